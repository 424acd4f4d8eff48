"""Streams of training batches read block by block from a recording store (large stores).

    blocks of the store holding training samples (chunk-aligned row ranges)
      -> epoch_order(seed, epoch)            same order on every rank (anchors)
      -> shard_for_rank(rank, world_size)    disjoint anchors per rank
      -> ordered_map(read block, threads)    reads in flight, results in order
      -> ShuffleBuffer                       rows of many blocks (raw counts), drawn uniformly
      -> augment                             a batch: (x1, x2, x_m, meta) or (x_pool, meta)

Both streams have the interface of the in-memory samplers in :mod:`pipeline.data`
(``next()``, ``steps_per_epoch``, ``batch_size``, ``state_dict``/``load_state_dict``)
and produce statistically the same batches; only where rows come from differs.

Temporal jitter across block boundaries: an anchor block [a, b) is read with ``J`` rows
of halo on both sides, and its positives are drawn among the training samples of the
same trial within +-J rows (and (J + 1/2) bins of time) exactly as the in-memory
``jitter_table`` does; a pair never crosses a trial or a store. Candidate metadata
(time, trial, store) comes from the in-memory index, so exclusion is exact.

Resume: the state is (epoch, blocks consumed this epoch, generator, the store rows in the
shuffle buffer). Loading it re-reads only the rows in the buffer, never the epoch so far.
The positives of a block are drawn with a generator seeded by (seed, epoch, block), so a
block gives the same pairs whichever reader thread (or worker) reads it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from preprocess.errors import UserError

from .jitter import draw_positives, jitter_table
from .recording import Recording, packed_counts
from .stages import EpochReads, ShuffleBuffer, derive_seed, epoch_order, ordered_map, shard_for_rank

log = logging.getLogger(__name__)

__all__ = ["release_freed_blocks", "StreamSettings", "default_block_rows", "BlockAnchorStream", "BlockPoolStream", "fit_normalization_stats"]

TARGET_BLOCK_BYTES = 4 << 20  # >= 4 MiB of float32 rates per block read: few, large requests


def release_freed_blocks(threshold_bytes: int = 256 << 10) -> None:
    """Make glibc return freed block buffers to the OS at once (no-op elsewhere).

    Reader threads allocate and free multi-MB block buffers. glibc's default raises its
    mmap threshold after such frees, so later blocks come from per-thread heap arenas that
    keep the memory: with 4 readers that held ~0.4 GB of dead blocks on a 3 GB store. A
    fixed threshold keeps large buffers mmap-backed, so freeing them shrinks RSS.
    """
    global _RELEASE_SET
    if _RELEASE_SET:
        return
    _RELEASE_SET = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(threshold_bytes))  # M_MMAP_THRESHOLD (also disables its dynamic raise)
        libc.mallopt(-8, 2)  # M_ARENA_MAX: fewer per-thread heaps holding freed memory
    except (OSError, AttributeError):
        pass


_RELEASE_SET = False


class StreamSettings:
    """How a block stream reads: block size, shuffle buffer, reader threads."""

    def __init__(self, block_rows: int, buffer_rows: int, read_threads: int = 4, read_ahead: int = 4):
        self.block_rows, self.buffer_rows = int(block_rows), int(buffer_rows)
        self.read_threads, self.read_ahead = int(read_threads), int(read_ahead)


def default_block_rows(rec: Recording, requested: int = 0) -> int:
    """Rows per block: ``requested`` rounded up to whole chunks, or whole chunks making
    at least TARGET_BLOCK_BYTES of float32 rates (chunk-aligned reads never split a chunk)."""
    chunk = rec.reader.chunk_rows if rec.reader else 1
    want = requested or math.ceil(TARGET_BLOCK_BYTES / max(1, 4 * rec.n_units))
    return max(1, math.ceil(want / chunk)) * chunk


class _BlockStream(EpochReads):
    """Epochs of shuffled blocks -> ordered reads -> shuffle buffer (shared by both streams)."""

    halo = 0

    def __init__(self, rec: Recording, is_sample: np.ndarray, settings: StreamSettings, *, seed: int,
                 order_seed: int, rank: int, world_size: int, shard: bool, name: str):
        if rec.reader is None:
            raise ValueError("block streams read through the recording's CountsReader")
        super().__init__()
        self.rec, self.is_sample, self.settings, self.name = rec, is_sample, settings, name
        self.read_threads, self.read_ahead = settings.read_threads, settings.read_ahead
        self.seed, self.order_seed, self.rank, self.world_size, self.shard = seed, order_seed, rank, world_size, shard
        B = settings.block_rows
        starts = np.arange(0, rec.n_rows, B)
        counts = np.add.reduceat(is_sample.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        keep = counts > 0
        self.blocks = np.stack([starts[keep], np.minimum(starts[keep] + B, rec.n_rows)], 1) if keep.any() \
            else np.zeros((0, 2), np.int64)
        self.n_samples = int(counts.sum())
        if len(self.blocks) == 0:
            raise UserError(f"{rec.url}: no training samples to stream")
        if shard and len(self.blocks) < world_size:
            raise UserError(f"{rec.url}: {len(self.blocks)} blocks of training samples cannot be shared by "
                            f"{world_size} ranks; lower data.block_rows or use data.loading=memory")
        self.generator = torch.Generator().manual_seed(seed)
        # exactly what _fill can hold: a full buffer plus one block (no geometric over-allocation)
        self.buffer = ShuffleBuffer(settings.buffer_rows + settings.block_rows)
        release_freed_blocks()

    # -- block order
    def epoch_blocks(self, epoch: int) -> np.ndarray:
        """Block indices this rank reads in ``epoch``, in order."""
        order = epoch_order(len(self.blocks), self.order_seed, epoch)
        return np.asarray(shard_for_rank(order, self.rank, self.world_size)) if self.shard else order

    def epoch_pieces(self, epoch: int) -> list[int]:
        return [int(b) for b in self.epoch_blocks(epoch)]

    def read_piece(self, epoch: int, block: int) -> dict[str, torch.Tensor]:
        return self.read_block(epoch, block)

    def _add(self, rows: dict[str, torch.Tensor]) -> None:
        self.buffer.add(rows)

    def _buffered(self) -> int:
        return len(self.buffer)

    def read_block(self, epoch: int, block: int) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fill(self, need: int) -> None:
        """Add blocks until the buffer holds max(need, buffer_rows) rows."""
        self._fill_to(max(need, self.settings.buffer_rows))

    # -- state
    def _buffer_state(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"kind": "block", "generator": self.generator.get_state(), "epoch": self.epoch,
                "cursor": self.cursor, "n_samples": self.n_samples, "n_blocks": len(self.blocks),
                **{k: v.clone() for k, v in self._buffer_state().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "block" or state["n_blocks"] != len(self.blocks) \
                or state["n_samples"] != self.n_samples:
            raise UserError(f"{self.rec.url}: the checkpoint's {self.name} stream state does not match the data "
                            f"(blocks/samples differ); resume with the same store and data.* settings")
        self._set_position(state)
        self.generator.set_state(state["generator"])
        self.buffer.clear()
        self._restore_buffer(state)

    def _restore_buffer(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

class BlockAnchorStream(_BlockStream):
    """Anchor batches from a streamed store: ``next()`` -> (x1, x2, x_m | None, meta), (B, N) each.

    x1 = t(s), x2 = t'(s') with s' a jitter neighbour of s (the anchor itself when it has
    none), x_m = t_m(s) when ``mining_view``. Anchors are sharded by rank (disjoint).
    """

    def __init__(self, rec: Recording, is_sample: np.ndarray, augment, batch_size: int, settings: StreamSettings,
                 *, seed: int, order_seed: int, jitter_max_bins: int, rank: int = 0, world_size: int = 1,
                 structured: bool = False, mining_view: bool = True, mining_augment=None):
        super().__init__(rec, is_sample, settings, seed=seed, order_seed=order_seed, rank=rank,
                         world_size=world_size, shard=True, name="anchor")
        self.augment, self.structured, self.mining_view = augment, structured, mining_view
        self.mining_augment = mining_augment or augment  # T_m of x_m
        self.halo = int(jitter_max_bins)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = max(1, self.n_samples // (self.batch_size * world_size))

    def positives(self, epoch: int, block: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Store rows of the anchors of ``block`` and of one jitter neighbour each, drawn
        with the block's own generator. ``lo:hi`` is the block with its halo."""
        a, b = (int(v) for v in self.blocks[block])
        local = np.flatnonzero(self.is_sample[lo:hi])  # training samples of block + halo
        rows = lo + local
        nb, cnt = jitter_table(local, self.rec.trial[lo:hi], self.rec.bin_start_s[lo:hi], self.rec.bin_size_s,
                               self.halo)
        anchor = np.flatnonzero((rows >= a) & (rows < b))
        g = torch.Generator().manual_seed(derive_seed(self.seed, 7, epoch, block))
        pos = draw_positives(torch.from_numpy(anchor), torch.from_numpy(nb), torch.from_numpy(cnt), g).numpy()
        return rows[anchor], rows[pos]

    def read_block(self, epoch: int, block: int) -> dict[str, torch.Tensor]:
        a, b = (int(v) for v in self.blocks[block])
        lo, hi = max(0, a - self.halo), min(self.rec.n_rows, b + self.halo)
        anchor_rows, pos_rows = self.positives(epoch, block, lo, hi)
        counts = packed_counts(self.rec.reader.read_counts(lo, hi))
        return {"anchor": counts[torch.from_numpy(anchor_rows - lo)], "positive": counts[torch.from_numpy(pos_rows - lo)],
                "row": torch.from_numpy(anchor_rows), "pos_row": torch.from_numpy(pos_rows)}

    def __next__(self):
        B = self.batch_size
        self._fill(B)
        got = self.buffer.take(B, self.generator)
        g, to_rates = self.generator, self.rec.reader.to_rates
        anchor, positive = to_rates(got["anchor"]), to_rates(got["positive"])
        drop = self.augment.dropout_mask(*anchor.shape, g) if self.structured else True
        x1 = self.augment(anchor, g, drop)
        x2 = self.augment(positive, g, drop)
        x_m = self.mining_augment(anchor, g, drop) if self.mining_view else None
        return x1, x2, x_m, self.rec.meta(got["row"])

    def _buffer_state(self) -> dict:
        return {"rows": self.buffer.view("row"), "pos_rows": self.buffer.view("pos_row")}

    def _restore_buffer(self, state: dict) -> None:
        rows, pos = state["rows"].numpy(), state["pos_rows"].numpy()
        if len(rows):
            counts = self.rec.reader.read_rows(np.concatenate([rows, pos]), self.settings.block_rows)
            self.buffer.add({"anchor": counts[:len(rows)], "positive": counts[len(rows):],
                             "row": torch.from_numpy(rows.copy()), "pos_row": torch.from_numpy(pos.copy())})


