"""Model and optimizer factories from a :class:`~pipeline.config.Config`."""

from __future__ import annotations

import torch

from model import MYOW, SessionEncoder, build_encoder

from .config import Config

__all__ = ["build_model", "build_optimizer"]


def build_model(cfg: Config, in_dim: int | list[int]) -> MYOW:
    """MYOW (BYOL when ``method.name: byol``; same module) for ``in_dim`` input units, or for
    a list of sessions' unit counts (a per-session read-in Linear(N_s, hidden_dim) before
    the shared encoder: :class:`model.SessionEncoder`).

    Paper neural setting (App. D): MLP encoder of ``num_blocks`` Linear(64)-BN-ReLU
    blocks and a Linear(32) output, no projectors, predictors MLP(32, 128, 32).
    """
    m = cfg.model
    dims = [in_dim] if isinstance(in_dim, int) else list(in_dim)
    width = dims[0] if len(dims) == 1 else m.hidden_dim
    encoder = build_encoder(m.encoder, in_dim=width, hidden_dim=m.hidden_dim, num_blocks=m.num_blocks,
                            out_dim=m.out_dim, dropout=m.dropout if cfg.method.name == "supervised" else 0.0)
    if len(dims) > 1:
        encoder = SessionEncoder(dims, encoder, width)
    return MYOW(encoder,
                projector_dims=tuple(m.projector) if m.projector else None,
                predictor_hidden=m.predictor_hidden,
                mined_projector_dims=tuple(m.mined_projector) if m.mined_projector else None,
                mined_predictor_hidden=m.mined_predictor_hidden,
                architecture=m.architecture)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (pass ``model.online_parameters()``: never the target's).

    The learning rate is set on every step by the schedule; ``optim.lr`` here is only the
    initial value. Weight decay applies to every parameter, as in myow-neuro.
    """
    o = cfg.optim
    params = list(params)
    if o.name == "adamw":
        # foreach: one fused multi-tensor update instead of a Python loop over parameters
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
