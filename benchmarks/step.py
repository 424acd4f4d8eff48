"""MYOW vs BYOL time per optimizer step, in one run; prints one JSON line.

Neural setting: the reach config on Chewie-1 (B = 512 anchors, L = 1024 candidates, MLP
encoder), step = sampling both streams + ``pipeline.step.train_step``; measured for both
mining views (``separate``: a third augmented draw, Algorithm 1; ``anchor``: view 1, as
myow-neuro). Image setting: a small convnet with MLP(., 512, 128) heads on 28x28 inputs,
B = L = 256, views given as tensors (the data path is not timed there).

MYOW and BYOL steps are interleaved in blocks so machine noise hits both alike; the
figures are medians over the timed steps after a warm-up. ``neural_mflop`` counts the
matrix-multiply FLOPs of one step of each (``torch.utils.flop_counter``, forward and
backward; ``reach_config_flop_ratio`` for the shipped configs). ``data_threads_cost``: the
shipped steps' time over the same steps with the prefetch threads idle (batches drawn
beforehand), i.e. what producing the next batches in threads of the process costs the step.

With ``--profile``, ``reach_config_extra_cost`` says where the shipped MYOW step's extra time
goes (op self-time per step, MYOW minus BYOL) and its ``matmul_floor``: the ratio if every
extra op but the matrix multiplies cost nothing.

Usage: python benchmarks/step.py [--steps 150] [--threads 1] [--profile] [--data ../shared/data/.../chewie.npz]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import prepare_store  # noqa: E402
from model import MYOW, SmallConvNet, exclusion_mask, mine_views  # noqa: E402
from pipeline.build import build_model, build_optimizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.kinds import build_train_data  # noqa: E402
from pipeline.runtime import set_threads  # noqa: E402
from pipeline.step import Plan, train_step  # noqa: E402

CHEWIE = ROOT.parent / "shared" / "data" / "reach-chewie-2013-10-03" / "chewie-2013-10-03-binned-100ms.npz"


def neural_stepper(store: str, method: str, mining_view: str | None = None, seed: int = 0, predrawn: int = 0):
    """A step of configs/reach_myow.yaml as the trainer runs it; ``mining_view`` None keeps
    the config's own (the shipped one: view 1). ``predrawn`` > 0: that many batches are drawn
    first and the steps cycle through them, so the prefetch threads sit idle (their queues
    are full): the step without the data threads competing for the process."""
    view = [f"method.mining_view={mining_view}"] if mining_view else []
    cfg = load_config(str(ROOT / "configs" / "reach_myow.yaml"),
                      [f"data.path={store}", f"method.name={method}", *view, f"run.seed={seed}", "run.progress=false"])
    data = build_train_data(cfg)
    plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
    torch.manual_seed(seed)
    model = build_model(cfg, data.sessions[0].recording.n_units).train()
    opt = build_optimizer(cfg, model.online_parameters())
    gen = torch.Generator().manual_seed(seed)
    # time the steady state: past the warm-up/ramp of lambda
    state = {"step": plan.mining_ramp_steps + 1}

    session = data.sessions[0]
    mining = cfg.effective_mining_weight > 0
    batches = [(next(session.anchors), next(session.pool) if mining else None) for _ in range(predrawn)]

    def step() -> None:
        if batches:
            anchors, pool = batches[state["step"] % len(batches)]
        else:
            anchors, pool = next(session.anchors), next(session.pool) if mining else None
        # as the trainer runs it: the shipped config's mining by temporal context included
        train_step(model, opt, anchors, pool, state["step"], cfg, gen, plan=plan, context=session.mining_context)
        state["step"] += 1
    return step


def image_stepper(method: str, batch: int = 256, pool_size: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = MYOW(SmallConvNet(1, 128), (512, 128), 512, (512, 128), 512).train()
    opt = torch.optim.SGD(model.online_parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    x1, x2, xm, xp = (torch.randn(n, 1, 28, 28) for n in (batch, batch, batch, pool_size))
    ids = torch.arange(batch)

    def step() -> None:
        loss = model.augmented_loss(x1, x2)
        if method == "myow":
            y_m = model.online_mining_representation(xm)
            pool_y = model.target_representation(xp)
            exclude = exclusion_mask(anchor_trial=ids, pool_trial=torch.arange(pool_size) + batch)
            idx = mine_views(y_m.detach(), pool_y, 1, gen, exclude)
            loss = loss + 0.1 * model.mined_loss(y_m, pool_y, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_target(0.996)
    return step


def interleaved(steppers: dict, steps: int, warmup: int, block: int = 10) -> dict[str, float]:
    """Median seconds per step of each stepper, run in alternating blocks."""
    times = {name: [] for name in steppers}
    for name, fn in steppers.items():
        for _ in range(warmup):
            fn()
    for _ in range(0, steps, block):
        for name, fn in steppers.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def step_mflop(step) -> float:
    """Matrix-multiply MFLOPs (forward + backward) of one call of ``step``."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e6


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_")


