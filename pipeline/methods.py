"""The one module that knows the methods: ``build_method(cfg)`` returns what the trainer
needs of ``cfg.method.name``: the data it needs (:class:`model.methods.DataNeeds`), how to
build its model, and its step.

    myow, byol   model.myow.MYOW (BYOL = lambda 0), pipeline.step.train_step
    simclr       model.simclr.SimCLR, pipeline.step.contrastive_step
    supervised   the supervised MLP baseline (pipeline.supervised; its own fit for now)

Adding a method: its pure module under ``model/``, its declaration in
:func:`model.methods.data_needs`, and one entry here. The loop, the checkpoint and the
distributed code stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from model.methods import DataNeeds, data_needs
from model.simclr import SimCLR

from .build import build_encoder_for, build_model
from .config import Config
from .step import contrastive_step, train_step


@dataclass(frozen=True)
class MethodSpec:
    """What the trainer needs of a method."""

    name: str
    needs: DataNeeds
    build_model: Callable[[Config, int | list[int]], nn.Module]  # (cfg, model_input) -> Method module
    step: Callable[..., dict]  # train_step-shaped: one optimizer step -> metrics dict


def build_method(cfg: Config) -> MethodSpec:
    """The method of ``cfg.method`` (validated by the config: the name is known)."""
    m = cfg.method
    needs = data_needs(m.name, cfg.effective_mining_weight, m.pool, m.mining_view)
    if m.name == "simclr":
        return MethodSpec(m.name, needs, build_simclr, contrastive_step)
    if m.name == "supervised":  # fitted by pipeline.supervised; the spec rebuilds its saved encoder
        return MethodSpec(m.name, needs, build_supervised, _no_step)
    return MethodSpec(m.name, needs, build_model, train_step)


class SupervisedEncoder(nn.Module):
    """What a supervised run's checkpoint holds: the trained encoder f (the read-out head is
    the baseline's own and is not kept)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)


def build_supervised(cfg: Config, in_dim: int | list[int]) -> SupervisedEncoder:
    return SupervisedEncoder(build_encoder_for(cfg, in_dim))


def _no_step(*args, **kwargs) -> dict:
    raise RuntimeError("the supervised baseline is fitted by pipeline.supervised.train_supervised, not the loop")


def build_simclr(cfg: Config, in_dim: int | list[int]) -> SimCLR:
    """SimCLR over :func:`pipeline.build.build_encoder_for`; projector g = MLP(D, hidden, Z) with
    ``model.projector`` [hidden, Z], or [model.predictor_hidden, model.out_dim] when null
    (the neural configs have no projector: SimCLR needs one)."""
    mc = cfg.model
    dims = tuple(mc.projector) if mc.projector else (mc.predictor_hidden, mc.out_dim)
    return SimCLR(build_encoder_for(cfg, in_dim), dims, cfg.method.temperature)
