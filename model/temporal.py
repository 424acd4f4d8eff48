"""RP (relative positioning) and TS (temporal shuffling), the temporal pretext tasks of
Banville et al. (2021) that the paper compares with (Table 3, Fig. 4).

    RP: a pair (x, x') of bins, label 1 when they are close in time (|dt| <= tau_pos), 0 when
        far apart (|dt| >= tau_neg, or another trial);
        logit = w . |f(x) - f(x')| + b                              w: (D,)
    TS: a triplet (x, x', x'') with x, x'' close to each other; label 1 when x' lies between
        them in time, 0 when x' is a far bin;
        logit = w . [|f(x) - f(x')|, |f(x') - f(x'')|] + b         w: (2D,)
    loss = binary cross-entropy of the logits (mean over the batch)

The pairs and triplets come from :class:`pipeline.data.temporal.TemporalSampler`. The
representation read out is y = f(x). No target network.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .methods import SingleNetworkMethod

__all__ = ["TemporalContrast", "rp_features", "ts_features", "temporal_loss", "TEMPORAL_TASKS"]

TEMPORAL_TASKS = ("rp", "ts")


def rp_features(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B, D): |y1 - y2|, the contrastive module's input of RP."""
    return (y1 - y2).abs()


def ts_features(y1: torch.Tensor, y2: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
    """(B, D) x 3 -> (B, 2D): [|y1 - y2|, |y2 - y3|], the contrastive module's input of TS."""
    return torch.cat([(y1 - y2).abs(), (y2 - y3).abs()], dim=1)


def temporal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of (B,) ``logits`` against (B,) labels in {0, 1}; mean over B."""
    if logits.shape != labels.shape:
        raise ValueError(f"temporal_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class TemporalContrast(SingleNetworkMethod):
    """Encoder f + the linear contrastive module of RP (``task`` "rp") or TS ("ts").

    ``forward(x1, x2, x3, labels, mode="temporal_loss")`` -> (loss, y1 (B, D), pretext
    accuracy (scalar tensor)); x3 is None for RP. ``forward(x)`` -> f(x).
    """

    modes = ("temporal_loss",)

    def __init__(self, encoder: nn.Module, task: str = "rp"):
        super().__init__()
        if task not in TEMPORAL_TASKS:
            raise ValueError(f"TemporalContrast: task must be one of {TEMPORAL_TASKS}, got {task!r}")
        out_dim = int(getattr(encoder, "out_dim"))
        self.encoder, self.task = encoder, task
        self.head = nn.Linear(out_dim if task == "rp" else 2 * out_dim, 1)

    def temporal_loss(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor | None, labels: torch.Tensor):
        if (x3 is None) != (self.task == "rp"):
            raise ValueError(f"TemporalContrast({self.task}): {'no' if self.task == 'rp' else 'a'} third view expected")
        b = x1.shape[0]
        # one encoder pass over all views (BatchNorm statistics over the whole pair/triplet batch)
        ys = self.encoder(torch.cat([x1, x2] if x3 is None else [x1, x2, x3])).split(b)
        features = rp_features(*ys) if self.task == "rp" else ts_features(*ys)
        logits = self.head(features).squeeze(1)
        accuracy = ((logits.detach() > 0) == (labels > 0.5)).float().mean()
        return temporal_loss(logits, labels), ys[0], accuracy
