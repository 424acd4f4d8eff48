"""Binned ``.npz`` files: counts already binned (T, N), their bin size, and the per-bin
trial, bin start, label and behaviour arrays, checked and returned as a ``Recording``.
"""

from __future__ import annotations

import logging
import zipfile
from fractions import Fraction

import numpy as np

from . import binning
from .errors import UsageError, UserError
from .source_common import COUNT_MAX, DEFAULT_MAX_BINS, Recording, check_float32, check_n_bins, check_n_units

# log records keep the logger name they had before the split
log = logging.getLogger("preprocess.sources")


def read_npz(path: str, source: str, bin_size: Fraction | None, max_bins: int = DEFAULT_MAX_BINS) -> Recording:
    """A binned ``.npz``: ``counts`` (T, N) and ``bin_size`` (or --bin-size), optional ``trial``
    and ``bin_start_s``; other 1-D integer arrays -> labels, 2-D float arrays -> behaviour."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise UserError(f"{source}: not an .npz archive")
        arrays = {k: npz[k] for k in npz.files}
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{source}: not a readable .npz file ({type(err).__name__}: {err})")
    if "counts" not in arrays:
        raise UserError(f"{source}: array 'counts' is missing; a binned .npz needs counts (T, N)")
    counts = arrays.pop("counts")
    if counts.ndim != 2:
        raise UserError(f"{source}: 'counts' has shape {counts.shape}; expected 2 dimensions (time, unit)")
    if counts.dtype.kind not in "iuf":
        raise UserError(f"{source}: 'counts' has dtype {counts.dtype}; spike counts must be integers")
    n_rows = counts.shape[0]
    if n_rows == 0 or counts.shape[1] == 0:
        raise UserError(f"{source}: 'counts' is empty {counts.shape}")
    check_n_bins(n_rows, max_bins, f"{source}: 'counts' has {n_rows} rows (bins)")
    check_n_units(counts.shape[1], f"{source}: 'counts' has {counts.shape[1]} columns (units)")
    low, high = counts.min(), counts.max()
    if counts.dtype.kind == "f" and not (np.isfinite(low) and np.isfinite(high) and np.all(counts == np.round(counts))):
        raise UserError(f"{source}: 'counts' has dtype {counts.dtype} with non-integer values; spike counts "
                        "must be integers")
    if low < 0:
        raise UserError(f"{source}: 'counts' has negative values")
    if high > COUNT_MAX:
        row, col = np.unravel_index(int(np.argmax(counts)), counts.shape)
        raise UserError(f"{source}: 'counts'[{row}, {col}] is {high:.6g}, more than {COUNT_MAX}, the largest "
                        "count a store holds (uint32); check the file")
    if counts.dtype.kind == "f":
        counts = counts.astype(np.int64)
    file_bin = arrays.pop("bin_size", None)
    if file_bin is not None:
        value = float(file_bin.reshape(-1)[0]) if file_bin.size == 1 and file_bin.dtype.kind in "iuf" else None
        if value is None or not 1e-9 <= value <= 1e9:
            found = f"{file_bin.dtype} {file_bin.shape}" if value is None else repr(value)
            raise UserError(f"{source}: 'bin_size' must be one positive number of seconds (1e-9 to 1e9), found "
                            f"{found}; fix the file or drop the array and pass --bin-size")
        file_bin = binning.to_fraction(value)
        if bin_size is not None and bin_size != file_bin:
            raise UsageError(f"--bin-size {float(bin_size)} differs from the file's bin_size {float(file_bin)}; "
                             "a binned .npz cannot be re-binned: drop --bin-size")
        bin_size = file_bin
    if bin_size is None:
        raise UserError(f"{source}: no 'bin_size' array; pass --bin-size SECONDS")

    def per_bin(name: str, arr: np.ndarray) -> np.ndarray:
        if arr.ndim == 0:
            raise UserError(f"{source}: '{name}' is a scalar; it must be an array with one entry per bin "
                            f"({n_rows})")
        if arr.shape[0] != n_rows:
            raise UserError(f"{source}: '{name}' has {arr.shape[0]} rows but counts has {n_rows}; "
                            "every per-bin array needs one row per bin")
        return arr

    trial = arrays.pop("trial", None)
    if trial is not None:
        trial = per_bin("trial", trial)
        if trial.ndim != 1 or trial.dtype.kind not in "iu":
            raise UserError(f"{source}: 'trial' must be a 1-D integer array")
        if trial.size and (trial.min() < -1 or trial.max() > np.iinfo(np.int32).max):
            raise UserError(f"{source}: 'trial' values must be >= -1 (-1 = outside trials) and fit int32")
        trial = trial.astype(np.int32)
    bin_start = arrays.pop("bin_start_s", None)
    if bin_start is not None:
        bin_start = per_bin("bin_start_s", bin_start)
        if bin_start.dtype.kind not in "iuf":
            raise UserError(f"{source}: 'bin_start_s' has dtype {bin_start.dtype}; it must hold seconds (numbers)")
        bin_start = bin_start.astype(np.float64)
        if bin_start.ndim != 1 or not np.all(np.isfinite(bin_start)) or np.any(np.diff(bin_start) <= 0):
            raise UserError(f"{source}: 'bin_start_s' must be 1-D, finite and strictly increasing")
    labels, behavior = {}, {}
    for name, arr in arrays.items():
        if arr.ndim == 1 and arr.dtype.kind in "iub":
            labels[name] = per_bin(name, arr)
        elif arr.ndim in (1, 2) and arr.dtype.kind == "f":
            behavior[name] = per_bin(name, arr)
            check_float32(arr, f"{source}: '{name}'")
        elif arr.ndim == 0:
            log.info("scalar %r in %s is not stored", name, source)
        else:
            raise UserError(f"{source}: array '{name}' ({arr.shape}, {arr.dtype}) is neither a 1-D integer label "
                            "nor a 1-D/2-D float behaviour; remove it or convert it")
    n_units = counts.shape[1]
    max_count = int(counts.max()) if counts.size else 0
    return Recording(format="npz", path=source, bin_size=bin_size, n_rows=n_rows,
                     unit_ids=np.arange(n_units, dtype=np.int64),
                     unit_quality=np.array(["unsorted"] * n_units, dtype=object), files=[path],
                     counts=counts, trial=trial, labels=labels, behavior=behavior, bin_start_s=bin_start,
                     max_count_bound=max_count)
