"""Projector / predictor heads."""

from __future__ import annotations

from torch import nn

__all__ = ["MLPHead"]


class MLPHead(nn.Sequential):
    """MLP(i, h, o) of paper App. C: Linear(i, h) - BatchNorm1d(h) - ReLU - Linear(h, o).

    Used for every projector (g, h) and predictor (q, r).

    Shapes: (B, in_dim) -> (B, out_dim). Attributes ``in_dim``, ``hidden_dim``, ``out_dim``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        if min(in_dim, hidden_dim, out_dim) <= 0:
            raise ValueError(f"MLPHead: dimensions must be positive, got ({in_dim}, {hidden_dim}, {out_dim})")
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
