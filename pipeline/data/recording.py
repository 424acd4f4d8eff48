"""One recording store (docs/contracts.md section 4) as the pipeline sees it.

Everything per bin except the counts (times, trials, labels, behaviour: a few bytes per
bin) is read into memory when the store is opened; it drives splits, jitter pairs,
exclusion and evaluation. The counts are either read once into memory
(:meth:`Recording.load_rates`, small stores) or read block by block through
:class:`CountsReader` (large stores, any fsspec URL), which retries transient errors and
turns permanent ones (store deleted, corrupt chunk, no credentials) into one clear line.
"""

from __future__ import annotations

import functools

import errno
import logging
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.store import filesystem, iter_arrays, join_url, open_recording

from .stages import retry

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

__all__ = ["Recording", "CountsReader", "ArrayReader", "packed_counts", "unpacked_counts", "open_store", "load_recording", "hand_speed", "split_rows", "trial_ranks", "SPLITS",
           "is_transient"]

# Errors of a network or a busy server (s3fs/aiobotocore/aiohttp): worth another try.
_TRANSIENT_NAMES = ("Timeout", "Connection", "Throttl", "SlowDown", "ServiceUnavailable", "InternalError",
                    "ServerDisconnected", "ClientPayloadError", "IncompleteRead", "RequestTimeTooSkewed")
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}


def is_transient(err: BaseException) -> bool:
    """True for errors a retry can cure (timeouts, dropped connections, throttling); False
    for missing keys/files, permissions, credentials and corrupt data."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, KeyError, ValueError, TypeError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    names = [type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None]
    return any(key in name for name in names for key in _TRANSIENT_NAMES)


class CountsReader:
    """Row blocks of a store's ``counts`` as float32 firing rates (Hz), safe to call from threads.

    zarr reads a missing chunk as zeros, so a block that comes back all zero is only
    accepted when the store's root ``zarr.json`` is still there: a store deleted mid-run
    is an error, not a silent run on zeros.
    """

    def __init__(self, url: str, storage_options: dict | None, array, bin_size_s: float, attempts: int = 5):
        self.url, self.array, self.attempts = url, array, attempts
        self.scale = np.float32(1.0 / bin_size_s)
        self.n_rows, self.n_units = array.shape
        self.chunk_rows = int(array.chunks[0])
        self.fs, root = filesystem(url, storage_options)
        self.marker = join_url(root, "zarr.json")

    def _read_once(self, start: int, stop: int) -> np.ndarray:
        counts = self.array[start:stop]
        if counts.shape != (stop - start, self.n_units):
            raise ValueError(f"got shape {counts.shape}, expected {(stop - start, self.n_units)}")
        # zarr reads a missing chunk as zeros: an all-zero block (rare in real data) may be a
        # store deleted under us, so only then is the store's root checked (one request, not
        # one per block)
        if not counts.any() and not self.fs.exists(self.marker):
            raise FileNotFoundError(f"{self.marker} is gone")
        return counts

    def read_counts(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, N) counts of rows [start, stop) in the store's dtype; UserError
        naming the store when the read fails for good (transient errors are retried)."""
        try:
            return retry(lambda: self._read_once(start, stop), attempts=self.attempts, transient=is_transient,
                         what=f"{self.url} rows {start}:{stop}")
        except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the store
            raise UserError(f"{self.url}: reading counts rows {start}:{stop} failed ({type(err).__name__}: {err}); "
                            "the store was moved, deleted or is corrupt, or the storage is unreachable: "
                            "check it (or re-create it with preprocess.bin_spikes) and rerun to resume") from None

    def read(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, N) float32 rates (Hz) of rows [start, stop)."""
        return self.to_rates(packed_counts(self.read_counts(start, stop)))

    def to_rates(self, packed: torch.Tensor) -> torch.Tensor:
        """Rates (float32, Hz) from counts packed by :func:`packed_counts`."""
        return unpacked_counts(packed).to(torch.float32).mul_(self.scale)

    def read_rows(self, rows: np.ndarray, block_rows: int) -> torch.Tensor:
        """(len(rows), N) packed counts of arbitrary rows, read one block at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        parts, where = [], []
        if len(rows):
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            cuts = np.flatnonzero(np.diff(sorted_rows // block_rows)) + 1
            for part in np.split(np.arange(len(rows)), cuts):
                lo, hi = int(sorted_rows[part[0]]), int(sorted_rows[part[-1]]) + 1
                parts.append(packed_counts(self.read_counts(lo, hi))[torch.from_numpy(sorted_rows[part] - lo)])
                where.append(order[part])
        if not parts:
            return packed_counts(np.zeros((0, self.n_units), dtype=np.uint16))
        out = torch.cat(parts)
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(where)] = np.arange(len(rows))
        return out[torch.from_numpy(inverse)]


def packed_counts(counts: np.ndarray) -> torch.Tensor:
    """Unsigned counts as a signed torch tensor of the same width (uint16 -> int16 bits),
    for torch ops (indexing, copies) that do not support unsigned types: half the memory
    of float32 rates in shuffle buffers. Undo with :func:`unpacked_counts`."""
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32, np.dtype(np.uint8): np.int8}
    kind = signed.get(counts.dtype)
    return torch.from_numpy(np.ascontiguousarray(counts).view(kind) if kind else np.ascontiguousarray(counts))


