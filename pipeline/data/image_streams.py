"""Image anchor and pool streams: in-memory samplers and streamed shard readers.

    shards (index.json + shard-NNNNNN.tar, written by preprocess.shard_images; any fsspec URL)
      small set (decoded size <= memory_budget_mb): decoded once into uint8 (n, C, H, W)
          anchors: epoch_order(order_seed, epoch) -> shard_for_rank -> equal count per rank -> B
          pool:    an independent uniform draw of L per step (own generator)
      large set: streamed
          epoch_order(shards) -> shard_for_rank (anchors only) -> ordered_map(read + decode, threads)
          -> shuffle buffer of decoded images -> B (anchors) or L (pool)
      -> views: T (two per anchor), T_m (one per anchor and one per candidate)

The streams have the interface of the neural ones (:mod:`pipeline.data.samplers`,
:mod:`pipeline.data.streams`), so the trainer uses them unchanged::

    anchors: next() -> (x1, x2, x_m | None, meta)     x* (B, C, S, S) float32, normalised
    pool:    next() -> (x_pool (L, C, S, S), meta)
    meta:    store int64 (0), time float64 (= sample index), trial int64 (= sample index),
             row int64 (sample index in the split), label int64 (class; monitoring only)

``trial`` is the sample index, so the trainer's same-trial exclusion
(:func:`model.miner.exclusion_mask`) keeps an anchor from mining its own image in the pool.
``time`` is the sample index too: keep the mining time gap at 0 for images.

The views (:mod:`pipeline.data.image_views`) are made in the Prefetcher's producer thread,
limited to ``augment_threads`` (1) intra-op threads: these small ops ran 3-6x slower with 2
OpenMP threads on 2 cores.

Determinism: every random draw (epoch order aside, which is a pure function of (seed,
epoch)) is made from the stream's own ``torch.Generator``: crop boxes, flips, jitter
factors and orders, grayscale decisions, pool indices and buffer picks. Nothing touches
torch's global RNG. (``torch.random.fork_rng`` + ``manual_seed`` around v2 transforms
would not be deterministic here: the anchor and pool streams run in two Prefetcher threads
at once and would race on the one global generator.) So two streams with the same seed
give the same batches, and a stream restored from ``state_dict()`` continues exactly.
"""

from __future__ import annotations

import logging

import torch

from preprocess.errors import UserError

from ..runtime import limit_intra_op_threads
from .image_shards import Item, ShardSet, _SizeMismatch, load_image_tensors
from .image_views import FIT_SAMPLES, TRANSFORM_SETS, ImageAugment, ImageNormalization
from .sampling import MemoryAnchorSampler, MemoryPoolSampler
from .stages import EpochReads, Prefetcher, derive_seed, epoch_order, shard_for_rank

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- meta


def _meta(samples: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    samples = samples.to(torch.int64)
    return {"store": torch.zeros(len(samples), dtype=torch.int64), "time": samples.double(),
            "trial": samples.clone(), "row": samples.clone(), "label": labels.to(torch.int64)}


# --------------------------------------------------------------------------- in-memory samplers


class ImageAnchorSampler(MemoryAnchorSampler):
    """Anchor batches from images in memory (the neural AnchorSampler's sampling).

    Each epoch is ``epoch_order(n, order_seed, epoch)`` (the same on every rank); rank r
    takes positions r, r + world_size, ..., trimmed to ``n // world_size`` (equal steps on
    every rank), cut into ``steps_per_epoch`` batches of B. ``next()`` -> (x1, x2, x_m, meta):
    two T views and one T_m view (None without ``mining_view``) of the same B images.
    """

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)
    state_kind, what = "images-memory", "images"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: ImageAugment, augment_m: ImageAugment,
                 batch_size: int, seed: int, *, order_seed: int, rank: int = 0, world_size: int = 1,
                 mining_view: bool = True, first_sample: int = 0):
        n = len(images)
        super().__init__(n, batch_size, seed, order_seed=order_seed, rank=rank, world_size=world_size)
        self.images, self.labels, self.augment, self.augment_m = images, labels, augment, augment_m
        self.samples = torch.arange(first_sample, first_sample + n, dtype=torch.int64)
        self.mining_view = mining_view

    def next_indices(self) -> torch.Tensor:
        return self.cursor.next()

    def __next__(self):
        limit_intra_op_threads(self.augment_threads)
        idx = self.next_indices()
        images, g = self.images.index_select(0, idx), self.generator
        x1, x2 = self.augment(images, g), self.augment(images, g)
        x_m = self.augment_m(images, g) if self.mining_view else None
        return x1, x2, x_m, _meta(self.samples[idx], self.labels[idx])


