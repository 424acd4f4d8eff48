"""Starting a run safely: checks that must pass before anything is written to run.dir.

The trainer (:func:`pipeline.loop.train`) calls these in order: the run directory's place
(:func:`check_run_dir`, writes nothing), the checkpoint's normalisation
(:func:`check_normalization`), the metrics endpoint (:func:`start_metrics`), the saved
states (:func:`load_resume`), and only then :func:`create_run_dir`. Each failure is one
``UserError`` line naming the file or key and the fix.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preprocess.errors import UserError

from .build import build_optimizer, uses_channels_last
from .checkpoint import (
    CHECKPOINT_NAME,
    TRAIN_FIX,
    atomic_write_text,
    check_normalization,
    checkpoint_error,
    dir_write_error,
    load_checkpoint,
    rng_state,
    set_rng_state,
    state_dict_problem,
)
from .cli import read_jsonl
from .config import Config, config_to_dict, dump_config
from .data.interface import TrainData
from .data.stages import derive_seed
from .distributed import DistEnv, barrier, broadcast_object, init_distributed, wrap_ddp
from .kinds import build_train_data
from .methods import MethodSpec, build_method
from .metrics import NullMetrics, make_metrics
from .runtime import default_run_dir, held_logs, seed_everything, set_threads
from .step import Plan

log = logging.getLogger("pipeline.train")

__all__ = ["check_run_dir", "create_run_dir", "start_metrics", "load_resume", "precheck_resume", "per_rank",
           "start_run", "Run"]


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
    _restore(ckpt_path, (("model weights", lambda: model.load_state_dict(resume["model"])),
                         ("optimizer state", lambda: optimizer.load_state_dict(resume["optimizer"])),
                         ("data stream state", lambda: data.load_state_dict(per_rank(resume["data"], env))),
                         ("random state", lambda: set_rng_state(per_rank(resume["rng"], env), mining_gen))))
    return int(resume["step"])


def precheck_resume(resume: dict, cfg: Config, method: MethodSpec, env: DistEnv, ckpt_path: Path) -> None:
    """Restore the checkpoint's model weights, optimizer and random states into a throwaway
    model before any data is read, so that a checkpoint that does not fit this run is one
    line before minutes of loading (and before any log line). The model's input comes from
    the checkpoint's normalisation (neural: units per session; images: channels); the data
    stream states need the data and are checked by :func:`load_resume`. The global random
    states are put back afterwards."""
    sizes = check_normalization(resume, None, ckpt_path)
    if sizes is not None:
        in_dim = sizes if len(sizes) > 1 else sizes[0]
    else:
        norm = resume.get("normalization")
        in_dim = norm.get("channels") if isinstance(norm, dict) else None
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or not 1 <= in_dim <= 4:
            return  # the real load (after the data) reports it
    saved = rng_state()
    try:
        model = method.build_model(cfg, in_dim)
        optimizer = build_optimizer(cfg, model.online_parameters())
        _restore(ckpt_path, (("model weights", lambda: model.load_state_dict(resume["model"])),
                             ("optimizer state", lambda: optimizer.load_state_dict(resume["optimizer"])),
                             ("random state", lambda: set_rng_state(per_rank(resume["rng"], env),
                                                                    torch.Generator()))))
    finally:
        set_rng_state(saved)


def _restore(ckpt_path: Path, parts) -> None:
    for what, load in parts:
        try:
            load()
        except UserError:
            raise
        except Exception as err:  # a size mismatch, missing keys, a wrong type, ...
            raise checkpoint_error(ckpt_path, f"its {what} cannot be restored into this run "
                                              f"({state_dict_problem(err)})", TRAIN_FIX) from None


def per_rank(state, env: DistEnv):
    """This rank's entry of a per-rank checkpoint list (older single-process checkpoints: the state)."""
    return state[env.rank] if isinstance(state, list) else state


