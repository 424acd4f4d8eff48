"""``python -m pipeline.train [--config FILE.yaml] [--set key=value ...]``

Self-supervised training of MYOW (or BYOL: ``--set method.name=byol``, the same code
with the mining weight at 0) on a recording store, then evaluation. With no arguments it
runs the embedded demo (see :mod:`pipeline.demo`).

One optimizer step (:func:`train_step`, paper Algorithm 1)::

    x1, x2, x_m, meta  <- anchor sampler (B)          x_pool, meta_pool <- pool sampler (L)
    loss_aug   = d(q(z1), z2') + d(q(z2), z1')        symmetric BYOL term
    y_m        = f(x_m)                               online, with grad
    y_pool'    = f'(x_pool)                           target, no grad; all-gathered (seam)
    idx        = random pick among k-NN of y_m in y_pool', same trial / too close in time masked
    loss       = loss_aug + lambda * d(r(v_m), v'_idx)
    backward; optimizer step; target EMA

The outer loop (:func:`train`) only decides when to log (``metrics.jsonl`` + tqdm), save
(``checkpoint.pt``, atomic) and evaluate. The run directory holds ``config.yaml`` (the
resolved config), ``metrics.jsonl``, ``checkpoint.pt``, ``eval.json``/``evaluations.jsonl``
and the evaluation plots. A run directory with a checkpoint is resumed exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import MYOW, cosine_ema_momentum, exclusion_mask, mine_views, mining_weight, warmup_cosine_lr
from preprocess.errors import UserError, run_cli, setup_logging

from .build import build_model, build_optimizer
from .checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .cli import OneLineParser, to_json
from .config import Config, config_to_dict, dump_config, load_config
from .data import Normalization, TrainData, build_train_data, derive_seed
from .metrics import make_metrics

log = logging.getLogger("pipeline.train")
PROG = "python -m pipeline.train"

MINING_METRICS = ("mining_pool_size", "mined_same_trial_ratio", "mined_time_gap_seconds",
                  "mined_label_agreement_ratio", "mined_valid_ratio")

__all__ = ["Plan", "schedules", "train_step", "identity_gather", "train", "set_threads", "main"]


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Plan:
    """Step counts and data-dependent settings, resolved once per run."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int  # learning-rate warm-up
    mining_warmup_steps: int  # lambda = 0
    mining_ramp_steps: int  # lambda ramps linearly to its maximum
    min_time_gap_s: float  # mining time-exclusion window (0 = off)
    multi_store: bool = False  # samples come from several recordings (compare store ids)

    @classmethod
    def build(cls, cfg: Config, steps_per_epoch: int, min_time_gap_s: float = 0.0,
              multi_store: bool = False) -> "Plan":
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        return cls(steps_per_epoch=steps_per_epoch, total_steps=int(total),
                   warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
                   mining_warmup_steps=round(cfg.method.mining_warmup_epochs * steps_per_epoch),
                   mining_ramp_steps=round(cfg.method.mining_ramp_epochs * steps_per_epoch),
                   min_time_gap_s=float(min_time_gap_s), multi_store=multi_store)


def schedules(step: int, cfg: Config, plan: Plan) -> tuple[float, float, float]:
    """(learning rate, EMA momentum tau, mining weight lambda) at optimizer step ``step`` (0-based)."""
    lr = warmup_cosine_lr(step, cfg.optim.lr, plan.warmup_steps, plan.total_steps)
    if cfg.optim.ema_schedule == "cosine":
        tau = cosine_ema_momentum(step, plan.total_steps, cfg.optim.ema_base_tau)
    else:
        tau = cfg.optim.ema_base_tau
    lam = mining_weight(step, cfg.effective_mining_weight, plan.mining_warmup_steps, plan.mining_ramp_steps)
    return lr, tau, lam


# --------------------------------------------------------------------------- one step


Meta = dict[str, torch.Tensor]
Gather = Callable[[torch.Tensor, Meta], tuple[torch.Tensor, Meta]]


