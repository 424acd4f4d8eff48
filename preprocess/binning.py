"""Exact binning: pure functions of arrays, no I/O.

Bins are half-open, [k*b, (k+1)*b), from t = 0. When the sample rate is known, spike
times are integer sample indices and the bin size in samples is an exact fraction
p/q, so a spike at sample s lies in bin floor(s*q/p), computed in integers: a spike on
an edge is counted once, in the later bin (the original MYOW code counts it twice).
For times in seconds (NWB), the edges are the float64 values stored in ``bin_start_s``
and each time is placed against exactly those edges.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

INT64_SAFE = _INT64_SAFE = 2**62  # sample index x bin-size denominator must stay below this


def to_fraction(value: str | float | int | Fraction) -> Fraction:
    """Exact fraction of a decimal given on the command line ("0.01" -> 1/100)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(repr(value))
    return Fraction(str(value))


def bin_starts_s(row0: int, row1: int, bin_size: Fraction) -> np.ndarray:
    """Start time in seconds of bins row0..row1-1: the correctly rounded k*b. (n,) float64."""
    k = np.arange(row0, row1, dtype=np.float64)
    # k*numerator is exact in float64 (< 2**53), so one division gives the rounded exact value
    return k * float(bin_size.numerator) / float(bin_size.denominator)


