"""MYOW vs BYOL on image shards, CPU: training throughput and MNIST linear accuracy; prints
one JSON line.

1. Throughput: anchor images per second through full training steps (a batch from each
   stream, with its augmentations, + ``pipeline.step.train_step``), MYOW and BYOL
   interleaved in blocks so machine noise hits both alike, medians after a warm-up, in the
   steady state (lambda ramped in). The small setting: configs/mnist_myow.yaml (small
   convnet, 16x16 views) with B = L = ``--throughput-batch``.
2. Accuracy: the MNIST test set (``../shared/data/mnist-t10k``, sharded by
   ``preprocess.shard_images``) split 8000 / 2000 (images 0-7999 trained on, 8000-9999
   evaluated on, ``images.eval_fraction``); ``pipeline.loop.train`` with
   configs/mnist_myow.yaml and configs/mnist_byol.yaml for the same number of steps and
   seeds, and a random-init encoder of the same architecture (the trainer's initialisation
   for that seed, no training) read out by the same evaluation (linear probe: logistic
   regression, its L2 weight chosen on a split of the 8000 training images; weighted kNN).
   With ``--byol-same-time`` BYOL is also trained for as many steps as fit MYOW's training
   wall time. The MNIST settings were chosen on a validation split carved from the 8000
   training images (trained on 0-6399, validated on 6400-7999), never on the 2000.

Usage: python benchmarks/images.py [--seeds 0 1 2] [--steps N] [--byol-same-time]
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

from pipeline.build import build_model, build_optimizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.stages import derive_seed  # noqa: E402
from pipeline.kinds import build_train_data  # noqa: E402
from pipeline.loop import train  # noqa: E402
from pipeline.runtime import seed_everything, set_threads  # noqa: E402
from pipeline.step import Plan, schedules, train_step  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist-t10k"


def config(method: str, shards: str, *overrides: str):
    return load_config(ROOT / "configs" / f"mnist_{method}.yaml",
                       [f"data.path={shards}", "run.progress=false", "run.device=cpu", *overrides])


def stepper(method: str, shards: str, batch: int, seed: int):
    """One full training step per call: both streams' next batch + train_step (steady state)."""
    cfg = config(method, shards, f"optim.batch_size={batch}", f"method.pool_size={batch}", f"run.seed={seed}")
    data = build_train_data(cfg)
    plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
    seed_everything(seed)
    model = build_model(cfg, data.model_input()).train()
    opt = build_optimizer(cfg, model.online_parameters())
    gen = torch.Generator().manual_seed(derive_seed(seed, 3, 0))
    state = {"step": plan.mining_ramp_steps + plan.mining_warmup_steps + 1}

    def step() -> None:
        anchors = next(data.sessions[0].anchors)
        pool = next(data.sessions[0].pool) if schedules(state["step"], cfg, plan)[2] > 0 else None
        train_step(model, opt, anchors, pool, state["step"], cfg, gen, plan=plan)
        state["step"] += 1
    return step, data


def throughput(shards: str, batch: int, steps: int, warmup: int, block: int, seed: int) -> dict:
    steppers = {m: stepper(m, shards, batch, seed) for m in ("myow", "byol")}
    times = {m: [] for m in steppers}
    for fn, _ in steppers.values():
        for _ in range(warmup):
            fn()
    for _ in range(0, steps, block):
        for m, (fn, _) in steppers.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
    for _, data in steppers.values():
        data.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"batch": batch, "pool": batch, "steps_each": len(times["myow"]),
            "images_per_s": {m: round(batch / v, 1) for m, v in med.items()},
            "ms_per_step": {m: round(v * 1000, 1) for m, v in med.items()},
            "myow_over_byol_time": round(med["myow"] / med["byol"], 3)}


