"""Training data for MYOW on recording stores: normalisation, augmentations, jitter pairs
and the two independent streams, held in memory or streamed block by block.

    store --open_store--> Recording (per-bin metadata in memory, counts behind a reader)
          --split_rows--> train / val / test rows (by trial order, or time blocks)
          --training mask--> the SSL training samples (train split [, moving bins])
    anchor stream: batches of B -> (x1, x2, x_m, meta)
        x1 = t(s), x2 = t'(s') with s' a temporal-jitter neighbour of s in the same trial,
        x_m = t_m(s) a third, independent draw of the anchor itself (T_m = T)
    pool stream (own generator and seed): L training samples -> (x_pool, meta_pool)

Small stores (``data.loading: auto`` and counts under ``data.memory_budget_mb`` as
float32) are read once into memory and sampled by :class:`AnchorSampler` /
:class:`PoolSampler`; larger ones are streamed by :mod:`pipeline.data.streams` with
chunk-aligned block reads, a shuffle buffer and reader threads. Either way each stream
runs in a :class:`~pipeline.data.stages.Prefetcher` thread, so the trainer only waits for
data when producing a batch is slower than a training step.

Ranks: anchors are sharded (every epoch's order is the same on all ranks, each rank takes
every world_size-th sample or block), the pool is an independent draw per rank; both are
seeded by (run seed, stream, rank) and every rank has the same ``steps_per_epoch``.

``meta`` is a dict of (n,) tensors: ``store`` (recording id), ``time`` (bin_start_s),
``trial`` (-1 = none), ``row`` (store row) and ``label`` (the main label, for monitoring
only: labels are never used for training). Every stream has ``state_dict()`` /
``load_state_dict()`` (generator, epoch and cursor; for block streams the rows in the
shuffle buffer), so a resumed run draws exactly the batches the uninterrupted run would
have drawn.

"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from model.methods import DataNeeds
from preprocess.errors import UserError
from preprocess.store import filesystem, join_url

from ..config import Config
from .augment import Augmenter, CountsView, Normalization, no_augmentation, normalization_state, normalizations_from
from .context import MiningContext
from .interface import SessionList
from .jitter import jitter_table
from .recording import Recording, hand_speed, open_store, split_rows
from .samplers import AnchorSampler, PoolSampler, Samples, training_samples
from .stages import Prefetcher, derive_seed
from .streams import (
    BlockAnchorStream,
    BlockPoolStream,
    StreamSettings,
    default_block_rows,
    fit_normalization_stats,
    release_freed_blocks,
)
from .temporal import TemporalSampler

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- bundle


@dataclass
class SessionData:
    """Everything training needs from one recording (session)."""

    recording: Recording
    splits: dict[str, np.ndarray]  # store rows per split
    normalization: Normalization
    anchors: Prefetcher  # -> (x1, x2, x_m, meta)
    pool: Prefetcher  # -> (x_pool, meta_pool)
    min_time_gap_s: float  # resolved mining time-exclusion window
    n_samples: int  # SSL training samples
    samples: Samples | None = None  # the SSL training samples, when held in memory
    mining_context: MiningContext | None = None  # method.mining_context_bins > 0

    @property
    def streamed(self) -> bool:
        return self.samples is None

    def close(self) -> None:
        self.anchors.shutdown()
        self.pool.shutdown()


@dataclass
class NeuralTrainData(SessionList):
    """The :class:`~pipeline.data.interface.TrainData` of recording stores: one session per
    store (:class:`SessionData`).

    A multi-session dataset (``data.path`` a list of stores, or a directory of stores) is
    batched per session (:meth:`SessionList.session_at`). Units differ between sessions, so
    the model reads each session in through its own input layer
    (:class:`model.SessionEncoder`).
    """

    sessions: list[SessionData]
    kind = "neural"

    def model_input(self) -> int | list[int]:
        """What :func:`pipeline.build.build_model` sizes the encoder's input from: the units
        of the store, or every session's unit count."""
        units = [s.recording.n_units for s in self.sessions]
        return units if self.multi else units[0]

    def normalization_state(self) -> dict | list[dict]:
        """The normalisation a checkpoint stores (evaluation and resume reuse it)."""
        return normalization_state([s.normalization for s in self.sessions])


def training_mask(rec: Recording, train_rows: np.ndarray, min_speed: float) -> np.ndarray:
    """(T,) bool: the train-split rows used for SSL (hand speed > min_speed when asked and known)."""
    mask = np.zeros(rec.n_rows, dtype=bool)
    mask[train_rows] = True
    if min_speed > 0:
        speed = hand_speed(rec)
        if speed is None:
            log.warning("data.min_speed=%s but %s has no behavior/velocity: training on every bin",
                        min_speed, rec.url)
        else:
            mask &= speed > min_speed
    return mask