def first_sample(row: int, samples_per_bin: Fraction) -> int:
    """Smallest sample index s with floor(s / samples_per_bin) == row (ceil(row*p/q))."""
    p, q = samples_per_bin.numerator, samples_per_bin.denominator
    return -((-row * p) // q)


def n_bins_for_samples(last_sample: int, samples_per_bin: Fraction) -> int:
    """Number of bins needed so that sample ``last_sample`` falls inside the last one."""
    p, q = samples_per_bin.numerator, samples_per_bin.denominator
    return (last_sample * q) // p + 1


class BinOverflow(ValueError):
    """A bin holds more spikes than the requested counts dtype can hold."""


TILE_CELLS = 1 << 16  # bins x units counted at a time: the int64 tile (512 KiB) stays in L2


def count_samples(times: np.ndarray, unit_columns: np.ndarray, row0: int, n_rows: int, n_units: int,
                  samples_per_bin: Fraction, dtype: np.dtype | type = np.int64,
                  out: np.ndarray | None = None, times_checked: bool = False) -> np.ndarray:
    """Spike counts of one block of bins from integer sample times.

    Args:
        times: (S,) integer sample indices, sorted, all in
            [first_sample(row0), first_sample(row0+n_rows)).
        unit_columns: (S,) column of each spike's unit in the output, -1 for spikes to drop.
        row0, n_rows: the block's first bin and its number of bins.
        n_units: N, number of output columns.
        dtype: integer dtype of the result (the store's: uint16 / uint32).
        out: optional C-contiguous (n_rows, n_units) array of ``dtype`` to count into (a
            buffer reused from block to block saves the page faults of a fresh one).
        times_checked: the caller has checked that ``times`` are sorted and inside the block
            (the check is then not made again: a pass over every spike). Otherwise every
            time, kept or dropped, is checked.
    Returns:
        (n_rows, n_units) counts of ``dtype`` (``out`` when given; :func:`count_rows`).
    Raises:
        BinOverflow: a bin holds more spikes than ``dtype`` can hold.
    """
    p, q = samples_per_bin.numerator, samples_per_bin.denominator
    t = np.asarray(times)
    s0 = first_sample(row0, samples_per_bin)
    span = first_sample(row0 + n_rows, samples_per_bin) - s0
    if not times_checked and t.size and (int(t[0]) < s0 or int(t[-1]) >= s0 + span or np.any(t[1:] < t[:-1])):
        raise ValueError("spike times outside the block or not sorted")
    if q == 1 and span < 2**31:
        # whole samples per bin (the usual case): bin = (t - s0) // p exactly (s0 = row0 x p),
        # in int32 from the times as given (one pass; half the bytes of int64 and a 4x faster
        # division); the times are in [s0, s0 + span), so the offsets fit
        rows = np.subtract(t, t.dtype.type(s0), out=np.empty(t.size, np.int32), casting="unsafe")
        rows //= p
    else:
        t = t.astype(np.int64, copy=False)
        if t.size and int(t[-1]) * q >= _INT64_SAFE:
            raise OverflowError("sample index x bin-size denominator overflows int64")
        rows = (t * q) // p if q != 1 else t // p  # a new array: the in-place steps below never touch ``times``
        rows -= row0
    cols = np.asarray(unit_columns)
    keep = cols >= 0
    if not keep.all():
        rows, cols = rows[keep], cols[keep]
    return count_rows(rows, cols, n_rows, n_units, dtype, out)


def count_rows(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_units: int, dtype: np.dtype | type = np.int64,
               out: np.ndarray | None = None) -> np.ndarray:
    """Counts (n_rows, n_units) of ``dtype`` from each spike's block-relative row (S,),
    sorted and in [0, n_rows), and its column (S,) in [0, n_units). ``rows`` is overwritten
    (it becomes each spike's cell, row x N + column: computed once for the block, in place).

    Counted a tile of rows at a time into the result: one bincount over the whole block
    allocates (n_rows x N) int64 afresh (page faults on every block, then a cast and two
    more passes over it), which made counting 2x slower than the tiles.
    Raises BinOverflow when a bin holds more spikes than ``dtype`` can hold."""
    if out is None:
        out = np.empty((n_rows, n_units), dtype=dtype)
    elif out.shape != (n_rows, n_units) or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"count_rows: out must be C-contiguous ({n_rows}, {n_units}) {np.dtype(dtype)}")
    limit = np.iinfo(out.dtype).max
    tile = max(1, TILE_CELLS // max(1, n_units))
    starts = np.arange(0, n_rows + tile, tile)
    bounds = np.searchsorted(rows, np.minimum(starts, n_rows))  # spikes of each tile (rows are sorted)
    cells = rows
    if n_rows * n_units >= np.iinfo(cells.dtype).max:
        cells = cells.astype(np.int64)
    cells *= n_units
    cells += cols
    for i, r0 in enumerate(range(0, n_rows, tile)):
        r1 = min(r0 + tile, n_rows)
        a, b = int(bounds[i]), int(bounds[i + 1])
        tile_cells = cells[a:b]
        tile_cells -= r0 * n_units  # in place: each spike belongs to one tile
        counts = np.bincount(tile_cells, minlength=(r1 - r0) * n_units)
        if b - a > limit and counts.max() > limit:  # fewer spikes than the limit cannot overflow a bin
            raise BinOverflow(f"a bin holds more than {limit} spikes")
        out[r0:r1] = counts.reshape(r1 - r0, n_units)
    return out


def bin_index_seconds(times_s: np.ndarray, bin_size: Fraction) -> np.ndarray:
    """Bin of each time in seconds, exact against the edges of ``bin_starts_s``. (S,) int64."""
    t = np.asarray(times_s, dtype=np.float64)
    num, den = float(bin_size.numerator), float(bin_size.denominator)
    k = np.floor(t * den / num).astype(np.int64)
    # the division may round across an edge: correct against the stored float edges
    k -= t < k.astype(np.float64) * num / den
    k += t >= (k + 1).astype(np.float64) * num / den
    return k


def count_seconds(unit_times_s: list[np.ndarray], row0: int, n_rows: int, bin_size: Fraction) -> np.ndarray:
    """Counts of one block from per-unit spike times in seconds. Returns (n_rows, N) int64."""
    out = np.zeros((n_rows, len(unit_times_s)), dtype=np.int64)
    lo, hi = bin_starts_s(row0, row0 + n_rows + 1, bin_size)[[0, -1]]
    for col, times in enumerate(unit_times_s):
        times = np.asarray(times)
        a, b = np.searchsorted(times, [lo, hi], side="left")
        rows = bin_index_seconds(times[max(0, a - 1):b + 1], bin_size) - row0
        rows = rows[(rows >= 0) & (rows < n_rows)]
        out[:, col] = np.bincount(rows, minlength=n_rows)
    return out


def assign_trials(bin_start: np.ndarray, trial_start: np.ndarray, trial_stop: np.ndarray) -> np.ndarray:
    """Trial index of each bin (the bin's start lies in [start, stop)), -1 outside. (T,) int32.

    ``trial_start`` must be sorted and the intervals non-overlapping (checked by the caller).
    """
    idx = np.searchsorted(trial_start, bin_start, side="right") - 1
    inside = (idx >= 0) & (bin_start < trial_stop[np.clip(idx, 0, None)])
    return np.where(inside, idx, -1).astype(np.int32)


def accumulate_in_bins(sums: np.ndarray, counts: np.ndarray, timestamps: np.ndarray, values: np.ndarray,
                       bin_size: Fraction) -> None:
    """Add ``values`` (n, k) into the per-bin ``sums`` (T, k) float64 and ``counts`` (T,)
    float64 by the bin of each timestamp; samples outside [0, T) bins or not finite are
    skipped. Chunk by chunk, this averages a series of any length in O(T k) memory."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    n_rows = len(counts)
    rows = bin_index_seconds(timestamps, bin_size)
    keep = (rows >= 0) & (rows < n_rows) & np.isfinite(values).all(axis=1)
    rows, values = rows[keep], values[keep]
    counts += np.bincount(rows, minlength=n_rows)
    for j in range(values.shape[1]):
        sums[:, j] += np.bincount(rows, weights=values[:, j], minlength=n_rows)


def mean_of_bins(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(T, k) float32 means of :func:`accumulate_in_bins`' sums, NaN for empty bins."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def average_in_bins(timestamps: np.ndarray, values: np.ndarray, n_rows: int, bin_size: Fraction) -> np.ndarray:
    """Mean of ``values`` (n, k) over the samples whose timestamp falls in each bin.

    Returns (n_rows, k) float32 with NaN for bins without samples.
    """
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    sums, counts = np.zeros((n_rows, values.shape[1])), np.zeros(n_rows)
    accumulate_in_bins(sums, counts, timestamps, values, bin_size)
    return mean_of_bins(sums, counts)
