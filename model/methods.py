"""The methods interface: what a method is, and what it needs from the data.

A method is a small pure module of this package (its heads and loss, shapes documented:
:mod:`model.myow` for MYOW and BYOL) plus a :class:`DataNeeds` declaration. The trainer
reads the declaration to decide what the streams produce and what each step draws, so a
new method plugs in without touching the loop, the checkpoint or the distributed code:

    1. its module here: an ``nn.Module`` satisfying :class:`Method` and its loss functions;
    2. its declaration in :func:`data_needs`;
    3. its step (``train_step``-shaped: batch in, metrics dict out) and model builder in
       :func:`pipeline.methods.build_method`.

Pure: no configs, files or ranks; the declaration is a function of the method's settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from torch import nn

METHOD_NAMES = ("myow", "byol", "simclr", "rp", "ts", "ae", "pivae", "supervised")
NEURAL_ONLY_METHODS = ("supervised", "rp", "ts", "ae", "pivae")  # binned recordings only, never images
TEMPORAL_VIEWS = ("pairs", "triplets")  # DataNeeds.temporal


@dataclass(frozen=True)
class DataNeeds:
    """What a method needs from the data at every step.

    augmented_pairs: the anchor stream's two augmented views (x1, x2) of each anchor.
    mining_view:     a third, separate view x_m of each anchor to mine with (Algorithm 1).
    candidate_pool:  an independent pool stream of L candidates to mine views from.
    temporal:        the anchor stream gives temporal "pairs" (RP) or "triplets" (TS) of bins
                     with their labels (close / far, in order / not) instead of jitter pairs.
    target_view:     the third element of an anchor batch is the anchors' "clean" normalised
                     rates (no augmentation: the AE's target) or their spike "counts" (pi-VAE).
    labels:          behaviour labels are trained on (the method is not self-supervised).
    """

    augmented_pairs: bool = True
    mining_view: bool = False
    candidate_pool: bool = False
    temporal: str | None = None
    target_view: str | None = None
    labels: bool = False

    @property
    def self_supervised(self) -> bool:
        return not self.labels


def data_needs(name: str, mining_weight: float = 0.0, pool: str = "independent",
               mining_view: str = "separate") -> DataNeeds:
    """The declaration of method ``name`` under its settings.

    MYOW (``mining_weight`` lambda > 0) mines among an independent pool (``pool``
    "independent"; "batch" mines among the batch's own view 1, the authors' code) with a
    separate mining view (``mining_view`` "separate"; "anchor" reuses view 1). BYOL is
    MYOW with lambda = 0, and SimCLR contrasts the two views against the batch: augmented
    pairs only. RP and TS train on temporal pairs / triplets, the AE reconstructs the clean
    rates of an augmented view, pi-VAE the counts of a view given its label. The supervised
    MLP trains on labels (its own fit).
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHOD_NAMES)}")
    if name == "supervised":
        return DataNeeds(augmented_pairs=False, labels=True)
    if name in ("rp", "ts"):
        return DataNeeds(augmented_pairs=False, temporal="pairs" if name == "rp" else "triplets")
    if name == "ae":
        return DataNeeds(augmented_pairs=False, target_view="clean")
    if name == "pivae":
        return DataNeeds(augmented_pairs=False, target_view="counts", labels=True)
    mines = name == "myow" and mining_weight > 0
    return DataNeeds(mining_view=mines and mining_view == "separate", candidate_pool=mines and pool != "batch")


class Method(Protocol):
    """A trainable method module, as the loop and the checkpoint see it."""

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer updates (never a target network's)."""
        ...

    def update_target(self, tau: float) -> None:
        """The end-of-step update of a target network (EMA); a no-op without one."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, strict: bool = True): ...


class SingleNetworkMethod(nn.Module):
    """Base of the methods without a target network (SimCLR, RP, TS, AE, pi-VAE): the optimizer
    trains every parameter, :meth:`update_target` is a no-op, and ``forward`` dispatches on
    ``mode``: "represent" -> ``self.encoder(x)`` (what the read-outs embed with), a name in
    ``modes`` -> that method (every computation with a gradient goes through ``forward`` so
    that DDP sees it)."""

    modes: tuple[str, ...] = ()

    def online_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def update_target(self, tau: float) -> None:
        """No target network."""

    def forward(self, *args, mode: str = "represent", **kwargs):
        if mode == "represent":
            return self.encoder(*args)
        if mode in self.modes:
            return getattr(self, mode)(*args, **kwargs)
        raise ValueError(f"{type(self).__name__}: unknown mode {mode!r}; one of represent, {', '.join(self.modes)}")