def identity_gather(pool_y: torch.Tensor, pool_meta: Meta) -> tuple[torch.Tensor, Meta]:
    """Single process: the local pool is the global pool. Under torchrun this becomes an
    all-gather of the (L, D) target representations and of every (L,) metadata tensor,
    so each rank mines in the pool of world_size x L candidates."""
    return pool_y, pool_meta


@torch.no_grad()
def mining_stats(idx: torch.Tensor, meta: Meta, pool_meta: Meta, pool_size: int) -> dict[str, float]:
    """Monitoring of the mined pairs (labels are only read here, never trained on).

    idx: (B,) indices into the pool, -1 = no mined view. Ratios are over anchors that got one.
    """
    valid = idx >= 0
    j = idx.clamp(min=0)
    same_store = meta["store"] == pool_meta["store"][j]
    n = valid.sum().clamp(min=1).double()
    same_trial = valid & same_store & (meta["trial"] >= 0) & (meta["trial"] == pool_meta["trial"][j])
    gap = torch.where(valid & same_store, (meta["time"] - pool_meta["time"][j]).abs(), 0.0)
    values = [same_trial.sum() / n, gap.sum() / (valid & same_store).sum().clamp(min=1), valid.double().mean()]
    if "label" in meta and "label" in pool_meta:
        la, lp = meta["label"], pool_meta["label"][j]
        known = valid & (la >= 0) & (lp >= 0)
        values.append(((la == lp) & known).sum() / known.sum().clamp(min=1).double())
    values = torch.stack([v.double() for v in values]).tolist()
    out = {"mining_pool_size": float(pool_size), "mined_same_trial_ratio": values[0],
           "mined_time_gap_seconds": values[1], "mined_valid_ratio": values[2],
           "mined_label_agreement_ratio": values[3] if len(values) > 3 else None}
    return out


def train_step(model: MYOW, optimizer: torch.optim.Optimizer,
               anchors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Meta],
               pool: tuple[torch.Tensor, Meta] | None, step: int, cfg: Config, generator: torch.Generator,
               *, plan: Plan, gather: Gather = identity_gather, rank: int = 0, world_size: int = 1) -> dict:
    """One MYOW/BYOL optimizer step (paper Algorithm 1).

    Args:
        model: the MYOW module, in train mode (pass the DDP wrapper's module calls later).
        optimizer: built over ``model.online_parameters()``.
        anchors: (x1, x2, x_m, meta): (B, N) views of B anchors (x2 from a temporal-jitter
            neighbour, x_m a separate draw for mining) and their (B,) metadata tensors.
        pool: (x_pool (L, N), meta_pool) candidates for mining, or None when lambda is 0
            at this step (the mined branch is then skipped: BYOL, or mining warm-up).
        step: 0-based optimizer step (drives the lr, tau and lambda schedules).
        generator: torch.Generator for the random pick among the k nearest neighbours.
        plan: resolved step counts (:class:`Plan`).
        gather: all-gathers pool representations + metadata across ranks (identity here).
        rank, world_size: this process's rank and the number of ranks (unused until
            distributed training; kept so the call site does not change).

    Returns:
        floats: loss_augmented, loss_mined, loss_total, mining_weight, learning_rate,
        ema_momentum, embedding_std, and (None when the mined branch is skipped)
        mining_pool_size, mined_same_trial_ratio, mined_time_gap_seconds,
        mined_label_agreement_ratio (None without labels), mined_valid_ratio.
    """
    x1, x2, x_m, meta = anchors
    lr, tau, lam = schedules(step, cfg, plan)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # Augmented views: symmetric BYOL loss; the online y(x1) feeds the collapse monitor and,
    # with method.mining_view "anchor", the miner.
    loss_aug, y1 = model.augmented_loss(x1, x2, return_representation=True)

    stats: dict = dict.fromkeys(MINING_METRICS)
    if lam > 0 and pool is not None:
        # Mining (Algorithm 1, "Mine views"): online y of the anchors' mining views against
        # target y of the independent pool; the same pool serves every anchor.
        x_pool, pool_meta = pool
        y_m = y1 if x_m is None else model.online_mining_representation(x_m)  # (B, D), with grad
        pool_y = model.target_representation(x_pool)  # (L, D), no grad
        pool_y, pool_meta = gather(pool_y, pool_meta)  # (world_size * L, D)
        stores = (meta["store"], pool_meta["store"]) if plan.multi_store else (None, None)
        exclude = exclusion_mask(meta["trial"], pool_meta["trial"], meta["time"], pool_meta["time"],
                                 plan.min_time_gap_s, *stores)  # (B, L) bool, True = not allowed
        idx = mine_views(y_m.detach(), pool_y, cfg.method.k, generator, exclude)  # (B,), -1 = none
        loss_mined = model.mined_loss(y_m, pool_y, idx)
        stats = mining_stats(idx, meta, pool_meta, pool_y.shape[0])
    else:
        # Keeps the mined heads in the graph (zero gradient), as DDP will need.
        loss_mined = model.zero_mined_loss()

    loss = loss_aug + lam * loss_mined
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_target(tau)

    with torch.no_grad():
        emb_std = F.normalize(y1.detach().float(), dim=1).std(dim=0).mean()
    l_aug, l_mined, l_total, emb_std = torch.stack(
        [loss_aug.detach(), loss_mined.detach(), loss.detach(), emb_std]).double().tolist()
    return {"loss_augmented": l_aug, "loss_mined": l_mined if stats["mined_valid_ratio"] is not None else None,
            "loss_total": l_total, "mining_weight": lam, "learning_rate": lr, "ema_momentum": tau,
            "embedding_std": emb_std, **stats}


