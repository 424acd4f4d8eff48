"""The paper's Fig. 4 (Mouse-CA1 arousal states) in one run; prints one JSON line.

MYOW and BYOL (configs/sleep_myow.yaml and sleep_byol.yaml, the same seeds for both), the
baselines of Fig. 4 (``--methods ... simclr rp ts ae pivae``: configs/sleep_<method>.yaml), the
supervised MLP (configs/sleep_supervised.yaml) and a logistic read-out of the raw rates, on
the 12-hour mouse CA1 recording split 70/10/20 by time. Every method picks its read-out
(C and class weighting, or its epoch for the supervised MLP) on the validation split; the
test split is only reported: accuracy, macro F1 and weighted F1 of the arousal state
(the authors' code reports weighted F1 with a class-balanced classifier).

For each method: mean and std over seeds, the per-seed values, and for MYOW the paired
MYOW - BYOL difference of weighted F1 per seed.

Usage: python benchmarks/sleep.py [--seeds 0 1 2] [--jobs 2] [--set key=value ...]
       [--methods myow byol simclr rp ts ae pivae supervised raw]   (--set applies to every trained run)
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

SLEEP = ROOT.parent / "shared" / "data" / "sleep-mouse-ca1-12h" / "mouse-ca1-12h-4s.npz"
KEYS = ("weighted_f1", "macro_f1", "accuracy", "val_weighted_f1")
PAPER = {"myow": 93.70, "byol": 93.24, "simclr": 81.94, "rp": 82.12, "ts": 81.93, "ae": 57.73, "pivae": 82.48,
         "supervised": 93.01}  # weighted F1 %, paper Fig. 4 (Mouse-CA1)
METHODS = (*PAPER, "raw")


def run_one(job: dict) -> dict:
    from pipeline.config import load_config
    from pipeline.loop import train
    from pipeline.runtime import set_threads
    from pipeline.supervised import train_supervised

    set_threads(job["threads"])
    method, seed, store, tmp = job["method"], job["seed"], job["store"], job["tmp"]
    t0 = time.perf_counter()
    if method == "raw":
        res = raw_readout(store)
    else:
        overrides = [f"data.path={store}", f"run.seed={seed}", f"run.dir={tmp}/{method}-{seed}", "run.progress=false",
                     "run.resume=false", f"run.threads={job['threads']}"]
        if method == "supervised":
            _, res = train_supervised(load_config(str(ROOT / "configs" / "sleep_supervised.yaml"), overrides))
        else:
            cfg = load_config(str(ROOT / "configs" / f"sleep_{method}.yaml"),
                              [*overrides, "eval.tsne=false", *job["overrides"]])
            _, res = train(cfg)
    val_key = "arousal_val_weighted_f1"
    return {"method": method, "seed": seed, "seconds": time.perf_counter() - t0,
            **{k: res[k] for k in ("weighted_f1", "macro_f1", "accuracy")}, "val_weighted_f1": res.get(val_key)}


def raw_readout(store: str) -> dict:
    """Logistic regression on z-scored raw rates (train statistics), C and weighting on validation."""
    import torch

    from pipeline.data.augment import Normalization

    from pipeline.data.recording import load_recording
    from pipeline.readout.probes import classification_readout
    from pipeline.data.recording import split_rows

    rec = load_recording(store)
    y = rec.labels["arousal"]
    rows = {k: r[y[r] >= 0] for k, r in split_rows(rec.trial, (0.7, 0.1, 0.2)).items()}
    norm = Normalization.fit(rec.rates[torch.from_numpy(rows["train"])])
    f = {k: norm(rec.rates[torch.from_numpy(r)]).numpy() for k, r in rows.items()}
    res = classification_readout(f["train"], y[rows["train"]], f["val"], y[rows["val"]], f["test"], y[rows["test"]])
    return {**res, "arousal_val_weighted_f1": res["val_weighted_f1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", nargs="+", default=["myow", "byol", "supervised", "raw"],
                   help=f"any of {', '.join(METHODS)} (configs/sleep_<method>.yaml)")
    p.add_argument("--data", default=str(SLEEP))
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 torch thread each)")
    args = p.parse_args()
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}")
    threads = 1 if args.jobs > 1 else 0
    result: dict = {"benchmark": "sleep", "dataset": Path(args.data).stem, "seeds": args.seeds,
                    "overrides": args.overrides, "paper_weighted_f1": PAPER}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare_store(args.data, tmp)
        jobs = [{"method": m, "seed": s, "store": store, "tmp": tmp, "threads": threads, "overrides": args.overrides}
                for s in args.seeds for m in args.methods if not (m == "raw" and s != args.seeds[0])]
        runs = run_jobs(run_one, jobs, args.jobs, lambda r: f"{r['method']} seed {r['seed']}: weighted F1 "
                        f"{100 * r['weighted_f1']:.2f}% ({r['seconds']:.0f} s)")
    for method in args.methods:
        result[method] = summarize(sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"]), KEYS)
    if "myow" in args.methods and "byol" in args.methods:
        by = {(r["method"], r["seed"]): r for r in runs}
        diffs = [by[("myow", s)]["weighted_f1"] - by[("byol", s)]["weighted_f1"] for s in args.seeds]
        result["myow_minus_byol_weighted_f1"] = {"mean": round(statistics.fmean(diffs), 4),
                                                 "per_seed": [round(d, 4) for d in diffs]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    lines = ["| method | weighted F1 % | macro F1 % | accuracy % | paper weighted F1 % |", "|---|---|---|---|---|"]
    for m in args.methods:
        e = result[m]
        lines.append(f"| {m} | {100 * e['weighted_f1']:.2f} +- {100 * e['weighted_f1_std']:.2f} | "
                     f"{100 * e['macro_f1']:.2f} +- {100 * e['macro_f1_std']:.2f} | "
                     f"{100 * e['accuracy']:.2f} +- {100 * e['accuracy_std']:.2f} | {PAPER.get(m, '-')} |")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
