import copy

import pytest
import torch
from torch import nn

from model.ema import ema_update_


def _pair():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))
    online.train()
    online(torch.randn(8, 4))  # move running stats away from the target's
    return target, online


def test_tau_zero_copies_tau_one_keeps():
    target, online = _pair()
    before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, 1.0)
    for b, p in zip(before, target.parameters()):
        assert torch.equal(b, p)
    ema_update_(target, online, 0.0)
    for p, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(p, o)


def test_tau_half_averages_and_buffers_copied():
    target, online = _pair()
    expected = [(t + o) / 2 for t, o in zip(target.parameters(), online.parameters())]
    ema_update_(target, online, 0.5)
    for e, p in zip(expected, target.parameters()):
        torch.testing.assert_close(p, e)
    for t, o in zip(target.buffers(), online.buffers()):
        assert torch.equal(t, o)
    assert not any(p.grad is not None for p in target.parameters())


def test_general_tau_formula_and_online_untouched():
    target, online = _pair()
    online_before = [p.clone() for p in online.parameters()]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target.parameters(), online.parameters())]
    ema_update_(target, online, 0.9)
    for e, p in zip(expected, target.parameters()):
        torch.testing.assert_close(p, e)
    for b, p in zip(online_before, online.parameters()):
        assert torch.equal(b, p)


def test_structure_check():
    target, online = _pair()
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(4, 3), online, 0.5)
    with pytest.raises(ValueError):
        ema_update_(target, online, 1.5)
