"""AE, the autoencoder baseline of the paper's Table 3 / Fig. 4: the method's encoder f and a
mirrored decoder d reconstruct the normalised rates.

    y = f(x)            (B, D)  x: (B, N) an augmented view of the anchor bins (T of the config)
    x_hat = d(y)        (B, N)  d = num_blocks x (Linear(hidden) - BN - ReLU) + Linear(N)
    loss = mean over the batch of the mean squared error to the target (B, N): the clean,
                 un-augmented normalised rates of the same bins (a denoising AE; with the
                 augmentations off, a plain one)

The representation read out is y = f(x), as for every method. No target network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import MLPEncoder
from .methods import SingleNetworkMethod

__all__ = ["AutoEncoder", "reconstruction_loss"]


def reconstruction_loss(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of (B, N) ``x_hat`` to (B, N) ``target``: mean over units and samples."""
    if x_hat.shape != target.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, {tuple(x_hat.shape)} vs {tuple(target.shape)}")
    return F.mse_loss(x_hat.float(), target.float())


class AutoEncoder(SingleNetworkMethod):
    """Encoder f + decoder d (an :class:`~model.encoders.MLPEncoder` from D to ``out_units``).

    ``forward(x, target, mode="reconstruction_loss", return_representation=True)`` ->
    (loss, y (B, D)); ``forward(x)`` -> f(x) (B, D).
    """

    modes = ("reconstruction_loss",)

    def __init__(self, encoder: nn.Module, out_units: int, hidden_dim: int = 64, num_blocks: int = 3):
        super().__init__()
        self.encoder = encoder
        self.decoder = MLPEncoder(int(getattr(encoder, "out_dim")), hidden_dim, num_blocks, int(out_units))

    def reconstruction_loss(self, x: torch.Tensor, target: torch.Tensor, return_representation: bool = False):
        y = self.encoder(x)
        loss = reconstruction_loss(self.decoder(y), target)
        return (loss, y) if return_representation else loss
