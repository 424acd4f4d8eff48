"""The paper's Table 3 in one run: every method x every reach recording x seeds; prints a
Markdown table (stderr) shaped like the paper's, with the paper's rows beside ours, and one
JSON line (stdout).

Methods: MYOW, BYOL, SimCLR, RP, TS, AE, pi-VAE (configs/reach_<method>.yaml through the
trainer), the supervised MLP (configs/reach_supervised.yaml) and a ridge read-out of the raw
rates. Each recording (``--data``: .npz of binned counts, or stores; default Chewie-1) is split
by trial order 70/10/20, read out on its moving bins; every method picks its read-out (or
epoch) on the validation split and only reports the test split (``benchmarks/reach.py``'s
protocol). All methods run on the same seeds; pi-VAE and the supervised MLP train on labels.

Per recording and method: test Acc and delta-Acc, mean +- std over seeds (and per seed);
with several recordings, their mean. Runs go ``--jobs`` at a time in spawned processes with
one torch thread each (deterministic per seed).

Usage: python benchmarks/table3.py [--seeds 0 1 2] [--jobs 2] [--methods myow byol ...]
       [--data REC.npz|STORE ...] [--set key=value ...]   (--set applies to every trained run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import prepare_store, run_jobs, summarize  # noqa: E402

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"
KEYS = ("reach_acc", "reach_delta_acc", "reach_val_acc")
# paper Table 3: (Acc, delta-Acc) % on Chewie-1, Chewie-2, Mihi-1, Mihi-2
PAPER = {
    "supervised": [(63.29, 77.22), (72.29, 81.51), (63.64, 79.02), (61.49, 68.44)],
    "pivae": [(65.63, 82.62), (60.60, 74.64), (62.44, 77.12), (63.26, 77.58)],
    "ae": [(48.40, 67.51), (46.79, 65.84), (50.94, 68.03), (55.19, 74.98)],
    "rp": [(59.21, 78.10), (50.69, 60.01), (57.78, 76.03), (53.76, 71.34)],
    "ts": [(60.16, 78.76), (49.48, 63.55), (59.23, 76.98), (54.10, 71.65)],
    "simclr": [(61.36, 79.40), (51.62, 65.01), (59.41, 77.82), (56.29, 74.57)],
    "byol": [(66.65, 78.17), (64.56, 77.22), (72.64, 85.14), (67.44, 82.17)],
    "myow": [(70.54, 79.99), (72.33, 84.81), (73.40, 85.58), (71.80, 81.96)],
}
PAPER_RECORDINGS = ("Chewie-1", "Chewie-2", "Mihi-1", "Mihi-2")
METHODS = (*PAPER, "raw")
LABELLED = ("supervised", "pivae")  # not self-supervised


def run_one(job: dict) -> dict:
    """One (recording, method, seed): train and read out (benchmarks/reach.py's runs)."""
    from benchmarks.reach import run_raw, run_ssl, run_supervised
    from pipeline.runtime import set_threads

    set_threads(job["threads"])
    method, seed, store = job["method"], job["seed"], job["store"]
    if method == "raw":
        res = run_raw(store)
    elif method == "supervised":
        res = run_supervised(store, seed)
    else:
        res = run_ssl(f"reach_{method}.yaml", store, seed, [f"run.threads={job['threads']}", *job["overrides"]],
                      f"{job['tmp']}/{job['recording']}")
    return {"recording": job["recording"], "method": method, "seed": seed, **res}


def markdown(result: dict, methods: list[str], names: list[str]) -> str:
    head = "| method | " + " | ".join(f"{n} Acc | {n} delta-Acc" for n in names)
    head += " | paper " + " / ".join(PAPER_RECORDINGS) + " Acc |"
    lines = [head, "|---" * (1 + 2 * len(names) + 1) + "|"]
    for m in methods:
        cells = []
        for n in names:
            e = result["per_recording"][n][m]
            cells += [f"{100 * e['reach_acc']:.1f} +- {100 * e['reach_acc_std']:.1f}",
                      f"{100 * e['reach_delta_acc']:.1f} +- {100 * e['reach_delta_acc_std']:.1f}"]
        paper = " / ".join(f"{a:.2f}" for a, _ in PAPER[m]) if m in PAPER else "-"
        label = f"{m} (labels)" if m in LABELLED else m
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--data", nargs="+", default=[str(CHEWIE)], metavar="REC",
                   help="reach recordings: .npz of binned counts or store URLs (default: Chewie-1)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 torch thread each)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; any of {', '.join(METHODS)}")
    threads = 1 if args.jobs > 1 else 0
    names = [Path(d).stem for d in args.data]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, (path, name) in enumerate(zip(args.data, names)):
            store = prepare_store(path, tmp, i)
            jobs += [{"recording": name, "method": m, "seed": s, "store": store, "tmp": tmp, "threads": threads,
                      "overrides": args.overrides}
                     for s in args.seeds for m in args.methods if not (m == "raw" and s != args.seeds[0])]
        runs = run_jobs(run_one, jobs, args.jobs, lambda r: f"{r['recording']} {r['method']} seed {r['seed']}: "
                        f"Acc {100 * r['reach_acc']:.1f}% ({r['seconds']:.0f} s)")
    result: dict = {"benchmark": "table3", "recordings": names, "seeds": args.seeds, "overrides": args.overrides,
                    "per_recording": {}, "paper": {m: PAPER[m] for m in args.methods if m in PAPER}}
    for name in names:
        result["per_recording"][name] = {
            m: summarize(sorted((r for r in runs if r["recording"] == name and r["method"] == m),
                                key=lambda r: r["seed"]), KEYS) for m in args.methods}
    if len(names) > 1:
        result["mean_over_recordings"] = {
            m: {k: round(statistics.fmean(result["per_recording"][n][m][k] for n in names), 4)
                for k in ("reach_acc", "reach_delta_acc")} for m in args.methods}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(markdown(result, args.methods, names), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
