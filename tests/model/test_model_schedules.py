import math

import pytest

from model.schedules import cosine_ema_momentum, mining_weight, warmup_cosine_lr


def test_warmup_cosine_lr_boundaries():
    base, warm, total = 0.1, 10, 110
    assert warmup_cosine_lr(0, base, warm, total) == pytest.approx(base / warm)
    assert warmup_cosine_lr(warm - 1, base, warm, total) == pytest.approx(base)
    assert warmup_cosine_lr(warm, base, warm, total) == pytest.approx(base)
    assert warmup_cosine_lr(warm + 50, base, warm, total) == pytest.approx(base / 2)
    assert warmup_cosine_lr(total, base, warm, total) == pytest.approx(0.0)
    assert warmup_cosine_lr(total, base, warm, total, final_lr=0.01) == pytest.approx(0.01)
    assert warmup_cosine_lr(total + 100, base, warm, total, final_lr=0.01) == pytest.approx(0.01)
    # no warm-up
    assert warmup_cosine_lr(0, base, 0, total) == pytest.approx(base)


def test_warmup_cosine_lr_monotone():
    base, warm, total = 0.03, 7, 60
    lrs = [warmup_cosine_lr(s, base, warm, total) for s in range(total + 5)]
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert all(a >= b for a, b in zip(lrs[warm - 1:], lrs[warm:]))
    assert max(lrs) == pytest.approx(base)


def test_cosine_ema_momentum():
    total = 100
    assert cosine_ema_momentum(0, total, 0.996) == pytest.approx(0.996)
    assert cosine_ema_momentum(total // 2, total, 0.98) == pytest.approx(0.99)
    assert cosine_ema_momentum(total, total, 0.98) == pytest.approx(1.0)
    assert cosine_ema_momentum(total + 10, total, 0.98) == pytest.approx(1.0)
    taus = [cosine_ema_momentum(s, total, 0.9) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    ref = 1 - (1 - 0.9) * (math.cos(math.pi * 30 / total) + 1) / 2
    assert taus[30] == pytest.approx(ref)


def test_mining_weight_warmup_ramp_constant():
    w = [mining_weight(s, 1.0, 5, 10) for s in range(30)]
    assert w[:5] == [0.0] * 5
    assert w[5] == pytest.approx(0.1)
    assert w[14] == pytest.approx(1.0)
    assert all(x == pytest.approx(1.0) for x in w[14:])
    assert all(a <= b for a, b in zip(w, w[1:]))
    assert mining_weight(3, 0.1, 0, 0) == pytest.approx(0.1)


def test_mining_weight_zero_is_byol():
    assert all(mining_weight(s, 0.0, 0, 0) == 0.0 for s in range(50))
    assert all(mining_weight(s, 0.0, 3, 7) == 0.0 for s in range(50))
