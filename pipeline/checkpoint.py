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
from pathlib import Path

import numpy as np
import torch

from preprocess.errors import UserError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_KEYS", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "atomic_write_text"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "step", "epoch", "config", "normalization", "data", "rng")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace:
    a reader (or a crash) never sees a half-written checkpoint."""
    missing = set(CHECKPOINT_KEYS) - set(checkpoint)
    if missing:
        raise ValueError(f"save_checkpoint: missing keys {sorted(missing)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU (weights_only=True); UserError when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there; train first (python -m pipeline.train) or fix --run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})")
    if not isinstance(ckpt, dict) or set(CHECKPOINT_KEYS) - set(ckpt):
        raise UserError(f"{path}: not a pipeline checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
