"""SimCLR (Chen et al. 2020) as a method of this package: an encoder f, a projector g and
the NT-Xent loss over two augmented views; the other samples of the batch are the negatives.

    z1 = g(f(x1)), z2 = g(f(x2))                  (B, Z) each
    loss = NT-Xent(z1, z2; temperature)           mean over the 2B views of
           -log( exp(s(i, pos(i)) / t) / sum_{j != i} exp(s(i, j) / t) )
           s = cosine similarity, pos(i) = the other view of the same sample

The representation read out is y = f(x), as for MYOW/BYOL. No target network: the
:class:`model.methods.Method` ``update_target`` is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MLPHead
from .methods import SingleNetworkMethod

__all__ = ["SimCLR", "nt_xent_loss"]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy of SimCLR.

    Args:
        z1, z2: (B, Z) projections of two views of the same B samples (any scale: they are
            L2-normalised here); row i of z1 and row i of z2 are a positive pair.
        temperature: t > 0.

    Returns:
        scalar: the mean over the 2B views of the cross-entropy of picking the view's
        positive among the other 2B - 1 views (itself excluded).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent_loss: z1 and z2 must be (B, Z) of one shape, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent_loss: temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, Z)
    logits = z @ z.T / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)  # (2B,)
    return F.cross_entropy(logits, positives)


class SimCLR(SingleNetworkMethod):
    """Encoder f + projector g = MLP(D, hidden, Z), trained with :func:`nt_xent_loss`.

    ``forward(x1, x2, mode="contrastive_loss", return_representation=True)`` -> (loss, y1 (B, D));
    ``forward(x)`` -> f(x) (B, D). Every computation with a gradient goes through
    ``forward`` so that DDP sees it.
    """

    modes = ("contrastive_loss",)

    def __init__(self, encoder: nn.Module, projector_dims: tuple[int, int], temperature: float = 0.1):
        super().__init__()
        out_dim = int(getattr(encoder, "out_dim"))
        self.encoder = encoder
        self.projector = MLPHead(out_dim, int(projector_dims[0]), int(projector_dims[1]))
        self.temperature = float(temperature)

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, return_representation: bool = False,
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """NT-Xent of the two views' projections (B, Z) each; ``gather`` (rows of every rank, with
        gradient) makes the negatives every rank's samples (the global batch), as SimCLR does."""
        y1, y2 = self.encoder(x1), self.encoder(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        if gather is not None:
            z1, z2 = gather(z1), gather(z2)
        loss = nt_xent_loss(z1, z2, self.temperature)
        return (loss, y1) if return_representation else loss
