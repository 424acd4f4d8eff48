"""Readers for the three source formats: Phy/Kilosort folders, NWB files, binned .npz.

Each reader validates its input and returns a ``Recording``: everything the writer
needs, with the spike data left on disk (memory-mapped, read block by block) so that
memory stays bounded whatever the recording length.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import logging
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from . import binning
from .errors import UsageError, UserError
from .store import filesystem, is_local, local_path

log = logging.getLogger(__name__)

UNIT_SELECTIONS = {"good": ("good",), "mua": ("good", "mua"), "all": None}
HASH_PIECE_BYTES = 64 << 20
# documented bounds (README, --help): refused before anything of that size is allocated
DEFAULT_MAX_BINS = 2**31  # rows of the store (--max-bins)
MAX_UNITS = 2**16  # units of the store, and distinct cluster ids in spike_clusters.npy
DENSE_LUT_IDS = 1 << 16  # cluster ids below this map to columns through a dense table, others by search
PARAMS_PY_MAX_BYTES = 1 << 20  # a Phy params.py is a few hundred bytes
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
    """The content hash: BLAKE2b of (file name, piece digest) in order."""
    top = hashlib.blake2b(digest_size=32)
    for (path, _, _), digest in zip(pieces, digests):
        top.update(os.path.basename(path).encode())
        top.update(digest)
    return "blake2b-tree64M:" + top.hexdigest()


def hash_piece(piece: tuple[str, int, int]) -> bytes:
    path, offset, length = piece
    h = hashlib.blake2b(digest_size=32)
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


def _label_column(values: list[str], where: str) -> tuple[np.ndarray, list[str] | None]:
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
        labels[col], c = _label_column([r[col] or "" for r in rows], f"--trials {path}: column '{col}'")
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


# --------------------------------------------------------------------------- Phy


def parse_params_py(path: str) -> dict:
    """Literal assignments of a Phy ``params.py``, parsed with ``ast`` (never executed)."""
    try:
        if os.path.getsize(path) > PARAMS_PY_MAX_BYTES:
            raise UserError(f"{path}: larger than {PARAMS_PY_MAX_BYTES >> 20} MiB, not a Phy params.py; "
                            "fix the file or pass --sample-rate")
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError) as err:
        what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__  # e.g. nesting too deep
        raise UserError(f"{path}: cannot parse ({what}); fix the file or pass --sample-rate")
    params = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                params[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass  # not a (reasonable) literal: ignored, never evaluated
    return params


def exact_number(value: Fraction) -> bool:
    """Whether a parsed bin size / sample rate is small enough for the exact integer arithmetic
    (numerator and denominator fit int64: at most ~18 significant digits, exponents in range)."""
    return max(value.numerator, value.denominator) < 2**63


def sample_rate_of_params(path: str) -> Fraction:
    """The ``sample_rate`` of a Phy params.py: a finite positive number of Hz."""
    value = parse_params_py(path).get("sample_rate")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        found = "" if value is None else f" (found {value!r:.40})"
        raise UserError(f"{path}: no positive 'sample_rate = <number>' line{found}; pass --sample-rate HZ")
    rate = binning.to_fraction(value)
    if not exact_number(rate):
        raise UserError(f"{path}: sample_rate {value!r:.40} is out of range or has too many digits; "
                        "pass --sample-rate HZ")
    return rate


def _load_npy(path: str, name: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a Phy folder needs {name}")
    except (ValueError, OSError, EOFError, TypeError, OverflowError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable .npy file ({type(err).__name__}: {err}); "
                        "write it again with numpy.save")


def cluster_labels(folder: str) -> tuple[dict[int, str], list[str]]:
    """Cluster quality merged on cluster_id: cluster_group.tsv (curated) wins over
    cluster_info.tsv 'group', which wins over cluster_KSLabel.tsv (Kilosort's own)."""
    labels: dict[int, str] = {}
    files = []
    for name, columns in (("cluster_KSLabel.tsv", ("KSLabel",)), ("cluster_info.tsv", ("group", "KSLabel")),
                          ("cluster_group.tsv", ("group", "KSLabel"))):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        files.append(path)
        for i, row in enumerate(read_tsv(path)):
            if "cluster_id" not in row:
                raise UserError(f"{path}: column 'cluster_id' is missing")
            col = next((c for c in columns if row.get(c)), None)
            if col is None:
                continue
            try:
                cid = int(row["cluster_id"])
            except (TypeError, ValueError):
                raise UserError(f"{path}: row {i + 1}: cluster_id {row['cluster_id']!r:.40} is not an integer")
            if not 0 <= cid < 2**63:
                raise UserError(f"{path}: row {i + 1}: cluster_id {cid:.6g} is out of range; cluster ids are "
                                "integers in 0..2**63-1")
            labels[cid] = row[col].strip()
    return labels, files


def read_phy(folder: str, source: str, bin_size: Fraction, units: str, sample_rate: Fraction | None,
             trials_path: str | None, max_bins: int = DEFAULT_MAX_BINS) -> Recording:
    times = _load_npy(os.path.join(folder, "spike_times.npy"), "spike_times.npy")
    clusters_name = "spike_clusters.npy"
    if not os.path.exists(os.path.join(folder, clusters_name)):
        clusters_name = "spike_templates.npy"
        if not os.path.exists(os.path.join(folder, clusters_name)):
            raise UserError(f"{folder}: neither spike_clusters.npy nor spike_templates.npy is there; "
                            "a Phy folder needs one of them")
    clusters = _load_npy(os.path.join(folder, clusters_name), clusters_name)
    tpath = os.path.join(folder, "spike_times.npy")
    if times.ndim == 2 and times.shape[1] == 1:
        times = times.reshape(-1)
    if times.ndim != 1:
        raise UserError(f"{tpath}: shape {times.shape}, expected (n_spikes,) or (n_spikes, 1)")
    if times.dtype.kind not in "iu":
        raise UserError(f"{tpath}: dtype {times.dtype}; expected integer sample indices (convert seconds "
                        "with round(t * sample_rate))")
    clusters = clusters.reshape(-1) if clusters.ndim == 2 and clusters.shape[1] == 1 else clusters
    if clusters.ndim != 1 or clusters.dtype.kind not in "iu":
        raise UserError(f"{os.path.join(folder, clusters_name)}: expected a 1-D integer array, "
                        f"got shape {clusters.shape} {clusters.dtype}")
    if len(clusters) != len(times):
        raise UserError(f"{os.path.join(folder, clusters_name)}: {len(clusters)} entries but spike_times.npy has "
                        f"{len(times)}; they must have one entry per spike")
    if len(times) == 0:
        raise UserError(f"{tpath}: no spikes")
    if times.dtype.kind == "i" and int(times[0]) < 0:
        raise UserError(f"{tpath}: negative spike times; sample indices must be >= 0")

    params_path = os.path.join(folder, "params.py")
    files = [tpath, os.path.join(folder, clusters_name)]
    if sample_rate is None:
        if not os.path.exists(params_path):
            raise UserError(f"{folder}: no sample rate: there is no params.py; pass --sample-rate HZ")
        sample_rate = sample_rate_of_params(params_path)
    if os.path.exists(params_path):
        files.append(params_path)

    # the size of the output, checked before anything is allocated or read in full
    spb = bin_size * sample_rate
    if spb < 1:
        raise UserError(f"--bin-size {float(bin_size):.6g}: shorter than one sample period "
                        f"(1/{float(sample_rate):.6g} s) of {tpath}; choose a bin size of at least "
                        f"{1 / float(sample_rate):.6g} s")
    last = int(times[-1])
    if (last + 1) * spb.denominator >= binning.INT64_SAFE:
        if spb.denominator == 1:
            raise UserError(f"{tpath}: last spike at sample {last} ({last / float(sample_rate):.6g} s) is beyond "
                            "2**62 samples; the file is damaged or does not hold sample indices")
        raise UserError(f"--bin-size {float(bin_size):.6g}: {spb} samples per bin at {float(sample_rate):.6g} Hz has "
                        f"too many digits for exact binning up to sample {last}; round --bin-size or --sample-rate")
    if Fraction(last + 1) / sample_rate < bin_size:
        raise UserError(f"--bin-size {float(bin_size)}: longer than the recording "
                        f"({(last + 1) / float(sample_rate):.6g} s); choose a smaller bin size")
    n_rows = binning.n_bins_for_samples(last, spb)
    check_n_bins(n_rows, max_bins, f"{tpath}: the last spike at {last / float(sample_rate):.6g} s needs {n_rows} "
                                   f"bins of {float(bin_size):.6g} s")
    trials = None
    if trials_path:
        trials = read_trials_table(trials_path)
        files.append(trials_path)
        end = Fraction(str(trials.stop_s.max()))
        needed = math.ceil(end / bin_size)
        check_n_bins(needed, max_bins, f"--trials {trials_path}: the last trial ends at {float(end):.6g} s, "
                                       f"{needed:.6g} bins of {float(bin_size):.6g} s")
        n_rows = max(n_rows, int(np.ceil(float(end / bin_size))))

    labels, label_files = cluster_labels(folder)
    files += label_files
    wanted = UNIT_SELECTIONS[units]
    if wanted is not None and not labels:
        raise UserError(f"{folder}: no cluster labels (cluster_group.tsv, cluster_info.tsv or cluster_KSLabel.tsv); "
                        "use --units all")
    spiking_ids, spiking_counts = cluster_spike_counts(os.path.join(folder, clusters_name))
    known = set(labels) | set(spiking_ids.tolist()) if wanted is None else set(labels)
    unit_ids = np.array(sorted(c for c in known if wanted is None or labels.get(c) in wanted), dtype=np.int64)
    if unit_ids.size == 0:
        found = sorted(set(labels.values()))
        raise UserError(f"{folder}: no cluster is labelled {' or '.join(wanted)} (labels found: {found}); "
                        "choose --units mua or all")
    check_n_units(len(unit_ids), f"{folder}: {len(unit_ids)} clusters selected by --units {units}")
    lut = None
    if int(unit_ids[-1]) < DENSE_LUT_IDS:
        lut = np.full(int(unit_ids[-1]) + 1, -1, dtype=np.int32)
        lut[unit_ids] = np.arange(len(unit_ids), dtype=np.int32)
    quality = np.array([labels.get(int(c), "unsorted") for c in unit_ids], dtype=object)
    return Recording(
        format="phy", path=source, bin_size=bin_size, n_rows=n_rows, unit_ids=unit_ids, unit_quality=quality,
        files=files, sample_rate_hz=float(sample_rate),
        phy=PhySpikes(tpath, os.path.join(folder, clusters_name), len(times), spb, unit_ids, lut),
        expected_spikes=int(spiking_counts[np.isin(spiking_ids, unit_ids)].sum()),
        trials=trials,
        # one spike per unit per sample, plus slack for duplicated samples (checked while binning)
        max_count_bound=int(np.ceil(float(spb))),
    )


def iter_npy_chunks(path: str, step: int = 1 << 23):
    """Yield consecutive 1-D chunks of an .npy file with plain reads (no memory map, so the
    file's pages do not stay in this process's resident memory)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise UserError(f"{path}: .npy format version {version} is not supported")
        if fortran and len(shape) > 1 and shape[1] != 1:
            raise UserError(f"{path}: Fortran-ordered 2-D array; save it as a 1-D array")
        total = int(np.prod(shape))
        done = 0
        while done < total:
            n = min(step, total - done)
            chunk = np.fromfile(f, dtype=dtype, count=n)
            if len(chunk) != n:
                raise UserError(f"{path}: file is truncated ({done + len(chunk)} of {total} values)")
            done += n
            yield chunk


def check_n_bins(n_bins: int, max_bins: int, what: str) -> None:
    """Refuse a store of more than ``max_bins`` rows (``what`` says which input asks for them)."""
    if n_bins > max_bins:
        raise UserError(f"{what}, more than --max-bins {max_bins}; use a larger --bin-size, check the "
                        "input's times, or raise --max-bins")


def check_n_units(n_units: int, what: str) -> None:
    if n_units > MAX_UNITS:
        raise UserError(f"{what}: more than the {MAX_UNITS} units a store may hold; select fewer units "
                        "(--units good) or check the file")


def cluster_spike_counts(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, spikes): the sorted distinct cluster ids (int64) and the spikes of each, read in
    chunks. Memory depends on the number of distinct ids (at most MAX_UNITS), not on their size."""
    ids, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for chunk in iter_npy_chunks(path):
        if not chunk.size:
            continue
        if chunk.min() < 0:
            raise UserError(f"{path}: negative cluster ids")
        top = int(chunk.max())
        if top >= 2**63:
            raise UserError(f"{path}: cluster id {top} is out of range; cluster ids are integers in 0..2**63-1")
        if top < DENSE_LUT_IDS:
            dense = np.bincount(chunk)
            u = np.flatnonzero(dense).astype(np.int64)
            c = dense[u]
        else:
            u, c = np.unique(chunk, return_counts=True)
            u = u.astype(np.int64)
        merged = np.union1d(ids, u)
        if len(merged) > MAX_UNITS:
            raise UserError(f"{path}: more than {MAX_UNITS} distinct cluster ids; this is not a spike-sorting "
                            "output (or the file is damaged)")
        total = np.zeros(len(merged), dtype=np.int64)
        total[np.searchsorted(merged, ids)] += counts
        total[np.searchsorted(merged, u)] += c.astype(np.int64)
        ids, counts = merged, total
    return ids, counts


class UnsortedSpikes(UserError):
    pass


def count_phy_block(spikes: PhySpikes, row0: int, row1: int, n_units: int) -> np.ndarray:
    """Counts (row1-row0, N) int64 of one block of a Phy recording, read from disk.

    Opens its own memory maps and drops them on return so resident memory stays bounded.
    Also checks that this block's spikes are sorted and inside the block: together over
    all blocks this proves the whole file is sorted.
    """
    times = np.load(spikes.times_path, mmap_mode="r").reshape(-1)
    clusters = np.load(spikes.clusters_path, mmap_mode="r").reshape(-1)
    s0, s1 = binning.first_sample(row0, spikes.samples_per_bin), binning.first_sample(row1, spikes.samples_per_bin)
    # spikes lie below 2**62 (checked by read_phy): clamping keeps the keys in the file's dtype
    s0, s1 = min(s0, 2**63 - 1), min(s1, 2**63 - 1)
    # keys in the file's dtype: mixing uint64 with int64 would convert the whole file to float64
    a, b = (int(i) for i in np.searchsorted(times, np.array([s0, s1], dtype=times.dtype), side="left"))
    if row0 == 0 and a != 0:
        raise UnsortedSpikes(f"{spikes.times_path}: spike times are negative or not sorted; "
                             "sort spike_times and spike_clusters together (Kilosort writes them sorted)")
    t = np.array(times[a:b], dtype=np.int64)
    c = np.array(clusters[a:b], dtype=np.int64)
    del times, clusters
    if t.size and (t[0] < s0 or t[-1] >= s1 or np.any(t[1:] < t[:-1])):
        raise UnsortedSpikes(f"{spikes.times_path}: spike times are not sorted (near spike {a}); "
                             "sort spike_times and spike_clusters together (Kilosort writes them sorted)")
    lut = spikes.cluster_to_column
    if lut is not None:
        cols = np.where(c < len(lut), lut[np.minimum(c, len(lut) - 1)], -1)
    else:
        ids = spikes.unit_ids
        pos = np.minimum(np.searchsorted(ids, c), len(ids) - 1)
        cols = np.where(ids[pos] == c, pos, -1)
    try:
        return binning.count_samples(t, cols, row0, row1 - row0, n_units, spikes.samples_per_bin)
    except OverflowError:  # read_phy checked the last spike: a larger one earlier means unsorted times
        raise UnsortedSpikes(f"{spikes.times_path}: spike times are not sorted (near spike {a}); "
                             "sort spike_times and spike_clusters together (Kilosort writes them sorted)")


# --------------------------------------------------------------------------- NWB


def read_nwb(path: str, source: str, bin_size: Fraction, units: str, max_bins: int = DEFAULT_MAX_BINS) -> Recording:
    """Units table (spike times in seconds), trials table, behavioural time series."""
    import warnings

    try:
        from pynwb import NWBHDF5IO
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise UserError(f"{source}: reading NWB needs pynwb ({err})")
    io_ = None
    # a file that is not HDF5 (truncated, random bytes, another format) raises OSError in h5py;
    # an HDF5 file that is not NWB raises whatever hdmf/pynwb meet first (ValueError, KeyError,
    # TypeError, their own exception classes): all mean "not a readable NWB file"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hdmf/pynwb warn about namespaces and versions on stderr
        try:
            io_ = NWBHDF5IO(path, mode="r", load_namespaces=True)
            nwb = io_.read()
        except Exception as err:
            if io_ is not None:
                try:
                    io_.close()
                except Exception:
                    pass
            raise UserError(f"{source}: not a readable NWB file ({type(err).__name__}: {str(err)[:200]}); "
                            "check that it is a complete NWB (HDF5) file") from None
        try:
            return _read_nwb_open(nwb, source, path, bin_size, units, max_bins)
        except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            # lazily read datasets of a damaged file fail here
            raise UserError(f"{source}: cannot read the NWB contents ({type(err).__name__}: {str(err)[:200]}); "
                            "check that the file is complete") from None
        finally:
            io_.close()


def _read_nwb_open(nwb, source: str, path: str, bin_size: Fraction, units: str,
                   max_bins: int = DEFAULT_MAX_BINS) -> Recording:
    if nwb.units is None or len(nwb.units) == 0:
        raise UserError(f"{source}: the NWB file has no units table (nwbfile.units); add the sorted units")
    table = nwb.units
    columns = set(table.colnames)
    if "spike_times" not in columns:
        raise UserError(f"{source}: units table has no 'spike_times' column")
    ids = np.asarray(table.id[:], dtype=np.int64)
    check_n_units(len(ids), f"{source}: the units table has {len(ids)} rows")
    quality = None
    for col in ("quality", "group", "KSLabel"):
        if col in columns:
            quality = np.array([str(v) for v in table[col][:]], dtype=object)
            break
    if quality is None:
        quality = np.array(["unsorted"] * len(ids), dtype=object)
    wanted = UNIT_SELECTIONS[units]
    if wanted is None:
        keep = np.arange(len(ids))
    else:
        if (quality == "unsorted").all():
            raise UserError(f"{source}: the units table has no 'quality' column; use --units all")
        keep = np.flatnonzero(np.isin(quality, wanted))
        if keep.size == 0:
            raise UserError(f"{source}: no unit has quality {' or '.join(wanted)} "
                            f"(found {sorted(set(quality))}); choose --units mua or all")
    unit_times = []
    for i in keep:
        t = np.asarray(table["spike_times"][int(i)], dtype=np.float64)
        if t.size and (np.any(t < 0) or not np.all(np.isfinite(t))):
            raise UserError(f"{source}: units row {i}: spike times must be finite and >= 0 seconds")
        if np.any(np.diff(t) < 0):
            t = np.sort(t)  # per-unit times in NWB are not required to be sorted: sorting is exact
        unit_times.append(t)
    t_end = max((float(t[-1]) for t in unit_times if t.size), default=0.0)

    trials = None
    if nwb.trials is not None and len(nwb.trials) > 0:
        df_cols = [c for c in nwb.trials.colnames if c not in ("start_time", "stop_time")]
        start = np.asarray(nwb.trials["start_time"][:], dtype=np.float64)
        stop = np.asarray(nwb.trials["stop_time"][:], dtype=np.float64)
        labels, cats = {}, {}
        for col in df_cols:
            values = nwb.trials[col][:]
            arr = np.asarray(values)
            if arr.ndim != 1:
                continue
            if arr.dtype.kind in "iub":
                labels[col] = int32_labels(arr, f"{source}: trials column '{col}'")
            elif arr.dtype.kind == "f":
                if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                    labels[col] = int32_labels(arr, f"{source}: trials column '{col}'")
                else:
                    log.info("trials column %r is not integer-valued: not stored as a label", col)
            else:
                labels[col], cats[col] = _label_column([str(v) for v in arr], f"{source}: trials column '{col}'")
                if cats[col] is None:
                    del cats[col]
        trials = check_trials(Trials(start, stop, labels, cats), f"{source}: trials table")
        t_end = max(t_end, float(stop.max()))

    series = list(_behaviour_series(nwb, source))
    for _, ts_times, _ in series:
        if len(ts_times):
            t_end = max(t_end, float(ts_times[-1]))
    if not math.isfinite(t_end):
        raise UserError(f"{source}: a behavioural time series has non-finite timestamps; fix its timestamps or rate")
    if t_end <= 0:
        raise UserError(f"{source}: no spikes in the selected units")
    if float(bin_size) > t_end:
        raise UserError(f"--bin-size {float(bin_size)}: longer than the recording ({t_end:.6g} s); "
                        "choose a smaller bin size")
    needed = math.floor(Fraction(t_end) / bin_size) + 1
    check_n_bins(needed, max_bins, f"{source}: the recording ends at {t_end:.6g} s: {needed:.6g} bins of "
                                   f"{float(bin_size):.6g} s")
    n_rows = int(binning.bin_index_seconds(np.array([t_end]), bin_size)[0]) + 1
    behavior = {}
    for name, ts_times, data in series:
        behavior[name] = binning.average_in_bins(ts_times, data, n_rows, bin_size)
    return Recording(format="nwb", path=source, bin_size=bin_size, n_rows=n_rows, unit_ids=ids[keep],
                     unit_quality=quality[keep], files=[path], unit_times_s=unit_times, trials=trials,
                     behavior=behavior)


def _behaviour_series(nwb, source: str = "NWB file"):
    """(name, timestamps (n,), data (n, k)) of every numeric TimeSeries outside the units,
    in processing modules and acquisition; names collide -> prefixed by their container."""
    from pynwb import TimeSeries

    seen: dict[str, int] = {}
    containers = list(nwb.acquisition.values())
    for module in nwb.processing.values():
        containers += list(module.data_interfaces.values())
    for obj in containers:
        children = [obj] if isinstance(obj, TimeSeries) else [
            c for c in getattr(obj, "children", []) if isinstance(c, TimeSeries)]
        for ts in children:
            data = np.asarray(ts.data[:])
            if data.dtype.kind not in "iuf" or data.ndim not in (1, 2) or len(data) == 0:
                continue
            if ts.timestamps is not None:
                times = np.asarray(ts.timestamps[:], dtype=np.float64)
            else:
                times = float(ts.starting_time or 0.0) + np.arange(len(data)) / float(ts.rate)
            check_float32(data, f"{source}: TimeSeries '{ts.name}'")
            name = ts.name
            if name in seen:
                name = f"{obj.name}_{ts.name}"
            seen[name] = 1
            yield name, times, data.reshape(len(data), -1)


def count_nwb_block(unit_times: list[np.ndarray], row0: int, row1: int, bin_size: Fraction) -> np.ndarray:
    return binning.count_seconds(unit_times, row0, row1 - row0, bin_size)


# --------------------------------------------------------------------------- binned npz


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


def read_source(source: str, fmt: str, local: str, bin_size: Fraction | None, units: str,
                sample_rate: Fraction | None, trials_path: str | None,
                max_bins: int = DEFAULT_MAX_BINS) -> Recording:
    """Dispatch to the reader of ``fmt`` (``local`` is a local path of ``source``)."""
    if fmt == "npz":
        if trials_path:
            raise UsageError("--trials applies to Phy folders only (an .npz carries its own 'trial' array)")
        return read_npz(local, source, bin_size, max_bins)
    if bin_size is None:
        bin_size = Fraction(1, 10)
    if fmt == "phy":
        return read_phy(local, source, bin_size, units, sample_rate, trials_path, max_bins)
    if trials_path:
        raise UsageError("--trials applies to Phy folders only (an NWB file carries its own trials table)")
    return read_nwb(local, source, bin_size, units, max_bins)
