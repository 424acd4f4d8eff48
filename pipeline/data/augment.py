"""Normalisation and augmentations of binned rates: per-unit standardisation fitted on the
SSL training samples, and the neural augmentations (randomized dropout, pepper, Gaussian noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AugmentConfig

# --------------------------------------------------------------------------- normalisation / augmentation


@dataclass
class Normalization:
    """Per-unit z-scoring of firing rates with statistics of the SSL training samples.

    Stored in checkpoints and reused by evaluation. Units with std 0 get std 1 (they are
    only shifted), so a unit silent in training cannot blow up at test time.
    """

    mean: torch.Tensor  # (N,) float32, Hz
    std: torch.Tensor  # (N,) float32, Hz (> 0)

    @classmethod
    def fit(cls, rates: torch.Tensor) -> "Normalization":
        """Mean and unbiased std per unit of ``rates`` (n, N)."""
        x = rates.double()
        return cls.from_stats(x.mean(0), x.std(0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=x.dtype))

    @classmethod
    def from_stats(cls, mean: torch.Tensor, std: torch.Tensor) -> "Normalization":
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return cls(mean.float().contiguous(), std.float().contiguous())

    def __call__(self, rates: torch.Tensor) -> torch.Tensor:
        """(n, N) Hz -> (n, N) z-scores (new tensor)."""
        return (rates - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalization":
        return cls(state["mean"].float().contiguous(), state["std"].float().contiguous())


def normalization_state(norms: list[Normalization]) -> dict | list[dict]:
    """What a checkpoint stores: one state dict, or a list of them for several sessions."""
    return norms[0].state_dict() if len(norms) == 1 else [n.state_dict() for n in norms]


def normalizations_from(state: dict | list[dict]) -> Normalization | list[Normalization]:
    """The inverse of :func:`normalization_state`."""
    if isinstance(state, list):
        return [Normalization.from_state_dict(s) for s in state]
    return Normalization.from_state_dict(state)


class Augmenter:
    """Neural-data augmentations on whole batches (vectorised; no loop over samples).

    Order (myow-neuro ``get_neural_transform``, paper App. J): randomized dropout ->
    pepper -> Gaussian noise, all on raw rates in Hz, then z-scoring. So a dropped unit is
    0 Hz *before* normalisation (-mean/std after), and the noise scale is in Hz.
    Every sample draws its own dropout rate, masks and apply-decisions.
    """

    def __init__(self, cfg: AugmentConfig, norm: Normalization):
        self.cfg = cfg
        self.mean = norm.mean
        self.inv_std = 1.0 / norm.std

    @staticmethod
    def _bernoulli(shape: tuple[int, ...], p: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bool tensor of ``shape``, True with probability ``p`` (a float, or a tensor that
        broadcasts against ``shape``); exact at the ends (uniforms lie in [0, 1)).

        torch, not numpy: these draws run in the prefetch threads, and torch releases the
        GIL while it draws where numpy's generators hold it. With numpy's 16-bit draws (no
        cheaper per batch in the end) the training thread waited for the GIL: 42 vs 38 ms a
        MYOW step, 23 vs 20 ms a BYOL step, against 35 / 18 ms with no data thread running
        (interleaved, reach config).
        """
        return torch.rand(shape, generator=generator) < p

    @classmethod
    def _rows(cls, n: int, p: float, generator: torch.Generator) -> torch.Tensor:
        """Indices of the rows (each with probability p) an augmentation applies to."""
        if p >= 1:
            return torch.arange(n)
        return cls._bernoulli((n,), p, generator).nonzero().squeeze(1)

    def dropout_mask(self, n: int, n_units: int, generator: torch.Generator) -> torch.Tensor | None:
        """(n, N) bool, True = unit dropped; per-sample rate ~ U(0, dropout_max), applied
        to a sample with probability dropout_apply_p. None when dropout is off."""
        c = self.cfg
        if c.dropout_max <= 0 or c.dropout_apply_p <= 0:
            return None
        rate = torch.rand(n, 1, generator=generator) * c.dropout_max
        if c.dropout_apply_p < 1:
            rate *= self._bernoulli((n, 1), c.dropout_apply_p, generator)
        return self._bernoulli((n, n_units), rate, generator)

    def __call__(self, rates: torch.Tensor, generator: torch.Generator,
                 drop: torch.Tensor | None | bool = True) -> torch.Tensor:
        """Augment and normalise a batch.

        Args:
            rates: (n, N) float32 firing rates (Hz); not modified.
            generator: torch.Generator for every random draw.
            drop: True = draw a dropout mask here; a (n, N) bool mask = use it (structured
                dropout shared between views; ignored by an augmenter without dropout, e.g.
                T_m = identity, :func:`no_augmentation`); None/False = no dropout.

        Returns:
            (n, N) float32 normalised augmented view (a new contiguous tensor).
        """
        c = self.cfg
        n, n_units = rates.shape
        if drop is True:
            drop = self.dropout_mask(n, n_units, generator)
        drops_units = isinstance(drop, torch.Tensor) and c.dropout_max > 0 and c.dropout_apply_p > 0
        x = rates.masked_fill(drop, 0.0) if drops_units else rates.clone()
        # Pepper and noise: random numbers are drawn only for the rows they apply to (about
        # half of them by default).
        if c.pepper_p > 0 and c.pepper_apply_p > 0 and c.pepper_value != 0:
            rows = self._rows(n, c.pepper_apply_p, generator)
            pepper = self._bernoulli((len(rows), n_units), c.pepper_p, generator)
            x.index_add_(0, rows, pepper.to(x.dtype), alpha=c.pepper_value)
        if c.noise_std > 0 and c.noise_apply_p > 0:
            rows = self._rows(n, c.noise_apply_p, generator)
            x.index_add_(0, rows, torch.randn(len(rows), n_units, generator=generator), alpha=c.noise_std)
        return x.sub_(self.mean).mul_(self.inv_std)


def no_augmentation(norm: Normalization) -> Augmenter:
    """T_m = identity: an Augmenter that only normalises (``method.mining_augment: false``)."""
    return Augmenter(AugmentConfig(dropout_max=0.0, noise_std=0.0, pepper_p=0.0), norm)


class CountsView:
    """The spike counts of the bins, rates (Hz) x bin size rounded to whole spikes: pi-VAE's
    Poisson target. Called like an :class:`Augmenter` (the generator and mask are unused)."""

    def __init__(self, bin_size_s: float):
        self.bin_size_s = float(bin_size_s)

    def __call__(self, rates: torch.Tensor, generator: torch.Generator | None = None,
                 drop: torch.Tensor | None | bool = True) -> torch.Tensor:
        """(n, N) Hz -> (n, N) float32 counts."""
        return torch.round(rates * self.bin_size_s).float()
