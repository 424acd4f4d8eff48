"""Data-loader throughput and memory, in one run; prints one JSON line.

* ``anchor_samples_per_s``: anchors per second from a local recording store through the
  trainer's data layer as ``data.loading: auto`` configures it for that store (a 1-hour
  session fits the memory budget, so it is read once into memory), with the paper's
  neural augmentations; every step takes B = 512 anchors (x1, x2, x_m) AND L = 1024 pool
  candidates. ``stream_anchor_samples_per_s``: the same store forced through block
  streaming (chunk-aligned reads, shuffle buffer, reader threads, prefetch thread).
* ``s3_anchor_samples_per_s``: the same store streamed from a local S3 server (moto in
  its own process on 127.0.0.1); ``s3_over_local`` compares it with local streaming.
* ``baseline_samples_per_s``: the original MYOW generator's sampling re-implemented in
  ``benchmarks/original_generator.py`` (a random trial split every step and boolean trial
  masks summed over all trials, the same augmentations of 3B + L rows), on the same data
  in memory, same B and L, at its best torch thread setting.
* ``by_session_length``: the same comparison on a Chewie-sized session (1,640 bins) and
  a 6-hour one (216,000 bins): the baseline's cost per step grows with #trials x #bins.
* ``large_store_gb`` / ``peak_rss_gb``: a synthetic store of >= 3 GB of counts (uint16)
  streamed for one full epoch of anchors (plus a pool per step) by a separate process,
  whose peak resident memory (VmHWM) is reported, with ``torch_import_rss_gb`` (what
  ``import torch`` alone costs) for scale; ``large_*``: its throughput, disk size.
* ``data_wait_ratio``: share of training time the trainer waited for data while training
  the reach config (Chewie-1 from ../shared/data when present, else a simulated session),
  from the ``data_wait_seconds`` / ``step_seconds`` the trainer logs every step.

Throughput stores: synthetic sessions at 100 ms bins, 200 units, trials of 2 s separated
by 0.4 s pauses. Throughputs are medians of ``--rounds`` interleaved rounds.

Usage: python benchmarks/loader.py [--seconds 4] [--large-gb 3.2] [--skip-large] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"
B, L = 512, 1024


# --------------------------------------------------------------------------- data


def session_arrays(n_rows: int, n_units: int, trial_bins: int = 20, pause_bins: int = 4, seed: int = 0) -> dict:
    """A trial-structured session: Poisson counts with slowly varying rates, trials of
    ``trial_bins`` bins separated by ``pause_bins`` bins outside trials (-1), 8 targets."""
    rng = np.random.default_rng(seed)
    period = trial_bins + pause_bins
    phase = np.arange(n_rows) % period
    trial = np.where(phase < trial_bins, np.arange(n_rows) // period, -1).astype(np.int32)
    target = np.where(trial >= 0, rng.integers(0, 8, n_rows // period + 1)[np.maximum(trial, 0)], -1)
    base = rng.lognormal(1.5, 0.8, n_units)
    tuning = 1 + 0.5 * np.cos(target[:, None] * np.pi / 4 - rng.uniform(0, 2 * np.pi, n_units)[None, :])
    counts = rng.poisson(np.where(trial[:, None] >= 0, tuning, 1.0) * base * 0.1).astype(np.uint16)
    return {"counts": counts, "trial": trial, "target": target.astype(np.int64)}


def write_store(url: str, counts, trial: np.ndarray | None, bin_size: float, labels: dict | None = None,
                storage_options: dict | None = None, progress: bool = False) -> str:
    """Publish (T, N) counts (an array or a memmap) as a recording store with the default layout."""
    from preprocess import bin_spikes, sources

    n_rows, n_units = counts.shape
    rec = sources.Recording(format="npz", path="<benchmark>", bin_size=Fraction(str(bin_size)), n_rows=n_rows,
                            unit_ids=np.arange(n_units), unit_quality=np.array(["good"] * n_units), files=[],
                            counts=counts, trial=trial, labels=labels or {}, max_count_bound=65535)
    bin_spikes.write_recording(rec, url, storage_options or {}, overwrite=True, scheduler="threads",
                               progress=progress)
    return url


# --------------------------------------------------------------------------- measurements


# The data layer is what is measured: the reach config's mining by temporal context keeps a
# bank of every training sample, which streamed stores refuse, so it is off here.
STREAMABLE = ["method.mining_context_bins=0"]


def loader_samples_per_s(url: str, seconds: float, storage_options: dict | None = None,
                         loading: str = "stream", extra: list[str] | None = None) -> tuple[float, dict]:
    """Anchors per second drawing one anchor batch (B) and one pool (L) per step."""
    from pipeline.config import load_config
    from pipeline.kinds import build_train_data

    overrides = [f"data.path={url}", f"data.loading={loading}", "data.min_speed=0", "run.progress=false",
                 f"optim.batch_size={B}", f"method.pool_size={L}", "method.mining_view=separate",
                 *STREAMABLE]
    if storage_options:
        overrides.append(f"data.storage_options={json.dumps(storage_options)}")
    cfg = load_config(str(ROOT / "configs" / "reach_myow.yaml"), overrides + (extra or []))
    t_build = time.perf_counter()
    data = build_train_data(cfg)
    build_s = time.perf_counter() - t_build
    next(data.sessions[0].anchors), next(data.sessions[0].pool)  # start-up: first blocks, threads
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(data.sessions[0].anchors), next(data.sessions[0].pool)
        steps += 1
    rate = steps * B / (time.perf_counter() - t0)
    data.close()
    return rate, {"steps": steps, "build_s": round(build_s, 2)}


def baseline_samples_per_s(arrays: dict, seconds: float) -> float:
    from original_generator import OriginalGenerator, samples_per_s

    from pipeline.data.recording import split_rows

    rates = arrays["counts"].astype(np.float32) / 0.1
    trial = np.full(len(rates), -1, dtype=np.int64)  # the same training rows the loader samples
    train = split_rows(arrays["trial"])["train"]
    trial[train] = arrays["trial"][train]
    gen = OriginalGenerator(rates, trial, batch_size=B, pool_size=L, seed=0)
    # its best thread setting: with other load on the cores, torch's 2-thread pool can
    # collapse on its many small ops (seen here: 5-10x slower than with 1 thread)
    threads = torch.get_num_threads()
    rates = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        rates.append(samples_per_s(gen, seconds=seconds / 2))
    torch.set_num_threads(threads)
    return max(rates)


def s3_samples_per_s(store: str, seconds: float, extra: list[str] | None = None) -> float:
    """The local store uploaded to a moto S3 server on 127.0.0.1, streamed through s3fs.

    The server runs in its own process, as a real object store would: in this process it
    would compete with the loader for the GIL and measure moto, not the loader."""
    import socket
    import urllib.request

    from preprocess.store import filesystem

    with socket.socket() as sock:  # a free port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
        fs, _ = filesystem("s3://bench", options)
        fs.mkdir("bench")
        fs.put(store, "bench/session.zarr", recursive=True)
        return loader_samples_per_s("s3://bench/session.zarr", seconds, options, extra=extra)[0]
    finally:
        server.terminate()
        server.wait()


def make_large_store(url: str, target_gb: float, n_units: int = 400, seed: int = 0) -> tuple[float, float]:
    """A >= target_gb store of uint16 counts (10 ms bins, no trials), written from a memmap so
    this process never holds it. Returns (raw counts GB, on-disk GB)."""
    n_rows = int(np.ceil(target_gb * 1e9 / (2 * n_units)))
    rng = np.random.default_rng(seed)
    pieces = [rng.poisson(rng.lognormal(-3, 1, n_units)[None, :], (65536, n_units)).astype(np.uint16)
              for _ in range(8)]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(url)) as tmp:
        counts = np.lib.format.open_memmap(os.path.join(tmp, "counts.npy"), mode="w+", dtype=np.uint16,
                                           shape=(n_rows, n_units))
        for i, start in enumerate(range(0, n_rows, 65536)):
            stop = min(start + 65536, n_rows)
            counts[start:stop] = np.roll(pieces[i % 8], i, axis=1)[:stop - start]
        counts.flush()
        write_store(url, counts, None, 0.01, progress=True)
    disk = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    return n_rows * n_units * 2 / 1e9, disk / 1e9


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image: VmHWM, which execve resets. (ru_maxrss
    survives execve, so a child started by a large parent would report the parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stream_whole_store(url: str) -> dict:
    """(Child process) stream one epoch of anchors (+ a pool per step); report peak RSS."""
    from pipeline.config import load_config
    from pipeline.kinds import build_train_data

    cfg = load_config(str(ROOT / "configs" / "reach_myow.yaml"),
                      [f"data.path={url}", "data.loading=stream", "data.min_speed=0", "run.progress=false",
                       f"optim.batch_size={B}", f"method.pool_size={L}", "method.mining_view=separate",
                       *STREAMABLE])
    t0 = time.perf_counter()
    data = build_train_data(cfg)
    t1 = time.perf_counter()
    steps = data.steps_per_epoch
    for _ in range(steps):
        next(data.sessions[0].anchors), next(data.sessions[0].pool)
    t2 = time.perf_counter()
    data.close()
    return {"peak_rss_gb": peak_rss_bytes() / 1e9,
            "normalisation_pass_s": round(t1 - t0, 1), "epoch_steps": steps,
            "samples_per_s": steps * B / (t2 - t1)}


def data_wait_ratio(workdir: Path, steps: int) -> dict:
    """Train the reach config for ``steps`` steps; share of (step + wait) time spent waiting."""
    from pipeline.config import load_config
    from pipeline.loop import train
    from preprocess import bin_spikes

    if CHEWIE.exists():
        store, source = str(workdir / "chewie.zarr"), "chewie-1"
        bin_spikes.main([str(CHEWIE), "--out", store, "--no-progress", "--overwrite"])
    else:
        arrays = session_arrays(1640, 174, trial_bins=10, pause_bins=0)
        store, source = write_store(str(workdir / "reach.zarr"), arrays["counts"], arrays["trial"], 0.1), "synthetic"
    run_dir = workdir / "wait-run"
    cfg = load_config(str(ROOT / "configs" / "reach_myow.yaml"),
                      [f"data.path={store}", f"run.dir={run_dir}", "run.resume=false", "run.progress=false",
                       f"train.max_steps={steps}", "train.log_every=1", "eval.tsne=false",
                       "train.checkpoint_every=100000"])
    train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]  # after start-up
    wait = sum(r["data_wait_seconds"] for r in rows)
    step = sum(r["step_seconds"] for r in rows)
    waits = [r["data_wait_seconds"] * 1e3 for r in rows]
    return {"data_wait_ratio": wait / (wait + step), "data_wait_ms_median": statistics.median(waits),
            "step_ms_median": statistics.median(r["step_seconds"] * 1e3 for r in rows), "data_wait_source": source,
            "data_wait_steps": len(rows)}


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput measurements")
    p.add_argument("--large-gb", type=float, default=3.2, help="raw size of the large store's counts (GB)")
    p.add_argument("--skip-large", action="store_true", help="skip the large-store memory measurement")
    p.add_argument("--s3-only", action="store_true",
                   help="only the interleaved rounds of the 1-hour session (in memory, streamed, baseline, S3)")
    p.add_argument("--train-steps", type=int, default=300, help="training steps for data_wait_ratio")
    p.add_argument("--workdir", help="where stores are written (default: a temporary directory)")
    p.add_argument("--stream-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stream_child:
        print(json.dumps(stream_whole_store(args.stream_child)))
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    from pipeline.runtime import set_threads

    set_threads(0)
    tmp = tempfile.TemporaryDirectory() if not args.workdir else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"batch_size": B, "pool_size": L}

    hour = session_arrays(36_000, 200)
    store = write_store(str(workdir / "session.zarr"), hour["counts"], hour["trial"], 0.1, {"target": hour["target"]})
    out["session"] = {"bins": 36_000, "units": 200, "trials": int(hour["trial"].max()) + 1, "bin_size_s": 0.1}
    # interleaved rounds, so that load from other processes hits every contender alike;
    # medians are reported, with the per-round figures
    rounds = {"auto": [], "stream": [], "baseline": [], "s3": []}
    for _ in range(args.rounds):
        rounds["auto"].append(loader_samples_per_s(store, args.seconds, loading="auto")[0])
        rounds["stream"].append(loader_samples_per_s(store, args.seconds)[0])
        rounds["baseline"].append(baseline_samples_per_s(hour, args.seconds))
        rounds["s3"].append(s3_samples_per_s(store, args.seconds))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    out["anchor_samples_per_s"] = med["auto"]  # what the trainer uses for this store (in memory)
    out["stream_anchor_samples_per_s"] = med["stream"]  # the same store forced through block streaming
    out["baseline_samples_per_s"] = med["baseline"]
    out["s3_anchor_samples_per_s"] = med["s3"]
    out["speedup_vs_baseline"] = med["auto"] / med["baseline"]
    out["stream_speedup_vs_baseline"] = med["stream"] / med["baseline"]
    out["s3_over_local"] = med["s3"] / med["stream"]  # both streamed
    per_round = [s3 / local for s3, local in zip(rounds["s3"], rounds["stream"])]
    out["s3_over_local_per_round"] = [round(r, 3) for r in per_round]  # the spread of the ratio
    out["s3_over_local_min"], out["s3_over_local_max"] = round(min(per_round), 3), round(max(per_round), 3)
    out["rounds"] = {k: [round(x) for x in v] for k, v in rounds.items()}
    if args.s3_only:
        print(json.dumps(out))
        return

    # the baseline's cost per step grows with #trials x #bins: other session lengths
    out["by_session_length"] = {}
    for name, rows, units in (("chewie_size", 1640, 174), ("6h", 216_000, 200)):
        arrays = session_arrays(rows, units, trial_bins=9 if rows < 2000 else 20,
                                pause_bins=0 if rows < 2000 else 4, seed=1)
        url = write_store(str(workdir / f"{name}.zarr"), arrays["counts"], arrays["trial"], 0.1)
        auto = loader_samples_per_s(url, args.seconds, loading="auto")[0]
        streamed = loader_samples_per_s(url, args.seconds)[0]
        base = baseline_samples_per_s(arrays, max(args.seconds, 6.0))
        out["by_session_length"][name] = {"bins": rows, "units": units, "auto_samples_per_s": auto,
                                          "stream_samples_per_s": streamed, "baseline_samples_per_s": base,
                                          "speedup": auto / base, "stream_speedup": streamed / base}

    if not args.skip_large:
        large = str(workdir / "large.zarr")
        out["large_store_gb"], out["large_store_disk_gb"] = make_large_store(large, args.large_gb)
        child = subprocess.run([sys.executable, __file__, "--stream-child", large], capture_output=True, text=True,
                               check=True)
        res = json.loads(child.stdout.strip().splitlines()[-1])
        out["peak_rss_gb"] = res.pop("peak_rss_gb")
        # for scale: what importing torch alone costs (a CUDA build maps ~0.7 GB here)
        probe = "import sys, torch; sys.path.insert(0, sys.argv[1]); import loader; print(loader.peak_rss_bytes())"
        torch_only = subprocess.run([sys.executable, "-c", probe, str(ROOT / "benchmarks")], capture_output=True,
                                    text=True, check=True)
        out["torch_import_rss_gb"] = int(torch_only.stdout.strip()) / 1e9
        out.update({f"large_{k}": v for k, v in res.items()})
    out.update(data_wait_ratio(workdir, args.train_steps))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
