"""What the source readers share: the ``Recording`` they return (with its ``Trials`` and
``PhySpikes`` parts), the bounds every reader enforces, format detection, the local copy of
a remote source, content hashing, and the TSV/label/trials-table helpers.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .errors import UserError
from .store import filesystem, is_local, local_path

UNIT_SELECTIONS = {"good": ("good",), "mua": ("good", "mua"), "all": None}
HASH_PIECE_BYTES = 64 << 20
# documented bounds (README, --help): refused before anything of that size is allocated
DEFAULT_MAX_BINS = 2**31  # rows of the store (--max-bins)
MAX_UNITS = 2**16  # units of the store, and distinct cluster ids in spike_clusters.npy
INT32 = np.iinfo(np.int32)
COUNT_MAX = int(np.iinfo(np.uint32).max)  # the widest count dtype of a store


@dataclass
class Trials:
    """A trials table: (n,) float64 start/stop in seconds, sorted and non-overlapping, and
    per-trial integer label columns (with category names for text columns)."""

    start_s: np.ndarray
    stop_s: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class PhySpikes:
    """Spike data of a Phy folder, left on disk: integer sample times (sorted) and clusters."""

    times_path: str
    clusters_path: str
    n_spikes: int
    samples_per_bin: Fraction
    unit_ids: np.ndarray  # (N,) int64 sorted cluster ids of the kept units: column i holds unit_ids[i]
    # (max(unit_ids)+1,) int32 column of each cluster id, -1 for dropped ones; None when the ids are
    # too large for a dense table (then columns are found in unit_ids by binary search)
    cluster_to_column: np.ndarray | None = None
    # every cluster that spikes in the file is a kept unit (--units all, or a fully labelled
    # selection): a block then counts every spike it reads, without a pass to count them
    keeps_every_cluster: bool = False
    # cluster_to_column is the identity (ids 0..N-1, all kept): a spike's column is its id
    columns_are_ids: bool = False


@dataclass
class Recording:
    """A source, validated and ready to be binned and written.

    Exactly one of ``counts`` (already binned, (T, N)), ``phy`` or ``unit_times_s`` is set.
    """

    format: str
    path: str
    bin_size: Fraction
    n_rows: int
    unit_ids: np.ndarray
    unit_quality: np.ndarray
    files: list[str]
    sample_rate_hz: float | None = None
    counts: np.ndarray | None = None
    phy: PhySpikes | None = None
    unit_times_s: list[np.ndarray] | None = None
    trial: np.ndarray | None = None
    trials: Trials | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_categories: dict[str, list[str]] = field(default_factory=dict)
    behavior: dict[str, np.ndarray] = field(default_factory=dict)
    bin_start_s: np.ndarray | None = None
    # a bound of any bin's count, to pick the dtype; 0 = unknown: start with uint16, and the
    # writer rewrites as uint32 if a block overflows (counts never wrap)
    max_count_bound: int = 0
    expected_spikes: int | None = None  # spikes of the selected units, checked against the written counts

    @property
    def n_units(self) -> int:
        return len(self.unit_ids)


# --------------------------------------------------------------------------- detection


def detect_format(source: str, storage_options: dict | None = None) -> str:
    fs, path = filesystem(source, storage_options)
    try:
        if not fs.exists(path):
            raise UserError(f"{source}: no such file or directory; check the SOURCE path")
        if fs.isdir(path):
            if fs.exists(f"{path}/spike_times.npy"):
                return "phy"
            raise UserError(f"{source}: a folder without spike_times.npy is not a Phy/Kilosort output; "
                            "pass a Phy folder, an .nwb or an .npz file (or force one with --format)")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{source}: cannot read ({type(err).__name__}: {err}); check the path and --storage-options")
    lower = path.lower()
    for ext, fmt in ((".nwb", "nwb"), (".npz", "npz")):
        if lower.endswith(ext):
            return fmt
    raise UserError(f"{source}: unknown format (expected a Phy folder, .nwb or .npz); force one with --format")


class LocalCopy:
    """Local path of a source; remote sources are copied to a temporary folder first
    (memory-mapping and HDF5 need a local file). Use as a context manager."""

    def __init__(self, source: str, storage_options: dict | None = None):
        self.source = source
        self.storage_options = storage_options
        self.tmp: str | None = None

    def __enter__(self) -> str:
        if is_local(self.source):
            return local_path(self.source)
        fs, path = filesystem(self.source, self.storage_options)
        self.tmp = tempfile.mkdtemp(prefix="myow-source-")
        target = os.path.join(self.tmp, os.path.basename(path.rstrip("/")) or "source")
        try:
            if fs.isdir(path):
                os.makedirs(target)
                for remote in fs.ls(path, detail=False):
                    name = os.path.basename(remote.rstrip("/"))
                    if name.endswith((".npy", ".tsv", ".py")):
                        fs.get(remote, os.path.join(target, name))
            else:
                fs.get(path, target)
        except Exception as err:
            raise UserError(f"{self.source}: cannot download ({type(err).__name__}: {err})")
        return target

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def hash_pieces(paths: list[str]) -> list[tuple[str, int, int]]:
    """(path, offset, length) pieces of 64 MiB covering the files, hashed independently so
    that they can be hashed in parallel."""
    pieces = []
    for path in sorted(paths):
        size = os.path.getsize(path)
        pieces += [(path, off, min(HASH_PIECE_BYTES, size - off)) for off in range(0, max(size, 1), HASH_PIECE_BYTES)]
    return pieces


def combine_hashes(pieces: list[tuple[str, int, int]], digests: list[bytes]) -> str:
    """The content hash: SHA-256 of (file name, piece digest) in order. SHA-256 rather than
    BLAKE2b: CPUs hash it in hardware (SHA-NI), 1.5 vs 0.7 GB/s on one core here, and
    hashing the source had been a sixth of the time of binning a 12-hour recording."""
    top = hashlib.sha256()
    for (path, _, _), digest in zip(pieces, digests):
        top.update(os.path.basename(path).encode())
        top.update(digest)
    return "sha256-tree64M:" + top.hexdigest()


def hash_piece(piece: tuple[str, int, int]) -> bytes:
    path, offset, length = piece
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining > 0:
            buf = f.read(min(remaining, 8 << 20))
            if not buf:
                break
            h.update(buf)
            remaining -= len(buf)
    return h.digest()


_THREAD_BUFFERS = threading.local()


def thread_buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's uninitialised buffer ``name`` of ``shape``/``dtype``, reused from call to
    call: a fresh (shard rows x N) counts array per block cost page faults worth a fifth of
    the time of binning a 12-hour recording. The caller must be done with the previous
    contents (a block's counts are written to the store before the thread's next block)."""
    buf = getattr(_THREAD_BUFFERS, name, None)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
        buf = np.empty(shape, dtype=dtype)
        setattr(_THREAD_BUFFERS, name, buf)
    return buf


