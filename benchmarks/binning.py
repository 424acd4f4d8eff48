"""Benchmark ``preprocess.bin_spikes`` end to end; prints one JSON line.

Measured in one run:
  * a synthetic 12-hour, 400-unit Phy recording (Poisson spikes, lognormal rates with
    median 5 Hz, ~180 M spikes, generated vectorised and seeded) binned at 10 ms by the
    command in a subprocess: spikes/s and the subprocess's peak RSS;
  * the real Phy folder in ../shared/data (good units, 50 ms), when present;
  * where the time goes (``cpu_seconds_by_stage``): start-up, the source's metadata, and
    per block reading, counting, compressing, zarr's share of writing, hashing, one block
    after another in this process;
  * references on a slice of the synthetic recording: a per-unit ``np.histogram`` and the
    original MYOW code's per-unit, per-bin mask loop; the store is checked to equal the
    histogram there.

Usage: python benchmarks/binning.py [--hours 12] [--units 400] [--workdir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_RATE = 30_000
REAL_PHY = os.path.join(ROOT, "..", "shared", "data", "phy-neuropixels-2min")


def synthesize_phy(folder: str, hours: float, n_units: int, seed: int, block_s: int = 60) -> int:
    """Write spike_times.npy / spike_clusters.npy / cluster_group.tsv; returns the spike count.

    Vectorised per block of ``block_s`` seconds, so memory stays at one block.
    """
    rng = np.random.default_rng(seed)
    rates = rng.lognormal(mean=np.log(5.0), sigma=1.2, size=n_units)  # median 5 Hz, mean ~10 Hz
    n_blocks = int(np.ceil(hours * 3600 / block_s))
    per_block = rng.poisson(rates[None, :] * block_s, size=(n_blocks, n_units))
    total = int(per_block.sum())
    os.makedirs(folder, exist_ok=True)
    times = np.lib.format.open_memmap(os.path.join(folder, "spike_times.npy"), "w+", np.uint64, (total, 1))
    clusters = np.lib.format.open_memmap(os.path.join(folder, "spike_clusters.npy"), "w+", np.int32, (total,))
    pos = 0
    block_samples = block_s * SAMPLE_RATE
    for b in range(n_blocks):
        n = int(per_block[b].sum())
        unit = np.repeat(np.arange(n_units, dtype=np.int32), per_block[b])
        t = rng.integers(b * block_samples, (b + 1) * block_samples, size=n, dtype=np.int64)
        order = np.argsort(t, kind="stable")
        times[pos:pos + n, 0] = t[order]
        clusters[pos:pos + n] = unit[order]
        pos += n
    times.flush()
    clusters.flush()
    del times, clusters
    with open(os.path.join(folder, "cluster_group.tsv"), "w") as f:
        f.write("cluster_id\tgroup\n")
        for u in range(n_units):
            f.write(f"{u}\t{'good' if u % 4 else 'mua'}\n")
    return total


def run_bin_spikes(args: list[str]) -> tuple[float, float]:
    """Run the command in a fresh process; (wall seconds, peak RSS GB of it and its workers).

    RSS is sampled every 20 ms over the whole process tree (dask worker processes
    included); ru_maxrss is not used because Linux carries it over fork+exec from this
    (large) parent.
    """
    import psutil

    cmd = [sys.executable, "-m", "preprocess.bin_spikes", *args, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bin_spikes failed: {proc.stderr.read().strip()[-2000:]}")
    return wall, peak / 1024**3


def where_time_goes(phy: str, work: str, bin_size: float) -> dict:
    """CPU seconds of each stage of binning the recording, one block after another in this
    process (the command runs them on every core at once): start-up (imports, in a fresh
    process), reading the source's metadata and its cluster pre-pass, and per block:
    reading the spikes out of the page cache, counting them, compressing the counts,
    zarr's own share of writing them, and hashing the source."""
    import zarr
    from fractions import Fraction

    from preprocess import sources
    from preprocess.store import COUNTS_COMPRESSOR, StoreLayout

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import preprocess.bin_spikes"], cwd=ROOT, check=True)
    out = {"startup_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rec = sources.read_source(phy, "phy", phy, Fraction(repr(bin_size)), "all", Fraction(SAMPLE_RATE), None)
    out["read_metadata_s"] = time.perf_counter() - t0
    layout = StoreLayout.for_counts(rec.n_rows, rec.n_units)
    target = os.path.join(work, "breakdown.zarr")
    shutil.rmtree(target, ignore_errors=True)
    counts_array = zarr.create_array(target, shape=(rec.n_rows, rec.n_units), dtype="uint16",
                                     chunks=(layout.chunk_rows, rec.n_units), shards=(layout.shard_rows, rec.n_units),
                                     compressors=[COUNTS_COMPRESSOR], config={"write_empty_chunks": True})
    import numcodecs  # the same Blosc settings as the store's, called directly

    shuffles = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
    codec = numcodecs.Blosc(cname=COUNTS_COMPRESSOR.cname.value, clevel=COUNTS_COMPRESSOR.clevel,
                            shuffle=shuffles[COUNTS_COMPRESSOR.shuffle.value])
    times = np.load(rec.phy.times_path, mmap_mode="r").reshape(-1)
    clusters = np.load(rec.phy.clusters_path, mmap_mode="r").reshape(-1)
    stages = dict.fromkeys(("read", "count", "compress", "zarr_write_other", "hash"), 0.0)
    start = 0
    for r0, r1 in layout.blocks():
        t0 = time.perf_counter()
        stop = int(np.searchsorted(times, np.uint64(r1 * round(bin_size * SAMPLE_RATE))))
        np.array(times[start:stop], dtype=np.int64), np.array(clusters[start:stop])
        start = stop
        t1 = time.perf_counter()
        counts, _ = sources.count_phy_block(rec.phy, r0, r1, rec.n_units, np.uint16)
        t2 = time.perf_counter()
        for c0 in range(0, r1 - r0, layout.chunk_rows):
            codec.encode(np.ascontiguousarray(counts[c0:c0 + layout.chunk_rows]))
        t3 = time.perf_counter()
        counts_array[r0:r1] = counts
        t4 = time.perf_counter()
        stages["read"] += t1 - t0
        stages["count"] += max(0.0, (t2 - t1) - (t1 - t0))  # count_phy_block reads the block again
        stages["compress"] += t3 - t2
        stages["zarr_write_other"] += max(0.0, (t4 - t3) - (t3 - t2))
    t0 = time.perf_counter()
    for piece in sources.hash_pieces(rec.files):
        sources.hash_piece(piece)
    stages["hash"] = time.perf_counter() - t0
    out.update({f"{k}_s": v for k, v in stages.items()})
    shutil.rmtree(target, ignore_errors=True)
    return {k: round(v, 2) for k, v in out.items()}


def histogram_reference(times: np.ndarray, clusters: np.ndarray, units: np.ndarray, n_bins: int,
                        samples_per_bin: int) -> np.ndarray:
    """Per-unit np.histogram over integer edges (exact, half-open except the last edge)."""
    edges = np.arange(n_bins + 1, dtype=np.int64) * samples_per_bin
    return np.stack([np.histogram(times[clusters == u], bins=edges)[0] for u in units], axis=1)


def original_mask_loop(times_s: np.ndarray, clusters: np.ndarray, units: np.ndarray, n_bins: int,
                       bin_size: float) -> np.ndarray:
    """The original MYOW code's binning: a boolean mask per unit and per bin, closed on both
    edges (a spike on an edge is counted in both bins)."""
    out = np.zeros((n_bins, len(units)), dtype=np.int64)
    for j, u in enumerate(units):
        t = times_s[clusters == u]
        for k in range(n_bins):
            out[k, j] = np.sum((t >= k * bin_size) & (t <= (k + 1) * bin_size))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=12.0)
    p.add_argument("--units", type=int, default=400)
    p.add_argument("--bin-size", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--scheduler", default="auto")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="myow-bench-binning-")
    os.makedirs(work, exist_ok=True)
    result: dict = {"benchmark": "binning", "hours": args.hours, "units": args.units, "bin_size_s": args.bin_size,
                    "seed": args.seed, "scheduler": args.scheduler, "cpus": os.cpu_count()}
    try:
        phy = os.path.join(work, "synthetic-phy")
        t0 = time.perf_counter()
        n_spikes = synthesize_phy(phy, args.hours, args.units, args.seed)
        result["synthetic_spikes"] = n_spikes
        result["synthesis_s"] = round(time.perf_counter() - t0, 2)
        os.sync()  # the 2 GB just written are flushed before timing, not during (it had cost ~40%)

        out = os.path.join(work, "synthetic.zarr")
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = run_bin_spikes([phy, "--out", out, "--bin-size", str(args.bin_size), "--sample-rate",
                                    str(SAMPLE_RATE), "--units", "all", "--scheduler", args.scheduler])
        result.update(seconds=round(wall, 2), spikes_per_s=round(n_spikes / wall), peak_rss_gb=round(rss, 3))
        result["cpu_seconds_by_stage"] = where_time_goes(phy, work, args.bin_size)

        # references on a 10-minute slice (first units), and exactness of the store there
        import zarr

        spb = int(round(args.bin_size * SAMPLE_RATE))
        times = np.load(os.path.join(phy, "spike_times.npy"), mmap_mode="r").reshape(-1)
        clusters = np.load(os.path.join(phy, "spike_clusters.npy"), mmap_mode="r")
        slice_bins = int(600 / args.bin_size)
        end = int(np.searchsorted(times, slice_bins * spb))
        t_slice = np.asarray(times[:end], dtype=np.int64)
        c_slice = np.asarray(clusters[:end])
        units = np.arange(args.units)
        t0 = time.perf_counter()
        ref = histogram_reference(t_slice, c_slice, units, slice_bins, spb)
        hist_s = time.perf_counter() - t0
        result["histogram_spikes_per_s"] = round(end / hist_s)
        stored = zarr.open_group(out, mode="r")["counts"][:slice_bins]
        result["exact_vs_histogram_10min"] = bool(np.array_equal(ref, stored))

        loop_units, loop_bins = units[:8], int(60 / args.bin_size)  # the loop is slow: 8 units x 60 s
        keep = (c_slice < 8) & (t_slice < loop_bins * spb)
        t0 = time.perf_counter()
        loop = original_mask_loop(t_slice[keep] / SAMPLE_RATE, c_slice[keep], loop_units, loop_bins, args.bin_size)
        loop_s = time.perf_counter() - t0
        result["mask_loop_spikes_per_s"] = round(int(keep.sum()) / loop_s)
        result["mask_loop_overcounted_spikes"] = int(loop.sum() - ref[:loop_bins, :8].sum())

        if os.path.isdir(REAL_PHY):
            real_out = os.path.join(work, "real.zarr")
            shutil.rmtree(real_out, ignore_errors=True)
            real_spikes = len(np.load(os.path.join(REAL_PHY, "spike_times.npy"), mmap_mode="r"))
            wall, rss = run_bin_spikes([REAL_PHY, "--out", real_out, "--bin-size", "0.05", "--sample-rate",
                                        str(SAMPLE_RATE), "--units", "good"])
            result.update(real_phy_seconds=round(wall, 3), real_phy_spikes_per_s=round(real_spikes / wall),
                          real_phy_peak_rss_gb=round(rss, 3))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
