"""Model and optimizer factories from a :class:`~pipeline.config.Config`."""

from __future__ import annotations

import torch

from model import MYOW, SessionEncoder, build_encoder

from .config import Config

__all__ = ["build_model", "build_encoder_for", "build_optimizer", "uses_channels_last"]


def build_encoder_for(cfg: Config, in_dim: int | list[int]) -> torch.nn.Module:
    """The encoder f of ``model.encoder`` for the data's input (``TrainData.model_input()``).

    mlp: ``in_dim`` input units, or a list of sessions' unit counts (a per-session read-in
    Linear(N_s, hidden_dim) before the shared MLP: :class:`model.SessionEncoder`).
    convnet / resnet18 / resnet50: ``in_dim`` image channels.
    """
    m = cfg.model
    dims = [in_dim] if isinstance(in_dim, int) else list(in_dim)
    if m.encoder != "mlp":
        if len(dims) != 1:
            raise ValueError(f"model.encoder {m.encoder} reads images of one channel count, got {dims}")
        kwargs = {"out_dim": m.out_dim} if m.encoder == "convnet" else {}
        return build_encoder(m.encoder, in_channels=dims[0], **kwargs)
    width = dims[0] if len(dims) == 1 else m.hidden_dim
    encoder = build_encoder(m.encoder, in_dim=width, hidden_dim=m.hidden_dim, num_blocks=m.num_blocks,
                            out_dim=m.out_dim, dropout=m.dropout if cfg.method.name == "supervised" else 0.0)
    return SessionEncoder(dims, encoder, width) if len(dims) > 1 else encoder


def uses_channels_last(cfg: Config, device: torch.device | str) -> bool:
    """ResNets on CUDA run in channels_last memory format (faster convolutions with tensor
    cores, above all under bf16 autocast); on CPUs, and for the small convnet, it is skipped."""
    return cfg.model.encoder.startswith("resnet") and torch.device(device).type == "cuda"


def build_model(cfg: Config, in_dim: int | list[int]) -> MYOW:
    """MYOW (BYOL when ``method.name: byol``; same module) over :func:`build_encoder_for`.

    Paper neural setting (App. D): MLP encoder of ``num_blocks`` Linear(64)-BN-ReLU
    blocks and a Linear(32) output, no projectors, predictors MLP(32, 128, 32). Paper
    image setting (App. C): ResNet-18 (CIFAR), g = MLP(512, 4096, 256), q = MLP(256, 4096,
    256), h = r = MLP(256, 4096, 256) (``configs/cifar10_myow.yaml``).
    """
    m = cfg.model
    encoder = build_encoder_for(cfg, in_dim)
    return MYOW(encoder,
                projector_dims=tuple(m.projector) if m.projector else None,
                predictor_hidden=m.predictor_hidden,
                mined_projector_dims=tuple(m.mined_projector) if m.mined_projector else None,
                mined_predictor_hidden=m.mined_predictor_hidden,
                architecture=m.architecture, target_init=m.target_init)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (pass ``model.online_parameters()``: never the target's).

    The learning rate is set on every step by the schedule; ``optim.lr`` here is only the
    initial value. Weight decay applies to every parameter, as in myow-neuro.
    """
    o = cfg.optim
    params = list(params)
    # fused: one kernel for every parameter's update (CPU and CUDA); on a CPU 0.5 ms a step
    # for the reach model, against 2.1 ms for foreach (which loops over tensors there)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)
