"""The paper's App. I test (dSprites with latent holes) in one run; prints one JSON line.

For each rate r: ``python -m preprocess.dsprites`` keeps half of the scale values and half
of the orientation values (latent seed ``--data-seed``) and trains on a random r of the images
with kept latents. ``--test kept`` (default, the paper's "remaining images") tests on the
kept-latent images not drawn for training (latent combinations such as positions never
trained on); ``--test unseen`` on images with a scale or orientation never trained on. MYOW
and BYOL (configs/dsprites_myow.yaml, dsprites_byol.yaml) train with the same steps and
seeds; the read-out is the trainer's linear probe of the shape (L2 chosen on a split of the
training images), scored on the test images. Paper (Fig. S7 text): both near 100% at 30%;
at 7.5% BYOL about 60%, MYOW 94%.

The views are the configs' (``images.transform: dsprites``); ``--set images.transform=dsprites-local``
gives App. I's "too local" augmentations (crop 0.85-1).

Usage: python benchmarks/dsprites.py [--rates 0.3 0.15 0.075] [--seeds 0 1 2] [--jobs 2] [--test {kept,unseen}]
       [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_jobs  # noqa: E402


def run_one(job: dict) -> dict:
    from pipeline.config import load_config
    from pipeline.loop import train

    cfg = load_config(str(ROOT / "configs" / f"dsprites_{job['method']}.yaml"),
                      [f"data.path={job['shards']}", f"run.seed={job['seed']}",
                       f"run.dir={job['tmp']}/{job['method']}-{job['rate']}-{job['seed']}", "run.progress=false",
                       "run.resume=false", f"run.threads={job['threads']}", *job["overrides"]])
    t0 = time.perf_counter()
    _, res = train(cfg)
    return {**{k: job[k] for k in ("method", "rate", "seed")}, "linear_accuracy": res["linear_accuracy"],
            "knn_accuracy": res.get("knn_accuracy"), "mining_class_agreement": res.get("mining_class_agreement"),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.15, 0.075])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0, help="seed of the kept latents and the sampled images")
    p.add_argument("--test", choices=["kept", "unseen"], default="kept",
                   help="test images: kept-latent images not trained on (paper App. I, default) or unseen "
                   "scales/orientations")
    p.add_argument("--methods", nargs="+", default=["myow", "byol"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from preprocess.dsprites import main as dsprites_main

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for rate in args.rates:
            shards = os.path.join(tmp, f"ds-{rate}")
            if dsprites_main([shards, "--rate", str(rate), "--seed", str(args.data_seed), "--test", args.test,
                              "--no-progress"]) != 0:
                raise SystemExit("could not write the dSprites shards")
            jobs += [{"method": m, "rate": rate, "seed": s, "shards": shards, "tmp": tmp, "overrides": args.overrides,
                      "threads": 1 if args.jobs > 1 else 0} for s in args.seeds for m in args.methods]
        runs = run_jobs(run_one, jobs, args.jobs, lambda r: f"rate {r['rate']} {r['method']} seed {r['seed']}: linear "
                        f"{100 * r['linear_accuracy']:.2f}% ({r['seconds']:.0f} s)")
    by = {(r["method"], r["rate"], r["seed"]): r for r in runs}
    summary: dict = {}
    lines = ["| rate | " + " | ".join(f"{m} linear acc %" for m in args.methods) + " | MYOW - BYOL (paired) |",
             "|---|" + "---|" * (len(args.methods) + 1)]
    for rate in args.rates:
        entry = {}
        for m in args.methods:
            acc = [by[(m, rate, s)]["linear_accuracy"] for s in args.seeds]
            entry[m] = {"mean": statistics.fmean(acc), "std": statistics.pstdev(acc), "per_seed": acc}
        if {"myow", "byol"} <= set(args.methods):
            d = [by[("myow", rate, s)]["linear_accuracy"] - by[("byol", rate, s)]["linear_accuracy"] for s in args.seeds]
            entry["myow_minus_byol"] = {"mean": statistics.fmean(d), "per_seed": d}
        summary[str(rate)] = entry
        cells = [f"{100 * entry[m]['mean']:.1f} +- {100 * entry[m]['std']:.1f}" for m in args.methods]
        diff = entry.get("myow_minus_byol")
        diff_text = "-" if diff is None else f"{100 * diff['mean']:+.1f}"
        lines.append(f"| {rate} | " + " | ".join(cells) + f" | {diff_text} |")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"benchmark": "dsprites", "rates": args.rates, "seeds": args.seeds, "data_seed": args.data_seed,
                      "test": args.test,
                      "overrides": args.overrides, "summary": summary, "runs": runs,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
