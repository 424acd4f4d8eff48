"""Re-implementation of the original MYOW neural data generator, for speed comparisons.

This module exists so that a benchmark can report how many anchors per second the
*original* MYOW sampling produces on the same in-memory arrays our pipeline uses. It is a
re-implementation written for this repository (not a copy of the authors' code): it keeps
the per-step algorithm and its cost, not the authors' structure.

What the original does per training step
----------------------------------------
Sampling: ``LocalGlobalGenerator`` in nerdslab/myow,
``self_supervised/data/generators/local_global_generator.py``, wired up by
``scripts/monkey-train.py`` and consumed by ``self_supervised/trainer/myow_trainer.py``.
At construction it builds, for every trial k, a boolean mask over *all* rows of the
feature matrix (``rows == k``) and the list of every within-trial pair (i, j) with
|j - i| <= max_lookahead, i.e. the temporal-jitter positives
(``self_supervised/data/utils.py``: ``onlywithin_indices`` / ``diagu_indices``; the pair
list includes j == i). Then, for every step:

1. random trial split: a permutation of the trial ids cut at
   ``int(K/2 + normal(loc=K/10, scale=1))`` (the code passes K/10 as the *mean* of the
   normal, so the cut sits near 0.6 K, +-1) into trials_1 and trials_2;
2. positive pairs: B rows drawn without replacement from the full pair list (the legacy
   ``np.random.choice(P, B, replace=False)``, which permutes all P pairs), giving anchor
   x1 and positive x2 (same trial, |dt| <= max_lookahead, dt = 0 allowed);
3. mining queries x3: B rows from trials_1; candidate pool x4: L rows from trials_2 (the
   independent pool of the paper, and disjoint in trials from the queries). Each is drawn
   by stacking the boolean masks of every trial of its half and summing them
   (``np.sum([mask_k for k in half], axis=0)``: O(#trials x T) work and memory per draw),
   counting the selected rows with Python's builtin ``sum`` (an interpreter loop over all
   T rows, twice on the common path), choosing rows without replacement (all of them,
   plus a second draw, when fewer than asked), and gathering ``features[mask][idx]`` (a
   boolean-mask copy of a whole half of the matrix before indexing);
4. every one of x1, x2, x3, x4 is turned into a tensor and augmented; x1/x2 either
   independently or, with ``structured_transform``, with one shared random draw.
The trainer uses (x1, x2) for the BYOL term, and mines the k nearest neighbours of x3's
online representation among x4's target representations for the MYOW term
(``myow_trainer.py``: ``view3`` / ``view_pool``).

Augmentations: the paper's neural settings are those of nerdslab/myow-neuro,
``train_monkey.py`` (batch 512, max_lookahead 2, randomized dropout p <= 0.2 applied
always, pepper p = 0.3 of value 1.5 applied with prob. 0.5, Gaussian noise std 1.5 applied
with prob. 0.5, then normalisation by the training mean/std; ``noise_after_norm=False``),
built by ``myow/transforms/__init__.py`` (``get_neural_transform``) and
``myow/transforms/compose.py``. With ``same_on_trial=same_on_batch=False`` each op draws
full (n, N) random tensors plus per-row apply draws (``myow/transforms/dropout.py``:
``RandomizedDropout``; ``myow/transforms/noise.py``: ``Pepper``, ``Noise``), and
``myow/transforms/normalize.py`` drops dead units (std == 0) by boolean column indexing
and standardises. The older transforms (nerdslab/myow
``self_supervised/transforms/neural.py``) are the same ops in another order with other
defaults; the myow-neuro order and settings are used here, as the brief asks.

Not reproduced: myow-neuro's later sampler (``myow/samplers/relative_positioning_dataloader.py``
and ``relative_sequence_dataloader.py``) is graph based: an epoch-level random partition of
all rows into batches, then per step a node mask over all rows, filtering of the whole
positive-edge and same-trial candidate-edge lists, and a pool made of the batch and its
positives (candidates from the anchor's own trial masked out in ``train_monkey.py``), not an
independent pool; ``myow/myow.py`` is the model only. The data classes
(nerdslab/myow ``self_supervised/data/monkey_reach_dataset.py``, myow-neuro
``myow/data/monkey_neural_dataset.py``) hold the binned trials concatenated in memory,
which is what this class takes as input.

Kept / simplified
-----------------
Kept: the per-step random trial split (with its quirk), the per-trial boolean masks over
all rows stacked and summed for both draws, the builtin ``sum`` counts, the legacy
without-replacement choices, ``features[mask][idx]`` gathers, the pair list with dt = 0,
four augmented views per step (3B + L rows), myow-neuro's per-row augmentation ops.
Simplified: runs in-process (the original ran the generator in 4 DataLoader workers);
features are float32 as given (the original held float64 rates and cast each view);
rows with ``trial == -1`` (outside trials) are never sampled but stay in the masks' length,
so the masks span all T rows; trials need not be contiguous (a positive is any row of the
same trial at most ``max_jitter_bins`` rows away); the mean/std are those of the in-trial
rows; when a half has fewer than half the rows asked for, the shortfall is filled by
repeated draws instead of the original's ValueError.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["OriginalGenerator", "OriginalStep", "samples_per_s", "synthetic_recording"]


class OriginalStep(NamedTuple):
    """What one training step of the original consumes (all float32, normalised)."""

    x1: torch.Tensor  # (B, N') anchors
    x2: torch.Tensor  # (B, N') temporal-jitter positives of the anchors
    x_pool: torch.Tensor  # (L, N') mining candidates (trials_2)
    meta: dict[str, torch.Tensor]  # rows / trial ids / dt of every view, int64
    x_mine: torch.Tensor | None  # (B, N') mining queries (trials_1); None when mine_view == "anchor"


class OriginalGenerator:
    """The original MYOW generator's per-step sampling and augmentation on in-memory arrays.

    Args:
        rates: (T, N) float32 binned activity (e.g. Hz), one row per time bin.
        trial: (T,) int trial id per row, -1 outside trials (never sampled).
        batch_size: B anchors (and B mining queries) per step.
        pool_size: L candidates per step.
        max_jitter_bins: positives are rows of the same trial within this many rows
            (the original's ``max_lookahead``; offset 0 included, as in the original).
        dropout_p, dropout_apply_p: randomized dropout (rate ~ U(0, dropout_p) per row).
        pepper_p, pepper_value, pepper_apply_p: add ``pepper_value`` to a unit with prob. p.
        noise_std, noise_apply_p: additive Gaussian noise.
        structured_transform: share one augmentation draw between x1 and x2 (nerdslab/myow's
            script default) instead of augmenting each view independently (myow-neuro).
        mine_view: ``"separate"`` (the original: B extra queries from trials_1, augmented)
            or ``"anchor"`` (no third draw; mine with x1).
        seed: seeds this generator's numpy RandomState and torch Generator.
    """

    def __init__(self, rates: np.ndarray, trial: np.ndarray, batch_size: int = 512, pool_size: int = 1024,
                 max_jitter_bins: int = 2, dropout_p: float = 0.2, dropout_apply_p: float = 1.0,
                 pepper_p: float = 0.3, pepper_value: float = 1.5, pepper_apply_p: float = 0.5,
                 noise_std: float = 1.5, noise_apply_p: float = 0.5, structured_transform: bool = False,
                 mine_view: str = "separate", seed: int = 0):
        rates = np.ascontiguousarray(rates, dtype=np.float32)
        trial = np.asarray(trial).astype(np.int64, copy=False)
        if rates.ndim != 2 or trial.shape != (rates.shape[0],):
            raise ValueError(f"rates must be (T, N) and trial (T,), got {rates.shape} and {trial.shape}")
        if mine_view not in ("separate", "anchor"):
            raise ValueError(f"mine_view must be 'separate' or 'anchor', got {mine_view!r}")
        self.rates, self.trial = rates, trial
        self.batch_size, self.pool_size, self.max_jitter_bins = int(batch_size), int(pool_size), int(max_jitter_bins)
        self.dropout_p, self.dropout_apply_p = float(dropout_p), float(dropout_apply_p)
        self.pepper_p, self.pepper_value, self.pepper_apply_p = float(pepper_p), float(pepper_value), float(pepper_apply_p)
        self.noise_std, self.noise_apply_p = float(noise_std), float(noise_apply_p)
        self.structured_transform, self.mine_view = bool(structured_transform), mine_view

        T = rates.shape[0]
        in_trial = trial >= 0
        self.trial_ids = np.unique(trial[in_trial])  # original trial id of code k
        K = len(self.trial_ids)
        if K < 2:
            raise ValueError("need at least two trials (the original splits trials in two every step)")
        code = np.full(T, -1, dtype=np.int64)
        code[in_trial] = np.searchsorted(self.trial_ids, trial[in_trial])
        self.trial_code = code
        # one boolean mask over all T rows per trial, built once (as the original does)
        self.trial_masks = [code == k for k in range(K)]

        # every within-trial (anchor, positive) pair with |dt| <= J, dt = 0 included
        rows = np.flatnonzero(in_trial)
        firsts, seconds = [], []
        for dt in range(-self.max_jitter_bins, self.max_jitter_bins + 1):
            other = rows + dt
            ok = (other >= 0) & (other < T)
            ok[ok] &= code[other[ok]] == code[rows[ok]]
            firsts.append(rows[ok])
            seconds.append(other[ok])
        self.pairs = np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1)  # (P, 2)
        if len(self.pairs) < self.batch_size:
            raise ValueError(f"only {len(self.pairs)} positive pairs for a batch of {self.batch_size}")

        # normalisation statistics of the (training) rows; dead units are dropped per call
        x = torch.from_numpy(rates[in_trial])
        mean, std = x.mean(0), x.std(0)
        self.alive = std != 0
        self.mean, self.std = mean[self.alive].contiguous(), std[self.alive].contiguous()

        self.rs = np.random.RandomState(seed)  # legacy RNG: choice(replace=False) permutes the population
        self.gen = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ sampling

    def _split_trials(self) -> tuple[np.ndarray, np.ndarray]:
        K = len(self.trial_ids)
        order = self.rs.permutation(K)
        # the original's cut: K/2 plus a normal draw whose *mean* is K/10 (scale 1)
        cut = int(K / 2 + self.rs.normal(K / 10))
        cut = min(max(cut, 1), K - 1)
        return order[:cut], order[cut:]

    def _draw_pairs(self) -> np.ndarray:
        chosen = self.rs.choice(len(self.pairs), self.batch_size, replace=False)
        return self.pairs[chosen]  # (B, 2): anchor row, positive row

    def _draw_from_trials(self, trials: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n rows from the given trials, the original way; returns (features, rows)."""
        selected = np.sum([self.trial_masks[k] for k in trials], axis=0).astype(bool)  # (T,)
        available = sum(selected)  # builtin sum: Python-level pass over all T rows, as in the original
        if sum(selected) >= n:  # ... and a second pass for the test
            idx = self.rs.choice(available, n, replace=False)
        else:  # take every selected row, then top up without replacement
            parts, missing = [np.arange(available)], n - available
            while missing > available:  # (the original raises here)
                parts.append(self.rs.permutation(available))
                missing -= available
            parts.append(self.rs.choice(available, missing, replace=False))
            idx = np.concatenate(parts)
        feats = self.rates[selected][idx]  # boolean-mask copy of the half, then gather
        rows = np.flatnonzero(selected)[idx]  # metadata only
        return feats, rows

    # ------------------------------------------------------------------ augmentation

    def _augment(self, *views: torch.Tensor) -> list[torch.Tensor]:
        """Randomized dropout, pepper, noise, normalisation; one random draw shared by ``views``."""
        g = self.gen
        shape = views[0].shape
        n = shape[0]
        # randomized dropout: per-row rate ~ U(0, p), per-element mask, rows skipped w.p. 1 - apply_p
        rate = torch.rand(n, generator=g) * self.dropout_p
        drop = torch.empty(shape).uniform_(0, 1, generator=g) < rate[:, None]
        drop[torch.rand(n, generator=g) < 1 - self.dropout_apply_p] = False
        # pepper: add a constant to a random subset of units, on a random subset of rows
        pepper = torch.empty(shape).uniform_(0, 1, generator=g) < self.pepper_p
        pepper[torch.rand(n, generator=g) < 1 - self.pepper_apply_p] = False
        # Gaussian noise on a random subset of rows
        noise = torch.normal(0.0, self.noise_std, size=shape, generator=g)
        noise[torch.rand(n, generator=g) < 1 - self.noise_apply_p] = 0.0
        out = []
        for x in views:
            x = x.clone()
            x[drop] = 0
            x = x + self.pepper_value * pepper
            x = x + noise
            out.append((x[:, self.alive] - self.mean) / self.std)
        return out

    # ------------------------------------------------------------------ public

    def next_step(self) -> OriginalStep:
        """Sample and augment everything one training step of the original consumes."""
        trials_1, trials_2 = self._split_trials()
        pairs = self._draw_pairs()
        both = self.rates[pairs.T]  # (2, B, N) gather
        x1, x2 = torch.tensor(both[0]), torch.tensor(both[1])
        meta = {
            "anchor_row": pairs[:, 0], "anchor_trial": self.trial[pairs[:, 0]],
            "positive_row": pairs[:, 1], "positive_trial": self.trial[pairs[:, 1]],
            "dt": pairs[:, 1] - pairs[:, 0],
        }
        x_mine = None
        if self.mine_view == "separate":
            f3, r3 = self._draw_from_trials(trials_1, self.batch_size)
            x_mine = torch.tensor(f3)
            meta["mine_row"], meta["mine_trial"] = r3, self.trial[r3]
        f4, r4 = self._draw_from_trials(trials_2, self.pool_size)
        x_pool = torch.tensor(f4)
        meta["pool_row"], meta["pool_trial"] = r4, self.trial[r4]

        if self.structured_transform:
            x1, x2 = self._augment(x1, x2)
        else:
            [x1] = self._augment(x1)
            [x2] = self._augment(x2)
        if x_mine is not None:
            [x_mine] = self._augment(x_mine)
        [x_pool] = self._augment(x_pool)
        meta_t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in meta.items()}
        return OriginalStep(x1=x1, x2=x2, x_pool=x_pool, meta=meta_t, x_mine=x_mine)


