"""The one interface between the trainer and its data, stated once, and the session
bookkeeping that both data kinds (recording stores, image shards) share.

The loop (:mod:`pipeline.loop`) and the checkpoint only ever touch a :class:`TrainData`:
its ``sessions`` (each with an ``anchors`` and a ``pool`` :class:`Stream`), the step and
session schedule, what sizes the model's input, the normalisation a checkpoint stores, and
``state_dict``/``load_state_dict``. :class:`SessionList` implements everything that does not
depend on the kind of data; :class:`~pipeline.data.neural.NeuralTrainData` and
:class:`~pipeline.data.images.ImageTrainData` add the rest.

Stream batches::

    anchors: next() -> (x1, x2, x_m | None, meta)    x* (B, ...) float32, normalised views
    pool:    next() -> (x_pool (L, ...), meta_pool)
    meta:    dict of (n,) tensors: store int64, time float64, trial int64 (-1 = none),
             row int64, label int64 (monitoring only, never trained on)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from preprocess.errors import UserError

from .context import MiningContext


class Stream(Protocol):
    """A resumable batch stream (a :class:`~pipeline.data.stages.Prefetcher`)."""

    steps_per_epoch: int
    pin: bool

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def shutdown(self) -> None: ...


class Session(Protocol):
    """One recording (or the one image set) of a run: its two streams and mining settings."""

    anchors: Stream
    pool: Stream
    min_time_gap_s: float  # mining time-exclusion window (0 = off)
    n_samples: int  # SSL training samples
    mining_context: MiningContext | None  # mining by temporal context (recordings only)

    def close(self) -> None: ...


class TrainData(Protocol):
    """What the loop, the checkpoint and the read-outs need from a run's data."""

    kind: str  # "neural" | "images": chooses the read-outs (pipeline.kinds)
    sessions: list  # list[Session]
    seed: int

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def multi(self) -> bool: ...

    def session_at(self, step: int) -> int: ...

    def model_input(self) -> int | list[int]: ...

    def normalization_state(self) -> dict | list[dict]: ...

    def pin_memory(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


@dataclass
class SessionList:
    """The sessions of a run and the order they are trained in (shared by both data kinds).

    Each step draws its anchors AND its pool from one session, picked by :meth:`session_at`
    with probability proportional to the session's training samples: a pure function of
    (seed, step), the same on every rank and after a resume.
    """

    sessions: list
    seed: int = 0

    @property
    def multi(self) -> bool:
        return len(self.sessions) > 1

    @property
    def steps_per_epoch(self) -> int:
        return sum(s.anchors.steps_per_epoch for s in self.sessions)

    def session_at(self, step: int) -> int:
        """The session trained at optimizer step ``step``."""
        if len(self.sessions) == 1:
            return 0
        weights = np.array([s.n_samples for s in self.sessions], dtype=np.float64)
        rng = np.random.default_rng([int(self.seed) % (1 << 63), 6, int(step)])
        return int(rng.choice(len(weights), p=weights / weights.sum()))

    def pin_memory(self) -> None:
        """Batches land in pinned memory (prefetch threads pin them), so that copies to the
        GPU can be asynchronous (``non_blocking``)."""
        for session in self.sessions:
            session.anchors.pin = session.pool.pin = True

    def state_dict(self) -> dict:
        states = []
        for s in self.sessions:
            state = {"anchors": s.anchors.state_dict(), "pool": s.pool.state_dict()}
            if s.mining_context is not None:
                state["mining_context"] = s.mining_context.state_dict()
            states.append(state)
        return {"sessions": states}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("sessions", [state])
        if len(states) != len(self.sessions):
            raise UserError(f"the checkpoint has {len(states)} sessions, data.path {len(self.sessions)}; "
                            "resume with the same stores")
        for session, st in zip(self.sessions, states):
            session.anchors.load_state_dict(st["anchors"])
            session.pool.load_state_dict(st["pool"])
            if session.mining_context is not None and "mining_context" in st:
                session.mining_context.load_state_dict(st["mining_context"])

    def close(self) -> None:
        for session in self.sessions:
            session.close()
