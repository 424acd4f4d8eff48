"""The MYOW module: online network, dual predictors, EMA target network.

Notation (paper section 2.1, Algorithm 1; primes are target-network outputs):

    y = f(x)          encoder (representation; what evaluation uses)
    z = g(y)          projector for augmented views (Identity in the neural setting)
    q(z)              predictor of z' = g'(f'(x'))
    v = h(g(y))       mined projector ("cascaded", default), or
    v = h(y)          "parallel" (h reads the representation directly), or
    v = g(y)          "single" (no h; r predicts in g-space)
    r(v)              predictor of v' (the target projection of the mined view)

Training step (single process)::

    opt = torch.optim.AdamW(model.online_parameters(), ...)   # never model.parameters()
    loss_aug = model.augmented_loss(x1, x2)
    y_m = model.online_mining_representation(x_m)              # (B, D), with grad
    pool_y = model.target_representation(x_pool)               # (L, D), no grad
    idx = mine_views(y_m.detach(), pool_y, k, gen, exclude)    # (B,), -1 = no view
    loss = loss_aug + lam * model.mined_loss(y_m, pool_y, idx)
    opt.zero_grad(); loss.backward(); opt.step()
    model.update_target(tau)

Under DistributedDataParallel, gradients are only synchronised for computations that
went through the DDP wrapper's ``forward``; so call every grad-carrying method through it
with ``mode=``: ``ddp(x1, x2, mode="augmented_loss")``,
``ddp(x_m, mode="online_mining_representation")``,
``ddp(y_m, pool_y, idx, mode="mined_loss")``. Several forwards before one backward are
fine. ``target_representation`` needs no grad and can use ``ddp.module``; the pool
representations (and their metadata) are all-gathered by the caller before mining.
Every online parameter receives a gradient on every step when both losses are computed
(also when every index is -1, or when lam == 0 and the mined loss is multiplied by 0).
If a step skips the mined branch (e.g. while lam == 0), add ``zero_mined_loss()``
(through the wrapper: ``ddp(mode="zero_mined_loss")``) to the loss so h and r still get
(zero) gradients; otherwise DDP needs ``find_unused_parameters=True``. The EMA update runs
on each rank after ``opt.step()``; online weights are identical across ranks so the
targets stay identical too. Seed model construction identically on every rank.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .ema import ema_update_
from .heads import MLPHead

__all__ = ["MYOW", "ARCHITECTURES"]

ARCHITECTURES = ("cascaded", "parallel", "single")

_FORWARD_MODES = ("represent", "augmented_loss", "online_mining_representation",
                  "target_representation", "mined_loss", "zero_mined_loss")


def _head(in_dim: int, dims: tuple[int, int] | None) -> tuple[nn.Module, int]:
    """MLPHead(in_dim, hidden, out) for dims=(hidden, out), or Identity; returns (module, out_dim)."""
    if dims is None:
        return nn.Identity(), in_dim
    hidden, out = dims
    return MLPHead(in_dim, hidden, out), out


class MYOW(nn.Module):
    """MYOW (and BYOL, with the mining weight at 0).

    Args:
        encoder: f; must have an ``out_dim`` attribute (D).
        projector_dims: (hidden, out) of g = MLP(D, hidden, out), or None for no projector
            (g = Identity, the paper's neural setting).
        predictor_hidden: hidden width of q = MLP(Z, predictor_hidden, Z).
        mined_projector_dims: (hidden, out) of h, or None for h = Identity. Ignored by
            ``architecture="single"``, which has no h.
        mined_predictor_hidden: hidden width of r = MLP(V, ., V); None = predictor_hidden.
        architecture: "cascaded" (v = h(g(y)), the paper's), "parallel" (v = h(y)) or
            "single" (v = g(y)); paper App. G.

    Paper settings: neural data ``MYOW(MLPEncoder(N), None, 128, None, 128)``; CIFAR
    ``MYOW(resnet_cifar(18), (4096, 256), 4096, (4096, 256), 4096)``.

    The target network (``self.target``: deep copies of f, g, h) has requires_grad False
    and changes only through :meth:`update_target`. It follows the online network's
    train/eval mode (in training its BatchNorm uses batch statistics, as in BYOL).
    """

    def __init__(self, encoder: nn.Module, projector_dims: tuple[int, int] | None = None,
                 predictor_hidden: int = 128, mined_projector_dims: tuple[int, int] | None = None,
                 mined_predictor_hidden: int | None = None, architecture: str = "cascaded",
                 target_init: str = "copy") -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        rep_dim = getattr(encoder, "out_dim", None)
        if not isinstance(rep_dim, int):
            raise ValueError("MYOW: encoder must have an integer attribute out_dim")
        self.architecture = architecture
        self.rep_dim = rep_dim

        self.encoder = encoder
        self.projector, self.proj_dim = _head(rep_dim, projector_dims)
        self.predictor = MLPHead(self.proj_dim, predictor_hidden, self.proj_dim)
        if architecture == "cascaded":
            self.mined_projector, self.mined_dim = _head(self.proj_dim, mined_projector_dims)
        elif architecture == "parallel":
            self.mined_projector, self.mined_dim = _head(rep_dim, mined_projector_dims)
        else:  # single: mined views share g's space, so there is no h
            self.mined_projector, self.mined_dim = nn.Identity(), self.proj_dim
        self.mined_predictor = MLPHead(self.mined_dim, mined_predictor_hidden or predictor_hidden,
                                       self.mined_dim)

        # xi <- theta at init (Algorithm 1). A ModuleDict keeps the target in state_dict
        # (checkpoints) while online_parameters() leaves it out of the optimizer.
        self.target = nn.ModuleDict({
            "encoder": copy.deepcopy(self.encoder),
            "projector": copy.deepcopy(self.projector),
            "mined_projector": copy.deepcopy(self.mined_projector),
        })
        self.target.requires_grad_(False)
        if target_init == "reinit":
            # myow-neuro re-draws its target encoder after copying it (an ablation here)
            for module in self.target["encoder"].modules():
                if module is not self.target["encoder"] and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        elif target_init != "copy":
            raise ValueError(f"unknown target_init {target_init!r}; choose copy or reinit")

    # ----------------------------------------------------------------- parameter sets
    def online_modules(self) -> dict[str, nn.Module]:
        """The trained modules: encoder f, projector g, predictor q, mined projector h, mined predictor r."""
        return {"encoder": self.encoder, "projector": self.projector, "predictor": self.predictor,
                "mined_projector": self.mined_projector, "mined_predictor": self.mined_predictor}

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer must own. Use this, not ``parameters()``, which also
        yields the target network's (frozen) parameters."""
        for module in self.online_modules().values():
            yield from module.parameters()

    # ------------------------------------------------------------------ forward paths
    def forward(self, *args, mode: str = "represent", **kwargs):
        """``forward(x)`` -> online representation y = f(x), (B, D) (evaluation, embeddings).

        ``mode`` dispatches to another method with the remaining arguments; it exists so
        that every grad-carrying computation can go through a DDP wrapper's forward
        (see the module docstring). Modes: "represent", "augmented_loss",
        "online_mining_representation", "target_representation", "mined_loss",
        "zero_mined_loss".
        """
        if mode == "represent":
            return self.encoder(*args, **kwargs)
        if mode not in _FORWARD_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(_FORWARD_MODES)}")
        return getattr(self, mode)(*args, **kwargs)

    def _online_v(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.architecture == "cascaded":
            return self.mined_projector(self.projector(y) if z is None else z)
        if self.architecture == "parallel":
            return self.mined_projector(y)
        return self.projector(y)

    def _target_v(self, y: torch.Tensor) -> torch.Tensor:
        t = self.target
        if self.architecture == "cascaded":
            return t["mined_projector"](t["projector"](y))
        if self.architecture == "parallel":
            return t["mined_projector"](y)
        return t["projector"](y)

    def augmented_loss(self, x1: torch.Tensor, x2: torch.Tensor, return_representation: bool = False,
                       return_projection: bool = False):
        """Symmetric BYOL loss between two augmented views of the same B samples.

        d(q(g(f(x1))), g'(f'(x2))) + d(q(g(f(x2))), g'(f'(x1))), averaged over the batch
        (:func:`model.losses.byol_loss`); scalar in [-2, 2]. Views go through the
        networks separately so BatchNorm statistics are per view, as in BYOL.

        With ``return_representation`` also returns the online y1 = f(x1) (B, D), with
        grad: it can serve as the anchors' mining representation (myow-neuro mines with
        view 1), which saves a third view's augmentation, forward and backward. With
        ``return_projection`` too, (loss, y1, z1 = g(y1) (B, P)): the cascaded mined head
        h(g(y)) then reuses z1 instead of recomputing g (``mined_loss(..., z_m=z1)``).
        """
        y1 = self.encoder(x1)
        z1 = self.projector(y1)
        p1 = self.predictor(z1)
        p2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            t1 = self.target["projector"](self.target["encoder"](x1))
            t2 = self.target["projector"](self.target["encoder"](x2))
        loss = losses.byol_loss(p1, t2, p2, t1)
        if return_projection:
            return loss, y1, z1
        return (loss, y1) if return_representation else loss

    @torch.no_grad()
    def target_representation(self, x: torch.Tensor) -> torch.Tensor:
        """Target encoder output y' = f'(x) of the candidate pool, (L, ...) -> (L, D), no grad."""
        return self.target["encoder"](x)

    def online_mining_representation(self, x_m: torch.Tensor) -> torch.Tensor:
        """Online y_m = f(x_m) of the anchors' mining views, (B, ...) -> (B, D), with grad.

        Pass ``y_m.detach()`` to the miner and ``y_m`` itself to :meth:`mined_loss`.
        """
        return self.encoder(x_m)

    def mined_loss(self, y_m: torch.Tensor, target_pool_y: torch.Tensor,
                   indices: torch.Tensor, z_m: torch.Tensor | None = None) -> torch.Tensor:
        """Mining loss d(r(v_m), v'_m) averaged over anchors that got a mined view.

        Args:
            y_m: (B, D) online representations from :meth:`online_mining_representation`
                (or augmented_loss's y1 when view 1 mines).
            target_pool_y: (L, D) target representations of the (gathered) pool.
            indices: (B,) int64 from :func:`model.miner.mine_views`; -1 = no mined view,
                that anchor is left out of the mean. Or (B, k) (``all_k``): the target is
                the mean of the k candidates' unit-norm target projections (-1 entries
                left out; an anchor with none is dropped).
            z_m: (B, P) g(y_m) when the caller already has it (augmented_loss's z1 when
                y_m is y1): the cascaded head reuses it; same values, one g pass less.

        Returns:
            scalar in [-1, 1]; exactly 0 (still connected to h and r) when every index is -1.

        The online heads run on all B anchors (dropped ones too) so their BatchNorm sees a
        fixed batch size and never a batch of one. The target heads run on the whole pool
        and the picked rows are gathered afterwards: same result per row up to BatchNorm
        statistics (pool instead of picked rows), no dynamic shapes, and no failure when a
        single anchor survives.
        """
        if indices.dim() not in (1, 2) or indices.shape[0] != y_m.shape[0]:
            raise ValueError(f"mined_loss: indices must be ({y_m.shape[0]},) or ({y_m.shape[0]}, k), "
                             f"got {tuple(indices.shape)}")
        pred = self.mined_predictor(self._online_v(y_m, z_m))            # (B, V)
        if target_pool_y.shape[0] == 0:
            return losses.mined_loss(pred[:0], pred[:0])
        with torch.no_grad():
            target_v = self._target_v(target_pool_y)                     # (L, V)
        indices = indices.to(pred.device)
        valid = indices >= 0
        picked = target_v[indices.clamp(min=0)]                          # (B, V) or (B, k, V); -1: placeholders
        if indices.dim() == 2:  # the mean of the k neighbours' unit-norm projections
            weights = valid.to(picked.dtype)[..., None]
            picked = (F.normalize(picked.float(), dim=-1) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            valid = valid.any(dim=1)
        return losses.mined_loss(pred, picked, valid)

    def zero_mined_loss(self) -> torch.Tensor:
        """Exact scalar 0 connected to every parameter of h and r (the mining-only heads).

        Add it to the loss on steps that skip the mined branch so DDP (without
        find_unused_parameters) still sees a gradient for every parameter.
        """
        params = list(self.mined_projector.parameters()) + list(self.mined_predictor.parameters())
        if not params:
            return torch.zeros((), device=next(self.encoder.parameters()).device)
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    # --------------------------------------------------------------------- target EMA
    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """xi <- tau xi + (1 - tau) theta for f, g, h; BatchNorm buffers copied. Call after opt.step()."""
        online = self.online_modules()
        for name, target in self.target.items():
            ema_update_(target, online[name], tau)