class BlockPoolStream(_BlockStream):
    """Candidate pools from a streamed store: ``next()`` -> (x_pool (L, N), meta).

    Independent of the anchors: its own block order and generator, seeded per rank, over
    every block (each rank's pool is a different uniform sample of the training set).
    """

    def __init__(self, rec: Recording, is_sample: np.ndarray, augment, pool_size: int, settings: StreamSettings,
                 *, seed: int, order_seed: int):
        super().__init__(rec, is_sample, settings, seed=seed, order_seed=order_seed, rank=0, world_size=1,
                         shard=False, name="pool")
        self.augment, self.pool_size = augment, int(pool_size)

    def read_block(self, epoch: int, block: int) -> dict[str, torch.Tensor]:
        a, b = (int(v) for v in self.blocks[block])
        local = np.flatnonzero(self.is_sample[a:b])
        counts = packed_counts(self.rec.reader.read_counts(a, b))
        return {"counts": counts[torch.from_numpy(local)], "row": torch.from_numpy(a + local)}

    def __next__(self):
        self._fill(self.pool_size)
        got = self.buffer.take(self.pool_size, self.generator)
        return self.augment(self.rec.reader.to_rates(got["counts"]), self.generator), self.rec.meta(got["row"])

    def _buffer_state(self) -> dict:
        return {"rows": self.buffer.view("row")}

    def _restore_buffer(self, state: dict) -> None:
        rows = state["rows"].numpy()
        if len(rows):
            self.buffer.add({"counts": self.rec.reader.read_rows(rows, self.settings.block_rows),
                             "row": torch.from_numpy(rows.copy())})


