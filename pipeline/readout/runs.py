"""A saved run for evaluation: its config and checkpoint (:func:`load_run`) and the
``--export-embeddings`` target, checked before the work and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from preprocess.errors import UserError

from ..checkpoint import CHECKPOINT_NAME, EVALUATE_FIX, atomic_write, checkpoint_error, dir_write_error, load_checkpoint
from ..config import Config, ConfigError, build_config

# --------------------------------------------------------------------------- run-level


def load_run(run_dir: str | os.PathLike) -> tuple[Config, dict]:
    """(config, checkpoint) of a run directory; UserError naming what is missing or unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise UserError(f"--run {run_dir}: is a file, not a run directory; pass the directory that holds "
                            "checkpoint.pt")
        raise UserError(f"--run {run_dir}: no such run directory")
    path = run_dir / CHECKPOINT_NAME
    ckpt = load_checkpoint(path, fix=EVALUATE_FIX)
    try:
        cfg = build_config(ckpt["config"])
    except ConfigError as err:
        raise checkpoint_error(path, f"its stored config is not valid ({err})", EVALUATE_FIX) from None
    return cfg, ckpt


def export_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The ``--export-embeddings`` path, checked before any work: UserError when it is a
    directory, an existing file (unless ``overwrite``), or its directory is missing or not
    writable."""
    path = Path(path)
    flag = f"--export-embeddings {path}"
    if path.is_dir():
        raise UserError(f"{flag}: is a directory; give a file name (e.g. {path / 'embeddings.npz'})")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"{flag}: exists and is not a regular file; choose another file")
        if not overwrite:
            raise UserError(f"{flag}: the file already exists; pass --overwrite to replace it or choose another file")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag}: directory {parent} does not exist; create it or choose another location")
    if dir_write_error(parent) is not None:
        raise UserError(f"{flag}: directory {parent} is not writable; choose another location")
    return path


def export_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``--export-embeddings``: ``arrays`` in one .npz, written atomically (a temporary
    sibling, then os.replace), so a failed export leaves nothing behind. The target was
    checked (and an existing file allowed or refused) by :func:`export_target` beforehand."""
    path = export_target(path, overwrite=True)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise UserError(f"--export-embeddings {path}: cannot write it ({err.strerror or err}); "
                        "choose another location") from None