def resolve_run_dir(cfg: Config, env: DistEnv) -> Path:
    """``run.dir``, or a new runs/<method>-<time> chosen by rank 0 and shared with every rank."""
    run_dir = Path(cfg.run.dir) if cfg.run.dir else (default_run_dir(cfg.method.name) if env.is_main else None)
    return Path(broadcast_object(str(run_dir), env))


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop JSON lines with a step after ``last_step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = [line for line, record in read_jsonl(path) if record.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


# Config keys that must match to resume a checkpoint: they change the data, the model or
# the meaning of a step. Everything else (train.max_steps, logging, metrics, threads, ...)
# may change between runs of the same run.dir.
RESUME_KEYS = ("data.path", "data.kind", "data.split", "data.min_speed", "data.jitter_max_bins", "images.transform",
               "images.image_size", "images.normalize", "images.train_split", "images.eval_split",
               "images.train_range", "images.eval_range", "images.eval_fraction", "images.shuffle_buffer", "model",
               "method", "optim.name", "optim.batch_size", "run.seed")


def check_resumable(checkpoint: dict, cfg: Config, world_size: int, ckpt_path: Path) -> None:
    """UserError when ``checkpoint`` was written by another world size or an incompatible config."""
    try:
        saved_world = int(checkpoint.get("world_size", 1))
    except (TypeError, ValueError):
        raise checkpoint_error(ckpt_path, f"its world_size is {checkpoint.get('world_size')!r}, not a count of "
                                          "ranks", TRAIN_FIX) from None
    if saved_world != world_size:
        raise UserError(f"{ckpt_path}: written by {saved_world} rank(s), this run has {world_size}; resume with "
                        f"--nproc_per_node={saved_world}, or use another run.dir to start over")
    old, new = checkpoint["config"], config_to_dict(cfg)
    for key in RESUME_KEYS:
        section, _, field = key.partition(".")
        if section not in old or (field and field not in old[section]):
            continue  # written before the key existed: nothing to compare
        a = old.get(section, {}) if not field else old.get(section, {}).get(field)
        b = new[section] if not field else new[section][field]
        if isinstance(a, dict) and isinstance(b, dict):  # keys the checkpoint predates: nothing to compare
            b = {k: v for k, v in b.items() if k in a}
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):  # name the first differing key of the section
                field = next((k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)), sorted(b)[0])
                key, a, b = f"{section}.{field}", a.get(field), b.get(field)
            raise UserError(f"{ckpt_path}: the checkpoint's {key} is {a!r}, this config has {b!r}; "
                            "resume with the same config, or use another run.dir to start over")


@dataclass
class Run:
    """A started run: what the loop needs, built by :func:`start_run`."""

    env: DistEnv
    device: torch.device
    run_dir: Path
    ckpt_path: Path
    metrics_path: Path
    resume_hint: str
    data: TrainData
    method: MethodSpec  # what the method needs from the data, its model and its step
    plan: Plan  # of the whole run; ``plans``: per session (its own mining time gap)
    plans: list[Plan]
    model: nn.Module  # the MYOW module
    net: nn.Module  # the module the step calls: ``model`` or its DDP wrapper
    optimizer: torch.optim.Optimizer
    mining_gen: torch.Generator
    metrics: NullMetrics
    channels_last: bool
    start: int  # first step to run (0, or the checkpoint's step)