class ImagePoolSampler(MemoryPoolSampler):
    """Candidate pools from images in memory, independent of the anchors (own generator):
    ``next()`` -> (x_pool (L, C, S, S), meta); L images drawn uniformly (without replacement
    when L <= n), one T_m view each."""

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)
    state_kind, what = "images-memory", "images"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment_m: ImageAugment, pool_size: int, seed: int,
                 first_sample: int = 0):
        super().__init__(len(images), pool_size, seed)
        self.images, self.labels, self.augment_m = images, labels, augment_m
        self.samples = torch.arange(first_sample, first_sample + len(images), dtype=torch.int64)

    def __next__(self):
        limit_intra_op_threads(self.augment_threads)
        idx = self.draw()
        return (self.augment_m(self.images.index_select(0, idx), self.generator),
                _meta(self.samples[idx], self.labels[idx]))


# --------------------------------------------------------------------------- streamed


class _ShardStream(EpochReads):
    """Epochs of shuffled shards -> ordered reads (threads) -> shuffle buffer of decoded images.

    State: (epoch, shards consumed this epoch, generator, the sample indices in the buffer,
    in buffer order). Loading it re-reads only the shards those samples live in.
    """

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)

    def __init__(self, shard_set: ShardSet, *, seed: int, order_seed: int, rank: int, world_size: int,
                 shard_by_rank: bool, buffer_size: int, read_threads: int, read_ahead: int, name: str):
        super().__init__()
        self.set, self.name = shard_set, name
        self.order_seed, self.rank, self.world_size, self.shard_by_rank = order_seed, rank, world_size, shard_by_rank
        if shard_by_rank and len(shard_set.shards) < world_size:
            raise UserError(f"{shard_set.url}: {len(shard_set.shards)} shard(s) cannot be shared by {world_size} "
                            "ranks; re-shard with a smaller --shard-size or load the set into memory")
        # never more than one pass over this stream's share: a small set must not be read
        # many times over just to fill the buffer
        share = shard_set.n_samples // world_size if shard_by_rank else shard_set.n_samples
        self.buffer_size = max(1, min(int(buffer_size), share))
        self.read_threads, self.read_ahead = int(read_threads), int(read_ahead)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[Item] = []

    def epoch_shards(self, epoch: int) -> list[int]:
        """Shard indices (into ``set.names``) this stream reads in ``epoch``, in order."""
        order = epoch_order(len(self.set.shards), self.order_seed, epoch)
        if self.shard_by_rank:
            order = shard_for_rank(order, self.rank, self.world_size)
        return [self.set.shards[int(i)] for i in order]

    def epoch_pieces(self, epoch: int) -> list[int]:
        return self.epoch_shards(epoch)

    def read_piece(self, epoch: int, shard) -> list[Item]:
        return self.set.read(shard)

    def _add(self, items: list[Item]) -> None:
        self.buffer.extend(items)

    def _buffered(self) -> int:
        return len(self.buffer)

    def _fill(self, need: int) -> None:
        self._fill_to(max(need, self.buffer_size))

    def _take(self, n: int) -> list[Item]:
        """Remove n items drawn uniformly without replacement (the rest keep their order)."""
        self._fill(n)
        picked = torch.randperm(len(self.buffer), generator=self.generator)[:n].tolist()
        out = [self.buffer[i] for i in picked]
        chosen = set(picked)
        self.buffer = [item for j, item in enumerate(self.buffer) if j not in chosen]
        return out

    def _batch(self, n: int):
        limit_intra_op_threads(self.augment_threads)
        items = self._take(n)
        samples = torch.tensor([it[0] for it in items], dtype=torch.int64)
        labels = torch.tensor([it[2] for it in items], dtype=torch.int64)
        images = [it[1] for it in items]
        if all(im.shape == images[0].shape for im in images):
            images = torch.stack(images)
        return images, _meta(samples, labels)

    def state_dict(self) -> dict:
        return {"kind": "images-stream", "generator": self.generator.get_state(), "epoch": self.epoch,
                "cursor": self.cursor, "n_samples": self.set.n_samples, "n_shards": len(self.set.shards),
                "order_seed": self.order_seed, "buffer": torch.tensor([it[0] for it in self.buffer], dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "images-stream" or state["n_samples"] != self.set.n_samples \
                or state["n_shards"] != len(self.set.shards):
            raise UserError(f"{self.set.url}: the checkpoint's {self.name} stream state ({state.get('kind')}, "
                            f"{state.get('n_samples')} samples) does not match the data (images-stream, "
                            f"{self.set.n_samples}); resume with the same shards and settings")
        self._set_position(state)
        self.generator.set_state(state["generator"])
        self.order_seed = int(state.get("order_seed", self.order_seed))
        ids = state["buffer"].tolist()
        found = self.set.read_samples(ids, self.read_threads) if ids else {}
        self.buffer = [found[i] for i in ids]

class ShardAnchorStream(_ShardStream):
    """Anchor batches streamed from shards: ``next()`` -> (x1, x2, x_m | None, meta).

    Every epoch the shard order is the same on all ranks and rank r reads shards
    r, r + world_size, ... of it (disjoint anchors); the stream runs on across epochs, and
    ``steps_per_epoch = n // (B x world_size)`` is the same on every rank.
    """

    def __init__(self, shard_set: ShardSet, augment: ImageAugment, augment_m: ImageAugment, batch_size: int, *,
                 seed: int, order_seed: int, rank: int = 0, world_size: int = 1, mining_view: bool = True,
                 buffer_size: int = 10000, read_threads: int = 4, read_ahead: int = 4):
        super().__init__(shard_set, seed=seed, order_seed=order_seed, rank=rank, world_size=world_size,
                         shard_by_rank=True, buffer_size=buffer_size, read_threads=read_threads,
                         read_ahead=read_ahead, name="anchor")
        self.augment, self.augment_m, self.mining_view = augment, augment_m, mining_view
        n_rank = max(1, shard_set.n_samples // world_size)
        self.batch_size = min(int(batch_size), n_rank)
        self.steps_per_epoch = max(1, shard_set.n_samples // (int(batch_size) * world_size))

    def __next__(self):
        images, meta = self._batch(self.batch_size)
        g = self.generator
        x1, x2 = self.augment(images, g), self.augment(images, g)
        x_m = self.augment_m(images, g) if self.mining_view else None
        return x1, x2, x_m, meta


class ShardPoolStream(_ShardStream):
    """Candidate pools streamed from shards, independent of the anchors: every shard, in
    its own order and with its own generator. ``next()`` -> (x_pool (L, C, S, S), meta)."""

    def __init__(self, shard_set: ShardSet, augment_m: ImageAugment, pool_size: int, *, seed: int, order_seed: int,
                 buffer_size: int = 10000, read_threads: int = 4, read_ahead: int = 4):
        super().__init__(shard_set, seed=seed, order_seed=order_seed, rank=0, world_size=1, shard_by_rank=False,
                         buffer_size=buffer_size, read_threads=read_threads, read_ahead=read_ahead, name="pool")
        self.augment_m, self.pool_size = augment_m, int(pool_size)

    def __next__(self):
        images, meta = self._batch(self.pool_size)
        return self.augment_m(images, self.generator), meta


# --------------------------------------------------------------------------- building


def build_image_streams(url: str, storage_options: dict | None = None, *, batch_size: int, pool_size: int, seed: int,
                        rank: int = 0, world_size: int = 1, transform: str = "imagenet", mining_view: bool = True,
                        index_range=None, split: str | None = None, memory_budget_mb: float = 1024,
                        loading: str = "auto", image_size: int | None = None,
                        normalize: str | tuple = "preset", shuffle_buffer: int | None = None, read_threads: int = 4,
                        augment_threads: int | None = 1, prefetch: int = 2,
                        read_retries: int = 3) -> tuple[Prefetcher, Prefetcher]:
    """The anchor and pool streams of an image shard set, each in a :class:`Prefetcher`.

    Args:
        url, storage_options: the shard set (a folder with index.json; any fsspec URL);
            ``split`` ("train", "test", ...) appends that sub-directory.
        batch_size, pool_size: B anchors and L candidates per step.
        seed, rank, world_size: streams are seeded by (seed, stream, rank) as the neural
            ones: anchors share the epoch order across ranks and are sharded; the pool is an
            independent draw per rank.
        transform: a key of TRANSFORM_SETS ("cifar", "imagenet", "mnist", "mnist-all").
        mining_view: whether anchors carry x_m (else None).
        index_range: (lo, hi) of sample indices to use (e.g. (0, 8000) of MNIST t10k).
        memory_budget_mb, loading: "auto" holds the set in memory when its decoded uint8 size
            is within the budget (and all images share one size), "memory" forces it,
            "stream" streams the shards.
        image_size: output side S of the views (default: the images' side; for sets of
            varying sizes, the first image's shorter side).
        normalize: "preset" (the transform set's constants), "fit" (from the training
            images), or (mean, std) per channel.
        shuffle_buffer: decoded images each streamed buffer holds (default: 10000, fewer when
            a quarter of the memory budget does not fit them, at least 2 batches).
        read_threads: shard readers (streamed) / decoders (in-memory loading).
        augment_threads: intra-op threads each producer thread augments with (None: torch's
            default; see :func:`limit_intra_op_threads`).
        prefetch: batches prepared ahead by each Prefetcher.
        read_retries: extra attempts at a shard read on transient storage errors.

    Both Prefetchers expose ``normalization``, ``channels``, ``image_size``, ``classes``,
    ``streamed`` (and ``images``/``labels`` when in memory) of their source.
    """
    if transform not in TRANSFORM_SETS:
        raise UserError(f"transform {transform!r}: choose one of {', '.join(TRANSFORM_SETS)}")
    if loading not in ("auto", "memory", "stream"):
        raise UserError(f"loading {loading!r}: choose auto, memory or stream")
    spec, spec_m, preset = TRANSFORM_SETS[transform]
    sset = ShardSet(url, storage_options, index_range, split=split, read_retries=read_retries)
    first = sset.first_image()
    C = first.shape[0]
    per_image = first.numel()
    in_memory = loading == "memory" or (loading == "auto" and per_image * sset.n_samples <= memory_budget_mb * (1 << 20))
    images = labels = None
    if in_memory:
        try:
            images, labels = load_image_tensors(url, shard_set=sset, threads=read_threads)
        except _SizeMismatch:
            if loading == "memory":
                raise
            log.info("%s: images of different sizes, streaming them", sset.url)
            in_memory = False
    size = int(image_size or min(first.shape[-2:]))  # in memory every image has the first one's size
    if normalize == "preset":
        norm = ImageNormalization.preset(preset, C)
    elif normalize == "fit":
        if images is not None:
            norm = ImageNormalization.fit(images)
        else:
            want = list(range(sset.lo, min(sset.hi, sset.lo + FIT_SAMPLES)))
            found = sset.read_samples(want, read_threads)
            norm = ImageNormalization.fit(found[i][1] for i in want)
    else:
        norm = ImageNormalization(*normalize)
    if norm.channels != C:
        raise UserError(f"normalisation for {norm.channels} channel(s), the images have {C}")
    augment, augment_m = ImageAugment(spec, size, norm), ImageAugment(spec_m, size, norm)
    anchor_seed, order_seed = derive_seed(seed, 1, rank), derive_seed(seed, 4)
    pool_seed, pool_order_seed = derive_seed(seed, 2, rank), derive_seed(seed, 5, rank)
    if in_memory:
        anchors = ImageAnchorSampler(images, labels, augment, augment_m, batch_size, anchor_seed,
                                     order_seed=order_seed, rank=rank, world_size=world_size,
                                     mining_view=mining_view, first_sample=sset.lo)
        pool = ImagePoolSampler(images, labels, augment_m, pool_size, pool_seed, first_sample=sset.lo)
    else:
        if shuffle_buffer is None:
            fits = int(memory_budget_mb * (1 << 20) / 4 / max(1, per_image))
            shuffle_buffer = max(2 * max(batch_size, pool_size), min(10000, fits))
        common = dict(buffer_size=shuffle_buffer, read_threads=read_threads, read_ahead=read_threads)
        anchors = ShardAnchorStream(sset, augment, augment_m, batch_size, seed=anchor_seed, order_seed=order_seed,
                                    rank=rank, world_size=world_size, mining_view=mining_view, **common)
        pool = ShardPoolStream(sset, augment_m, pool_size, seed=pool_seed, order_seed=pool_order_seed, **common)
    for stream in (anchors, pool):
        stream.normalization, stream.channels, stream.image_size = norm, C, size
        stream.classes, stream.streamed, stream.url = sset.classes, not in_memory, sset.url
        stream.n_samples, stream.augment_threads = sset.n_samples, augment_threads
    log.info("%s: %d images (%s), %s, views %dx%d, transform %s", sset.url, sset.n_samples,
             "in memory" if in_memory else f"streamed from {len(sset.shards)} shards",
             f"normalisation mean {norm.mean} std {norm.std}", size, size, transform)
    return (Prefetcher(anchors, prefetch, name="image-anchors"), Prefetcher(pool, prefetch, name="image-pool"))


