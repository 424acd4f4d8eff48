"""Training throughput with 1 and 2 ranks (torchrun, gloo on CPU; NCCL on GPUs when
present), and the share of step time spent gathering the pool and mining; one JSON line.

Each setting runs the real trainer's pieces (build_train_data, build_model, wrap_ddp,
train_step with the all-gather of the pool) on the reach config: B = 512 anchors and
L = 1024 candidates per rank, so with 2 ranks every anchor is mined against 2048
candidates. ``samples_per_s`` counts anchors of all ranks per second of wall time;
``gather_share`` and ``mining_share`` are the median shares of a step spent in the
all-gather of pool representations + metadata, and in the exclusion mask + top-k
(timed by wrapping those functions in this benchmark only).

The data is Chewie-1 from ../shared/data when present (else a synthetic session of the
same size). On 2 cores, 1 rank uses 2 threads and 2 ranks use 1 thread each, so the
comparison is the same machine split two ways, not added hardware.

Usage: python benchmarks/scaling.py [--steps 120] [--ranks 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"


def make_store(workdir: Path) -> str:
    from preprocess import bin_spikes

    out = workdir / "reach.zarr"
    if CHEWIE.exists():
        bin_spikes.main([str(CHEWIE), "--out", str(out), "--no-progress", "--overwrite"])
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from loader import session_arrays, write_store

        arrays = session_arrays(1640, 174, trial_bins=10, pause_bins=0)
        write_store(str(out), arrays["counts"], arrays["trial"], 0.1)
    return str(out)


def worker(store: str, steps: int, out_path: str) -> None:
    """One rank: time ``steps`` training steps after a warm-up (lambda > 0 throughout)."""
    import functools

    import torch

    import pipeline.train as T
    from pipeline.config import load_config
    from pipeline.kinds import build_train_data
    from pipeline.build import build_model, build_optimizer
    from pipeline.distributed import all_gather_pool, barrier, gather_object, init_distributed, shutdown, wrap_ddp

    cfg = load_config(str(ROOT / "configs" / "reach_myow.yaml"), [f"data.path={store}", "run.progress=false"])
    env = init_distributed(cfg.run.device, 300)
    T.set_threads(max(1, (os.cpu_count() or 2) // env.world_size) if env.device.type == "cpu" else 0)
    timers = {"gather": [], "mining": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            timers[name][-1] += time.perf_counter() - t0
            return out
        return wrapper

    T.exclusion_mask = timed("mining", T.exclusion_mask)
    T.mine_views = timed("mining", T.mine_views)
    gather = timed("gather", functools.partial(all_gather_pool, env=env))
    data = build_train_data(cfg, rank=env.rank, world_size=env.world_size)
    plan = T.Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
    torch.manual_seed(0)
    model = build_model(cfg, data.sessions[0].recording.n_units).to(env.device).train()
    opt = build_optimizer(cfg, model.online_parameters())
    net = wrap_ddp(model, env)
    gen = torch.Generator().manual_seed(env.rank)
    first = plan.mining_warmup_steps + plan.mining_ramp_steps + 1  # lambda at its maximum
    step_times = []
    for i in range(steps + 10):
        for t in timers.values():
            t.append(0.0)
        barrier(env)
        t0 = time.perf_counter()
        anchors, pool = T._to(next(data.sessions[0].anchors), env.device), T._to(next(data.sessions[0].pool), env.device)
        T.train_step(net, opt, anchors, pool, first + i, cfg, gen, plan=plan, gather=gather)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
    data.close()
    keep = slice(10, None)  # after the warm-up
    result = {"step_ms": statistics.median(step_times[keep]) * 1e3,
              "gather_share": statistics.median(g / s for g, s in zip(timers["gather"][keep], step_times[keep])),
              "mining_share": statistics.median(m / s for m, s in zip(timers["mining"][keep], step_times[keep])),
              "wall_s": sum(step_times[keep]), "steps": steps, "batch_size": cfg.optim.batch_size,
              "pool_size_global": cfg.method.pool_size * env.world_size, "device": str(env.device),
              "threads": torch.get_num_threads()}
    results = gather_object(result, env)
    if env.is_main:
        Path(out_path).write_text(json.dumps(results))
    del net
    shutdown(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, store: str, steps: int, workdir: Path) -> dict:
    out = workdir / f"ranks{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "--worker", store, "--steps", str(steps), "--out", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    per_rank = json.loads(out.read_text())
    wall = max(r["wall_s"] for r in per_rank)  # ranks step together: the slowest sets the pace
    return {"samples_per_s": ranks * per_rank[0]["batch_size"] * steps / wall,
            "step_ms": max(r["step_ms"] for r in per_rank),
            "gather_share": statistics.mean(r["gather_share"] for r in per_rank),
            "mining_share": statistics.mean(r["mining_share"] for r in per_rank),
            "pool_size_global": per_rank[0]["pool_size_global"], "threads_per_rank": per_rank[0]["threads"],
            "device": per_rank[0]["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", metavar="STORE", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        store = make_store(workdir)
        out = {f"ranks_{n}": run(n, store, args.steps, workdir) for n in args.ranks}
    if "ranks_1" in out:
        for n in args.ranks[1:]:
            out[f"speedup_{n}_ranks"] = out[f"ranks_{n}"]["samples_per_s"] / out["ranks_1"]["samples_per_s"]
    out["data"] = "chewie-1" if CHEWIE.exists() else "synthetic"
    print(json.dumps({k: ({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()}
                          if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v)
                      for k, v in out.items()}))


if __name__ == "__main__":
    main()
