"""``python -m pipeline.train [--config FILE.yaml] [--set key=value ...]``

Self-supervised training of MYOW (or BYOL: ``--set method.name=byol``, the same code
with the mining weight at 0) on a recording store or on image shards (``data.kind``,
detected from ``data.path``), then evaluation. With no arguments it runs the embedded
demo (see :mod:`pipeline.demo`).

The data is a :class:`~pipeline.data.TrainData` (neural) or a
:class:`~pipeline.images.ImageTrainData` (images): the loop only uses their shared members
(``sessions`` with ``anchors``/``pool`` streams and ``min_time_gap_s``, ``steps_per_epoch``,
``session_at``, ``model_input()``, ``normalization_state()``, ``evaluate(...)``,
``state_dict``/``load_state_dict``, ``pin_memory``, ``close``), so both kinds go through
the same loop, the same :func:`train_step` and the same checkpoints.

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
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model import MYOW, cosine_ema_momentum, exclusion_mask, mine_views, mining_weight, set_session, warmup_cosine_lr
from preprocess.errors import UserError, run_cli, setup_logging

from .build import build_model, build_optimizer, uses_channels_last
from .checkpoint import (CHECKPOINT_NAME, TRAIN_FIX, atomic_write_text, checkpoint_error, load_checkpoint, rng_state,
                         save_checkpoint)
from .cli import OneLineParser, to_json
from .config import Config, config_to_dict, dump_config, load_config
from .context import MiningContext
from .distributed import (DistEnv, all_gather_pool, all_reduce_mean, barrier, broadcast_object, configure_rank_logging,
                          gather_object, init_distributed, shutdown, wrap_ddp)
from .data import TrainData, build_train_data, data_kind, derive_seed
from .startup import check_normalization, check_run_dir, create_run_dir, load_resume, start_metrics

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


def train_step(model: MYOW | nn.Module, optimizer: torch.optim.Optimizer,
               anchors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Meta],
               pool: tuple[torch.Tensor, Meta] | None, step: int, cfg: Config, generator: torch.Generator,
               *, plan: Plan, gather: Gather = identity_gather, context: MiningContext | None = None) -> dict:
    """One MYOW/BYOL optimizer step (paper Algorithm 1).

    Args:
        model: the MYOW module in train mode, or its DDP wrapper: every computation with a
            gradient goes through ``model(..., mode=...)`` so DDP sees it, and the two
            losses are summed before ONE backward (gradients are reduced once per step).
        optimizer: built over ``model.online_parameters()``.
        anchors: (x1, x2, x_m, meta): (B, N) views of B anchors (x2 from a temporal-jitter
            neighbour, x_m a separate draw for mining) and their (B,) metadata tensors.
        pool: (x_pool (L, N), meta_pool) candidates for mining, or None when lambda is 0
            at this step (the mined branch is then skipped: BYOL, or mining warm-up).
        step: 0-based optimizer step (drives the lr, tau and lambda schedules).
        generator: torch.Generator for the random pick among the k nearest neighbours.
        plan: resolved step counts (:class:`Plan`).
        gather: all-gathers pool representations + metadata across ranks
            (:func:`pipeline.distributed.all_gather_pool`; identity in one process).
        context: the session's :class:`~pipeline.context.MiningContext` (mining by temporal
            context), or None (the k-NN search compares single bins).

    Returns:
        floats: loss_augmented, loss_mined, loss_total, mining_weight, learning_rate,
        ema_momentum, embedding_std, and (None when the mined branch is skipped)
        mining_pool_size, mined_same_trial_ratio, mined_time_gap_seconds,
        mined_label_agreement_ratio (None without labels), mined_valid_ratio.
    """
    x1, x2, x_m, meta = anchors
    core = getattr(model, "module", model)  # the MYOW module itself (no-grad paths skip DDP)
    lr, tau, lam = schedules(step, cfg, plan)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # Augmented views: symmetric BYOL loss; the online y(x1) feeds the collapse monitor and,
    # with method.mining_view "anchor", the miner.
    loss_aug, y1 = model(x1, x2, mode="augmented_loss", return_representation=True)

    stats: dict = dict.fromkeys(MINING_METRICS)
    method = cfg.method
    if lam > 0 and (pool is not None or method.pool == "batch"):
        # Mining (Algorithm 1, "Mine views"): online y of the anchors' mining views against
        # target y of the candidates (an independent pool, or the batch's own view 1); the
        # same candidates serve every anchor.
        x_pool, pool_meta = (x1, meta) if method.pool == "batch" else pool
        y_m = y1 if x_m is None else model(x_m, mode="online_mining_representation")  # (B, D), with grad
        if method.mining_space == "online":
            with torch.no_grad():
                pool_y = core.encoder(x_pool)  # (L, D), online space, no grad (paper App. F)
        else:
            pool_y = core.target_representation(x_pool)  # (L, D), no grad
        pool_y, pool_meta = gather(pool_y, pool_meta)  # (world_size * L, D): the global pool
        stores = (meta["store"], pool_meta["store"]) if plan.multi_store else (None, None)
        exclude = exclusion_mask(meta["trial"], pool_meta["trial"], meta["time"], pool_meta["time"],
                                 plan.min_time_gap_s, *stores)  # (B, world_size * L) bool, True = not allowed
        if method.oracle:  # diagnostic only: candidates of another label are not allowed
            exclude = exclude | (meta["label"][:, None] != pool_meta["label"][None, :])
        if context is None:
            idx = mine_views(y_m.detach(), pool_y, cfg.method.k, generator, exclude)  # (B,), -1 = none
        else:  # search on +-W-bin context averages; the mined view itself stays one bin
            idx = mine_views(context.smooth(meta["row"], y_m), context.smooth(pool_meta["row"], pool_y),
                             cfg.method.k, generator, exclude)
            context.update(pool_meta["row"], pool_y)
        loss_mined = model(y_m, pool_y, idx, mode="mined_loss")
        stats = mining_stats(idx, meta, pool_meta, pool_y.shape[0])
    else:
        # Keeps the mined heads in the graph (zero gradient): DDP needs every parameter used.
        loss_mined = model(mode="zero_mined_loss")

    loss = loss_aug + lam * loss_mined
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    core.update_target(tau)

    with torch.no_grad():
        emb_std = F.normalize(y1.detach().float(), dim=1).std(dim=0).mean()
    l_aug, l_mined, l_total, emb_std = torch.stack(
        [loss_aug.detach(), loss_mined.detach(), loss.detach(), emb_std]).double().tolist()
    return {"loss_augmented": l_aug, "loss_mined": l_mined if stats["mined_valid_ratio"] is not None else None,
            "loss_total": l_total, "mining_weight": lam, "learning_rate": lr, "ema_momentum": tau,
            "embedding_std": emb_std, **stats}


# --------------------------------------------------------------------------- helpers


def set_threads(threads: int, images: bool = False) -> int:
    """torch intra-op threads: ``threads``, or auto = the CPU cores available (<= 4: the
    MLPs are small, more threads only add synchronisation). Returns the number set.

    ``images`` (image data on a CPU): auto = every core but one, which is left to the
    streams' augmenting threads. An OpenMP team that shares its cores with other busy
    threads waits at every barrier for a descheduled member: on 2 cores, 2 trainer threads
    next to the augmenting threads made the MNIST convnet step 4x slower (2.8 s) than 1
    thread (0.7 s).
    """
    if threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores - 1) if images else max(1, min(4, cores))
    torch.set_num_threads(threads)
    return threads


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


def _to(batch, device: torch.device, channels_last: bool = False):
    """Batch tensors to ``device`` (asynchronously from pinned memory); image batches in
    channels_last memory format when the model is (ResNets on CUDA)."""
    if device.type == "cpu" or batch is None:
        return batch
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device, channels_last) for k, v in batch.items()}
    return type(batch)(_to(v, device, channels_last) for v in batch)


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

# Config keys that must match to resume a checkpoint: they change the data, the model or
# the meaning of a step. Everything else (train.max_steps, logging, metrics, threads, ...)
# may change between runs of the same run.dir.
RESUME_KEYS = ("data.path", "data.kind", "data.split", "data.min_speed", "data.jitter_max_bins", "images.transform",
               "images.image_size", "images.normalize", "images.train_split", "images.eval_split",
               "images.train_range", "images.eval_range", "images.eval_fraction", "images.shuffle_buffer", "model",
               "method", "optim.name", "optim.batch_size", "run.seed")


def check_resumable(checkpoint: dict, cfg: Config, world_size: int, ckpt_path: Path) -> None:
    """UserError when ``checkpoint`` was written by another world size or an incompatible config."""
    try:
        saved_world = int(checkpoint.get("world_size", 1))
    except (TypeError, ValueError):
        raise checkpoint_error(ckpt_path, f"its world_size is {checkpoint.get('world_size')!r}, not a count of "
                                          "ranks", TRAIN_FIX) from None
    if saved_world != world_size:
        raise UserError(f"{ckpt_path}: written by {saved_world} rank(s), this run has {world_size}; resume with "
                        f"--nproc_per_node={saved_world}, or use another run.dir to start over")
    old, new = checkpoint["config"], config_to_dict(cfg)
    for key in RESUME_KEYS:
        section, _, field = key.partition(".")
        if section not in old or (field and field not in old[section]):
            continue  # written before the key existed: nothing to compare
        a = old.get(section, {}) if not field else old.get(section, {}).get(field)
        b = new[section] if not field else new[section][field]
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):  # name the first differing key of the section
                field = next((k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)), sorted(b)[0])
                key, a, b = f"{section}.{field}", a.get(field), b.get(field)
            raise UserError(f"{ckpt_path}: the checkpoint's {key} is {a!r}, this config has {b!r}; "
                            "resume with the same config, or use another run.dir to start over")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and stops at the next step boundary
    (the same step on every rank: the flag is all-reduced). A second signal is not caught."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        for sig, handler in self._previous.items():  # a second signal acts as usual
            signal.signal(sig, handler)

    def requested(self, env: DistEnv) -> bool:
        flag = float(self.signal is not None)
        if env.distributed:
            flag = all_reduce_mean({"stop": flag}, env)["stop"]
        return flag > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_run_dir(cfg: Config, env: DistEnv) -> Path:
    """``run.dir``, or a new runs/<method>-<time> chosen by rank 0 and shared with every rank."""
    run_dir = Path(cfg.run.dir) if cfg.run.dir else (default_run_dir(cfg) if env.is_main else None)
    return Path(broadcast_object(str(run_dir), env))


def train(cfg: Config, data: TrainData | None = None, env: DistEnv | None = None, *,
          resume_hint: str | None = None) -> tuple[Path, dict]:
    """Train (or resume) a run and evaluate it; one process or one rank of torchrun.

    Returns (run directory, evaluation metrics); ranks other than 0 return an empty dict,
    and a run stopped by SIGTERM/SIGINT returns {"stopped_at_step": n} after checkpointing
    (``resume_hint``: what the stop message tells the user to do to resume).

    Nothing is written to the run directory (not even its mkdir) until the run has started:
    data read, model built, checkpoint states loaded, metrics endpoint bound. A start-up
    failure after that removes what this call created.
    """
    env = env or init_distributed(cfg.run.device)
    threads = set_threads(cfg.run.threads)
    # Subnormal floats (tiny EMA/Adam updates late in training) are ~100x slower on x86 CPUs;
    # flushing them to 0 made the CPU MYOW step ~25% faster and changes nothing measurable.
    torch.set_flush_denormal(True)
    device = env.device
    run_dir = resolve_run_dir(cfg, env)
    if env.is_main:
        check_run_dir(run_dir)  # a file, an unwritable place: refused before any work
    if resume_hint is None:
        resume_hint = ("rerun the same command to resume" if cfg.run.dir else
                       f"rerun with --set run.dir={run_dir} to resume")
    ckpt_path = run_dir / CHECKPOINT_NAME
    resume = None
    if cfg.run.resume and (ckpt_path.exists() or ckpt_path.is_symlink()):
        resume = load_checkpoint(ckpt_path, fix=TRAIN_FIX)
        check_resumable(resume, cfg, env.world_size, ckpt_path)
        check_normalization(resume, None, ckpt_path)

    metrics = start_metrics(cfg, env)  # a busy port or bad host fails before minutes of data loading
    created: Path | None = None
    config_path = run_dir / "config.yaml"
    had_config = config_path.exists()
    metrics_path = run_dir / "metrics.jsonl"
    try:
        # the stored normalisation (a checkpoint's state) is reused as is: before the run dir,
        # so a bad store or shard set leaves nothing behind
        data = data or build_train_data(cfg, normalization=resume["normalization"] if resume else None,
                                        rank=env.rank, world_size=env.world_size,
                                        progress=cfg.run.progress and env.is_main)
        if resume and resume.get("data_kind", "neural") != data.kind:
            raise UserError(f"{ckpt_path}: written by a run on {resume.get('data_kind', 'neural')} data, data.path "
                            f"is {data.kind} data; resume with the same data, or use another run.dir to start over")
        if data.kind == "images" and device.type == "cpu":  # leave a core to the augmenting threads
            threads = set_threads(cfg.run.threads, images=True)
        if device.type == "cuda":
            data.pin_memory()
        plan = Plan.build(cfg, data.steps_per_epoch, data.min_time_gap_s)
        plans = [dataclasses.replace(plan, min_time_gap_s=s.min_time_gap_s) for s in data.sessions]
        seed_everything(cfg.run.seed)  # model initialisation: the same on every rank
        model = build_model(cfg, data.model_input()).to(device)
        channels_last = uses_channels_last(cfg, device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model.online_parameters())
        mining_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 3, env.rank))
        start = 0
        if resume:
            check_normalization(resume, data, ckpt_path)
            start = load_resume(resume, model, optimizer, data, mining_gen, env, ckpt_path)
            log.info("resuming %s at step %d", run_dir, start)
        # DDP after loading: it broadcasts rank 0's weights at construction
        net = wrap_ddp(model, env, sync_bn=cfg.run.sync_bn, find_unused_parameters=data.multi)
        gather = functools.partial(all_gather_pool, env=env)
        if env.is_main:  # the run has started: only now is the run directory written
            created = create_run_dir(run_dir)
            try:
                atomic_write_text(config_path, dump_config(cfg))
                for path in (metrics_path, run_dir / "evaluations.jsonl"):
                    if resume:
                        _trim_metrics(path, start)  # lines written after the checkpoint are written again
                    elif path.exists():
                        path.unlink()
            except OSError as err:
                raise UserError(f"run.dir {run_dir}: cannot write it ({err.strerror or err}); "
                                "choose another run.dir") from None
        barrier(env)
    except BaseException:
        metrics.close()
        if data is not None:
            data.close()
        if env.is_main:  # leave nothing this call created
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif not had_config and config_path.exists():
                config_path.unlink()
        raise
    log.info("run %s: %s, %d steps (%d per epoch), %d rank(s), device %s, %d threads",
             run_dir, cfg.method.name, plan.total_steps, plan.steps_per_epoch, env.world_size, device, threads)

    def checkpoint(step: int) -> None:
        t0 = time.perf_counter()
        data_states, rng_states = gather_object(data.state_dict(), env), gather_object(rng_state(mining_gen), env)
        if env.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "epoch": step // plan.steps_per_epoch, "config": config_to_dict(cfg),
                "normalization": data.normalization_state(), "data_kind": data.kind,
                "data": data_states, "rng": rng_states, "world_size": env.world_size})
        barrier(env)
        metrics.observe_checkpoint(time.perf_counter() - t0)

    def evaluate(step: int, plots: bool = False) -> dict:
        results = data.evaluate(model, cfg, device=device, run_dir=run_dir, plots=plots)
        results["step"] = step
        with open(run_dir / "evaluations.jsonl", "a") as f:
            f.write(to_json(results) + "\n")
        return results

    model.train()
    bar = tqdm(total=plan.total_steps, initial=start, desc=cfg.method.name, unit="step", dynamic_ncols=True,
               disable=not (cfg.run.progress and env.is_main), file=sys.stderr)
    stop = StopRequest()
    samples = start * cfg.optim.batch_size * env.world_size  # global anchors consumed (equal B per rank)
    try:
        with open(metrics_path, "a") if env.is_main else contextlib.nullcontext() as metrics_file, \
                contextlib.closing(metrics), contextlib.closing(bar), contextlib.closing(data):
            for step in range(start, plan.total_steps):
                t0 = time.perf_counter()
                session = data.session_at(step)  # the same on every rank
                stream = data.sessions[session]
                anchors = next(stream.anchors)
                # no pool while lambda == 0, nor when the candidates are the batch itself
                pool = next(stream.pool) if schedules(step, cfg, plan)[2] > 0 and cfg.method.pool != "batch" else None
                anchors, pool = _to(anchors, device, channels_last), _to(pool, device, channels_last)
                t1 = time.perf_counter()
                set_session(model, session)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.amp):
                    out = train_step(net, optimizer, anchors, pool, step, cfg, mining_gen, plan=plans[session],
                                     gather=gather, context=stream.mining_context)
                t2 = time.perf_counter()
                done = step + 1
                samples += anchors[0].shape[0] * env.world_size
                if not math.isfinite(out["loss_total"]):
                    raise UserError(f"training diverged at step {done} (loss {out['loss_total']}); "
                                    "lower optim.lr or check the data")
                bar.update(1)
                metrics.update(out, samples, t2 - t1, t1 - t0)
                if env.is_main and (done % cfg.train.log_every == 0 or done == plan.total_steps
                                    or done == start + 1):
                    record = {"step": done, "epoch": done // plan.steps_per_epoch, **out, "samples": samples,
                              "world_size": env.world_size, "step_seconds": t2 - t1, "data_wait_seconds": t1 - t0}
                    metrics_file.write(to_json(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(aug=f"{out['loss_augmented']:.3f}",
                                    mined="-" if out["loss_mined"] is None else f"{out['loss_mined']:.3f}",
                                    lam=f"{out['mining_weight']:.2f}", refresh=False)
                if stop.requested(env):
                    checkpoint(done)
                    log.warning("stopped by signal at step %d; checkpoint saved in %s: %s", done, run_dir,
                                resume_hint)
                    return run_dir, {"stopped_at_step": done}
                if done % cfg.train.checkpoint_every == 0 and done < plan.total_steps:
                    checkpoint(done)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < plan.total_steps:
                    if env.is_main:
                        log.info("step %d: %s", done, to_json(evaluate(done)))
                    barrier(env)
            final = max(start, plan.total_steps)
            checkpoint(final)
    finally:
        stop.restore()
    results = {}
    if env.is_main:
        results = evaluate(final, plots=True)
        atomic_write_text(run_dir / "eval.json", to_json(results) + "\n")
    barrier(env)
    return run_dir, results


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train MYOW (or BYOL) on a recording store or on image shards (written by "
                    "python -m preprocess.shard_images; data.kind auto-detects which), then evaluate it. "
                    "With no arguments: the embedded demo (simulated reach session, ~1 minute on a CPU).",
        epilog="Examples:\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set data.path=chewie.zarr\n"
               "  python -m pipeline.train --config configs/reach_myow.yaml --set method.name=byol --set run.seed=1\n"
               "  python -m pipeline.train --demo --set train.max_steps=100\n"
               "Images (configs/mnist_myow.yaml, mnist_byol.yaml: small convnet, minutes on a CPU; "
               "configs/cifar10_myow.yaml, cifar10_byol.yaml: the paper's ResNet-18 setting, for a GPU):\n"
               "  python -m preprocess.shard_images ../shared/data/mnist-t10k --out mnist-shards\n"
               "  python -m pipeline.train --config configs/mnist_myow.yaml --set data.path=mnist-shards\n"
               "  python -m pipeline.train --config configs/cifar10_myow.yaml --set data.path=cifar10-shards\n"
               "Keys: data.*, augment.*, model.*, method.*, optim.*, train.*, run.*, metrics.*, eval.*, images.* "
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
        if data_kind(cfg) == "images":
            raise UserError("method.name supervised is the neural-data baseline; image runs take myow or byol")
        from .supervised import train_supervised

        if cfg.run.dir:
            check_run_dir(Path(cfg.run.dir))
        run_dir, results = train_supervised(cfg)
        print(to_json({**results, "run_dir": str(run_dir)}))
        return 0
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_s)  # torchrun's ranks, or a world of one
    configure_rank_logging(env)
    try:
        run_dir, results = train(cfg, env=env)
    finally:
        shutdown(env)
    if env.is_main:
        print(to_json({**results, "run_dir": str(run_dir)}))
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
