"""Starting a run safely: checks that must pass before anything is written to run.dir.

The trainer (:func:`pipeline.train.train`) calls these in order: the run directory's place
(:func:`check_run_dir`, writes nothing), the checkpoint's normalisation
(:func:`check_normalization`), the metrics endpoint (:func:`start_metrics`), the saved
states (:func:`load_resume`), and only then :func:`create_run_dir`. Each failure is one
``UserError`` line naming the file or key and the fix.
"""

from __future__ import annotations

import errno
import shutil
import socket
from pathlib import Path

import torch
from torch import nn

from preprocess.errors import UserError

from .checkpoint import TRAIN_FIX, checkpoint_error, dir_write_error, set_rng_state, state_dict_problem
from .config import Config
from .data import normalizations_from
from .distributed import DistEnv
from .metrics import NullMetrics, make_metrics

__all__ = ["check_run_dir", "create_run_dir", "start_metrics", "load_resume", "check_normalization", "per_rank"]


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path) -> None:
    """UserError unless ``run_dir`` is a writable directory or can be created as one.

    Writes nothing (:func:`pipeline.checkpoint.dir_write_error` probes writability)."""
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise UserError(f"run.dir {run_dir}: exists and is not a directory; choose another run.dir")
        where, what = run_dir, "the directory is not writable"
    else:
        where = nearest_existing(run_dir)
        if not where.is_dir():
            raise UserError(f"run.dir {run_dir}: cannot create it, {where} is a file; choose another run.dir")
        what = f"cannot create it, {where} is not writable"
    err = dir_write_error(where)
    if err is not None:
        reason = f" ({err.strerror})" if err.strerror and err.errno != errno.ENOENT else ""
        raise UserError(f"run.dir {run_dir}: {what}{reason}; choose another run.dir or fix its permissions")


def create_run_dir(run_dir: Path) -> Path | None:
    """mkdir -p ``run_dir``; returns the top-most directory this created (None: it existed)."""
    missing, path = [], run_dir.absolute()
    while not (path.exists() or path.is_symlink()):
        missing.append(path)
        path = path.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if missing and missing[-1].exists():
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise UserError(f"run.dir {run_dir}: cannot create it ({err.strerror or err}); choose another run.dir") from None
    return missing[-1] if missing else None


def start_metrics(cfg: Config, env: DistEnv) -> NullMetrics:
    """The rank's Prometheus endpoint, bound (or NullMetrics); UserError naming metrics.host
    or metrics.port when it cannot be served."""
    host, port = cfg.metrics.host, cfg.metrics.port
    if not port:
        return NullMetrics()
    fix = "use an address of this machine (127.0.0.1, or 0.0.0.0 for every interface), or metrics.port=0 to disable"
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as err:
        reason = getattr(err, "strerror", None) or "not a valid host name"
        raise UserError(f"metrics.host {host!r}: not a known host name or address ({reason}); {fix}") from None
    try:
        return make_metrics(host, port, env.rank, env.world_size)
    except OverflowError:
        raise UserError(f"metrics.port {port}: port + LOCAL_RANK is beyond 65535; choose a lower metrics.port") from None
    except UserError:
        family, kind, proto, _, address = infos[0]
        try:  # the host itself cannot be bound (not an address of this machine): name the host
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
        except OSError as err:
            raise UserError(f"metrics.host {host!r}: cannot serve metrics there ({err.strerror or err}); {fix}") from None
        raise


def load_resume(resume: dict, model: nn.Module, optimizer: torch.optim.Optimizer, data, mining_gen: torch.Generator,
                 env: DistEnv, ckpt_path: Path) -> int:
    """Restore the checkpoint's states; UserError naming checkpoint.pt when one does not fit."""
    parts = (("model weights", lambda: model.load_state_dict(resume["model"])),
             ("optimizer state", lambda: optimizer.load_state_dict(resume["optimizer"])),
             ("data stream state", lambda: data.load_state_dict(per_rank(resume["data"], env))),
             ("random state", lambda: set_rng_state(per_rank(resume["rng"], env), mining_gen)))
    for what, load in parts:
        try:
            load()
        except UserError:
            raise
        except Exception as err:  # a size mismatch, missing keys, a wrong type, ...
            raise checkpoint_error(ckpt_path, f"its {what} cannot be restored into this run "
                                              f"({state_dict_problem(err)})", TRAIN_FIX) from None
    return int(resume["step"])


def check_normalization(resume: dict, data, ckpt_path: Path, fix: str = TRAIN_FIX) -> list[int] | None:
    """A neural checkpoint's normalisation: one (N,) mean and std per session, N = the
    session's units when ``data`` is given (before it is used; images store their own kind
    of state: None). Returns the unit counts N per session; ``fix`` ends the error line."""
    if resume.get("data_kind", "neural") == "images":
        return None
    try:
        norms = normalizations_from(resume["normalization"])
        norms = norms if isinstance(norms, list) else [norms]
        sizes = [int(n.mean.shape[0]) for n in norms]
        if any(n.mean.dim() != 1 or n.std.shape != n.mean.shape for n in norms):
            raise ValueError("mean and std must be (N,) vectors")
    except Exception as err:
        raise checkpoint_error(ckpt_path, f"its normalization is not usable ({type(err).__name__}: {err})",
                               fix) from None
    if data is not None:
        inputs = data.model_input()
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if sizes != inputs:
            raise checkpoint_error(ckpt_path, f"its normalization is for {sizes} units, data.path has {inputs}",
                                   fix)
    return sizes


def per_rank(state, env: DistEnv):
    """This rank's entry of a per-rank checkpoint list (older single-process checkpoints: the state)."""
    return state[env.rank] if isinstance(state, list) else state
