"""One optimizer step and what drives it: the per-run :class:`Plan`, the lr / tau / lambda
:func:`schedules`, MYOW/BYOL's :func:`train_step` (paper Algorithm 1) with its mining
statistics. The baselines' steps (SimCLR, RP, TS, AE, pi-VAE) are in :mod:`pipeline.baseline_steps`.
Steps are pure functions of the batch, the step number and the config; the loop
(:mod:`pipeline.loop`) owns when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.miner import exclusion_mask, mine_views
from model.myow import MYOW
from model.schedules import cosine_ema_momentum, mining_weight, warmup_cosine_lr

from .config import Config
from .data.context import MiningContext

MINING_METRICS = ("mining_pool_size", "mined_same_trial_ratio", "mined_time_gap_seconds",
                  "mined_label_agreement_ratio", "mined_valid_ratio")

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
    min_trial_gap: int = 0  # mining trial-exclusion window in trials (0 = off: the same trial only)
    encoder_bn_frozen_step: int | None = None  # train.freeze_encoder_bn_epochs in steps (None = never)

    @classmethod
    def build(cls, cfg: Config, steps_per_epoch: int, min_time_gap_s: float = 0.0,
              multi_store: bool = False) -> "Plan":
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        freeze = cfg.train.freeze_encoder_bn_epochs
        return cls(steps_per_epoch=steps_per_epoch, total_steps=int(total),
                   warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
                   mining_warmup_steps=round(cfg.method.mining_warmup_epochs * steps_per_epoch),
                   mining_ramp_steps=round(cfg.method.mining_ramp_epochs * steps_per_epoch),
                   min_time_gap_s=float(min_time_gap_s), multi_store=multi_store,
                   min_trial_gap=cfg.data.min_trial_gap,
                   encoder_bn_frozen_step=None if freeze is None else round(freeze * steps_per_epoch))


def schedules(step: int, cfg: Config, plan: Plan) -> tuple[float, float, float]:
    """(learning rate, EMA momentum tau, mining weight lambda) at optimizer step ``step`` (0-based)."""
    if cfg.optim.lr_schedule == "constant":
        lr = cfg.optim.lr
    else:
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
               *, plan: Plan, gather: Gather = identity_gather, context: MiningContext | None = None,
               schedule: tuple[float, float, float] | None = None, gather_rows: Callable | None = None) -> dict:
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
        context: the session's :class:`~pipeline.data.context.MiningContext` (mining by temporal
            context), or None (the k-NN search compares single bins).
        schedule: (lr, tau, lambda) of this step when the caller already has it
            (:func:`schedules`; the loop needs lambda to decide whether to draw a pool).
        gather_rows: unused here (the baselines' gather with gradient: SimCLR's negatives).

    Returns:
        floats: loss_augmented, loss_mined, loss_total, mining_weight, learning_rate,
        ema_momentum, embedding_std, and (None when the mined branch is skipped)
        mining_pool_size, mined_same_trial_ratio, mined_time_gap_seconds,
        mined_label_agreement_ratio (None without labels), mined_valid_ratio.
    """
    x1, x2, x_m, meta = anchors
    core = getattr(model, "module", model)  # the MYOW module itself (no-grad paths skip DDP)
    lr, tau, lam = schedule or schedules(step, cfg, plan)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # Augmented views: symmetric BYOL loss; the online y(x1) feeds the collapse monitor and,
    # with method.mining_view "anchor", the miner (and z1 = g(y1) the cascaded mined head).
    loss_aug, y1, z1 = model(x1, x2, mode="augmented_loss", return_projection=True)

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
        trial_key = "trial_rank" if plan.min_trial_gap > 1 else "trial"  # ranks: a gap counts trials
        exclude = exclusion_mask(meta[trial_key], pool_meta[trial_key], meta["time"], pool_meta["time"],
                                 plan.min_time_gap_s, *stores,
                                 min_trial_gap=plan.min_trial_gap)  # (B, world_size * L) bool, True = not allowed
        if method.oracle:  # diagnostic only: candidates of another label are not allowed
            other = meta["label"][:, None] != pool_meta["label"][None, :]
            if method.oracle_error_rate > 0:  # ... except for anchors drawn to get a wrong-label pair
                wrong = torch.rand(other.shape[0], generator=generator, device=generator.device) < method.oracle_error_rate
                other = torch.where(wrong.to(other.device)[:, None], ~other, other)
            exclude = exclude | other
        target_y = pool_y
        query, keys = y_m.detach(), pool_y
        if context is not None:  # search on +-W-bin context averages; the mined view itself stays one bin
            query, keys = context.smooth(meta["row"], y_m), context.smooth(pool_meta["row"], pool_y)
        idx = mine_views(query, keys, method.k, generator, exclude, mutual_k=method.mining_mutual_k,
                         keep_fraction=method.mining_keep_fraction,
                         all_k=method.mining_all_k)  # (B,) or (B, k), -1 = none
        if context is not None:
            context.update(pool_meta["row"], pool_y)
            if method.mining_context_target:  # predict the candidate's context average, not its bin
                target_y = keys
        # view 1 mines: its projection g(y1) is reused by the cascaded head (not recomputed)
        loss_mined = model(y_m, target_y, idx, z_m=z1 if x_m is None else None, mode="mined_loss")
        # with mining_all_k the statistics describe each anchor's nearest candidate
        stats = mining_stats(idx if idx.dim() == 1 else idx[:, 0], meta, pool_meta, pool_y.shape[0])
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