def samples_per_s(generator: OriginalGenerator, seconds: float = 3.0) -> float:
    """Anchors per second (B per step) of ``generator.next_step()``, after one warm-up step."""
    generator.next_step()
    steps = 0
    start = time.perf_counter()
    while True:
        generator.next_step()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps * generator.batch_size / elapsed


def synthetic_recording(T: int, N: int, n_trials: int, seed: int = 0, in_trial_fraction: float = 0.95,
                        bin_s: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Poisson rates (T, N) float32 in Hz and trial ids (T,) with ~n_trials trials and -1 gaps."""
    rng = np.random.default_rng(seed)
    unit_hz = rng.lognormal(np.log(8.0), 1.0, size=N)
    rates = (rng.poisson(unit_hz * bin_s, size=(T, N)) / bin_s).astype(np.float32)
    rates[:, -1] = 0.0  # one silent unit: exercises the dead-unit drop of the normalisation
    trial = np.full(T, -1, dtype=np.int64)
    mean_len = T * in_trial_fraction / n_trials
    mean_gap = T * (1 - in_trial_fraction) / n_trials
    t = 0
    for k in range(n_trials):
        t += int(rng.poisson(mean_gap))
        length = max(3, int(rng.poisson(mean_len)))
        if t >= T:
            break
        trial[t:t + length] = k
        t += length
    return rates, trial


def _check_step(gen: OriginalGenerator, step: OriginalStep) -> None:
    """Positives share their anchor's trial and lie within the jitter window; pool/queries are split."""
    m = step.meta
    B, L = gen.batch_size, gen.pool_size
    n_alive = int(gen.alive.sum())
    assert step.x1.shape == step.x2.shape == (B, n_alive) and step.x_pool.shape == (L, n_alive)
    assert bool((m["anchor_trial"] >= 0).all()) and bool((m["anchor_trial"] == m["positive_trial"]).all())
    assert bool((m["dt"].abs() <= gen.max_jitter_bins).all())
    assert bool((m["positive_row"] - m["anchor_row"] == m["dt"]).all())
    assert bool((m["pool_trial"] >= 0).all())
    if step.x_mine is not None:
        assert step.x_mine.shape == (B, n_alive)
        shared = np.intersect1d(m["mine_trial"].numpy(), m["pool_trial"].numpy())
        assert shared.size == 0, "mining queries and pool must come from disjoint trial halves"
    for x in (step.x1, step.x2, step.x_pool):
        assert bool(torch.isfinite(x).all())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    results = {}
    # Chewie-1 shaped: 1640 bins x 174 units, ~170 trials of ~9-10 bins; and a large one
    for name, (T, N, K) in {"chewie_like": (1640, 174, 170), "large": (100_000, 200, 2000)}.items():
        rates, trial = synthetic_recording(T, N, K, seed=args.seed)
        gen = OriginalGenerator(rates, trial, batch_size=512, pool_size=1024, max_jitter_bins=2, seed=args.seed)
        for _ in range(3):
            _check_step(gen, gen.next_step())
        results[f"{name}_samples_per_s"] = round(samples_per_s(gen, args.seconds), 1)
    print(json.dumps(results))