def unpacked_counts(packed: torch.Tensor) -> torch.Tensor:
    """The counts (as int32/int64) from :func:`packed_counts`."""
    mask = {torch.int8: (torch.int32, 0xFF), torch.int16: (torch.int32, 0xFFFF),
            torch.int32: (torch.int64, 0xFFFFFFFF)}.get(packed.dtype)
    if mask is None:
        return packed
    return packed.to(mask[0]).bitwise_and_(mask[1])


class ArrayReader(CountsReader):
    """A CountsReader over counts already in memory ((T, N) array): the block streams on
    data that needs no storage (tests, generated data)."""

    def __init__(self, counts: np.ndarray, bin_size_s: float, chunk_rows: int = 64, url: str = "<memory>"):
        self.url, self.attempts, self.counts = url, 1, counts
        self.scale = np.float32(1.0 / bin_size_s)
        self.n_rows, self.n_units = counts.shape
        self.chunk_rows = int(chunk_rows)

    def _read_once(self, start: int, stop: int) -> np.ndarray:
        return self.counts[start:stop]


@dataclass
class Recording:
    """One recording store: per-bin metadata in memory, counts in memory or read on demand.

    T rows (bins), N units. ``rates`` is the (T, N) float32 firing rates in Hz when the
    counts were loaded into memory, else None (read through ``reader``).
    """

    url: str
    bin_start_s: np.ndarray  # (T,) float64
    trial: np.ndarray  # (T,) int64, -1 = outside trials
    labels: dict[str, np.ndarray]  # name -> (T,) int64
    behavior: dict[str, np.ndarray]  # name -> (T, k) float32
    bin_size_s: float
    reader: CountsReader | None = None
    rates: torch.Tensor | None = None
    store_id: int = 0
    _n_units: int = field(default=0, repr=False)

    @property
    def n_rows(self) -> int:
        return len(self.trial)

    @property
    def n_units(self) -> int:
        return self.rates.shape[1] if self.rates is not None else self._n_units

    @property
    def counts_nbytes_float32(self) -> int:
        """Bytes the counts take as float32 rates in memory."""
        return self.n_rows * self.n_units * 4

    @property
    def in_memory(self) -> bool:
        return self.rates is not None

    @property
    def has_trials(self) -> bool:
        return bool((self.trial >= 0).any())

    @functools.cached_property
    def trial_rank(self) -> np.ndarray:
        """(T,) int64: each row's trial numbered in recording order (by its first row, as
        :func:`split_rows` orders them), -1 outside trials; what ``data.min_trial_gap``
        counts in."""
        return trial_ranks(self.trial)

    @property
    def main_label(self) -> str | None:
        """``target`` when present, else the first label by name, else None."""
        if "target" in self.labels:
            return "target"
        return min(self.labels) if self.labels else None

    def load_rates(self) -> "Recording":
        """Read all counts into memory (``rates``); returns self."""
        if self.rates is None:
            self.rates = self.reader.read(0, self.n_rows).contiguous()
        return self

    def read_rates(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, N) float32 rates of rows [start, stop)."""
        return self.rates[start:stop] if self.rates is not None else self.reader.read(start, stop)

    def iter_rates(self, block_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rates of a block) over all rows in order, chunk-aligned blocks."""
        step = block_rows or (self.reader.chunk_rows if self.reader else self.n_rows) or 1
        for start in range(0, self.n_rows, step):
            yield start, self.read_rates(start, min(start + step, self.n_rows))

    def meta(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact metadata of store rows (n,) int64: store, time (bin_start_s), trial, trial_rank, row [, label]."""
        r = rows.numpy()
        out = {"store": torch.full((len(r),), self.store_id, dtype=torch.int64),
               "time": torch.from_numpy(self.bin_start_s[r]),
               "trial": torch.from_numpy(self.trial[r]),
               "trial_rank": torch.from_numpy(self.trial_rank[r]),
               "row": rows.clone()}
        if self.main_label is not None:
            out["label"] = torch.from_numpy(self.labels[self.main_label][r])
        return out


def open_store(url: str, storage_options: dict | None = None, store_id: int = 0, attempts: int = 5) -> Recording:
    """Open a recording store: metadata into memory, counts behind a reader (not read yet)."""
    group = open_recording(url, storage_options)
    bin_size = group.attrs.get("bin_size_s")
    if not isinstance(bin_size, (int, float)) or bin_size <= 0:
        raise UserError(f"{url}: attribute 'bin_size_s' is {bin_size!r}; expected a positive number of seconds")
    labels, behavior = {}, {}
    try:
        for name, arr in iter_arrays(group):
            if name.startswith("labels/"):
                labels[name.split("/", 1)[1]] = np.asarray(arr[...], dtype=np.int64)
            elif name.startswith("behavior/"):
                values = np.asarray(arr[...], dtype=np.float32)
                behavior[name.split("/", 1)[1]] = values[:, None] if values.ndim == 1 else values
        bin_start_s = np.asarray(group["bin_start_s"][...], dtype=np.float64)
        trial = np.asarray(group["trial"][...], dtype=np.int64)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{url}: cannot read the per-bin arrays ({type(err).__name__}: {err}); "
                        "the store is corrupt or unreachable")
    counts = group["counts"]
    reader = CountsReader(url, storage_options, counts, float(bin_size), attempts)
    return Recording(url=url, bin_start_s=bin_start_s, trial=trial, labels=labels, behavior=behavior,
                     bin_size_s=float(bin_size), reader=reader, store_id=store_id, _n_units=int(counts.shape[1]))


def load_recording(url: str, storage_options: dict | None = None, store_id: int = 0) -> Recording:
    """Open a store and read its counts into memory (small stores, evaluation, baselines)."""
    return open_store(url, storage_options, store_id).load_rates()


def hand_speed(rec: Recording) -> np.ndarray | None:
    """(T,) norm of ``behavior/velocity`` (cm/s), or None when the store has no velocity."""
    vel = rec.behavior.get("velocity")
    return None if vel is None else np.linalg.norm(vel.astype(np.float64), axis=1)


def _cut(n: int, fractions) -> tuple[int, int]:
    """Numbers of items in train and train+val for ``n`` items (floor, train >= 1)."""
    f_train, f_val = float(fractions[0]), float(fractions[1])
    n_train = max(1, int(np.floor(n * f_train + 1e-9)))
    n_trainval = max(n_train, int(np.floor(n * (f_train + f_val) + 1e-9)))
    return n_train, min(n_trainval, n)


def trial_ranks(trial: np.ndarray) -> np.ndarray:
    """(T,) int64 rank of each row's trial in recording order (ordered by first row), -1 outside trials."""
    trial = np.asarray(trial)
    out = np.full(trial.shape[0], -1, dtype=np.int64)
    inside = trial >= 0
    if inside.any():
        ids, first = np.unique(trial[inside], return_index=True)
        rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
        out[inside] = rank[np.searchsorted(ids, trial[inside])]
    return out


def split_rows(trial: np.ndarray, fractions=(0.7, 0.1, 0.2)) -> dict[str, np.ndarray]:
    """Split store rows into train/val/test by time, never by random rows.

    With trials: trials are ordered by their first row (recording order); the first
    ``floor(n * f_train)`` trials are train, the next ones up to ``floor(n * (f_train +
    f_val))`` val, the rest test. A row outside trials (-1) goes with the last trial
    before it (the first trial's split before the first trial). Without trials: the
    first ``floor(T * f_train)`` rows are train, then val, then test (time blocks).

    Args:
        trial: (T,) int trial id per row, -1 = none.
        fractions: (train, val, test), summing to 1.

    Returns:
        {"train", "val", "test"} -> sorted int64 row indices; every row in exactly one.
    """
    trial = np.asarray(trial)
    T = trial.shape[0]
    split_of = np.zeros(T, dtype=np.int8)
    in_trial = trial >= 0
    if in_trial.any():
        rank = trial_ranks(trial)[in_trial]  # recording order of each row's trial
        n_trials = int(rank.max()) + 1
        n_train, n_trainval = _cut(n_trials, fractions)
        split_of_rank = np.zeros(n_trials, dtype=np.int8)
        split_of_rank[n_train:n_trainval] = 1
        split_of_rank[n_trainval:] = 2
        row_split = split_of_rank[rank]
        rows_in = np.flatnonzero(in_trial)
        # rows outside trials follow the last trial row before them
        last = np.maximum.accumulate(np.where(in_trial, np.arange(T), -1))
        last[last < 0] = rows_in[0]
        split_of[:] = row_split[np.searchsorted(rows_in, last)]
    elif T:
        n_train, n_trainval = _cut(T, fractions)
        split_of[n_train:n_trainval] = 1
        split_of[n_trainval:] = 2
    return {name: np.flatnonzero(split_of == i).astype(np.int64) for i, name in enumerate(SPLITS)}
