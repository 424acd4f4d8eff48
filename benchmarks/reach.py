"""The Chewie-1 row of the paper's Table 3 in one run; prints one JSON line.

MYOW and BYOL (configs/reach_myow.yaml and reach_byol.yaml, the same seeds for both),
the supervised MLP (configs/reach_supervised.yaml) and a ridge read-out of the raw
firing rates, on the same split (trials 70/10/20 in recording order), moving bins only
(hand speed > 5 cm/s). Every method picks its read-out strength (or its epoch, for the
supervised MLP) on the validation split; the test split is only reported.

For each method: mean and standard deviation over seeds of test accuracy and
delta-accuracy (and of the validation figures, which are what configs may be tuned on),
the per-seed values and the seconds per run.

Any number of reach recordings (``--data``: .npz of binned counts, or stores; recordings
may hold only some bins of each trial, e.g. only the moving ones): the figures per
recording, the paired MYOW - BYOL difference per seed (mean, std, 95% t interval), and
with several recordings the mean over them.

Usage: python benchmarks/reach.py [--seeds 0 1 2] [--set key=value ...] [--methods myow byol supervised raw]
       [--data REC.npz|STORE ...]   (--set applies to the MYOW and BYOL runs alike)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import prepare_store, summarize, t_interval  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.augment import Normalization  # noqa: E402
from pipeline.data.recording import load_recording  # noqa: E402
from pipeline.readout.neural import reach_task_rows  # noqa: E402
from pipeline.readout.probes import reach_readout  # noqa: E402
from pipeline.supervised import fit_supervised  # noqa: E402
from pipeline.loop import train  # noqa: E402
from pipeline.runtime import set_threads  # noqa: E402

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"
KEYS = ("reach_acc", "reach_delta_acc", "reach_val_acc", "reach_val_delta_acc")


def run_ssl(config: str, store: str, seed: int, overrides: list[str], tmp: str) -> dict:
    cfg = load_config(str(ROOT / "configs" / config),
                      [f"data.path={store}", f"run.seed={seed}", f"run.dir={tmp}/{config}-{seed}",
                       "run.progress=false", "eval.tsne=false", "run.resume=false", *overrides])
    t0 = time.perf_counter()
    _, results = train(cfg)
    return {**{k: results[k] for k in KEYS}, "seconds": time.perf_counter() - t0}


def run_supervised(store: str, seed: int) -> dict:
    cfg = load_config(str(ROOT / "configs" / "reach_supervised.yaml"), [f"data.path={store}", f"run.seed={seed}"])
    t0 = time.perf_counter()
    rec = load_recording(store)
    results = fit_supervised(cfg, rec, reach_task_rows(rec, cfg.data.split, cfg.eval.reach_min_speed))
    return {**{k: results[k] for k in KEYS}, "seconds": time.perf_counter() - t0}


def run_raw(store: str) -> dict:
    """Ridge on z-scored raw rates (train statistics), alpha on validation."""
    t0 = time.perf_counter()
    rec = load_recording(store)
    rows = reach_task_rows(rec)
    norm = Normalization.fit(rec.rates[torch.from_numpy(rows["train"])])
    feats = {s: norm(rec.rates[torch.from_numpy(r)]).numpy() for s, r in rows.items()}
    y = {s: rec.labels["target"][r] for s, r in rows.items()}
    results = reach_readout(feats["train"], y["train"], feats["val"], y["val"], feats["test"], y["test"])
    return {**{k: results[k] for k in KEYS}, "seconds": time.perf_counter() - t0}


def paired(a: list[dict], b: list[dict], key: str = "reach_acc") -> dict:
    """Per-seed a - b of ``key`` (the same seeds in the same order), mean, std and 95% t interval."""
    diffs = [x[key] - y[key] for x, y in zip(a, b)]
    mean, sd, lo, hi = t_interval(diffs)
    return {"mean": round(mean, 4), "std": round(sd, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "per_seed": [round(d, 4) for d in diffs]}


def run_recording(path: str, args, tmp: str, index: int) -> dict:
    store = prepare_store(path, tmp, index)
    out: dict = {"data": path}
    runs = {}
    for method in args.methods:
        if method in ("myow", "byol"):
            runs[method] = [run_ssl(f"reach_{method}.yaml", store, s, args.overrides, f"{tmp}/{index}")
                            for s in args.seeds]
        elif method == "supervised":
            runs[method] = [run_supervised(store, s) for s in args.seeds]
        elif method == "raw":
            runs[method] = [run_raw(store)]  # deterministic: one run
        else:
            raise SystemExit(f"unknown method {method!r}")
        out[method] = summarize(runs[method], KEYS)
        print(f"{Path(path).name} {method}: " + json.dumps(out[method]), file=sys.stderr)
    if "myow" in runs and "byol" in runs:
        out["myow_minus_byol"] = paired(runs["myow"], runs["byol"])
        out["myow_minus_byol_delta_acc"] = paired(runs["myow"], runs["byol"], "reach_delta_acc")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", nargs="+", default=["myow", "byol", "supervised", "raw"])
    p.add_argument("--data", nargs="+", default=[str(CHEWIE)], metavar="REC",
                   help="reach recordings: .npz of binned counts or store URLs (default: Chewie-1)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(0)
    result: dict = {"benchmark": "reach", "recordings": [Path(d).name for d in args.data], "seeds": args.seeds,
                    "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        per = [run_recording(d, args, tmp, i) for i, d in enumerate(args.data)]
    if len(per) == 1:
        result.update({k: v for k, v in per[0].items() if k != "data"})
        result["dataset"] = Path(args.data[0]).stem
    else:
        result["per_recording"] = per
        mean = {}
        for method in args.methods:
            for key in ("reach_acc", "reach_delta_acc"):
                mean.setdefault(method, {})[key] = round(statistics.fmean(r[method][key] for r in per), 4)
        if "myow" in args.methods and "byol" in args.methods:
            mean["myow_minus_byol"] = round(statistics.fmean(r["myow_minus_byol"]["mean"] for r in per), 4)
        result["mean_over_recordings"] = mean
    print(json.dumps(result))


if __name__ == "__main__":
    main()