def _training_seconds(run_dir: Path) -> float:
    """Time inside the training loop: step + data-wait seconds of every step (log_every 1)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["step_seconds"] + r["data_wait_seconds"] for r in rows)


def trained(method: str, shards: str, seed: int, steps: int, run_dir: Path) -> dict:
    cfg = config(method, shards, f"run.seed={seed}", f"train.max_steps={steps}", f"run.dir={run_dir}",
                 "train.log_every=1", "run.resume=false")
    t0 = time.perf_counter()
    _, results = train(cfg)
    wall = time.perf_counter() - t0
    return {"steps": steps, "linear_accuracy": round(results["linear_accuracy"], 4),
            "knn_accuracy": round(results["knn_accuracy"], 4), "linear_l2": results["linear_l2"],
            "train_seconds": round(_training_seconds(run_dir), 1), "wall_seconds": round(wall, 1),
            "mining_class_agreement": round(results.get("mining_class_agreement", float("nan")), 4)}


def random_init(shards: str, seed: int) -> dict:
    cfg = config("myow", shards, f"run.seed={seed}")
    set_threads(cfg.run.threads, images=True)
    data = build_train_data(cfg)
    try:
        seed_everything(seed)  # the trainer's initialisation for this seed
        model = build_model(cfg, data.model_input())
        results = data.evaluate(model, cfg, device=torch.device("cpu"), plots=False)
    finally:
        data.close()
    return {"steps": 0, "linear_accuracy": round(results["linear_accuracy"], 4),
            "knn_accuracy": round(results["knn_accuracy"], 4), "linear_l2": results["linear_l2"]}


def _mean(rows: list[dict], key: str) -> float:
    return round(statistics.mean(r[key] for r in rows), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(MNIST), help="folder with the MNIST t10k idx files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the configs' epochs)")
    p.add_argument("--byol-same-time", action="store_true",
                   help="also train BYOL for as many steps as fit MYOW's training time")
    p.add_argument("--throughput-batch", type=int, default=128)
    p.add_argument("--throughput-steps", type=int, default=30)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--workdir", help="keep the shards and runs here (default: a temporary folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_flush_denormal(True)
    threads = set_threads(0, images=True)
    result: dict = {"benchmark": "images", "device": "cpu", "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = work / "mnist-shards"
        if not (shards / "test" / "index.json").exists():
            from preprocess.shard_images import main as shard_main

            if shard_main([args.mnist, "--out", str(shards), "--no-progress"]) != 0:
                raise SystemExit("could not shard the MNIST files")
        shards = str(shards)
        result["throughput"] = throughput(shards, args.throughput_batch, args.throughput_steps, warmup=3, block=5,
                                          seed=args.seeds[0])
        if not args.skip_accuracy:
            cfg = config("myow", shards)
            steps = args.steps or None
            result["accuracy_setup"] = {
                "data": "MNIST t10k: train images 0-7999, eval images 8000-9999", "seeds": args.seeds,
                "encoder": cfg.model.encoder, "out_dim": cfg.model.out_dim, "batch": cfg.optim.batch_size,
                "pool": cfg.method.pool_size, "transform": cfg.images.transform,
                "configs": ["configs/mnist_myow.yaml", "configs/mnist_byol.yaml"]}
            runs: dict[str, list[dict]] = {"myow": [], "byol": [], "random_init": []}
            if args.byol_same_time:
                runs["byol_same_time"] = []
            for seed in args.seeds:
                myow = trained("myow", shards, seed, steps or _config_steps(cfg), work / f"myow-{seed}")
                runs["myow"].append({"seed": seed, **myow})
                byol = trained("byol", shards, seed, myow["steps"], work / f"byol-{seed}")
                runs["byol"].append({"seed": seed, **byol})
                if args.byol_same_time:
                    more = round(myow["steps"] * myow["train_seconds"] / max(1e-9, byol["train_seconds"]))
                    runs["byol_same_time"].append({"seed": seed, **trained("byol", shards, seed, more,
                                                                           work / f"byol-time-{seed}")})
                runs["random_init"].append({"seed": seed, **random_init(shards, seed)})
                print(json.dumps({"seed": seed, **{k: v[-1] for k, v in runs.items()}}), file=sys.stderr)
            result["accuracy"] = runs
            result["linear_accuracy_mean"] = {k: _mean(v, "linear_accuracy") for k, v in runs.items()}
            result["knn_accuracy_mean"] = {k: _mean(v, "knn_accuracy") for k, v in runs.items()}
            result["myow_train_seconds_mean"] = _mean(runs["myow"], "train_seconds")
    print(json.dumps(result))


def _config_steps(cfg) -> int:
    return cfg.train.max_steps or cfg.train.epochs * (8000 // cfg.optim.batch_size)


if __name__ == "__main__":
    main()