def session_urls(path: str | list[str], storage_options: dict | None = None) -> list[str]:
    """The stores of ``data.path``: a list of store URLs, one store, or a directory (or
    object-storage prefix) whose sub-folders are stores (sorted by name)."""
    if isinstance(path, list):
        if not path:
            raise UserError("data.path is an empty list; give one or more recording store URLs")
        return [str(p) for p in path]
    fs, root = filesystem(path, storage_options)
    try:
        if fs.exists(join_url(root, "zarr.json")) or not fs.isdir(root):
            return [path]  # a store (or a missing path: open_store says what is wrong)
        children = sorted(p for p in fs.ls(root, detail=False) if fs.exists(join_url(p, "zarr.json")))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: cannot list the storage ({type(err).__name__}: {err})")
    if not children:
        raise UserError(f"{path}: neither a recording store nor a directory of stores; "
                        "create stores with `python -m preprocess.bin_spikes`")
    base = path.rstrip("/")
    return [join_url(base, c.rstrip("/").rsplit("/", 1)[-1]) for c in children]


def _use_memory(cfg: Config, rec: Recording, budget_bytes: float) -> bool:
    mode = cfg.data.loading
    if mode == "auto":
        return rec.in_memory or rec.counts_nbytes_float32 <= budget_bytes
    return mode == "memory"


def build_neural_train_data(cfg: Config, recording: Recording | None = None,
                            normalization: Normalization | list[Normalization] | dict | list[dict] | None = None,
                            rank: int = 0, world_size: int = 1, progress: bool = False, *,
                            needs: DataNeeds) -> NeuralTrainData:
    """Open the stores of ``cfg.data`` (or use ``recording``), split them, fit each
    session's normalisation on its SSL training samples (unless given, e.g. from a
    checkpoint) and build both streams per session, in memory or streamed
    (``data.loading``; ``auto`` keeps sessions in memory while they fit
    ``data.memory_budget_mb`` together), for ``rank`` of ``world_size``.

    ``normalization`` may be a checkpoint's stored state (``checkpoint["normalization"]``).
    """
    d = cfg.data
    if isinstance(normalization, dict) or (isinstance(normalization, list) and normalization
                                           and isinstance(normalization[0], dict)):
        normalization = normalizations_from(normalization)
    if recording is not None:
        recordings = [recording]
    else:
        if not d.path:
            raise UserError("data.path is not set: pass --set data.path=STORE_URL or put it in the config")
        recordings = [open_store(url, d.storage_options, store_id=i, attempts=d.read_retries + 1)
                      for i, url in enumerate(session_urls(d.path, d.storage_options))]
    norms = normalization if isinstance(normalization, list) else [normalization] * len(recordings)
    if len(norms) != len(recordings):
        raise UserError(f"the checkpoint has {len(norms)} sessions, data.path {len(recordings)}; "
                        "use the stores the run was trained on")
    budget = d.memory_budget_mb * (1 << 20)
    sessions = []
    for rec, norm in zip(recordings, norms):
        in_memory = _use_memory(cfg, rec, budget)
        if in_memory and not rec.in_memory:
            budget -= rec.counts_nbytes_float32
        session = _build_session(cfg, rec, norm, rank, world_size, progress, in_memory, needs, budget)
        if session.mining_context is not None and not in_memory:  # a streamed session's bank counts too
            budget -= session.mining_context.nbytes
        sessions.append(session)
    return NeuralTrainData(sessions, seed=cfg.run.seed)


def _check_trained_labels(cfg: Config, rec: Recording, mask: np.ndarray) -> None:
    """A method that trains on the main label (pi-VAE) needs one, with its training values
    below ``method.label_classes`` (-1 = unknown): checked before the run writes anything."""
    name = cfg.method.name
    if rec.main_label is None:
        raise UserError(f"{rec.url}: method.name {name} trains on the main label, and the store has no labels; "
                        "use a store with a label (e.g. the reach target)")
    top = int(rec.labels[rec.main_label][mask].max())
    if top >= cfg.method.label_classes:
        raise UserError(f"{rec.url}: the main label '{rec.main_label}' reaches {top} on the training bins, "
                        f"method.label_classes is {cfg.method.label_classes}; set method.label_classes={top + 1}")


