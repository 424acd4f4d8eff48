"""The CIFAR-10 configs on a CUDA machine, in one run: MYOW vs BYOL images/s, data-wait
share and peak GPU memory of the real trainer, and a short torchrun run; one JSON line.

Run it once on a CUDA machine (``python benchmarks/gpu.py``); on a CPU it runs at a tiny
size (or anywhere with ``--tiny``), which only checks that every part works.

1. Data: random CIFAR-shaped images (32x32x3 uint8, 10 labels, ``--images`` training
   images and a quarter as many test images) are written as a folder of PNG files per
   class (train/ and test/) and sharded by the project's own command,
   ``python -m preprocess.shard_images`` (ImageFolder source).
2. Throughput: for MYOW and BYOL, ``pipeline.loop.train`` with configs/cifar10_myow.yaml /
   cifar10_byol.yaml as shipped (ResNet-18, g/q/h/r heads of width 4096, the cifar views,
   SGD) except B = L = ``--batch``, ``--steps`` steps, ``train.log_every=1`` and no t-SNE.
   On CUDA the configs' ``run.amp: true`` (bf16 autocast) is kept and the ResNet runs in
   channels_last (``pipeline.build.uses_channels_last``); on a CPU amp is off and
   ``run.threads=1``. From metrics.jsonl, after the first ``--warmup`` steps:
     images_per_s       B x steps / sum(step_seconds + data_wait_seconds)  (the loop's
                        own timers: the step ends when its losses are read back, so GPU
                        work is inside it; the data wait is drawing both streams' views
                        and copying them to the device)
     data_wait_share    sum(data_wait_seconds) / sum(step_seconds + data_wait_seconds)
     step_ms_median, data_wait_ms_median
     peak_memory_gib    torch.cuda.max_memory_allocated over the run (reset before each
                        method); peak_memory_train_gib the same read when the final
                        evaluation starts (training steps only); null on a CPU
   ``myow_over_byol_time_per_step`` = MYOW's time per step / BYOL's (= BYOL images/s /
   MYOW images/s). Goals: <= 1.5 (paper), and a data wait under 5% of the step for both
   methods (``goals`` in the JSON).
3. torchrun: ``python -m torch.distributed.run --nproc_per_node=N --master_addr=127.0.0.1
   --master_port=<free port> -m pipeline.train --config configs/cifar10_myow.yaml --set ...``
   for ``--torchrun-steps`` steps. N = 2 ranks: on CUDA with >= 2 GPUs NCCL (one GPU per
   rank, pipeline.distributed picks NCCL for CUDA and gloo for CPU); on a CPU gloo, 1
   thread per rank. With a single GPU N = 1: pipeline.distributed makes no process group
   for a world of one, so NCCL is not exercised (``backend: null`` and a note). Reports the
   exit code, wall time (start-up and final evaluation included) and the last
   metrics.jsonl line's world_size / samples / step against the expected values.

Sizes (defaults; every one can be set): CUDA: 4096 training images, B = L = 512, 60 steps
(first 10 dropped), torchrun 20 steps, 32-pixel views. Tiny (a CPU, or --tiny): 256 images,
B = L = 16, 5 steps (first 2 dropped), torchrun 3 steps, 16-pixel views
(``images.image_size``). Everything listens on 127.0.0.1 only (the torchrun rendezvous;
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME=lo unless already set; no metrics endpoint).

Usage: python benchmarks/gpu.py [--steps N] [--batch B] [--tiny] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import loop  # noqa: E402
from pipeline.build import uses_channels_last  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CLASSES = 10
SIDE = 32
SIZES = {  # name -> training images, batch (= pool), steps, warm-up steps, torchrun steps, view side
    "gpu": {"images": 4096, "batch": 512, "steps": 60, "warmup": 10, "torchrun_steps": 20, "image_size": None},
    "tiny": {"images": 256, "batch": 16, "steps": 5, "warmup": 2, "torchrun_steps": 3, "image_size": 16},
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def write_png_folder(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """root/{train,test}/class_K/NNNNNN.png: random 32x32 RGB images, label = index mod 10."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(CLASSES):
            (root / split / f"class_{k}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)
        for i in range(n):
            Image.fromarray(pixels[i], mode="RGB").save(root / split / f"class_{i % CLASSES}" / f"{i:06d}.png")


def make_shards(work: Path, n_train: int, n_test: int) -> Path:
    """The PNG folder sharded by ``python -m preprocess.shard_images`` -> work/shards/{train,test}/."""
    pngs, shards = work / "pngs", work / "shards"
    if (shards / "train" / "index.json").exists() and (shards / "test" / "index.json").exists():
        say(f"reusing {shards}")
        return shards
    if pngs.exists():
        shutil.rmtree(pngs)
    t0 = time.perf_counter()
    write_png_folder(pngs, n_train, n_test)
    say(f"wrote {n_train} + {n_test} random 32x32 PNGs in {time.perf_counter() - t0:.1f} s")
    cmd = [sys.executable, "-m", "preprocess.shard_images", str(pngs), "--out", str(shards), "--no-progress",
           "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"python -m preprocess.shard_images failed (exit {proc.returncode})")
    shutil.rmtree(pngs)
    return shards


# --------------------------------------------------------------------------- settings


def overrides(shards: Path, run_dir: Path, device: str, batch: int, steps: int, image_size: int | None,
              amp: bool, n_test: int) -> list[str]:
    """--set values shared by the in-process runs and the torchrun run."""
    return [f"data.path={shards}", f"run.dir={run_dir}", f"run.device={device}", "run.resume=false",
            "run.progress=false", f"run.amp={str(amp).lower()}", f"run.threads={1 if device == 'cpu' else 0}",
            f"optim.batch_size={batch}", f"method.pool_size={batch}", f"train.max_steps={steps}",
            "train.log_every=1", f"train.checkpoint_every={steps + 1}", "train.eval_every=0", "metrics.port=0",
            "eval.tsne=false", f"eval.mining_anchors={min(1000, n_test)}",
            f"images.image_size={'null' if image_size is None else image_size}"]


# --------------------------------------------------------------------------- throughput


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(rows: list[dict], batch: int, warmup: int) -> dict:
    kept = [r for r in rows if r["step"] > warmup] or rows[-1:]
    step = [r["step_seconds"] for r in kept]
    wait = [r["data_wait_seconds"] for r in kept]
    total = sum(step) + sum(wait)
    return {"steps_timed": len(kept), "images_per_s": round(batch * len(kept) / total, 1),
            "time_per_step_ms": round(1000 * total / len(kept), 2),
            "step_ms_median": round(1000 * statistics.median(step), 2),
            "data_wait_ms_median": round(1000 * statistics.median(wait), 2),
            "data_wait_share": round(sum(wait) / total, 4)}


def train_method(method: str, shards: Path, work: Path, device: str, size: dict, amp: bool, n_test: int) -> dict:
    run_dir = work / f"run-{method}"
    cfg = load_config(ROOT / "configs" / f"cifar10_{method}.yaml",
                      overrides(shards, run_dir, device, size["batch"], size["steps"], size["image_size"], amp,
                                n_test))
    cuda = device == "cuda"
    peak_train: dict = {}
    evaluate_data = loop.evaluate_data

    def evaluate_and_note_peak(*args, **kwargs):  # the peak of the training steps, before the read-outs
        if cuda:
            peak_train.setdefault("bytes", torch.cuda.max_memory_allocated())
        return evaluate_data(*args, **kwargs)

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loop.evaluate_data = evaluate_and_note_peak
    t0 = time.perf_counter()
    try:
        _, results = loop.train(cfg)
    finally:
        loop.evaluate_data = evaluate_data
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    out = {"batch": cfg.optim.batch_size, "pool": cfg.method.pool_size, "encoder": cfg.model.encoder,
           "amp": cfg.run.amp, "channels_last": uses_channels_last(cfg, device), "steps": len(rows), "warmup_steps_dropped": size["warmup"],
           **summarize(rows, cfg.optim.batch_size, size["warmup"])}
    gib = 2 ** 30
    out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / gib, 3) if cuda else None
    out["peak_memory_train_gib"] = round(peak_train["bytes"] / gib, 3) if cuda and peak_train else None
    out["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / gib, 3) if cuda else None
    out["mining_weight_last"] = rows[-1].get("mining_weight")
    out["loss_total_last"] = round(rows[-1]["loss_total"], 4)
    out["wall_seconds"] = round(wall, 1)  # data loading, the steps, checkpoint and final evaluation
    out["linear_accuracy"] = round(results["linear_accuracy"], 4) if "linear_accuracy" in results else None
    say(f"{method}: {out['images_per_s']} images/s ({out['time_per_step_ms']} ms/step, data wait "
        f"{100 * out['data_wait_share']:.1f}%), peak GPU memory "
        f"{'n/a' if out['peak_memory_gib'] is None else str(out['peak_memory_gib']) + ' GiB'}, {wall:.0f} s in all "
        f"(random images: accuracy {out['linear_accuracy']} means nothing)")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a ResNet-18 with 4096-wide heads are large
    return out


# --------------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_check(shards: Path, work: Path, device: str, size: dict, amp: bool, n_test: int) -> dict:
    if device == "cuda":
        ranks = min(2, torch.cuda.device_count())
        backend = "nccl" if ranks > 1 else None
    else:
        ranks, backend = 2, "gloo"
    steps = size["torchrun_steps"]
    run_dir = work / "run-torchrun"
    sets = overrides(shards, run_dir, device, size["batch"], steps, size["image_size"], amp, n_test)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "pipeline.train", "--config", "configs/cifar10_myow.yaml"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():  # keep gloo's / NCCL's sockets on the loopback interface
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    log_path = work / "torchrun.log"
    say(f"torchrun: {ranks} rank(s), backend {backend}, {steps} steps (log: {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    out = {"nproc_per_node": ranks, "backend": backend, "device": device, "steps": steps,
           "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
           "command": f"python -m torch.distributed.run --nproc_per_node={ranks} --master_addr=127.0.0.1 "
                      "--master_port=PORT -m pipeline.train --config configs/cifar10_myow.yaml --set ..."}
    if backend is None:
        out["note"] = "one GPU: a world of one makes no process group, so NCCL was not exercised"
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if rows:
        last = rows[-1]
        expected = steps * size["batch"] * ranks
        out.update(last_step=last["step"], world_size=last["world_size"], samples=last["samples"],
                   samples_expected=expected,
                   ok=proc.returncode == 0 and last["world_size"] == ranks and last["samples"] == expected
                   and last["step"] == steps)
    else:
        out.update(last_step=None, world_size=None, samples=None, ok=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        say("torchrun failed; last lines of its log:\n  " + "\n  ".join(tail))
    say(f"torchrun: exit {proc.returncode}, {wall:.0f} s, world_size {out['world_size']}, samples {out['samples']} "
        f"(expected {out.get('samples_expected')})")
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="training steps per method (default 60 on CUDA, 5 tiny)")
    p.add_argument("--warmup", type=int, help="first steps left out of the figures (default 10 on CUDA, 2 tiny)")
    p.add_argument("--batch", type=int, help="B = L, anchors and candidates per step (default 512 on CUDA, 16 tiny)")
    p.add_argument("--images", type=int, help="training images to generate (default 4096 on CUDA, 256 tiny; "
                                              "test images: a quarter as many)")
    p.add_argument("--torchrun-steps", type=int, help="steps of the torchrun run (default 20 on CUDA, 3 tiny)")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU size even on a GPU (a quick check)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available (default)")
    p.add_argument("--skip-torchrun", action="store_true", help="leave out part 3")
    p.add_argument("--out-dir", help="keep the shards and logs here (reused by a second run; default: a temporary "
                                     "folder, removed at the end)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    size_name = "tiny" if args.tiny or device == "cpu" else "gpu"
    size = dict(SIZES[size_name])
    for key in ("steps", "warmup", "batch", "images", "torchrun_steps"):
        if getattr(args, key) is not None and getattr(args, key) != size[key]:
            size[key], size_name = getattr(args, key), f"{size_name}, changed"
    if size["warmup"] >= size["steps"]:
        raise SystemExit(f"--warmup {size['warmup']} must be below --steps {size['steps']}")
    n_train, n_test = size["images"], max(CLASSES, size["images"] // 4)
    if n_train < 2 * size["batch"]:
        raise SystemExit(f"--images {n_train} must be at least 2 x --batch ({2 * size['batch']})")
    amp = device == "cuda" and torch.cuda.is_bf16_supported()
    result: dict = {"benchmark": "gpu", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "device_count": torch.cuda.device_count() if device == "cuda" else 0,
                    "torch": torch.__version__, "cuda": torch.version.cuda if device == "cuda" else None,
                    "size": size_name, "batch": size["batch"], "steps": size["steps"],
                    "train_images": n_train, "test_images": n_test, "image_size": size["image_size"] or SIDE,
                    "configs": ["configs/cifar10_myow.yaml", "configs/cifar10_byol.yaml"]}
    if device == "cpu":
        torch.set_num_threads(1)
    say(f"device {result['device']}, torch {torch.__version__}, B = L = {size['batch']}, {size['steps']} steps "
        f"({size['warmup']} dropped), amp {amp}")
    tmp = None if args.out_dir else tempfile.mkdtemp(prefix="myow-gpu-bench-")
    work = Path(args.out_dir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        shards = make_shards(work, n_train, n_test)
        for method in ("myow", "byol"):
            result[method] = train_method(method, shards, work, device, size, amp, n_test)
        ratio = result["myow"]["time_per_step_ms"] / result["byol"]["time_per_step_ms"]
        result["myow_over_byol_time_per_step"] = round(ratio, 3)
        result["goals"] = {"myow_over_byol_le_1_5": ratio <= 1.5,
                           "data_wait_below_5pct": all(result[m]["data_wait_share"] < 0.05 for m in ("myow", "byol"))}
        say(f"MYOW / BYOL time per step: {ratio:.2f} (goal <= 1.5); data wait MYOW "
            f"{100 * result['myow']['data_wait_share']:.1f}%, BYOL {100 * result['byol']['data_wait_share']:.1f}% "
            "(goal < 5%)" + (" -- tiny CPU size: a check that it runs, not a measurement" if device == "cpu" else ""))
        if not args.skip_torchrun:
            result["torchrun"] = torchrun_check(shards, work, device, size, amp, n_test)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
