"""Mining by temporal context (``method.mining_context_bins``): the k-NN search compares
representations averaged over each sample's within-trial neighbourhood instead of single
bins.

Why: a 100 ms bin of a sparse recording is a noisy, Poisson-dominated sample of the
population state, so the nearest neighbours of single bins often belong to another
behaviour (Chewie-1: 66% of the mined views share the anchor's reach direction late in
training, ~25% around step 200). Averaging the (unit-norm) representations over the
+-W neighbouring bins of the same trial (the same rules as the temporal jitter: training
samples only, never across a trial, a gap or a recording) makes the search far more
reliable, while the mined view itself stays a single bin: only WHICH candidate is picked
changes, not what is predicted.

The neighbours' representations come from a bank of the latest target representation of
every training sample, refreshed with the candidates' own target representations at
every step (as a memory bank: entries are at most a few steps stale when the pool covers
the training set, and never written entries are left out of the mean). The bank is state:
it has ``state_dict``/``load_state_dict`` and is saved with the streams' states, so a resumed
run mines exactly as an uninterrupted one. Memory: (training samples x D) float32 plus two
(training samples x 2W) int64 tables (:meth:`MiningContext.bytes_needed`); it needs only
the training rows and the store's metadata, so streamed sessions have it too (their size
is checked against ``data.memory_budget_mb`` before the bank is allocated).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from preprocess.errors import UserError

from .jitter import jitter_table, valid_first

__all__ = ["MiningContext"]


class MiningContext:
    """Bank of target representations of the training samples and their +-W neighbourhoods.

    Args:
        rows: (n,) ascending store rows of the training samples.
        trial, bin_start_s: (T,) per store row; bin_size_s: the store's bin size.
        window: W, neighbours within +-W bins of the same trial.
        dim: representation size D.
    """

    def __init__(self, rows: np.ndarray, trial: np.ndarray, bin_start_s: np.ndarray, bin_size_s: float,
                 window: int, dim: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.window = int(window)
        self.trial = torch.from_numpy(np.asarray(trial)[self.rows].astype(np.int64))  # (n,) trial of each sample
        by_offset, _ = jitter_table(self.rows, trial, bin_start_s, bin_size_s, self.window, by_offset=True)
        self.by_offset = torch.from_numpy(by_offset)  # (n, 2W) positions at offsets -W..-1, 1..W, -1 absent
        self.neighbors = torch.from_numpy(valid_first(by_offset))  # (n, 2W) the same, valid first, -1 pad
        self.bank = torch.zeros(len(self.rows), dim)  # (n, D) unit-norm target representations
        self.filled = torch.zeros(len(self.rows), dtype=torch.bool)

    @staticmethod
    def bytes_needed(n_samples: int, window: int, dim: int) -> int:
        """Memory of a context for ``n_samples`` training samples: bank (n, D) float32, two
        (n, 2W) int64 neighbour tables, rows, trials and the filled flags."""
        return n_samples * (4 * dim + 2 * 8 * 2 * window + 8 + 8 + 1)

    @property
    def nbytes(self) -> int:
        """:meth:`bytes_needed` of this context."""
        return self.bytes_needed(len(self.rows), self.window, self.bank.shape[1])

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """(m,) positions of store ``rows`` among the training samples (rows must be training samples)."""
        pos = np.searchsorted(self.rows, rows.cpu().numpy())
        return torch.from_numpy(pos)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, target_y: torch.Tensor) -> None:
        """Write the target representations (m, D) of the samples at store ``rows`` (m,)."""
        pos = self.positions(rows)
        self.bank[pos] = F.normalize(target_y.detach().float().cpu(), dim=1)
        self.filled[pos] = True

    @torch.no_grad()
    def smooth(self, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, D) mean of the unit-norm ``y`` (m, D) of the samples at ``rows`` and the banked
        representations of their filled neighbours (on ``y``'s device)."""
        pos = self.positions(rows)
        nb = self.neighbors[pos]  # (m, 2W)
        safe = nb.clamp(min=0)
        valid = (nb >= 0) & self.filled[safe]
        # sum of the valid neighbours' banked rows, without materialising (m, 2W, D): a third
        # of the time of gather-then-sum, the same sums bit for bit
        neigh = F.embedding_bag(safe, self.bank, per_sample_weights=valid.float(), mode="sum")  # (m, D)
        total = F.normalize(y.detach().float(), dim=1) + neigh.to(y.device)
        return total / (1.0 + valid.sum(1, keepdim=True).to(y.device))

    @torch.no_grad()
    def aligned(self, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, (2W+1) D) unit-norm concatenation of the samples' own unit-norm ``y`` (m, D)
        and their banked neighbours at offsets -W..W in time order (zeros where a
        neighbour is absent or not yet filled). The cosine of two such vectors is the sum,
        over the offsets both have, of the cosines of time-aligned bins, over
        sqrt(n_a n_b): it compares trajectories, where :meth:`smooth` compares their means."""
        pos = self.positions(rows)
        nb = self.by_offset[pos]  # (m, 2W)
        safe = nb.clamp(min=0)
        valid = ((nb >= 0) & self.filled[safe]).float().to(y.device)
        neigh = self.bank.to(y.device)[safe] * valid[..., None]  # (m, 2W, D)
        own = F.normalize(y.detach().float(), dim=1)[:, None, :]
        W = self.window
        seq = torch.cat([neigh[:, :W], own, neigh[:, W:]], dim=1)  # (m, 2W+1, D)
        return F.normalize(seq.flatten(1), dim=1)

    def state_dict(self) -> dict:
        return {"bank": self.bank.clone(), "filled": self.filled.clone(), "window": self.window,
                "n_samples": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n_samples"]) != len(self.rows) or int(state["window"]) != self.window:
            raise UserError("the checkpoint's mining context is for other training samples or another "
                            "method.mining_context_bins; resume with the same data and config")
        self.bank.copy_(state["bank"])
        self.filled.copy_(state["filled"])