def _build_session(cfg: Config, rec: Recording, normalization: Normalization | None, rank: int, world_size: int,
                   progress: bool, in_memory: bool, needs: DataNeeds, budget: float) -> SessionData:
    """One session's split, normalisation and streams; ``budget``: the bytes of
    ``data.memory_budget_mb`` the sessions before it left (for a streamed session's
    mining-context bank)."""
    d = cfg.data
    splits = split_rows(rec.trial, d.split)
    mask = training_mask(rec, splits["train"], d.min_speed)
    n_samples = int(mask.sum())
    if n_samples == 0:
        raise UserError(f"{rec.url}: no training samples (train split has {len(splits['train'])} bins, "
                        f"none faster than data.min_speed={d.min_speed}); lower data.min_speed")
    if normalization is not None and normalization.mean.shape[0] != rec.n_units:
        raise UserError(f"{rec.url}: has {rec.n_units} units, the checkpoint's normalisation "
                        f"{normalization.mean.shape[0]}; use the store the run was trained on")
    if needs.labels:
        _check_trained_labels(cfg, rec, mask)
    seed, B, sid = cfg.run.seed, cfg.optim.batch_size, rec.store_id
    anchor_seed, order_seed = derive_seed(seed, 1, rank, sid), derive_seed(seed, 4, sid)
    pool_seed = derive_seed(seed, 2, rank, sid)
    # x_m, the third element of an anchor batch: a separate view to mine with, or a method's target
    mining_view = needs.mining_view or needs.target_view is not None
    wants_context = cfg.effective_mining_weight > 0 and cfg.method.mining_context_bins > 0
    need = (MiningContext.bytes_needed(n_samples, cfg.method.mining_context_bins, cfg.model.out_dim)
            if wants_context else 0)
    if not in_memory and need > budget:  # before reading the store
        raise UserError(f"{rec.url}: the mining-context bank (method.mining_context_bins) needs "
                        f"{need / (1 << 20):.1f} MiB for {n_samples} training samples, over what is left of "
                        f"data.memory_budget_mb={d.memory_budget_mb:g}; raise data.memory_budget_mb "
                        "or set method.mining_context_bins=0")
    if needs.temporal and not in_memory:
        raise UserError(f"{rec.url}: method.name {cfg.method.name} draws its pairs from training samples in memory; "
                        "set data.loading=memory if they fit")

    def third_view(augment: Augmenter, normalization: Normalization):
        if needs.target_view == "clean":  # the AE's target: the normalised rates, not augmented
            return no_augmentation(normalization)
        if needs.target_view == "counts":  # pi-VAE's Poisson target
            return CountsView(rec.bin_size_s)
        return augment if cfg.method.mining_augment else no_augmentation(normalization)

    samples = None
    if in_memory:
        rec.load_rates()
        samples = training_samples(rec, np.flatnonzero(mask), d.jitter_max_bins)
        normalization = normalization or Normalization.fit(samples.rates)
        augment = Augmenter(cfg.augment, normalization)
        mining_augment = third_view(augment, normalization)
        if needs.temporal:
            nb, cnt = jitter_table(samples.rows, rec.trial, rec.bin_start_s, rec.bin_size_s,
                                   cfg.method.temporal_pos_bins)
            anchors = TemporalSampler(samples, torch.from_numpy(nb), torch.from_numpy(cnt), augment, B, anchor_seed,
                                      order_seed=order_seed, kind=needs.temporal, rank=rank, world_size=world_size,
                                      neg_gap_s=cfg.method.temporal_neg_bins * rec.bin_size_s,
                                      across_trials=cfg.method.temporal_across_trials)
        else:
            anchors = AnchorSampler(samples, augment, B, anchor_seed, order_seed=order_seed, rank=rank,
                                    world_size=world_size, structured=cfg.augment.structured, mining_view=mining_view,
                                    mining_augment=mining_augment)
        pool = PoolSampler(samples, mining_augment, cfg.method.pool_size, pool_seed)
    else:
        release_freed_blocks()
        settings = StreamSettings(default_block_rows(rec, d.block_rows), d.shuffle_buffer_rows,
                                  d.read_threads, d.read_threads)
        if normalization is None:
            normalization = Normalization.from_stats(*fit_normalization_stats(rec, mask, settings, progress))
        augment = Augmenter(cfg.augment, normalization)
        mining_augment = third_view(augment, normalization)
        anchors = BlockAnchorStream(rec, mask, augment, B, settings, seed=anchor_seed, order_seed=order_seed,
                                    jitter_max_bins=d.jitter_max_bins, rank=rank, world_size=world_size,
                                    structured=cfg.augment.structured, mining_view=mining_view,
                                    mining_augment=mining_augment)
        pool = BlockPoolStream(rec, mask, mining_augment, cfg.method.pool_size, settings, seed=pool_seed,
                               order_seed=derive_seed(seed, 5, rank, sid))
    context = None
    if wants_context:
        # the bank needs only the training rows and the store's metadata (in memory either
        # way), so a streamed session gets it too (its size was checked before the store was read)
        rows = samples.rows if samples is not None else np.flatnonzero(mask)
        context = MiningContext(rows, rec.trial, rec.bin_start_s, rec.bin_size_s,
                                cfg.method.mining_context_bins, cfg.model.out_dim)
    if d.min_trial_gap and not rec.has_trials:
        raise UserError(f"{rec.url}: data.min_trial_gap needs trials and the store has none; "
                        "use data.min_time_gap_s (seconds) instead")
    gap = d.min_time_gap_s
    if gap is None:
        gap = 0.0 if rec.has_trials else (d.jitter_max_bins + 1) * rec.bin_size_s
    log.info("%s: %d bins x %d units (%s); splits train/val/test %d/%d/%d bins; %d SSL training samples; "
             "%d steps per epoch", rec.url, rec.n_rows, rec.n_units, "in memory" if samples else "streamed",
             len(splits["train"]), len(splits["val"]), len(splits["test"]), n_samples, anchors.steps_per_epoch)
    depth = d.prefetch_batches
    return SessionData(rec, splits, normalization, Prefetcher(anchors, depth, "anchors"),
                       Prefetcher(pool, depth, "pool"), float(gap), n_samples, samples, context)