# --------------------------------------------------------------------------- helpers


def set_threads(threads: int) -> int:
    """torch intra-op threads: ``threads``, or auto = the CPU cores available (<= 4: the
    MLPs are small, more threads only add synchronisation). Returns the number set."""
    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, min(4, cores))
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is available; use run.device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.method.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _to(batch, device: torch.device):
    if device.type == "cpu" or batch is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return type(batch)(_to(v, device) for v in batch)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop JSON lines with a step after ``last_step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


# --------------------------------------------------------------------------- the loop


def train(cfg: Config, data: TrainData | None = None) -> tuple[Path, dict]:
    """Train (or resume) a run and evaluate it. Returns (run directory, evaluation metrics)."""
    from .evaluate import embed, evaluate_embedding, save_plots

    threads = set_threads(cfg.run.threads)
    # Subnormal floats (tiny EMA/Adam updates late in training) are ~100x slower on x86 CPUs;
    # flushing them to 0 made the CPU MYOW step ~25% faster and changes nothing measurable.
    torch.set_flush_denormal(True)
    device = resolve_device(cfg.run.device)
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)
    ckpt_path = run_dir / CHECKPOINT_NAME
    resume = load_checkpoint(ckpt_path) if cfg.run.resume and ckpt_path.exists() else None
    normalization = Normalization.from_state_dict(resume["normalization"]) if resume else None

    data = data or build_train_data(cfg, normalization=normalization, progress=cfg.run.progress)  # before the run dir:
    run_dir.mkdir(parents=True, exist_ok=True)  # a bad store leaves nothing behind
    plan = Plan.build(cfg, data.steps_per_epoch, data.min_time_gap_s)
    seed_everything(cfg.run.seed)  # model initialisation
    model = build_model(cfg, data.recording.n_units).to(device)
    optimizer = build_optimizer(cfg, model.online_parameters())
    mining_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 3))
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        data.load_state_dict(resume["data"])
        set_rng_state(resume["rng"], mining_gen)
        start = int(resume["step"])
        log.info("resuming %s at step %d", run_dir, start)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    for path in (metrics_path, run_dir / "evaluations.jsonl"):
        if resume:
            _trim_metrics(path, start)  # lines written after the checkpoint are written again
        elif path.exists():
            path.unlink()
    log.info("run %s: %s, %d steps (%d per epoch), device %s, %d threads",
             run_dir, cfg.method.name, plan.total_steps, plan.steps_per_epoch, device, threads)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "epoch": step // plan.steps_per_epoch, "config": config_to_dict(cfg),
            "normalization": data.normalization.state_dict(), "data": data.state_dict(),
            "rng": rng_state(mining_gen)})

    def evaluate(step: int, plots: bool = False) -> dict:
        emb = embed(model.encoder, data.recording, data.normalization, device)
        results = evaluate_embedding(emb, data.recording, cfg.data.split, cfg.eval.tasks, cfg.eval.reach_min_speed)
        results["step"] = step
        with open(run_dir / "evaluations.jsonl", "a") as f:
            f.write(to_json(results) + "\n")
        if plots:
            save_plots(run_dir, emb, data.recording, cfg.data.split, cfg.eval.reach_min_speed, cfg.eval.tsne,
                       cfg.run.seed)
        return results

    model.train()
    batch = data.anchors.batch_size * 1  # x world_size under torchrun
    metrics = make_metrics(cfg.metrics.host, cfg.metrics.port)
    bar = tqdm(total=plan.total_steps, initial=start, desc=cfg.method.name, unit="step", dynamic_ncols=True,
               disable=not cfg.run.progress, file=sys.stderr)
    with open(metrics_path, "a") as metrics_file, contextlib.closing(metrics), contextlib.closing(bar), \
            contextlib.closing(data):
        for step in range(start, plan.total_steps):
            t0 = time.perf_counter()
            anchors = next(data.anchors)
            pool = next(data.pool) if schedules(step, cfg, plan)[2] > 0 else None  # no pool while lambda == 0
            anchors, pool = _to(anchors, device), _to(pool, device)
            t1 = time.perf_counter()
            out = train_step(model, optimizer, anchors, pool, step, cfg, mining_gen, plan=plan)
            t2 = time.perf_counter()
            done = step + 1
            if not math.isfinite(out["loss_total"]):
                raise UserError(f"training diverged at step {done} (loss {out['loss_total']}); "
                                "lower optim.lr or check the data")
            bar.update(1)
            metrics.update(out, done * batch, t2 - t1, t1 - t0)
            if done % cfg.train.log_every == 0 or done == plan.total_steps or done == start + 1:
                record = {"step": done, "epoch": done // plan.steps_per_epoch, **out,
                          "samples": done * batch, "step_seconds": t2 - t1, "data_wait_seconds": t1 - t0}
                metrics_file.write(to_json(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(aug=f"{out['loss_augmented']:.3f}",
                                mined="-" if out["loss_mined"] is None else f"{out['loss_mined']:.3f}",
                                lam=f"{out['mining_weight']:.2f}", refresh=False)
            if done % cfg.train.checkpoint_every == 0 and done < plan.total_steps:
                checkpoint(done)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < plan.total_steps:
                res = evaluate(done)
                log.info("step %d: %s", done, to_json(res))
    final = max(start, plan.total_steps)
    checkpoint(final)
    results = evaluate(final, plots=True)
    atomic_write_text(run_dir / "eval.json", to_json(results) + "\n")
    return run_dir, results


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train MYOW (or BYOL) on a recording store, then evaluate it. "
                    "With no arguments: the embedded demo (simulated reach session, ~1 minute on a CPU).",
        epilog="Examples:\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set data.path=chewie.zarr\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set method.name=byol --set run.seed=1\n"
               "  python -m pipeline.train --demo --set train.max_steps=100\n"
               "Keys: data.*, augment.*, model.*, method.*, optim.*, train.*, run.*, metrics.*, eval.* "
               "(see configs/*.yaml and pipeline/config.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data, model, method, optim, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.002 (repeatable; value parsed as YAML)")
    p.add_argument("--demo", action="store_true",
                   help="run the demo (what no arguments do); --config/--set then adjust the demo config")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.demo or not argv:
        from .demo import run_demo

        return run_demo(args.set, args.config)
    cfg = load_config(args.config, args.set)
    if cfg.method.name == "supervised":
        from .supervised import train_supervised

        run_dir, results = train_supervised(cfg)
    else:
        run_dir, results = train(cfg)
    print(to_json({**results, "run_dir": str(run_dir)}))
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
