"""Temporal-jitter positives (paper section 3.2): the second view of an anchor is another
training sample of the same trial within +-J bins. Pure functions of arrays, shared by
the in-memory sampler and the block streams (which call them on a block plus its halo).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["jitter_table", "valid_first", "draw_positives"]


def jitter_table(rows: np.ndarray, trial: np.ndarray, bin_start_s: np.ndarray, bin_size_s: float,
                 max_bins: int, by_offset: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Temporal-jitter neighbours of each training sample among the training samples.

    j is a neighbour of i when j != i, both are training samples, they have the same
    trial id (-1 == -1 for recordings without trials), their store rows differ by at
    most ``max_bins`` and their start times by at most (max_bins + 0.5) bins (so a gap in
    the recording is never jumped).

    Args:
        rows: (n,) ascending store rows of the training samples.
        trial, bin_start_s: (T,) per store row.
        by_offset: keep column c for offset c - max_bins (c < max_bins) or c - max_bins + 1
            (offsets -J..-1, 1..J in order, -1 where that neighbour is absent) instead of
            putting the valid neighbours first.

    Returns:
        neighbors (n, 2*max_bins) int64 positions into ``rows`` (valid first, -1 pad, or by
        offset) and counts (n,) int64.
    """
    n, T = len(rows), len(trial)
    offsets = [d for d in range(-max_bins, max_bins + 1) if d != 0]
    if not offsets or n == 0:
        return np.full((n, 0), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pos_of_row = np.full(T, -1, dtype=np.int64)
    pos_of_row[rows] = np.arange(n)
    cand = rows[:, None] + np.asarray(offsets)[None, :]  # (n, 2J) store rows
    inside = (cand >= 0) & (cand < T)
    cand_c = np.clip(cand, 0, T - 1)
    pos = pos_of_row[cand_c]
    ok = (inside & (pos >= 0) & (trial[cand_c] == trial[rows][:, None])
          & (np.abs(bin_start_s[cand_c] - bin_start_s[rows][:, None]) <= (max_bins + 0.5) * bin_size_s))
    table = np.where(ok, pos, -1)
    return (table if by_offset else valid_first(table)), ok.sum(1).astype(np.int64)


def valid_first(table: np.ndarray) -> np.ndarray:
    """A by-offset neighbour table (-1 = absent) with each row's valid entries first, in
    offset order: :func:`jitter_table`'s default layout."""
    order = np.argsort(table < 0, axis=1, kind="stable")
    return np.take_along_axis(table, order, axis=1)



def draw_positives(anchor: torch.Tensor, neighbors: torch.Tensor, n_neighbors: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """(B,) position of one jitter neighbour per anchor, uniform among its neighbours (the
    anchor itself when it has none). ``neighbors`` (n, 2J) / ``n_neighbors`` (n,) as from
    :func:`jitter_table`; ``anchor`` (B,) positions into them."""
    count = n_neighbors.index_select(0, anchor)
    u = torch.rand(len(anchor), generator=generator)
    k = torch.minimum((u * count).long(), (count - 1).clamp(min=0))
    if neighbors.shape[1] == 0:
        return anchor.clone()
    return torch.where(count > 0, neighbors[anchor, k], anchor)