def start_run(cfg: Config, data: TrainData | None = None, env: DistEnv | None = None,
              resume_hint: str | None = None) -> Run:
    """Check, load and build everything a run needs, then create its run directory.

    Nothing is written to the run directory (not even its mkdir) until the run has started:
    data read, model built, checkpoint states loaded, metrics endpoint bound. A start-up
    failure after that removes what this call created.
    """
    env = env or init_distributed(cfg.run.device)
    threads = set_threads(cfg.run.threads)
    # Subnormal floats (tiny EMA/Adam updates late in training) are ~100x slower on x86 CPUs;
    # flushing them to 0 made the CPU MYOW step ~25% faster and changes nothing measurable.
    torch.set_flush_denormal(True)
    device = env.device
    run_dir = resolve_run_dir(cfg, env)
    if env.is_main:
        check_run_dir(run_dir)  # a file, an unwritable place: refused before any work
    if resume_hint is None:
        resume_hint = ("rerun the same command to resume" if cfg.run.dir else
                       f"rerun with --set run.dir={run_dir} to resume")
    ckpt_path = run_dir / CHECKPOINT_NAME
    resume = None
    if cfg.run.resume and (ckpt_path.exists() or ckpt_path.is_symlink()):
        resume = load_checkpoint(ckpt_path, fix=TRAIN_FIX)
        check_resumable(resume, cfg, env.world_size, ckpt_path)
    method = build_method(cfg)
    if resume:  # its normalisation, weights, optimizer and random states, before any data is read
        precheck_resume(resume, cfg, method, env, ckpt_path)

    metrics = start_metrics(cfg, env)  # a busy port or bad host fails before minutes of data loading
    created: Path | None = None
    config_path = run_dir / "config.yaml"
    had_config = config_path.exists()
    metrics_path = run_dir / "metrics.jsonl"
    # INFO lines of the data loading are held until the run has started: a run refused
    # after loading says one line (the error)
    with held_logs():
        try:
            # the stored normalisation (a checkpoint's state) is reused as is: before the run dir,
            # so a bad store or shard set leaves nothing behind
            data = data or build_train_data(cfg, normalization=resume["normalization"] if resume else None,
                                            rank=env.rank, world_size=env.world_size,
                                            progress=cfg.run.progress and env.is_main, needs=method.needs)
            if resume and resume.get("data_kind", "neural") != data.kind:
                raise UserError(f"{ckpt_path}: written by a run on {resume.get('data_kind', 'neural')} data, data.path "
                                f"is {data.kind} data; resume with the same data, or use another run.dir to start over")
            if data.kind == "images" and device.type == "cpu":  # leave a core to the augmenting threads
                threads = set_threads(cfg.run.threads, images=True)
            if device.type == "cuda":
                data.pin_memory()
            plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
            plans = [dataclasses.replace(plan, min_time_gap_s=s.min_time_gap_s) for s in data.sessions]
            seed_everything(cfg.run.seed)  # model initialisation: the same on every rank
            model = method.build_model(cfg, data.model_input()).to(device)
            channels_last = uses_channels_last(cfg, device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = build_optimizer(cfg, model.online_parameters())
            mining_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 3, env.rank))
            start = 0
            if resume:
                check_normalization(resume, data, ckpt_path)
                start = load_resume(resume, model, optimizer, data, mining_gen, env, ckpt_path)
                log.info("resuming %s at step %d", run_dir, start)
            # DDP after loading: it broadcasts rank 0's weights at construction
            net = wrap_ddp(model, env, sync_bn=cfg.run.sync_bn, find_unused_parameters=data.multi)
            if env.is_main:  # the run has started: only now is the run directory written
                created = create_run_dir(run_dir)
                try:
                    atomic_write_text(config_path, dump_config(cfg))
                    for path in (metrics_path, run_dir / "evaluations.jsonl"):
                        if resume:
                            trim_metrics(path, start)  # lines written after the checkpoint are written again
                        elif path.exists():
                            path.unlink()
                except OSError as err:
                    raise UserError(f"run.dir {run_dir}: cannot write it ({err.strerror or err}); "
                                    "choose another run.dir") from None
            barrier(env)
        except BaseException:
            metrics.close()
            if data is not None:
                data.close()
            if env.is_main:  # leave nothing this call created
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                elif not had_config and config_path.exists():
                    config_path.unlink()
            raise
    log.info("run %s: %s, %d steps (%d per epoch), %d rank(s), device %s, %d threads",
             run_dir, cfg.method.name, plan.total_steps, plan.steps_per_epoch, env.world_size, device, threads)
    return Run(env, device, run_dir, ckpt_path, metrics_path, resume_hint, data, method, plan, plans, model, net, optimizer,
               mining_gen, metrics, channels_last, start)
