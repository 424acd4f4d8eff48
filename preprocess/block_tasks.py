"""What one worker does for one block of a recording: count it and write its rows of every
per-bin array (:func:`write_block`, run as a dask task by :mod:`preprocess.bin_spikes`).

Kept apart from the command's module so that the tasks pickle by reference: run as
``python -m preprocess.bin_spikes`` that module is ``__main__``, whose functions cloudpickle
copies by value into every task (with their module globals)."""

from __future__ import annotations

import threading

import numpy as np

from . import binning, sources
from .store import join_url, open_array


class CountOverflow(Exception):
    """A bin exceeded the dtype chosen for counts: rewrite with a wider dtype."""


def count_block(rec: sources.Recording, row0: int, row1: int, dtype: str) -> tuple[np.ndarray, int]:
    """(row1-row0, N) counts of ``dtype`` of one block, from whichever data the source has,
    and the number of spikes they hold.

    Raises CountOverflow when a bin does not fit ``dtype``."""
    if rec.phy is not None:  # counted straight into dtype, a cache-sized tile at a time
        try:
            return sources.count_phy_block(rec.phy, row0, row1, rec.n_units, dtype,
                                           sources.thread_buffer("counts", (row1 - row0, rec.n_units), dtype))
        except binning.BinOverflow as err:
            raise CountOverflow(str(err)) from None
    if rec.unit_times_s is not None:
        counts = sources.count_nwb_block(rec.unit_times_s, row0, row1, rec.bin_size)
    else:
        counts = np.asarray(rec.counts[row0:row1], dtype=np.int64)
    peak = int(counts.max()) if counts.size else 0
    if peak > np.iinfo(dtype).max:
        raise CountOverflow(peak)
    return counts.astype(dtype), int(counts.sum())


def write_block(rec: sources.Recording, store_url: str, storage_options: dict, row0: int, row1: int,
                dtype: str, attempt: str) -> int:
    """Count one block and write its rows of every per-bin array (its own shard/chunk of
    each). ``attempt`` names this creation of the arrays (:func:`opened_array`). Returns the
    number of spikes counted."""
    counts, n_spikes = count_block(rec, row0, row1, dtype)
    # write_empty_chunks: zarr otherwise tests every chunk for all-zeros before encoding,
    # which made writing a block ~2-3x slower than compressing it; a spike-free chunk costs
    # a few bytes once compressed, and reads back the same zeros
    opened_array(join_url(store_url, "counts"), storage_options, attempt, write_empty_chunks=True)[row0:row1] = counts
    for name, values in per_bin_block(rec, row0, row1).items():
        opened_array(join_url(store_url, name), storage_options, attempt)[row0:row1] = values
    return n_spikes


_OPENED = threading.local()


def opened_array(url: str, storage_options: dict, attempt: str, write_empty_chunks: bool = False):
    """The array at ``url``, opened once per thread (worker) and write attempt: opening
    reads and parses its zarr.json (~3 ms), which every block did for each of its arrays
    (~0.9 CPU s over a 12-hour recording's ~100 blocks x 3 arrays). A new ``attempt`` (the
    arrays recreated, e.g. as uint32 after an overflow) drops the thread's earlier ones."""
    cached = getattr(_OPENED, "arrays", None)
    if cached is None or cached[0] != attempt:
        cached = _OPENED.arrays = (attempt, {})
    arrays = cached[1]
    if url not in arrays:
        array = open_array(url, storage_options)
        arrays[url] = array.with_config({"write_empty_chunks": True}) if write_empty_chunks else array
    return arrays[url]


def per_bin_block(rec: sources.Recording, row0: int, row1: int) -> dict[str, np.ndarray]:
    """Rows [row0, row1) of every per-bin array (computed per block: memory stays bounded)."""
    if rec.bin_start_s is not None:
        bin_start = rec.bin_start_s[row0:row1]
    else:
        bin_start = binning.bin_starts_s(row0, row1, rec.bin_size)
    out = {"bin_start_s": bin_start}
    trial = rec.trial[row0:row1] if rec.trial is not None else np.full(row1 - row0, -1, dtype=np.int32)
    if rec.trials is not None:
        trial = binning.assign_trials(bin_start, rec.trials.start_s, rec.trials.stop_s)
        inside = trial >= 0
        for name, per_trial in rec.trials.labels.items():
            per_bin = np.full(row1 - row0, -1, dtype=np.int32)
            per_bin[inside] = per_trial[trial[inside]]
            out[f"labels/{name}"] = per_bin
    out["trial"] = trial
    for name, values in rec.labels.items():
        out[f"labels/{name}"] = values[row0:row1]
    for name, values in rec.behavior.items():
        out[f"behavior/{name}"] = np.asarray(values[row0:row1], dtype=np.float32).reshape(row1 - row0, -1)
    return out
