"""The optimizer steps of the baselines (paper Table 3 / Fig. 4), each shaped like
:func:`pipeline.step.train_step`: ``step(model, optimizer, anchors, pool, step, cfg,
generator, *, plan, gather, context, schedule) -> metrics dict`` with train_step's keys
(those a method has no use for are None), plus the method's own terms.

    contrastive_step     SimCLR      (x1, x2) -> NT-Xent; the batch's other samples are the negatives
    temporal_step        RP, TS      (x, x'[, x''], temporal_label) -> binary cross-entropy
    reconstruction_step  AE          (x1, clean rates) -> mean squared error
    elbo_step            pi-VAE      (x1, counts, label) -> Poisson NLL + KL

None of them mines, so ``pool``, ``gather`` and ``context`` are unused, and none has a target
network (``ema_momentum`` is None). ``gather_rows`` (rows of every rank, with gradient) is
what SimCLR draws its negatives from under torchrun; the others ignore it. The learning rate follows the same warm-up + cosine schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .step import MINING_METRICS, Plan, schedules

__all__ = ["contrastive_step", "temporal_step", "reconstruction_step", "elbo_step"]


def _optimize(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: Config, plan: Plan, schedule,
              losses) -> dict:
    """Set the lr, compute ``losses(model)`` -> (loss, y (B, D), extra {name: tensor}), one
    backward and update; the metrics dict of train_step's keys plus the extras."""
    lr = (schedule or schedules(step, cfg, plan))[0]
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, y, extra = losses(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        emb_std = F.normalize(y.detach().float(), dim=1).std(dim=0).mean()
    values = torch.stack([loss.detach().float(), emb_std, *(v.detach().float() for v in extra.values())]).double()
    l_total, emb_std, *rest = values.tolist()
    return {"loss_augmented": l_total, "loss_mined": None, "loss_total": l_total, "mining_weight": 0.0,
            "learning_rate": lr, "ema_momentum": None, "embedding_std": emb_std, **dict.fromkeys(MINING_METRICS),
            **dict(zip(extra, rest))}


def contrastive_step(model, optimizer, anchors, pool, step: int, cfg: Config, generator: torch.Generator, *,
                     plan: Plan, gather=None, context=None, schedule=None, gather_rows=None) -> dict:
    """One SimCLR step (:class:`model.simclr.SimCLR`): anchors = (x1 (B, N), x2 (B, N), _, meta);
    ``loss_augmented`` = ``loss_total`` = the NT-Xent loss. ``gather_rows``
    (:func:`pipeline.distributed.all_gather_with_grad`; None in one process): the negatives
    are the samples of every rank."""
    x1, x2, _, _ = anchors

    def losses(m):
        loss, y1 = m(x1, x2, mode="contrastive_loss", return_representation=True, gather=gather_rows)
        return loss, y1, {}

    return _optimize(model, optimizer, step, cfg, plan, schedule, losses)


def temporal_step(model, optimizer, anchors, pool, step: int, cfg: Config, generator: torch.Generator, *,
                  plan: Plan, gather=None, context=None, schedule=None, gather_rows=None) -> dict:
    """One RP / TS step (:class:`model.temporal.TemporalContrast`): anchors = (x (B, N), x' (B, N),
    x'' (B, N) or None, meta with ``temporal_label`` (B,)) from
    :class:`pipeline.data.temporal.TemporalSampler`. Adds ``pretext_accuracy`` (share of pairs
    or triplets classified right)."""
    x1, x2, x3, meta = anchors

    def losses(m):
        loss, y1, accuracy = m(x1, x2, x3, meta["temporal_label"], mode="temporal_loss")
        return loss, y1, {"pretext_accuracy": accuracy}

    return _optimize(model, optimizer, step, cfg, plan, schedule, losses)


def reconstruction_step(model, optimizer, anchors, pool, step: int, cfg: Config, generator: torch.Generator, *,
                        plan: Plan, gather=None, context=None, schedule=None, gather_rows=None) -> dict:
    """One AE step (:class:`model.autoencoder.AutoEncoder`): anchors = (x1 (B, N) augmented,
    _, clean normalised rates (B, N), meta); the loss is the reconstruction error."""
    x1, _, target, _ = anchors

    def losses(m):
        loss, y1 = m(x1, target, mode="reconstruction_loss", return_representation=True)
        return loss, y1, {}

    return _optimize(model, optimizer, step, cfg, plan, schedule, losses)


def elbo_step(model, optimizer, anchors, pool, step: int, cfg: Config, generator: torch.Generator, *,
              plan: Plan, gather=None, context=None, schedule=None, gather_rows=None) -> dict:
    """One pi-VAE step (:class:`model.pivae.PiVAE`): anchors = (x1 (B, N), _, counts (B, N),
    meta with ``label`` (B,)); the loss is the negative ELBO. Adds ``poisson_nll`` and ``kl``.
    ``generator`` draws the reparameterisation noise. The data builder has checked that the
    labels lie below ``method.label_classes``."""
    x1, _, counts, meta = anchors
    labels = meta["label"]

    def losses(m):
        loss, y, nll, kl = m(x1, counts, labels, mode="elbo_loss", generator=generator)
        return loss, y, {"poisson_nll": nll, "kl": kl}

    return _optimize(model, optimizer, step, cfg, plan, schedule, losses)
