"""The one module that knows the methods: ``build_method(cfg)`` returns what the trainer
needs of ``cfg.method.name``: the data it needs (:class:`model.methods.DataNeeds`), how to
build its model, and its step.

    myow, byol   model.myow.MYOW (BYOL = lambda 0)     pipeline.step.train_step
    simclr       model.simclr.SimCLR                     pipeline.baseline_steps.contrastive_step
    rp, ts       model.temporal.TemporalContrast         pipeline.baseline_steps.temporal_step
    ae           model.autoencoder.AutoEncoder           pipeline.baseline_steps.reconstruction_step
    pivae        model.pivae.PiVAE (trains on labels)    pipeline.baseline_steps.elbo_step
    supervised   the supervised MLP baseline (pipeline.supervised; its own fit for now)

Adding a method: its pure module under ``model/``, its declaration in
:func:`model.methods.data_needs`, and one entry here. The loop, the checkpoint and the
distributed code stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from model.autoencoder import AutoEncoder
from model.methods import DataNeeds, data_needs
from model.pivae import PiVAE
from model.simclr import SimCLR
from model.temporal import TemporalContrast
from preprocess.errors import UserError

from .baseline_steps import contrastive_step, elbo_step, reconstruction_step, temporal_step
from .build import build_encoder_for, build_model
from .config import Config
from .step import train_step


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
    if m.name in ("rp", "ts"):
        return MethodSpec(m.name, needs, build_temporal, temporal_step)
    if m.name == "ae":
        return MethodSpec(m.name, needs, build_autoencoder, reconstruction_step)
    if m.name == "pivae":
        return MethodSpec(m.name, needs, build_pivae, elbo_step)
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


def build_temporal(cfg: Config, in_dim: int | list[int]) -> TemporalContrast:
    """RP or TS (``method.name``) over :func:`pipeline.build.build_encoder_for`."""
    return TemporalContrast(build_encoder_for(cfg, in_dim), cfg.method.name)


def _one_session_units(cfg: Config, in_dim: int | list[int]) -> int:
    """The units a decoder reconstructs: one recording's (its decoder is per recording)."""
    if not isinstance(in_dim, int):
        raise UserError(f"method.name {cfg.method.name} reconstructs one recording's units; data.path has "
                        f"{len(in_dim)} sessions: train it on one store at a time")
    return in_dim


def build_autoencoder(cfg: Config, in_dim: int | list[int]) -> AutoEncoder:
    """The AE: the encoder and a mirrored decoder (model.hidden_dim, model.num_blocks) back to the units."""
    units, m = _one_session_units(cfg, in_dim), cfg.model
    return AutoEncoder(build_encoder_for(cfg, in_dim), units, m.hidden_dim, m.num_blocks)


def build_pivae(cfg: Config, in_dim: int | list[int]) -> PiVAE:
    """pi-VAE: the encoder, a Z = method.latent_dim latent with a prior per class of the main
    label (method.label_classes), and an MLP decoder (model.hidden_dim, model.num_blocks) of
    the counts' log rates."""
    units, m, me = _one_session_units(cfg, in_dim), cfg.model, cfg.method
    return PiVAE(build_encoder_for(cfg, in_dim), units, me.label_classes, me.latent_dim, m.hidden_dim,
                 m.num_blocks, me.kl_weight)
