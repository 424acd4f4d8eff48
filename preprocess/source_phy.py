"""Phy/Kilosort folders: reading ``params.py`` (parsed, never executed), cluster labels and
spike files into a ``Recording`` whose spikes stay on disk, and counting one block of bins
at a time (``count_phy_block``), which also proves the spike times sorted.
"""

from __future__ import annotations

import ast
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np

from . import binning
from .errors import UserError
from .source_common import (DEFAULT_MAX_BINS, MAX_UNITS, UNIT_SELECTIONS, PhySpikes, Recording, check_n_bins,
                            check_n_units, exact_number, read_trials_table, read_tsv)

DENSE_LUT_IDS = 1 << 16  # cluster ids below this map to columns through a dense table, others by search
PARAMS_PY_MAX_BYTES = 1 << 20  # a Phy params.py is a few hundred bytes


def parse_params_py(path: str) -> dict:
    """Literal assignments of a Phy ``params.py``, parsed with ``ast`` (never executed)."""
    try:
        if os.path.getsize(path) > PARAMS_PY_MAX_BYTES:
            raise UserError(f"{path}: larger than {PARAMS_PY_MAX_BYTES >> 20} MiB, not a Phy params.py; "
                            "fix the file or pass --sample-rate")
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError) as err:
        if isinstance(err, (MemoryError, RecursionError)):  # the parser's limits: deeply nested expressions
            what = "an expression is nested too deeply or is too large for the parser"
        else:
            what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot parse ({what}); fix the file or pass --sample-rate")
    params = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                params[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass  # not a (reasonable) literal: ignored, never evaluated
    return params



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
    top_id = max(int(unit_ids[-1]), int(spiking_ids[-1]) if spiking_ids.size else 0)
    if top_id < DENSE_LUT_IDS:  # covers every id of the file, so a block's lookup is one gather
        lut = np.full(top_id + 1, -1, dtype=np.int32)
        lut[unit_ids] = np.arange(len(unit_ids), dtype=np.int32)
    quality = np.array([labels.get(int(c), "unsorted") for c in unit_ids], dtype=object)
    return Recording(
        format="phy", path=source, bin_size=bin_size, n_rows=n_rows, unit_ids=unit_ids, unit_quality=quality,
        files=files, sample_rate_hz=float(sample_rate),
        phy=PhySpikes(tpath, os.path.join(folder, clusters_name), len(times), spb, unit_ids, lut,
                      keeps_every_cluster=bool(np.isin(spiking_ids, unit_ids).all()),
                      columns_are_ids=lut is not None and np.array_equal(lut, np.arange(len(lut)))),
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


def _chunk_cluster_counts(path: str, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ids int64, spikes of each) of one chunk of cluster ids."""
    if chunk.min() < 0:
        raise UserError(f"{path}: negative cluster ids")
    top = int(chunk.max())
    if top >= 2**63:
        raise UserError(f"{path}: cluster id {top} is out of range; cluster ids are integers in 0..2**63-1")
    if top < DENSE_LUT_IDS:
        dense = np.bincount(chunk)
        u = np.flatnonzero(dense).astype(np.int64)
        return u, dense[u]
    u, c = np.unique(chunk, return_counts=True)
    return u.astype(np.int64), c


def cluster_spike_counts(path: str, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, spikes): the sorted distinct cluster ids (int64) and the spikes of each, read in
    chunks. Memory depends on the number of distinct ids (at most MAX_UNITS), not on their
    size, and on ``threads`` chunks in flight.

    Chunks are counted by ``threads`` threads (default: the cores, at most 4) while the next
    ones are read: bincount releases the GIL, and this pre-pass over every spike runs before
    the parallel binning starts (0.97 s of a 10 s 12-hour recording on one thread)."""
    threads = threads or min(4, os.cpu_count() or 1)
    ids, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)

    def merge(u: np.ndarray, c: np.ndarray) -> None:
        nonlocal ids, counts
        merged = np.union1d(ids, u)
        if len(merged) > MAX_UNITS:
            raise UserError(f"{path}: more than {MAX_UNITS} distinct cluster ids; this is not a spike-sorting "
                            "output (or the file is damaged)")
        total = np.zeros(len(merged), dtype=np.int64)
        total[np.searchsorted(merged, ids)] += counts
        total[np.searchsorted(merged, u)] += c.astype(np.int64)
        ids, counts = merged, total

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for chunk in iter_npy_chunks(path):
            if chunk.size:
                pending.append(pool.submit(_chunk_cluster_counts, path, chunk))
            if len(pending) >= threads:  # bounded: at most `threads` chunks counted at once
                merge(*pending.popleft().result())
        while pending:
            merge(*pending.popleft().result())
    return ids, counts


class UnsortedSpikes(UserError):
    pass


def count_phy_block(spikes: PhySpikes, row0: int, row1: int, n_units: int,
                    dtype: np.dtype | type = np.int64, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Counts (row1-row0, N) of ``dtype`` of one block of a Phy recording, read from disk
    (:class:`preprocess.binning.BinOverflow` when a bin does not fit ``dtype``), into
    ``out`` when given (see :func:`preprocess.binning.count_samples`), and the number of
    spikes counted: summing the counts instead cast every cell to uint64, a twentieth of
    the CPU time of binning a 12-hour recording.

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
    t = times[a:b]  # a view of the map: checked first, then converted in one pass
    c = np.array(clusters[a:b])  # the file's integer dtype: the lookups below need no int64 copy
    del times, clusters
    if t.size and (int(t[0]) < s0 or int(t[-1]) >= s1 or np.any(t[1:] < t[:-1])):
        raise UnsortedSpikes(f"{spikes.times_path}: spike times are not sorted (near spike {a}); "
                             "sort spike_times and spike_clusters together (Kilosort writes them sorted)")
    cols = _columns(spikes, c)
    try:
        counts = binning.count_samples(t, cols, row0, row1 - row0, n_units, spikes.samples_per_bin, dtype, out,
                                       times_checked=True)
        return counts, (t.size if spikes.keeps_every_cluster else int(np.count_nonzero(cols >= 0)))
    except OverflowError:  # read_phy checked the last spike: a larger one earlier means unsorted times
        raise UnsortedSpikes(f"{spikes.times_path}: spike times are not sorted (near spike {a}); "
                             "sort spike_times and spike_clusters together (Kilosort writes them sorted)")


def _columns(spikes: PhySpikes, clusters: np.ndarray) -> np.ndarray:
    """The output column of each spike's cluster (S,), -1 for clusters not kept."""
    lut = spikes.cluster_to_column
    if lut is None:
        ids = spikes.unit_ids
        pos = np.minimum(np.searchsorted(ids, clusters), len(ids) - 1)
        return np.where(ids[pos] == clusters, pos, -1)
    if spikes.columns_are_ids:  # column = cluster id: no lookup, only a range check (the lookup's)
        if clusters.size and (clusters.min() < 0 or clusters.max() >= len(lut)):
            raise UserError(f"{spikes.clusters_path}: the file changed while it was being binned; run again")
        return clusters
    try:  # the lut covers every cluster id of the file (read_phy), ids are >= 0
        return np.take(lut, clusters)  # take: 25% faster than lut[clusters] for int32 ids
    except IndexError:
        raise UserError(f"{spikes.clusters_path}: the file changed while it was being binned; run again") from None
