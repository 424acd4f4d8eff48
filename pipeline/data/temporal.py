"""The anchor stream of RP and TS (:mod:`model.temporal`): pairs and triplets of training
bins labelled by how far apart in time they are, drawn from samples held in memory.

    pairs (RP):     (x, x', None, meta)   x' a bin within +-tau_pos bins of x (label 1) or a
                                          far bin (label 0), each with probability 1/2
    triplets (TS):  (x, x', x'', meta)    x, x'' close to each other; x' the middle one in
                                          time (label 1) or a far bin (label 0)
    meta:           the first bin's metadata, plus ``temporal_label`` (B,) float32 in {0, 1}

Close means within ``pos_bins`` bins of the anchor in the same trial without a gap (the
temporal-jitter rule, :func:`~pipeline.data.jitter.jitter_table`). Far means at least
``neg_gap_s`` seconds from the anchor in the same trial (or, for recordings without trials,
in the recording), or in another trial when ``across_trials``. Pairs never cross recordings:
a sampler draws from one session's samples. Anchors are sharded over ranks like
:class:`~pipeline.data.samplers.AnchorSampler`'s, and the state (generator, cursor) resumes exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from model.methods import TEMPORAL_VIEWS
from preprocess.errors import UserError

from .augment import Augmenter
from .jitter import draw_positives
from .samplers import Samples
from .sampling import MemoryAnchorSampler

__all__ = ["TemporalSampler", "far_apart", "draw_far"]


def far_apart(trial_a: torch.Tensor, time_a: torch.Tensor, trial_b: torch.Tensor, time_b: torch.Tensor,
              neg_gap_s: float, across_trials: bool) -> torch.Tensor:
    """(B,) bool: bin b is a negative ("far") for bin a. Trials -1 (none) count as one trial."""
    same_trial = trial_a == trial_b
    far_in_trial = same_trial & ((time_a - time_b).abs() >= neg_gap_s)
    return far_in_trial | (~same_trial & across_trials)


def draw_far(anchor: torch.Tensor, trial: torch.Tensor, time: torch.Tensor, neg_gap_s: float, across_trials: bool,
             generator: torch.Generator, rounds: int = 32) -> torch.Tensor:
    """(B,) positions of one far bin per anchor (uniform among them, by rejection), -1 where
    ``rounds`` draws found none. ``trial``/``time`` (n,) per sample; ``anchor`` (B,) positions."""
    n = trial.shape[0]
    trial_a, time_a = trial[anchor], time[anchor]
    out = torch.full_like(anchor, -1)
    for _ in range(rounds):
        todo = out < 0
        cand = torch.randint(n, anchor.shape, generator=generator)  # drawn for all: the stream stays aligned
        ok = todo & far_apart(trial_a, time_a, trial[cand], time[cand], neg_gap_s, across_trials)
        out = torch.where(ok, cand, out)
        if not bool((out < 0).any()):
            break
    return out


class TemporalSampler(MemoryAnchorSampler):
    """RP pairs / TS triplets of training samples in memory (module docstring).

    Args:
        samples: the session's SSL training samples.
        neighbors, n_neighbors: (n, 2 pos_bins) / (n,) the close bins of each sample
            (:func:`~pipeline.data.jitter.jitter_table` with ``pos_bins``).
        kind: "pairs" or "triplets". Anchors are the samples with at least 1 (pairs) or 2
            (triplets) close bins.
    """

    def __init__(self, samples: Samples, neighbors: torch.Tensor, n_neighbors: torch.Tensor, augment: Augmenter,
                 batch_size: int, seed: int, *, order_seed: int, kind: str, neg_gap_s: float, across_trials: bool,
                 rank: int = 0, world_size: int = 1):
        if kind not in TEMPORAL_VIEWS:
            raise ValueError(f"TemporalSampler: kind must be one of {TEMPORAL_VIEWS}, got {kind!r}")
        need = 1 if kind == "pairs" else 2
        self.eligible = torch.from_numpy(np.flatnonzero(n_neighbors.numpy() >= need)).long()
        if len(self.eligible) == 0:
            raise UserError(f"no training bin has {need} neighbour(s) within method.temporal_pos_bins in its trial: "
                            f"{kind} cannot be drawn; raise method.temporal_pos_bins")
        super().__init__(len(self.eligible), batch_size, seed, order_seed=order_seed, rank=rank,
                         world_size=world_size)
        self.samples, self.augment, self.kind = samples, augment, kind
        self.neighbors, self.n_neighbors = neighbors, n_neighbors
        self.neg_gap_s, self.across_trials = float(neg_gap_s), bool(across_trials)

    def next_positions(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([positions of each view (B,)], labels (B,) float32) of the next batch."""
        s, g = self.samples, self.generator
        anchor = self.eligible.index_select(0, self.cursor.next())
        far = draw_far(anchor, s.meta["trial"], s.meta["time"], self.neg_gap_s, self.across_trials, g)
        label = (torch.rand(anchor.shape, generator=g) < 0.5) | (far < 0)  # no far bin: a close one
        if self.kind == "pairs":
            close = draw_positives(anchor, self.neighbors, self.n_neighbors, g)
            return [anchor, torch.where(label, close, far)], label.float()
        # two distinct close bins, then the three in time order: (first, middle, last)
        count = self.n_neighbors.index_select(0, anchor)
        k1 = (torch.rand(anchor.shape, generator=g) * count).long().clamp(max=count - 1)
        k2 = (k1 + 1 + (torch.rand(anchor.shape, generator=g) * (count - 1)).long().clamp(max=count - 2)) % count
        triple = torch.stack([anchor, self.neighbors[anchor, k1], self.neighbors[anchor, k2]], 1)  # (B, 3)
        order = s.meta["time"][triple].argsort(dim=1)
        first, middle, last = triple.gather(1, order).unbind(1)
        return [first, torch.where(label, middle, far), last], label.float()

    def __next__(self):
        positions, label = self.next_positions()
        s, g = self.samples, self.generator
        views = [self.augment(s.rates.index_select(0, p), g) for p in positions]
        meta = {k: v.index_select(0, positions[0]) for k, v in s.meta.items()}
        meta["temporal_label"] = label
        return views[0], views[1], views[2] if len(views) > 2 else None, meta
