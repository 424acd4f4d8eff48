"""The selection protocol: compare settings on the NON-TEST trials only, paired by seed.

For every reach recording given (an .npz of binned counts, or a recording store), every
candidate (a name and ``--set`` overrides on top of ``--config``) and every seed:

1. self-supervised training on the non-test trials only: ``data.split`` becomes
   [train + val, 0, test] of the config's split (Chewie-1: the first 127 of 159 trials;
   the test trials are the same 32 as in ``benchmarks/reach.py``);
2. the frozen encoder embeds those trials' bins; a ridge read-out of the reach direction
   is cross-validated over ``--folds`` folds of consecutive trials, with the ridge
   strength chosen by an inner cross-validation of the fitting folds
   (:func:`pipeline.readout.probes.reach_cv_readout`). Every labelled moving bin of the non-test
   trials is predicted once (Chewie-1: ~730 bins instead of the 84 validation bins).

``--protocol prospective`` mirrors the test instead (later trials, after a gap, that the SSL
never saw): the non-test trials of each .npz recording are written as two recordings, in
recording order ("fwd") and in reversed trial order ("bwd", each trial's bins kept in
order), and each is run with ``--prospective-split`` (default 0.625/0.125/0.25: Chewie-1's
127 non-test trials -> 79 SSL/read-out training trials, 16 trials whose bins choose the ridge
strength, and 32 later (fwd) or earlier (bwd) trials that are predicted, the shape of the
real 111/16/32 split). The figure is that block's accuracy, as ``benchmarks/reach.py``'s
test accuracy; cross-validation instead interpolates between trials the SSL trained on, and
its ranking need not carry over to trials it did not see.

The test trials are never read out here. Every candidate runs on the same seeds, so the
comparison with ``--baseline`` is paired: per (recording, seed) the difference of
accuracy, then its mean, std and a 95% t confidence interval (over all recordings x
seeds, and per recording).

Prints a Markdown table on stderr and one JSON line on stdout.

Usage:
    python benchmarks/selection.py --seeds 0 1 2 3 4 --jobs 2 \\
        --candidate byol method.name=byol --candidate myow \\
        --candidate myow_k1 method.k=1 [--data REC.npz|STORE ...] [--config configs/reach_myow.yaml]
        [--protocol cv|prospective]
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

from benchmarks.common import prepare_store, run_jobs, t_interval  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"


def non_test_recordings(path: str, split: list[float], tmp: str, index: int) -> list[tuple[str, str]]:
    """The prospective protocol's recordings: (suffix, .npz path) for the non-test trials of
    ``path`` in recording order ("fwd") and in reversed trial order ("bwd")."""
    import numpy as np

    from pipeline.data.recording import split_rows, trial_ranks

    if not path.endswith(".npz"):
        raise SystemExit(f"{path}: --protocol prospective takes .npz recordings (binned counts with a trial array)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: cannot read it as an .npz of binned counts ({err})")
    if "trial" not in arrays:
        raise SystemExit(f"{path}: no 'trial' array; the prospective protocol splits by trials")
    trial = arrays["trial"]
    n_rows = trial.shape[0]
    rank = trial_ranks(trial)  # recording order of each row's trial, -1 outside trials
    rows = split_rows(trial, split)
    keep = np.concatenate([rows["train"], rows["val"]])
    keep = keep[rank[keep] >= 0]
    out = []
    for suffix, sign in (("fwd", 1), ("bwd", -1)):
        take = keep[np.lexsort((keep, sign * rank[keep]))]  # trials in (reversed) order, rows in order within
        derived = {k: (v[take] if v.ndim and v.shape[0] == n_rows else v) for k, v in arrays.items()}
        dest = os.path.join(tmp, f"rec{index}-{suffix}.npz")
        np.savez(dest, **derived)
        out.append((suffix, dest))
    return out


def run_one(job: dict) -> dict:
    """Train one (recording, candidate, seed) and read it out with the job's protocol."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.augment import normalizations_from
    from pipeline.readout.neural import embed, reach_task_rows
    from pipeline.readout.probes import reach_cv_readout
    from pipeline.data.recording import open_store
    from pipeline.loop import train
    from pipeline.methods import build_method
    from pipeline.runtime import set_threads

    if job["threads"]:
        set_threads(job["threads"])
    run_dir = os.path.join(job["tmp"], f"{job['recording']}-{job['candidate']}-{job['seed']}")
    common = [f"data.path={job['store']}", f"run.seed={job['seed']}", f"run.dir={run_dir}", "run.progress=false",
              "run.resume=false", "eval.tsne=false", f"run.threads={job['threads']}", "train.checkpoint_every=1000000"]
    if job["protocol"] == "prospective":
        # the derived recording holds only non-test trials: its own split's last block is the one predicted
        split = ",".join(str(f) for f in job["prospective_split"])
        cfg = load_config(job["config"], [*common, f"data.split=[{split}]", "eval.tasks=[reach]", *job["overrides"]])
        t0 = time.perf_counter()
        _, results = train(cfg)
        seconds = time.perf_counter() - t0
        res = {"acc": results["reach_acc"], "delta_acc": results["reach_delta_acc"],
               "val_acc": results["reach_val_acc"], "bins": results["reach_test_bins"]}
    else:
        base = load_config(job["config"], [f"data.path={job['store']}"])
        tr, va, te = base.data.split
        cfg = load_config(job["config"], [*common, f"data.split=[{tr + va},0.0,{te}]", "eval.tasks=[none]",
                                          *job["overrides"]])
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt")
        norm = normalizations_from(ckpt["normalization"])
        rec = open_store(job["store"])
        model = build_method(cfg).build_model(cfg, rec.n_units)  # any method's module, as pipeline.evaluate
        model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            emb = embed(model.encoder, rec, norm)
        # the read-out rows of the SSL training split = the non-test trials; test rows are never read
        rows = reach_task_rows(rec, cfg.data.split, cfg.eval.reach_min_speed)["train"]
        cv = reach_cv_readout(emb[rows], rec.labels["target"][rows], rec.trial[rows], n_folds=job["folds"])
        res = {"acc": cv["reach_cv_acc"], "delta_acc": cv["reach_cv_delta_acc"], "bins": cv["reach_cv_bins"],
               "fold_acc": cv["reach_cv_fold_acc"]}
    monitors = {}
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for key in ("mined_label_agreement_ratio", "loss_mined", "loss_augmented", "embedding_std", "pretext_accuracy"):
        vals = [m[key] for m in metrics if m.get(key) is not None]
        monitors[key] = vals[-1] if vals else None
    return {**{k: job[k] for k in ("recording", "candidate", "seed")}, **res, "seconds": seconds, **monitors}


