"""The baselines' losses against reference math on tiny tensors (RP, TS, AE, pi-VAE)."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.autoencoder import AutoEncoder, reconstruction_loss
from model.encoders import MLPEncoder
from model.methods import data_needs
from model.pivae import PiVAE, gaussian_kl, gaussian_product, pivae_loss, poisson_nll
from model.temporal import TemporalContrast, rp_features, temporal_loss, ts_features


def test_rp_and_ts_losses_match_the_logistic_formula():
    g = torch.Generator().manual_seed(0)
    y1, y2, y3 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    w, b = torch.randn(3, generator=g, dtype=torch.float64), 0.3
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    logits = (y1 - y2).abs() @ w + b
    p = 1 / (1 + torch.exp(-logits))
    expected = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    assert torch.allclose(temporal_loss(rp_features(y1, y2) @ w + b, labels).double(), expected, atol=1e-6)
    assert torch.equal(ts_features(y1, y2, y3), torch.cat([(y1 - y2).abs(), (y2 - y3).abs()], 1))
    assert torch.equal(rp_features(y1, y2), rp_features(y2, y1))  # symmetric in the pair


def test_temporal_contrast_forward():
    torch.manual_seed(0)
    for task, third in (("rp", None), ("ts", torch.randn(6, 4))):
        model = TemporalContrast(MLPEncoder(4, 8, 1, 3), task)
        x1, x2, labels = torch.randn(6, 4), torch.randn(6, 4), (torch.arange(6) % 2).float()
        loss, y1, accuracy = model(x1, x2, third, labels, mode="temporal_loss")
        assert y1.shape == (6, 3) and 0 <= float(accuracy) <= 1 and loss.ndim == 0
        assert model.head.in_features == (3 if task == "rp" else 6)


def test_reconstruction_loss_is_mean_squared_error():
    x_hat, target = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert math.isclose(float(reconstruction_loss(x_hat, target)), (1 + 0 + 4 + 4) / 4)
    ae = AutoEncoder(MLPEncoder(5, 8, 2, 3), out_units=5, hidden_dim=8, num_blocks=2)
    loss, y = ae(torch.randn(4, 5), torch.randn(4, 5), mode="reconstruction_loss", return_representation=True)
    assert y.shape == (4, 3) and ae.decoder.out_dim == 5 and loss > 0


def test_gaussian_product_and_kl_reference():
    m1, lv1 = torch.tensor([[0.0, 1.0]]), torch.log(torch.tensor([[1.0, 4.0]]))
    m2, lv2 = torch.tensor([[2.0, -1.0]]), torch.log(torch.tensor([[1.0, 4.0]]))
    m, lv = gaussian_product(m1, lv1, m2, lv2)
    assert torch.allclose(m, torch.tensor([[1.0, 0.0]])) and torch.allclose(lv.exp(), torch.tensor([[0.5, 2.0]]))
    # KL(N(1, 2) || N(0, 1)) = 0.5 (2 + 1 - 1 - log 2) per dimension
    kl = gaussian_kl(torch.tensor([[1.0]]), torch.log(torch.tensor([[2.0]])), torch.zeros(1, 1), torch.zeros(1, 1))
    assert math.isclose(float(kl), 0.5 * (2 + 1 - 1 - math.log(2)), rel_tol=1e-6)
    same = gaussian_kl(m1, lv1, m1, lv1)
    assert torch.allclose(same, torch.zeros(1))


def test_poisson_nll_is_the_negative_log_likelihood():
    rate, counts = torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, 3.0]])
    expected = -sum(c * math.log(r) - r - math.lgamma(c + 1) for r, c in ((0.5, 1.0), (2.0, 3.0)))
    assert math.isclose(float(poisson_nll(rate.log(), counts)), expected, rel_tol=1e-6)
    loss, nll, kl = pivae_loss(rate.log(), counts, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                               torch.zeros(1, 2), kl_weight=0.5)
    assert math.isclose(float(loss), float(nll) + 0.5 * float(kl)) and float(kl) == 0.0


def test_pivae_uses_the_label_prior_and_an_unknown_row():
    torch.manual_seed(0)
    model = PiVAE(MLPEncoder(6, 8, 1, 4), out_units=6, n_classes=3, latent_dim=2, hidden_dim=8, num_blocks=1)
    assert model.prior_mean.num_embeddings == 4  # 3 classes + unknown
    x, counts = torch.randn(5, 6), torch.poisson(torch.full((5, 6), 2.0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model(x, counts, torch.tensor([0, 1, 2, -1, 0]), mode="elbo_loss", generator=g1)
    b = model(x, counts, torch.tensor([0, 1, 2, -1, 0]), mode="elbo_loss", generator=g2)
    assert torch.equal(a[0], b[0])  # the generator makes the draw reproducible
    with torch.no_grad():
        model.prior_mean.weight[1] += 5.0  # moving class 1's prior changes a class-1 sample's KL only
    model.eval()  # BatchNorm on running statistics: the two calls see the same network
    c = model(x[:2], counts[:2], torch.tensor([1, 1]), mode="elbo_loss", generator=torch.Generator().manual_seed(1))
    d = model(x[:2], counts[:2], torch.tensor([0, 0]), mode="elbo_loss", generator=torch.Generator().manual_seed(1))
    assert float(c[3].detach()) > float(d[3].detach()) + 1.0  # the KL to the moved prior grows
    assert isinstance(model.encoder, nn.Module) and model(x).shape == (5, 4)


def test_needs_of_the_baselines():
    assert data_needs("rp").temporal == "pairs" and data_needs("ts").temporal == "triplets"
    assert data_needs("ae").target_view == "clean" and data_needs("ae").self_supervised
    pivae = data_needs("pivae")
    assert pivae.target_view == "counts" and pivae.labels and not pivae.self_supervised
    assert not any(data_needs(n).candidate_pool for n in ("rp", "ts", "ae", "pivae"))
