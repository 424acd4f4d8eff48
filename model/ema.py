"""Target-network updates (in place, no autograd)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update_"]


def _paired(target: nn.Module, online: nn.Module):
    tp, op = list(target.parameters()), list(online.parameters())
    tb, ob = list(target.buffers()), list(online.buffers())
    if len(tp) != len(op) or len(tb) != len(ob):
        raise ValueError(
            f"target and online modules differ in structure: {len(tp)}/{len(op)} parameters, "
            f"{len(tb)}/{len(ob)} buffers")
    return tp, op, tb, ob


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau * xi + (1 - tau) * theta for every parameter; buffers copied.

    Args:
        target: module updated in place (same structure as ``online``).
        online: source module (not modified).
        tau: momentum in [0, 1]; 1 keeps the target, 0 copies the online weights.

    Buffers (BatchNorm running mean/var, num_batches_tracked) are copied rather than
    averaged: they are statistics of the online network's activations, not learned
    weights, and averaging an integer counter makes no sense.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"ema_update_: tau must be in [0, 1], got {tau}")
    tp, op, tb, ob = _paired(target, online)
    if tp:
        # lerp(xi, theta, 1 - tau) = xi + (1 - tau)(theta - xi); one fused multi-tensor kernel.
        torch._foreach_lerp_(tp, op, 1.0 - float(tau))
    if tb:
        torch._foreach_copy_(tb, ob)  # one call for every buffer, not a Python loop of copies
