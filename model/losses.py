"""Losses (pure functions of tensors).

d(u, v) = -<u, v> / (||u|| ||v||)  (paper eq. 1). Computed in float32 even under
autocast: normalising low-precision vectors loses most of the signal of a loss that lives
in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_distance", "byol_loss", "mined_loss"]

_EPS = 1e-8


def cosine_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row negative cosine similarity.

    Args:
        u, v: (B, D).

    Returns:
        (B,) float32, d_i = -cos(u_i, v_i) in [-1, 1]. A zero row gives 0.
        Gradients flow to both arguments (detach targets at the call site).
    """
    if u.shape != v.shape:
        raise ValueError(f"cosine_distance: shapes differ {tuple(u.shape)} vs {tuple(v.shape)}")
    u = F.normalize(u.float(), dim=-1, eps=_EPS)
    v = F.normalize(v.float(), dim=-1, eps=_EPS)
    return -(u * v).sum(dim=-1)


def byol_loss(p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Symmetric augmentation loss (Algorithm 1, first two terms, divided by B).

    Args:
        p1: (B, Z) online prediction q(g(f(x1))).
        z2: (B, Z) target projection g'(f'(x2)); detached here.
        p2: (B, Z) online prediction q(g(f(x2))).
        z1: (B, Z) target projection g'(f'(x1)); detached here.

    Returns:
        scalar = mean_i [ d(p1_i, z2_i) + d(p2_i, z1_i) ], in [-2, 2] (the two
        directions are summed, as in Algorithm 1 and BYOL, not averaged).
    """
    return (cosine_distance(p1, z2.detach()) + cosine_distance(p2, z1.detach())).mean()


def mined_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mining loss: mean_i d(pred_i, target_i) over the kept rows, target detached.

    Args:
        pred: (n, V) online prediction r(v_m).
        target: (n, V) target projection v'_m.
        valid: optional (n,) bool; rows with False are left out of the mean (anchors
            without a mined view). A mask instead of boolean indexing keeps shapes static
            (no host-device sync on GPU).

    Returns:
        scalar in [-1, 1]. With no row kept (n == 0 or ``valid`` all False) the result is
        an exact 0 that is still connected to ``pred``'s graph (like ``pred.sum() * 0``),
        so backward reaches the same parameters on every step (DDP without
        find_unused_parameters).
    """
    if pred.shape[0] == 0:
        return pred.float().sum() * 0.0
    d = cosine_distance(pred, target.detach())
    if valid is None:
        return d.mean()
    if valid.shape != d.shape:
        raise ValueError(f"mined_loss: valid must be ({d.shape[0]},), got {tuple(valid.shape)}")
    keep = valid.to(d.dtype)
    # where() rather than d * keep so a non-finite dropped row cannot turn the value into NaN.
    return torch.where(valid, d, torch.zeros_like(d)).sum() / keep.sum().clamp(min=1.0)
