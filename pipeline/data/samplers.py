"""The SSL training samples of a session held in memory, and their anchor and pool
samplers (:mod:`pipeline.data.sampling` holds what they share with the image samplers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .augment import Augmenter
from .jitter import draw_positives, jitter_table
from .recording import Recording
from .sampling import MemoryAnchorSampler, MemoryPoolSampler

# --------------------------------------------------------------------------- training samples


@dataclass
class Samples:
    """The SSL training samples (n of them), gathered once into contiguous tensors."""

    rows: np.ndarray  # (n,) int64 store rows, ascending
    rates: torch.Tensor  # (n, N) float32 Hz
    meta: dict[str, torch.Tensor]  # each (n,): store, time, trial, trial_rank, row [, label]
    neighbors: torch.Tensor  # (n, 2J) int64 positions of jitter neighbours, valid ones first, -1 pad
    n_neighbors: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.rows)


def training_samples(rec: Recording, rows: np.ndarray, jitter_max_bins: int) -> Samples:
    """Gather the rows used for SSL (and their jitter table and metadata)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    nb, cnt = jitter_table(rows, rec.trial, rec.bin_start_s, rec.bin_size_s, jitter_max_bins)
    idx = torch.from_numpy(rows)
    meta = {
        "store": torch.full((len(rows),), rec.store_id, dtype=torch.int64),
        "time": torch.from_numpy(rec.bin_start_s[rows].copy()),
        "trial": torch.from_numpy(rec.trial[rows].copy()),
        "trial_rank": torch.from_numpy(rec.trial_rank[rows].copy()),
        "row": idx.clone(),
    }
    if rec.main_label is not None:
        meta["label"] = torch.from_numpy(rec.labels[rec.main_label][rows].copy())
    return Samples(rows=rows, rates=rec.rates.index_select(0, idx).contiguous(), meta=meta,
                   neighbors=torch.from_numpy(nb), n_neighbors=torch.from_numpy(cnt))


def _take_meta(meta: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, idx) for k, v in meta.items()}


# --------------------------------------------------------------------------- in-memory samplers


class AnchorSampler(MemoryAnchorSampler):
    """Anchor batches from samples in memory.

    Every epoch is a permutation of the training samples that depends only on
    (``order_seed``, epoch), so it is the same on every rank; rank r takes positions
    r, r + world_size, ... (the same number on every rank, the remainder is dropped) and
    cuts them into ``steps_per_epoch = max(1, n_rank // B)`` batches of B (with fewer than
    B samples, one batch of all of them).

    ``next(sampler)`` -> ``(x1, x2, x_m, meta)``: x1, x2, x_m (B, N) float32 normalised
    views (x2 of a jitter neighbour, x_m a third draw of the anchor; None when
    ``mining_view`` is False), meta of the anchors.
    """

    def __init__(self, samples: Samples, augment: Augmenter, batch_size: int, seed: int, *, order_seed: int,
                 rank: int = 0, world_size: int = 1, structured: bool = False, mining_view: bool = True,
                 mining_augment: Augmenter | None = None):
        super().__init__(len(samples), batch_size, seed, order_seed=order_seed, rank=rank, world_size=world_size)
        self.samples, self.augment, self.structured, self.mining_view = samples, augment, structured, mining_view
        self.mining_augment = mining_augment or augment  # T_m of x_m

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor positions (B,), positive positions (B,)) into the samples."""
        anchor = self.cursor.next()
        s = self.samples
        return anchor, draw_positives(anchor, s.neighbors, s.n_neighbors, self.generator)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        anchor, positive = self.next_indices()
        s, g = self.samples, self.generator
        rates = s.rates.index_select(0, anchor)
        drop = self.augment.dropout_mask(*rates.shape, g) if self.structured else True
        x1 = self.augment(rates, g, drop)
        x2 = self.augment(s.rates.index_select(0, positive), g, drop)
        x_m = self.mining_augment(rates, g, drop) if self.mining_view else None
        return x1, x2, x_m, _take_meta(s.meta, anchor)


class PoolSampler(MemoryPoolSampler):
    """Candidate pools for mining, independent of the anchors (own generator and seed).

    ``next(sampler)`` -> ``(x_pool (L, N), meta_pool)``: L training samples drawn uniformly
    (without replacement when L <= n, with replacement otherwise), each augmented by its
    own draw of T_m.
    """

    def __init__(self, samples: Samples, augment: Augmenter, pool_size: int, seed: int):
        super().__init__(len(samples), pool_size, seed)
        self.samples, self.augment = samples, augment

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = self.draw()
        x = self.augment(self.samples.rates.index_select(0, idx), self.generator)
        return x, _take_meta(self.samples.meta, idx)