# --------------------------------------------------------------------------- tables


def read_tsv(path: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: cannot read this table ({err}); it must be tab-separated text with a header")
    return rows


def int32_labels(values: np.ndarray, where: str) -> np.ndarray:
    """Integer-valued labels as int64, refused (never wrapped) unless they fit the stored int32."""
    values = np.asarray(values)
    if values.size and (values.min() < INT32.min or values.max() > INT32.max):
        bad = values[(values < INT32.min) | (values > INT32.max)][0]
        raise UserError(f"{where}: value {bad:.6g} does not fit the stored int32 labels; labels must be "
                        f"integers in [{INT32.min}, {INT32.max}] or text categories")
    return values.astype(np.int64)


def check_float32(values: np.ndarray, where: str) -> None:
    """Refuse finite values that the stored float32 behaviour would turn into +-inf."""
    if values.dtype.kind != "f" or values.dtype.itemsize <= 4:  # integers are always in range
        return
    finite = np.abs(values[np.isfinite(values)])
    if finite.size and finite.max() > np.finfo(np.float32).max:
        raise UserError(f"{where}: value {float(finite.max()):.6g} is beyond the float32 range of the stored "
                        "behaviour (3.4e38); rescale it")


def label_column(values: list[str], where: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer codes of a label column: integers stay, text becomes category codes."""
    try:
        nums = np.array([float(v) for v in values])
    except ValueError:
        cats = sorted(set(values))
        index = {c: i for i, c in enumerate(cats)}
        return np.array([index[v] for v in values], dtype=np.int64), cats
    if np.all(np.isfinite(nums)) and np.all(nums == np.round(nums)):
        return int32_labels(nums, where), None
    raise UserError(f"{where}: has non-integer values; labels must be integers or text categories")


def read_trials_table(path: str) -> Trials:
    """A trials TSV: columns ``start_s``, ``stop_s`` and optional integer/text label columns."""
    if not os.path.exists(path):
        raise UserError(f"--trials {path}: no such file")
    rows = read_tsv(path)
    if not rows:
        raise UserError(f"--trials {path}: the table has no rows")
    for col in ("start_s", "stop_s"):
        if col not in rows[0]:
            raise UserError(f"--trials {path}: column '{col}' is missing (columns must include start_s, stop_s)")
    try:
        start = np.array([float(r["start_s"]) for r in rows])
        stop = np.array([float(r["stop_s"]) for r in rows])
    except (TypeError, ValueError):
        raise UserError(f"--trials {path}: start_s/stop_s must be numbers of seconds")
    labels, cats = {}, {}
    for col in rows[0]:
        if col in ("start_s", "stop_s") or col is None:
            continue
        labels[col], c = label_column([r[col] or "" for r in rows], f"--trials {path}: column '{col}'")
        if c:
            cats[col] = c
    return check_trials(Trials(start, stop, labels, cats), f"--trials {path}")


def check_trials(trials: Trials, where: str) -> Trials:
    if np.any(~np.isfinite(trials.start_s)) or np.any(~np.isfinite(trials.stop_s)):
        raise UserError(f"{where}: trial start/stop times must be finite")
    if np.any(trials.stop_s <= trials.start_s):
        raise UserError(f"{where}: every trial needs stop > start (row {int(np.argmax(trials.stop_s <= trials.start_s))})")
    if np.any(trials.start_s < 0):
        raise UserError(f"{where}: trial start times must be >= 0 seconds from recording start")
    if np.any(np.diff(trials.start_s) < 0) or np.any(trials.start_s[1:] < trials.stop_s[:-1]):
        raise UserError(f"{where}: trials must be sorted by start time and must not overlap")
    return trials


# --------------------------------------------------------------------------- bounds


def exact_number(value: Fraction) -> bool:
    """Whether a parsed bin size / sample rate is small enough for the exact integer arithmetic
    (numerator and denominator fit int64: at most ~18 significant digits, exponents in range)."""
    return max(value.numerator, value.denominator) < 2**63


def check_n_bins(n_bins: int, max_bins: int, what: str) -> None:
    """Refuse a store of more than ``max_bins`` rows (``what`` says which input asks for them)."""
    if n_bins > max_bins:
        raise UserError(f"{what}, more than --max-bins {max_bins}; use a larger --bin-size, check the "
                        "input's times, or raise --max-bins")


def check_n_units(n_units: int, what: str) -> None:
    if n_units > MAX_UNITS:
        raise UserError(f"{what}: more than the {MAX_UNITS} units a store may hold; select fewer units "
                        "(--units good) or check the file")
