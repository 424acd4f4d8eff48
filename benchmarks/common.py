"""What the quality benchmarks share: a store for a recording given as an .npz, running
independent training runs in parallel processes, and paired differences with a t confidence
interval."""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import statistics
import sys
from typing import Callable


def prepare_store(path: str, tmp: str, index: int = 0) -> str:
    """A recording store for ``path``: a store is used as is, an .npz is binned into ``tmp``."""
    if not path.endswith(".npz"):
        return path
    from preprocess.bin_spikes import main as bin_main

    store = os.path.join(tmp, f"rec{index}.zarr")
    if bin_main([path, "--out", store, "--no-progress"]) != 0:
        raise SystemExit(f"{path}: could not build a store")
    return store


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, lo, hi): the mean of ``values`` and its two-sided t confidence interval
    (NaN bounds for fewer than 2 values)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, 0.0, float("nan"), float("nan")
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def run_jobs(fn: Callable[[dict], dict], jobs: list[dict], n_jobs: int, describe: Callable[[dict], str]) -> list[dict]:
    """``fn(job)`` for every job in ``n_jobs`` spawned processes (spawn: fsspec/s3fs are not
    fork-safe); prints ``[i/n] describe(result)`` to stderr as each one finishes."""
    results: list[dict] = []
    with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as pool:
        for fut in cf.as_completed([pool.submit(fn, job) for job in jobs]):
            results.append(fut.result())
            print(f"[{len(results)}/{len(jobs)}] {describe(results[-1])}", file=sys.stderr, flush=True)
    return results


def summarize(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """Mean, population std and per-seed values of every key in ``keys`` over ``runs`` (None
    values left out), and the mean ``seconds`` per run."""
    out: dict = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            continue
        out[key] = round(statistics.fmean(values), 4)
        out[key + "_std"] = round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0
        out[key + "_per_seed"] = [round(v, 4) for v in values]
    out["seconds_per_run"] = round(statistics.fmean(r["seconds"] for r in runs), 2)
    return out
