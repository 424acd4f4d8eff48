"""SimCLR: the NT-Xent loss against its definition on tiny tensors, and the module."""

import math

import pytest
import torch
from torch import nn

from model.simclr import SimCLR, nt_xent_loss


def _reference(z1, z2, t):
    """NT-Xent written out: for each of the 2B views, -log(exp(s+/t) / sum_{j != i} exp(s_ij/t))."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -(float(z[i] @ z[pos]) / t - math.log(denom))
    return total / n


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_its_definition(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert float(nt_xent_loss(z1, z2, t)) == pytest.approx(_reference(z1, z2, t), rel=1e-5)


def test_nt_xent_is_low_for_aligned_views_and_scale_free():
    z = torch.eye(4)
    aligned = nt_xent_loss(z, z.clone(), 0.1)
    assert float(aligned) < 1e-3  # each view's positive is far more similar than every negative
    assert float(nt_xent_loss(z, torch.roll(z, 1, 0), 0.1)) > 5.0  # positives orthogonal, a negative equal
    torch.testing.assert_close(nt_xent_loss(3 * z, z, 0.1), aligned)


def test_nt_xent_refuses_bad_shapes():
    with pytest.raises(ValueError):
        nt_xent_loss(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        nt_xent_loss(torch.zeros(3, 2), torch.zeros(3, 2), temperature=0.0)


def test_simclr_module_trains_encoder_and_projector():
    enc = nn.Sequential(nn.Linear(6, 8))
    enc.out_dim = 8
    model = SimCLR(enc, (16, 4), temperature=0.2)
    x1, x2 = torch.randn(10, 6), torch.randn(10, 6)
    loss, y1 = model(x1, x2, mode="contrastive_loss", return_representation=True)
    assert y1.shape == (10, 8) and loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None for p in model.online_parameters())
    before = [p.clone() for p in model.parameters()]
    model.update_target(0.99)  # no target network: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model(x1).shape == (10, 8)
