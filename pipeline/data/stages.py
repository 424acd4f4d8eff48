"""Small, generic stages the data streams are chained from (each testable on a plain list).

    epoch_order ----> shard_for_rank ----> ordered_map(read, threads) ----> ShuffleBuffer.take
    (blocks of one     (this rank's          (block reads in flight,          (rows drawn uniformly
     epoch, shuffled)   share)                results in input order)          from several blocks)
                                  Prefetcher: whole batches built in a background thread

Nothing here knows about recordings: items are anything, rows are dicts of tensors.
Determinism comes from the order of the stages, never from thread timing: ``ordered_map``
returns results in input order and the Prefetcher's single producer thread makes every
random draw, so a stream gives the same batches with 1 or 8 reader threads.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from preprocess.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["derive_seed", "epoch_order", "shard_for_rank", "EpochCursor", "ordered_map", "retry", "ShuffleBuffer", "Prefetcher",
           "EpochReads"]


def derive_seed(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for stream ``stream`` of run seed ``seed`` (SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 63), *stream]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """(n_items,) int64 permutation of range(n_items) for ``epoch``, a pure function of (seed, epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 63), int(epoch)]))
    return rng.permutation(n_items).astype(np.int64)


def shard_for_rank(items: Sequence, rank: int, world_size: int) -> Sequence:
    """Items ``rank, rank + world_size, ...``: disjoint across ranks and covering all items."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return items[rank::world_size]


class EpochCursor:
    """The sample positions one rank visits, batch after batch, epoch after epoch.

    Epoch e visits ``epoch_order(n, order_seed, e)`` (the same on every rank), rank r takes
    positions r, r + world_size, ... trimmed to ``n_rank = n // world_size`` (equal on every
    rank), cut into ``steps_per_epoch = max(1, n_rank // batch_size)`` batches of
    ``min(batch_size, n_rank)`` (a last partial batch is dropped). The state is two ints.
    """

    def __init__(self, n: int, batch_size: int, order_seed: int, rank: int = 0, world_size: int = 1):
        if n < world_size:
            raise ValueError(f"{n} samples cannot be shared by {world_size} ranks")
        self.n, self.order_seed, self.rank, self.world_size = n, order_seed, rank, world_size
        self.n_rank = n // world_size
        self.batch_size = min(int(batch_size), self.n_rank)
        self.steps_per_epoch = max(1, self.n_rank // int(batch_size))
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """(n_rank,) int64 positions this rank visits in ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            perm = shard_for_rank(epoch_order(self.n, self.order_seed, epoch), self.rank, self.world_size)
            self._order = (epoch, torch.from_numpy(np.ascontiguousarray(perm[:self.n_rank])))
        return self._order[1]

    def next(self) -> torch.Tensor:
        """(batch_size,) positions of the next batch."""
        if self.cursor >= self.steps_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        B = self.batch_size
        batch = self.order(self.epoch)[self.cursor * B:(self.cursor + 1) * B]
        self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        """Epoch and cursor; an ``order_seed`` in ``state`` replaces this one (a resume keeps
        the run's original order even under another seed)."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        if "order_seed" in state:
            self.order_seed, self._order = int(state["order_seed"]), None


def ordered_map(fn: Callable[[Any], Any], items: Iterable, threads: int = 4, read_ahead: int = 4) -> Iterator:
    """``map(fn, items)`` with up to ``read_ahead`` calls in flight on ``threads`` threads.

    Results come back in input order (so the output never depends on which call finishes
    first), at most ``read_ahead`` results are held, and ``items`` may be infinite. An
    exception raised by ``fn`` is re-raised at its position. Closing the iterator (or
    dropping it) cancels what is still queued.
    """
    items = iter(items)
    if threads <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="myow-read")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, read_ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def retry(fn: Callable[[], Any], *, attempts: int, transient: Callable[[BaseException], bool],
          base_delay_s: float = 0.2, max_delay_s: float = 5.0, what: str = "read") -> Any:
    """Call ``fn``; on an error ``transient(err)`` accepts, retry with exponential backoff and
    jitter (``base_delay_s * 2**i``, at most ``max_delay_s``), ``attempts`` calls in all.
    Other errors, and the last transient one, propagate unchanged."""
    for attempt in range(max(1, attempts)):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified by `transient`
            if attempt + 1 >= attempts or not transient(err):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(err).__name__, err,
                        attempt + 1, attempts - 1, delay)
            time.sleep(delay)


class ShuffleBuffer:
    """Rows from several blocks, drawn uniformly at random without replacement.

    Rows are dicts of equal-length tensors (``{"rates": (m, N), "row": (m,)}``); the buffer
    keeps them in preallocated tensors, so adding a block and drawing a batch copy only the
    rows involved. After ``take``, the rows left keep a deterministic order (holes are
    filled from the tail), which ``state_dict`` records through the caller's row ids.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity  # rows to allocate at the first add (grows beyond if needed)
        self.columns: dict[str, torch.Tensor] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Append m rows (every column (m, ...), the same columns every time)."""
        m = len(next(iter(rows.values())))
        if not self.columns:
            rows_to_allocate = max(self.capacity, m, 1)
            self.columns = {k: v.new_empty((rows_to_allocate, *v.shape[1:])) for k, v in rows.items()}
        if set(rows) != set(self.columns):
            raise ValueError(f"rows have columns {sorted(rows)}, the buffer {sorted(self.columns)}")
        need = self.size + m
        for k, col in self.columns.items():
            if need > col.shape[0]:  # grow geometrically: amortised O(1) per row
                grown = col.new_empty((max(need, col.shape[0] * 2), *col.shape[1:]))
                grown[:self.size] = col[:self.size]
                self.columns[k] = col = grown
            col[self.size:need] = rows[k]
        self.size = need

    def take(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Remove and return ``n`` rows chosen uniformly without replacement (n <= len)."""
        if n > self.size:
            raise ValueError(f"asked for {n} rows, the buffer holds {self.size}")
        picked = torch.randperm(self.size, generator=generator)[:n]
        out = {k: col.index_select(0, picked) for k, col in self.columns.items()}
        keep = self.size - n
        chosen = torch.zeros(self.size, dtype=torch.bool)
        chosen[picked] = True
        holes = picked[picked < keep].sort().values  # slots below the new size to refill
        movers = torch.arange(keep, self.size)[~chosen[keep:]]  # unchosen rows of the tail
        for col in self.columns.values():
            col[holes] = col[movers]
        self.size = keep
        return out

    def view(self, name: str) -> torch.Tensor:
        """The first ``len(self)`` rows of column ``name`` (a view; copy before keeping it)."""
        return self.columns[name][:self.size] if self.columns else torch.empty(0, dtype=torch.int64)

    def clear(self) -> None:
        self.size = 0


def _pinned(item):
    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if isinstance(item, dict):
        return {k: _pinned(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_pinned(v) for v in item)
    return item


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs ``next(source)`` in a background thread, ``depth`` items ahead.

    ``source`` is an iterator with ``state_dict``/``load_state_dict``. Items are produced
    in order by one thread, so the sequence is exactly the source's. ``state_dict()`` is
    the source state *after the last item handed out* (a snapshot taken by the producer
    right after producing it), not after the ones still queued: a checkpoint resumes
    with the first batch the trainer has not seen. An error in the source is re-raised
    by ``next`` (no hang); ``wait_seconds`` accumulates the time ``next`` was blocked.
    """

    def __init__(self, source, depth: int = 2, name: str = "stream"):
        self.source, self.depth, self.name = source, max(1, depth), name
        self._state = source.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_seconds = 0.0
        self.pin = False  # pin batches' tensors (asynchronous host-to-GPU copies)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = next(self.source)
                snapshot = self.source.state_dict()
                if self.pin:
                    item = _pinned(item)
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, snapshot), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._queue.put(_Failure(err))

    def _start(self) -> None:
        self._stop.clear()
        thread = threading.Thread(target=self._run, name=f"myow-{self.name}", daemon=True)
        try:
            thread.start()
        except RuntimeError as err:  # out of memory or a thread limit: no half-started state left
            raise UserError(f"cannot start the {self.name} prefetch thread ({err}); free memory, raise the limits "
                            "(ulimit -v, ulimit -u) or lower data.read_threads") from None
        self._thread = thread

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        while True:
            try:
                got = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{self.name} stream stopped without an error") from None
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(got, _Failure):
            self.close(rewind=False)
            raise got.error
        item, self._state = got
        return item

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close(rewind=False)
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def close(self, rewind: bool = True) -> None:
        """Stop the producer and drop what it prepared; with ``rewind`` the source goes back
        to ``state_dict()`` so that iterating again continues with the next unseen item."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        self._queue = queue.Queue(maxsize=self.depth)
        if rewind:
            self.source.load_state_dict(self._state)

    def shutdown(self) -> None:
        """Stop for good: the producer thread and the source's own readers (``source.close``)."""
        self.close(rewind=False)
        if hasattr(self.source, "close"):
            self.source.close()

    def __getattr__(self, name: str):
        # steps_per_epoch, batch_size, ... of the wrapped stream
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


class EpochReads:
    """The skeleton both streamed data kinds share: epochs of pieces (blocks of a store,
    shards of an image set) in this rank's order -> ordered reads on threads -> a buffer.

    A subclass gives ``epoch_pieces(epoch)`` (the pieces it reads in ``epoch``, in order),
    ``read_piece(epoch, piece)`` (one piece's payload), ``_add(payload)`` and
    ``_buffered()`` (its buffer), and sets ``read_threads`` / ``read_ahead``. The position
    (``epoch``, ``cursor`` = pieces consumed this epoch) is what a state needs to resume:
    reads restart at the cursor.
    """

    read_threads: int = 1
    read_ahead: int = 1

    def __init__(self) -> None:
        self.epoch, self.cursor = 0, 0
        self._reads = None

    def epoch_pieces(self, epoch: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def read_piece(self, epoch: int, piece):  # pragma: no cover - abstract
        raise NotImplementedError

    def _add(self, payload) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _buffered(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _schedule(self, epoch: int, cursor: int):
        while True:
            pieces = self.epoch_pieces(epoch)
            for i in range(cursor, len(pieces)):
                yield epoch, i, pieces[i], len(pieces)
            epoch, cursor = epoch + 1, 0

    def _load(self, item):
        epoch, i, piece, n = item
        return epoch, i, n, self.read_piece(epoch, piece)

    def _fill_to(self, rows: int) -> None:
        """Read pieces until the buffer holds ``rows``."""
        if self._reads is None:
            self._reads = ordered_map(self._load, self._schedule(self.epoch, self.cursor), self.read_threads,
                                      self.read_ahead)
        while self._buffered() < rows:
            epoch, i, n, payload = next(self._reads)
            self._add(payload)
            self.epoch, self.cursor = (epoch + 1, 0) if i + 1 >= n else (epoch, i + 1)

    def _stop_reads(self) -> None:
        if self._reads is not None:
            self._reads.close()
            self._reads = None

    def _set_position(self, state: dict) -> None:
        self._stop_reads()
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def close(self) -> None:
        self._stop_reads()

    def __iter__(self):
        return self
