"""Schedules: pure functions of the integer optimizer step (0-based)."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine_lr", "cosine_ema_momentum", "mining_weight"]


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     final_lr: float = 0.0) -> float:
    """Linear warm-up, then cosine decay (paper App. C/D).

    - ``step < warmup_steps``: ``base_lr * (step + 1) / warmup_steps``. The +1 makes the
      first step useful (lr > 0) and reaches ``base_lr`` on the last warm-up step.
    - ``warmup_steps <= step <= total_steps``: cosine from ``base_lr`` (at the end of
      warm-up) to ``final_lr`` (at ``total_steps``).
    - ``step > total_steps``: ``final_lr``.
    """
    if step < 0:
        raise ValueError(f"warmup_cosine_lr: step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        # No decay phase (total_steps <= warmup_steps): training is over once warm-up ends.
        return final_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ema_momentum(step: int, total_steps: int, base_tau: float) -> float:
    """EMA momentum of the target network (BYOL): tau = 1 - (1 - base_tau) (cos(pi k/K) + 1) / 2.

    ``base_tau`` at step 0, 1.0 at ``step >= total_steps`` (the target stops moving).
    """
    if total_steps <= 0:
        raise ValueError(f"cosine_ema_momentum: total_steps must be > 0, got {total_steps}")
    progress = min(1.0, max(0, step) / total_steps)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


def mining_weight(step: int, max_weight: float, warmup_steps: int, ramp_steps: int) -> float:
    """Weight lambda of the mining loss.

    0 for ``step < warmup_steps`` (representations are meaningless at first, so their
    neighbours are too); then a linear ramp ``max_weight * (step - warmup_steps + 1) /
    ramp_steps`` reaching ``max_weight`` on step ``warmup_steps + ramp_steps - 1``; then
    constant. ``ramp_steps <= 0`` jumps straight to ``max_weight``.
    ``max_weight == 0`` gives 0 at every step: the BYOL baseline.
    """
    if max_weight == 0.0 or step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return float(max_weight)
    return float(max_weight) * min(1.0, (step - warmup_steps + 1) / ramp_steps)
