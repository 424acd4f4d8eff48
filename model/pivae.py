"""pi-VAE (Zhou & Wei, NeurIPS 2020), the label-conditioned generative baseline of the
paper's Table 3 / Fig. 4: a VAE whose latent prior depends on the behaviour label u and whose
observation model is Poisson in the spike counts. It trains WITH labels: not self-supervised.

    y = f(x)                                   (B, D)   x: (B, N) normalised rates
    q(z | x)   = N(m_x, diag v_x)              m_x, log v_x = Linear(D, Z)(y)
    p(z | u)   = N(m_u, diag v_u)              learned per class (C classes + "unknown")
    q(z | x, u) ∝ q(z | x) p(z | u)            product of Gaussians (pi-VAE eq. 6):
                  v = 1 / (1/v_x + 1/v_u),  m = v (m_x/v_x + m_u/v_u)
    z = m + sqrt(v) * eps                      reparameterised draw
    log rate = g(z)                            (B, N)   g = MLP decoder
    loss = Poisson NLL(counts | exp g(z)) summed over units
           + kl_weight * KL(q(z | x, u) || p(z | u)) summed over Z; both mean over B

Documented simplifications of the pi-VAE paper: the decoder g is an MLP, not their
GIN-flow decoder (a flow would make g invertible; nothing here needs the inverse); the label
prior is a table per discrete class (the reach-direction octant, the arousal state), where
their code also allows continuous labels. The representation read out is y = f(x), which
no label enters (m_x is linear in it, so a linear read-out of y contains m_x's).
"""

from __future__ import annotations

import torch
from torch import nn

from .encoders import MLPEncoder
from .methods import SingleNetworkMethod

__all__ = ["PiVAE", "gaussian_product", "gaussian_kl", "poisson_nll", "pivae_loss"]


def gaussian_product(m1: torch.Tensor, logv1: torch.Tensor, m2: torch.Tensor, logv2: torch.Tensor):
    """Mean and log-variance of N(m1, v1) N(m2, v2), renormalised (diagonal; any shape)."""
    p1, p2 = torch.exp(-logv1), torch.exp(-logv2)  # precisions
    v = 1.0 / (p1 + p2)
    return v * (m1 * p1 + m2 * p2), torch.log(v)


def gaussian_kl(m_q: torch.Tensor, logv_q: torch.Tensor, m_p: torch.Tensor, logv_p: torch.Tensor) -> torch.Tensor:
    """(B, Z) each -> (B,): KL(N(m_q, v_q) || N(m_p, v_p)) summed over the Z dimensions."""
    kl = 0.5 * (logv_p - logv_q + (logv_q.exp() + (m_q - m_p) ** 2) / logv_p.exp() - 1.0)
    return kl.sum(1)


def poisson_nll(log_rate: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N) log Poisson means and (B, N) counts -> (B,): -log p(counts), summed over units
    (the log(counts!) term included, so the value is a true negative log-likelihood)."""
    return (log_rate.exp() - counts * log_rate + torch.lgamma(counts + 1.0)).sum(1)


def pivae_loss(log_rate, counts, m_q, logv_q, m_p, logv_p, kl_weight: float = 1.0):
    """(negative ELBO, Poisson NLL, KL), each the mean over the batch (scalars)."""
    nll, kl = poisson_nll(log_rate.float(), counts.float()).mean(), gaussian_kl(m_q, logv_q, m_p, logv_p).mean()
    return nll + kl_weight * kl, nll, kl


class PiVAE(SingleNetworkMethod):
    """Encoder f, the posterior heads, the label prior and the decoder g.

    ``forward(x, counts, labels, mode="elbo_loss", generator=g)`` -> (loss, y (B, D), nll, kl);
    ``labels`` (B,) int64 in 0..n_classes-1, or -1 (unknown: the extra prior row).
    ``forward(x)`` -> f(x) (B, D).
    """

    modes = ("elbo_loss",)

    def __init__(self, encoder: nn.Module, out_units: int, n_classes: int, latent_dim: int = 32,
                 hidden_dim: int = 64, num_blocks: int = 2, kl_weight: float = 1.0):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"PiVAE: n_classes must be >= 1, got {n_classes}")
        d = int(getattr(encoder, "out_dim"))
        self.encoder, self.n_classes, self.kl_weight = encoder, int(n_classes), float(kl_weight)
        self.posterior = nn.Linear(d, 2 * latent_dim)  # -> (m_x, log v_x)
        self.prior_mean = nn.Embedding(n_classes + 1, latent_dim)  # row n_classes: unknown label
        self.prior_logvar = nn.Embedding(n_classes + 1, latent_dim)
        nn.init.zeros_(self.prior_logvar.weight)
        self.decoder = MLPEncoder(latent_dim, hidden_dim, num_blocks, int(out_units))

    def elbo_loss(self, x: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator | None = None):
        y = self.encoder(x)
        m_x, logv_x = self.posterior(y).float().chunk(2, dim=1)
        u = torch.where(labels >= 0, labels, torch.full_like(labels, self.n_classes))
        m_u, logv_u = self.prior_mean(u).float(), self.prior_logvar(u).float()
        m, logv = gaussian_product(m_x, logv_x, m_u, logv_u)
        eps = torch.randn(m.shape, generator=generator).to(m.device) if generator is not None else torch.randn_like(m)
        z = m + (0.5 * logv).exp() * eps
        loss, nll, kl = pivae_loss(self.decoder(z), counts, m, logv, m_u, logv_u, self.kl_weight)
        return loss, y, nll, kl
