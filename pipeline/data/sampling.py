"""The in-memory sampling that both data kinds share: what an anchor sampler and a pool
sampler do with n samples held in memory, whatever the samples are (binned rates or images).

    MemoryAnchorSampler: epoch order (the same on every rank) -> this rank's share -> batches
                         of B positions (:class:`~pipeline.data.stages.EpochCursor`); own generator
    MemoryPoolSampler:   L positions per draw, uniform (without replacement when L <= n); own
                         generator, independent of the anchors

Subclasses (:mod:`pipeline.data.samplers`, :mod:`pipeline.data.image_streams`) turn the
positions into views. Both bases own their state (generator, cursor / draw count) and refuse
a state written for another number of samples or another loading kind.
"""

from __future__ import annotations

import torch

from preprocess.errors import UserError

from .stages import EpochCursor

__all__ = ["MemoryAnchorSampler", "MemoryPoolSampler"]


class MemoryAnchorSampler:
    """Batches of anchor positions into ``n`` samples in memory, for ``rank`` of ``world_size``.

    ``state_kind`` names the loading in the state ("memory": rates, "images-memory": images),
    ``what`` the samples in messages.
    """

    state_kind = "memory"
    what = "training samples"

    def __init__(self, n: int, batch_size: int, seed: int, *, order_seed: int, rank: int = 0, world_size: int = 1):
        if n < world_size:
            raise UserError(f"{n} {self.what} cannot be shared by {world_size} ranks")
        self.n_positions = n
        self.cursor = EpochCursor(n, batch_size, order_seed, rank, world_size)
        self.batch_size, self.steps_per_epoch = self.cursor.batch_size, self.cursor.steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"kind": self.state_kind, "generator": self.generator.get_state(), **self.cursor.state_dict(),
                "n_samples": self.n_positions, "order_seed": self.cursor.order_seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.state_kind or state["n_samples"] != self.n_positions:
            raise UserError(f"the checkpoint's anchor stream state is for {state.get('n_samples')} {self.what} "
                            f"({state.get('kind')} loading), the data has {self.n_positions} ({self.state_kind} "
                            "loading); resume with the same data and config")
        self.generator.set_state(state["generator"])
        self.cursor.load_state_dict(state)


class MemoryPoolSampler:
    """Pools of ``pool_size`` candidate positions into ``n`` samples in memory."""

    state_kind = "memory"
    what = "training samples"

    def __init__(self, n: int, pool_size: int, seed: int):
        if n == 0:
            raise UserError(f"no {self.what} for the mining pool")
        self.n_positions, self.pool_size = n, int(pool_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def __iter__(self):
        return self

    def draw(self) -> torch.Tensor:
        """(L,) positions: without replacement when L <= n, with replacement otherwise."""
        n, L, g = self.n_positions, self.pool_size, self.generator
        idx = torch.randperm(n, generator=g)[:L] if L <= n else torch.randint(n, (L,), generator=g)
        self.draws += 1
        return idx

    def state_dict(self) -> dict:
        return {"kind": self.state_kind, "generator": self.generator.get_state(), "draws": self.draws,
                "n_samples": self.n_positions}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.state_kind or state["n_samples"] != self.n_positions:
            raise UserError("the checkpoint's pool stream state does not match the data; "
                            "resume with the same data and config")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])