def summarize(runs: list[dict], candidates: list[str], baseline: str, recordings: list[str]) -> dict:
    by = {(r["recording"], r["candidate"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = {}
    for name in candidates:
        entry: dict = {}
        accs = [by[(rec, name, s)]["acc"] for rec in recordings for s in seeds]
        entry["acc"], entry["acc_std"] = statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        entry["delta_acc"] = statistics.fmean(by[(rec, name, s)]["delta_acc"] for rec in recordings for s in seeds)
        entry["seconds_per_run"] = statistics.fmean(by[(rec, name, s)]["seconds"] for rec in recordings for s in seeds)
        agree = [by[(rec, name, s)]["mined_label_agreement_ratio"] for rec in recordings for s in seeds]
        entry["mined_label_agreement"] = statistics.fmean(agree) if all(a is not None for a in agree) else None
        entry["per_recording"] = {rec: [round(by[(rec, name, s)]["acc"], 4) for s in seeds] for rec in recordings}
        if name != baseline:
            diffs = [by[(rec, name, s)]["acc"] - by[(rec, baseline, s)]["acc"] for rec in recordings for s in seeds]
            mean, sd, lo, hi = t_interval(diffs)
            entry["paired_diff"] = {"mean": mean, "std": sd, "ci95": [lo, hi], "n": len(diffs),
                                    "wins": sum(d > 0 for d in diffs)}
            entry["paired_diff_per_recording"] = {}
            for rec in recordings:
                d = [by[(rec, name, s)]["acc"] - by[(rec, baseline, s)]["acc"] for s in seeds]
                m, sd_, lo_, hi_ = t_interval(d)
                entry["paired_diff_per_recording"][rec] = {"mean": m, "ci95": [lo_, hi_]}
        out[name] = entry
    return out


def markdown(summary: dict, baseline: str, protocol: str) -> str:
    what = "CV" if protocol == "cv" else "prospective"
    lines = [f"| candidate | {what} acc % (mean +- std) | {what} delta-acc % | paired diff vs {baseline} (95% CI) | wins | "
             "mined label agreement | s/run |", "|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        d = e.get("paired_diff")
        diff = "-" if d is None else f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
        wins = "-" if d is None else f"{d['wins']}/{d['n']}"
        agree = "-" if e["mined_label_agreement"] is None else f"{e['mined_label_agreement']:.2f}"
        lines.append(f"| {name} | {100 * e['acc']:.2f} +- {100 * e['acc_std']:.2f} | "
                     f"{100 * e['delta_acc']:.2f} | {diff} | {wins} | {agree} | {e['seconds_per_run']:.0f} |")
    return "\n".join(lines)


def parse_candidates(raw: list[list[str]]) -> list[tuple[str, list[str]]]:
    out = []
    for tokens in raw:
        name, overrides = tokens[0], tokens[1:]
        if "=" in name:
            raise SystemExit(f"--candidate {' '.join(tokens)}: the first word is the candidate's name, "
                             "then KEY=VALUE overrides")
        out.append((name, overrides))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("--candidate: names must be unique")
    return out


def merge(paths: list[str], candidates: list[str], baseline: str) -> None:
    """Summarise the runs of earlier outputs (``--merge``)."""
    runs: dict[tuple, dict] = {}
    protocols, settings = set(), {}
    for path in paths:
        try:
            out = json.loads(Path(path).read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as err:
            raise SystemExit(f"{path}: not an output of benchmarks/selection.py ({err})")
        if not isinstance(out, dict) or "runs" not in out:
            raise SystemExit(f"{path}: not an output of benchmarks/selection.py (no runs)")
        protocols.add(out.get("protocol", "cv"))
        for name, overrides in out.get("candidates", {}).items():
            full = [*out.get("common_overrides", []), *overrides]
            if settings.setdefault(name, full) != full:
                raise SystemExit(f"--merge: candidate {name!r} has other settings in {path}: {full} vs {settings[name]}")
        for r in out["runs"]:
            runs.setdefault((r["recording"], r["candidate"], r["seed"]), r)
    if len(protocols) != 1:
        raise SystemExit(f"--merge: the outputs mix protocols {sorted(protocols)}")
    pairs = {(rec, seed) for rec, _, seed in runs}
    pairs = sorted(p for p in pairs if all((p[0], c, p[1]) in runs for c in candidates))
    if not pairs:
        raise SystemExit(f"--merge: no (recording, seed) has runs of every candidate {candidates}")
    recordings, seeds = sorted({r for r, _ in pairs}), sorted({s for _, s in pairs})
    if len(pairs) != len(recordings) * len(seeds):
        raise SystemExit("--merge: the candidates' runs do not cover the same seeds on every recording")
    kept = [runs[(rec, c, s)] for rec, s in pairs for c in candidates]
    summary = summarize(kept, candidates, baseline, recordings)
    protocol = protocols.pop()
    print(markdown(summary, baseline, protocol), file=sys.stderr)
    print(json.dumps({"benchmark": "select", "protocol": protocol, "merged": paths, "recordings": recordings,
                      "seeds": seeds, "baseline": baseline, "summary": summary}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=None, metavar="REC",
                   help="reach recording: .npz of binned counts or a store URL (repeatable; default Chewie-1)")
    p.add_argument("--config", default=str(ROOT / "configs" / "reach_myow.yaml"))
    p.add_argument("--candidate", action="append", nargs="+", metavar="NAME [KEY=VALUE ...]", required=True,
                   help="a candidate: a name, then --set overrides on top of --config (repeatable)")
    p.add_argument("--baseline", default=None, help="candidate the others are paired against (default: the first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--protocol", choices=("cv", "prospective"), default="cv",
                   help="cv: SSL on the non-test trials, read-out cross-validated over them; prospective: SSL on "
                        "the first 62.5%% of the non-test trials (forwards and in reversed trial order), read-out "
                        "of the last 25%% after a 12.5%% gap, as the test split (default cv)")
    p.add_argument("--prospective-split", type=float, nargs=3, default=[0.625, 0.125, 0.25], metavar="F",
                   help="train/val/predicted fractions of the non-test trials (prospective protocol)")
    p.add_argument("--folds", type=int, default=5, help="trial-grouped folds of the read-out (cv protocol)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 torch thread each)")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every candidate")
    p.add_argument("--merge", nargs="+", metavar="OUT.json", default=None,
                   help="train nothing: pool the runs of earlier outputs of this script (their JSON lines; a "
                        "run found twice is kept once) and summarise the --candidate names over the (recording, "
                        "seed) pairs that all of them ran")
    args = p.parse_args()
    candidates = parse_candidates(args.candidate)
    baseline = args.baseline or candidates[0][0]
    if baseline not in {n for n, _ in candidates}:
        raise SystemExit(f"--baseline {baseline}: not a candidate")
    if args.merge:
        merge(args.merge, [n for n, _ in candidates], baseline)
        return
    data = args.data or [str(CHEWIE)]
    names = [Path(d.rstrip("/")).stem for d in data]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    threads = 1 if args.jobs > 1 else 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.protocol == "prospective":
            split = list(load_config(args.config, [f"data.path={data[0]}"]).data.split)
            derived = [(f"{name}-{suffix}", npz) for i, (d, name) in enumerate(zip(data, names))
                       for suffix, npz in non_test_recordings(d, split, tmp, i)]
            names = [n for n, _ in derived]
            stores = [prepare_store(npz, tmp, i) for i, (_, npz) in enumerate(derived)]
        else:
            stores = [prepare_store(d, tmp, i) for i, d in enumerate(data)]
        jobs = [{"recording": rec, "store": store, "candidate": name, "overrides": [*args.common, *ov],
                 "seed": seed, "config": args.config, "tmp": tmp, "folds": args.folds, "threads": threads,
                 "protocol": args.protocol, "prospective_split": args.prospective_split}
                for seed in args.seeds for rec, store in zip(names, stores) for name, ov in candidates]
        runs = run_jobs(run_one, jobs, args.jobs, lambda r: f"{r['recording']} {r['candidate']} seed {r['seed']}: "
                        f"{args.protocol} acc {100 * r['acc']:.2f}% ({r['seconds']:.0f} s)")
    summary = summarize(runs, [n for n, _ in candidates], baseline, names)
    print(markdown(summary, baseline, args.protocol), file=sys.stderr)
    result = {"benchmark": "select", "protocol": args.protocol, "recordings": names, "seeds": args.seeds,
              "folds": args.folds, "prospective_split": args.prospective_split,
              "config": os.path.relpath(args.config, ROOT), "common_overrides": args.common,
              "candidates": {n: ov for n, ov in candidates}, "baseline": baseline, "summary": summary,
              "runs": sorted(runs, key=lambda r: (r["recording"], r["candidate"], r["seed"])),
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
