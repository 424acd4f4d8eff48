import math

import torch

from model.losses import byol_loss, cosine_distance, mined_loss


def test_cosine_distance_known_vectors():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    v = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [6.0, 8.0], [1.0, 0.0]])
    d = cosine_distance(u, v)
    assert d.shape == (5,)
    torch.testing.assert_close(d, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1 / math.sqrt(2)]))


def test_cosine_distance_matches_torch_reference():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    torch.testing.assert_close(cosine_distance(u, v), -torch.nn.functional.cosine_similarity(u, v))


def test_byol_loss_symmetric_sum_and_detached_targets():
    g = torch.Generator().manual_seed(1)
    p1, z2, p2, z1 = (torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(4))
    loss = byol_loss(p1, z2, p2, z1)
    ref = (-torch.nn.functional.cosine_similarity(p1, z2) - torch.nn.functional.cosine_similarity(p2, z1)).mean()
    torch.testing.assert_close(loss, ref)
    # swapping the two directions gives the same value
    torch.testing.assert_close(byol_loss(p2, z1, p1, z2), loss)
    loss.backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None
    # identical predictions and targets: the minimum, -2
    x = torch.randn(3, 4, generator=g)
    torch.testing.assert_close(byol_loss(x, x, x, x), torch.tensor(-2.0))


def test_mined_loss_value_detach_and_empty():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(5, 3, generator=g, requires_grad=True)
    target = torch.randn(5, 3, generator=g, requires_grad=True)
    loss = mined_loss(pred, target)
    torch.testing.assert_close(loss, -torch.nn.functional.cosine_similarity(pred, target).mean())
    loss.backward()
    assert pred.grad is not None and target.grad is None

    empty = torch.randn(0, 3, requires_grad=True)
    z = mined_loss(empty, torch.randn(0, 3))
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert empty.grad is not None


def test_mined_loss_valid_mask():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 3, generator=g, requires_grad=True)
    target = torch.randn(6, 3, generator=g)
    target[2] = float("nan")  # a dropped row must not poison the value
    valid = torch.tensor([True, True, False, True, False, True])
    loss = mined_loss(pred, target, valid)
    torch.testing.assert_close(loss, mined_loss(pred[valid], target[valid]))
    none = mined_loss(pred, target, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
