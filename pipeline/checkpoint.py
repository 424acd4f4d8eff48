"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict with fixed keys:

    model          MYOW state_dict (online and target networks)
    optimizer      optimizer state_dict
    step           completed optimizer steps (int)
    epoch          completed epochs (int)
    config         the resolved config as a plain dict
    normalization  {"mean": (N,), "std": (N,)} firing-rate z-scoring of the training data
    data           sampler states (generator states, epoch, cursor, permutation)
    rng            {"torch", "numpy", "python", "mining"[, "cuda"]} random states

Only tensors and plain Python types are stored, so loading needs no pickled classes.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from preprocess.errors import UserError

from .data.augment import normalizations_from

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_KEYS", "save_checkpoint", "load_checkpoint", "checkpoint_error",
           "state_dict_problem", "EVALUATE_FIX", "TRAIN_FIX", "rng_state", "set_rng_state", "atomic_write_text",
           "dir_write_error"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "step", "epoch", "config", "normalization", "data", "rng")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace:
    a reader (or a crash) never sees a half-written checkpoint."""
    missing = set(CHECKPOINT_KEYS) - set(checkpoint)
    if missing:
        raise ValueError(f"save_checkpoint: missing keys {sorted(missing)}")
    atomic_write(path, lambda f: torch.save(checkpoint, f), fsync=True)


EVALUATE_FIX = "train the run again (python -m pipeline.train) or pass another --run"
TRAIN_FIX = "delete it or use another run.dir"


def _unreadable_reason(err: Exception) -> str:
    """Why torch.load failed, in our words (torch's own text suggests weights_only=False,
    which would run arbitrary pickled code: never echoed)."""
    text = str(err)
    if "Unsupported global" in text or "GLOBAL" in text:
        return "it holds Python objects other than tensors and plain types, so pipeline.train did not write it"
    if "zip" in text.lower() or "central directory" in text:
        return "truncated or corrupt: not a complete torch archive"
    return "not a torch checkpoint file"


def checkpoint_error(path: str | os.PathLike, problem: str, fix: str = TRAIN_FIX) -> UserError:
    """The one-line error for a checkpoint that cannot be used: names the file and the fix."""
    problem = " ".join(str(problem).split())
    if len(problem) > 300:
        problem = problem[:297] + "..."
    return UserError(f"{path}: {problem}; {fix}")


def load_checkpoint(path: str | os.PathLike, fix: str = EVALUATE_FIX) -> dict:
    """Load a checkpoint on the CPU (weights_only=True); UserError when absent, unreadable
    or not shaped like a pipeline checkpoint (``fix``: what the message tells the user to do)."""
    path = Path(path)
    if path.is_dir():
        raise checkpoint_error(path, "is a directory, not a checkpoint file", fix)
    if path.is_symlink() and not path.exists():
        raise checkpoint_error(path, "is a broken symbolic link, not a checkpoint file", fix)
    if path.exists() and not path.is_file():
        raise checkpoint_error(path, "is not a regular file", fix)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there; train first (python -m pipeline.train) or fix --run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise checkpoint_error(path, "not a readable checkpoint (too large to load)", fix) from None
    except Exception as err:  # truncated file, foreign pickle, permissions, ...
        reason = (err.strerror or str(err)) if isinstance(err, OSError) else _unreadable_reason(err)
        raise checkpoint_error(path, f"not a readable checkpoint ({reason})", fix) from None
    if not isinstance(ckpt, dict) or set(CHECKPOINT_KEYS) - set(ckpt):
        raise checkpoint_error(path, f"not a pipeline checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)})", fix)
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise checkpoint_error(path, f"its step is {step!r}, not a count of steps", fix)
    for key in ("model", "optimizer", "config"):
        if not isinstance(ckpt[key], dict):
            raise checkpoint_error(path, f"its {key} is a {type(ckpt[key]).__name__}, not a mapping", fix)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise checkpoint_error(path, "its model is not a mapping of parameter names to tensors", fix)
    bad = [k for k, v in ckpt["config"].items() if not isinstance(v, dict)]
    if bad:
        raise checkpoint_error(path, f"its config section {bad[0]!r} is not a mapping", fix)
    return ckpt


def state_dict_problem(err: Exception) -> str:
    """The first line that says what is wrong in a load_state_dict error (e.g. a size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line), lines[0] if lines else type(err).__name__)
    return detail.rstrip(".")


def rng_state(mining: torch.Generator | None = None) -> dict:
    """Global torch/numpy/python random states (+ the mining generator) as plain types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if mining is not None:
        state["mining"] = mining.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, mining: torch.Generator | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if mining is not None and "mining" in state:
        mining.set_state(state["mining"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """The project's one atomic writer: ``write(f)`` into a temporary sibling of ``path``
    (``fsync`` it), then os.replace: a reader, or a crash, never sees a half-written file,
    and a failed write leaves the old file (or none) and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def dir_write_error(path: str | os.PathLike) -> OSError | None:
    """Why no file can be created in the directory ``path`` (None: one can), probed with an
    anonymous temporary file that leaves no trace (right for root and read-only mounts too,
    where os.access says yes)."""
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return err
    return None


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