def fit_normalization_stats(rec: Recording, is_sample: np.ndarray, settings: StreamSettings,
                            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and unbiased std (float64, (N,)) of the training samples' rates, in one
    pass over the blocks (Chan et al.'s pairwise merge of block means and squared
    deviations: exact to float64 rounding, no catastrophic cancellation)."""
    from tqdm import tqdm

    n_total, mean, m2 = 0, torch.zeros(rec.n_units, dtype=torch.float64), torch.zeros(rec.n_units, dtype=torch.float64)
    B = settings.block_rows
    spans = [(a, min(a + B, rec.n_rows)) for a in range(0, rec.n_rows, B) if is_sample[a:a + B].any()]

    def read(span):
        a, b = span
        return rec.reader.read(a, b)[torch.from_numpy(np.flatnonzero(is_sample[a:b]))].double()

    bar = tqdm(total=len(spans), desc="normalisation", unit="block", disable=not progress, leave=False)
    for x in ordered_map(read, spans, settings.read_threads, settings.read_ahead):
        n = x.shape[0]
        block_mean = x.mean(0)
        block_m2 = ((x - block_mean) ** 2).sum(0)
        delta = block_mean - mean
        total = n_total + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta ** 2 * (n_total * n / total)
        n_total = total
        bar.update(1)
    bar.close()
    std = (m2 / max(1, n_total - 1)).sqrt() if n_total > 1 else torch.zeros_like(mean)
    return mean, std