def op_self_ms(step, steps: int = 30) -> dict[str, float]:
    """Self CPU milliseconds per step of each aten op over ``steps`` calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key.startswith("aten::")}


def extra_cost_profile(myow_step, byol_step, rounds: int = 3) -> dict:
    """Where the shipped MYOW step's extra time goes: ``rounds`` profiles of each method,
    alternating, each op's median over the rounds (one profile can catch a slow spell).

    ``matmul_floor`` = (BYOL op time + MYOW's extra matmul time) / BYOL op time: the
    MYOW/BYOL ratio if every extra op but the matrix multiplies cost nothing.
    """
    runs: dict[str, list[dict[str, float]]] = {"myow": [], "byol": []}
    for _ in range(rounds):
        runs["myow"].append(op_self_ms(myow_step, 20))
        runs["byol"].append(op_self_ms(byol_step, 20))
    myow, byol = ({k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)}
                  for rs in (runs["myow"], runs["byol"]))
    extra = {k: myow.get(k, 0.0) - byol.get(k, 0.0) for k in set(myow) | set(byol)}
    extra_mm = sum(extra.get(k, 0.0) for k in MATMUL_OPS)
    top = sorted(((v, k) for k, v in extra.items() if k not in MATMUL_OPS), reverse=True)[:8]
    byol_total = sum(byol.values())
    return {"myow_op_ms": round(sum(myow.values()), 2), "byol_op_ms": round(byol_total, 2),
            "extra_matmul_ms": round(extra_mm, 2), "extra_other_ms": {k: round(v, 2) for v, k in top},
            "matmul_floor": round((byol_total + extra_mm) / byol_total, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--data", default=str(CHEWIE))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile the shipped MYOW and BYOL steps: where MYOW's extra time goes "
                        "(reach_config_extra_cost, with its matmul_floor)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    torch.set_flush_denormal(True)
    result: dict = {"benchmark": "step", "threads": threads, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare_store(args.data, tmp)
        steppers = {"myow_separate": neural_stepper(store, "myow", "separate"),
                    "myow_anchor": neural_stepper(store, "myow", "anchor"),
                    "byol": neural_stepper(store, "byol"),
                    # the shipped configs again with the data threads idle: what they cost the step
                    "myow_data_idle": neural_stepper(store, "myow", predrawn=10),
                    "byol_data_idle": neural_stepper(store, "byol", predrawn=10)}
        mflop = {name: step_mflop(fn) for name, fn in steppers.items() if not name.endswith("_data_idle")}
        med = interleaved(steppers, args.steps, args.warmup)
        shipped_view = load_config(str(ROOT / "configs" / "reach_myow.yaml")).method.mining_view
        if args.profile:
            result["reach_config_extra_cost"] = extra_cost_profile(steppers[f"myow_{shipped_view}"], steppers["byol"])
    result["neural_ms"] = {k: round(v * 1000, 3) for k, v in med.items()}
    result["neural_mflop"] = {k: round(v, 1) for k, v in mflop.items()}
    result["neural_myow_over_byol"] = round(med["myow_separate"] / med["byol"], 3)
    result["neural_myow_anchor_view_over_byol"] = round(med["myow_anchor"] / med["byol"], 3)
    # configs/reach_{myow,byol}.yaml as shipped, with the config's own mining view (view 1)
    result["reach_config_myow_over_byol"] = round(med[f"myow_{shipped_view}"] / med["byol"], 3)
    result["reach_config_flop_ratio"] = round(mflop[f"myow_{shipped_view}"] / mflop["byol"], 3)
    # > 1: the prefetch threads (sampling and augmenting the next batches) slow the step down
    result["data_threads_cost"] = {"myow": round(med[f"myow_{shipped_view}"] / med["myow_data_idle"], 3),
                                   "byol": round(med["byol"] / med["byol_data_idle"], 3)}
    med = interleaved({"myow": image_stepper("myow"), "byol": image_stepper("byol")}, max(20, args.steps // 5),
                      max(3, args.warmup // 5), block=5)
    result["image_ms"] = {k: round(v * 1000, 2) for k, v in med.items()}
    result["image_myow_over_byol"] = round(med["myow"] / med["byol"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
