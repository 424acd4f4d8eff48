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
:class:`PoolSampler`; larger ones are streamed by :mod:`pipeline.streams` with
chunk-aligned block reads, a shuffle buffer and reader threads. Either way each stream
runs in a :class:`~pipeline.stages.Prefetcher` thread, so the trainer only waits for
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

from preprocess.errors import UserError
from preprocess.store import filesystem, join_url

from .config import AugmentConfig, Config
from .recording import SPLITS, Recording, hand_speed, load_recording, open_store, split_rows
from .context import MiningContext
from .jitter import draw_positives, jitter_table
from .stages import EpochCursor, Prefetcher, derive_seed
from .streams import (BlockAnchorStream, BlockPoolStream, StreamSettings, default_block_rows, fit_normalization_stats,
                      release_freed_blocks)

log = logging.getLogger(__name__)

__all__ = ["Recording", "load_recording", "open_store", "hand_speed", "split_rows", "Normalization", "Augmenter",
           "Samples", "training_samples", "jitter_table", "draw_positives", "AnchorSampler", "PoolSampler",
           "SessionData", "TrainData", "normalization_state", "normalizations_from", "build_train_data", "session_urls", "derive_seed", "training_mask", "SPLITS",
           "data_kind"]


# --------------------------------------------------------------------------- normalisation / augmentation


@dataclass
class Normalization:
    """Per-unit z-scoring of firing rates with statistics of the SSL training samples.

    Stored in checkpoints and reused by evaluation. Units with std 0 get std 1 (they are
    only shifted), so a unit silent in training cannot blow up at test time.
    """

    mean: torch.Tensor  # (N,) float32, Hz
    std: torch.Tensor  # (N,) float32, Hz (> 0)

    @classmethod
    def fit(cls, rates: torch.Tensor) -> "Normalization":
        """Mean and unbiased std per unit of ``rates`` (n, N)."""
        x = rates.double()
        return cls.from_stats(x.mean(0), x.std(0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=x.dtype))

    @classmethod
    def from_stats(cls, mean: torch.Tensor, std: torch.Tensor) -> "Normalization":
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return cls(mean.float().contiguous(), std.float().contiguous())

    def __call__(self, rates: torch.Tensor) -> torch.Tensor:
        """(n, N) Hz -> (n, N) z-scores (new tensor)."""
        return (rates - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalization":
        return cls(state["mean"].float().contiguous(), state["std"].float().contiguous())


def normalization_state(norms: list[Normalization]) -> dict | list[dict]:
    """What a checkpoint stores: one state dict, or a list of them for several sessions."""
    return norms[0].state_dict() if len(norms) == 1 else [n.state_dict() for n in norms]


def normalizations_from(state: dict | list[dict]) -> Normalization | list[Normalization]:
    """The inverse of :func:`normalization_state`."""
    if isinstance(state, list):
        return [Normalization.from_state_dict(s) for s in state]
    return Normalization.from_state_dict(state)


class Augmenter:
    """Neural-data augmentations on whole batches (vectorised; no loop over samples).

    Order (myow-neuro ``get_neural_transform``, paper App. J): randomized dropout ->
    pepper -> Gaussian noise, all on raw rates in Hz, then z-scoring. So a dropped unit is
    0 Hz *before* normalisation (-mean/std after), and the noise scale is in Hz.
    Every sample draws its own dropout rate, masks and apply-decisions.
    """

    def __init__(self, cfg: AugmentConfig, norm: Normalization):
        self.cfg = cfg
        self.mean = norm.mean
        self.inv_std = 1.0 / norm.std

    @staticmethod
    def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
        """A numpy generator seeded by one draw of ``generator``.

        Masks come from uniform 16-bit integers of SFC64, a third of the cost of
        ``torch.rand``'s floats (drawing random numbers is most of the cost of augmenting).
        Seeding it from ``generator`` keeps the torch generator the only state to save.
        """
        return np.random.Generator(np.random.SFC64(int(torch.randint(0, 2**62, (1,), generator=generator))))

    @staticmethod
    def _bernoulli(rng: np.random.Generator, shape: tuple[int, ...], p: float | np.ndarray) -> torch.Tensor:
        """Bool tensor of ``shape``, True with probability ``p`` (a float, or an array that
        broadcasts against ``shape``) to 1/65536: a uniform 16-bit integer < floor(p * 65536)."""
        threshold = np.floor(np.asarray(p, dtype=np.float64) * 65536.0)
        if threshold.ndim == 0:  # a Python int compares exactly, even at 65536 (p = 1)
            return torch.from_numpy(rng.integers(0, 65536, shape, dtype=np.uint16) < int(threshold))
        return torch.from_numpy(rng.integers(0, 65536, shape, dtype=np.uint16) < threshold.astype(np.uint32))

    @classmethod
    def _rows(cls, n: int, p: float, rng: np.random.Generator) -> torch.Tensor:
        """Indices of the rows (each with probability p) an augmentation applies to."""
        if p >= 1:
            return torch.arange(n)
        return cls._bernoulli(rng, (n,), p).nonzero().squeeze(1)

    def dropout_mask(self, n: int, n_units: int, generator: torch.Generator) -> torch.Tensor | None:
        """(n, N) bool, True = unit dropped; per-sample rate ~ U(0, dropout_max), applied
        to a sample with probability dropout_apply_p. None when dropout is off."""
        c = self.cfg
        if c.dropout_max <= 0 or c.dropout_apply_p <= 0:
            return None
        rng = self._numpy_rng(generator)
        rate = rng.random((n, 1)) * c.dropout_max
        if c.dropout_apply_p < 1:
            rate *= rng.random((n, 1)) < c.dropout_apply_p
        return self._bernoulli(rng, (n, n_units), rate)

    def __call__(self, rates: torch.Tensor, generator: torch.Generator,
                 drop: torch.Tensor | None | bool = True) -> torch.Tensor:
        """Augment and normalise a batch.

        Args:
            rates: (n, N) float32 firing rates (Hz); not modified.
            generator: torch.Generator for every random draw.
            drop: True = draw a dropout mask here; a (n, N) bool mask = use it (structured
                dropout shared between views; ignored by an augmenter without dropout, e.g.
                T_m = identity, :func:`no_augmentation`); None/False = no dropout.

        Returns:
            (n, N) float32 normalised augmented view (a new contiguous tensor).
        """
        c = self.cfg
        n, n_units = rates.shape
        if drop is True:
            drop = self.dropout_mask(n, n_units, generator)
        drops_units = isinstance(drop, torch.Tensor) and c.dropout_max > 0 and c.dropout_apply_p > 0
        x = rates.masked_fill(drop, 0.0) if drops_units else rates.clone()
        # Pepper and noise: random numbers are drawn only for the rows they apply to (about
        # half of them by default).
        if c.pepper_p > 0 and c.pepper_apply_p > 0 and c.pepper_value != 0:
            rng = self._numpy_rng(generator)
            rows = self._rows(n, c.pepper_apply_p, rng)
            pepper = self._bernoulli(rng, (len(rows), n_units), c.pepper_p)
            x.index_add_(0, rows, pepper.to(x.dtype), alpha=c.pepper_value)
        if c.noise_std > 0 and c.noise_apply_p > 0:
            rows = self._rows(n, c.noise_apply_p, self._numpy_rng(generator))
            # torch's vectorised normal_ is faster than numpy's ziggurat for float32
            x.index_add_(0, rows, torch.randn(len(rows), n_units, generator=generator), alpha=c.noise_std)
        return x.sub_(self.mean).mul_(self.inv_std)


def no_augmentation(norm: Normalization) -> Augmenter:
    """T_m = identity: an Augmenter that only normalises (``method.mining_augment: false``)."""
    return Augmenter(AugmentConfig(dropout_max=0.0, noise_std=0.0, pepper_p=0.0), norm)


# --------------------------------------------------------------------------- training samples


@dataclass
class Samples:
    """The SSL training samples (n of them), gathered once into contiguous tensors."""

    rows: np.ndarray  # (n,) int64 store rows, ascending
    rates: torch.Tensor  # (n, N) float32 Hz
    meta: dict[str, torch.Tensor]  # each (n,): store, time, trial, row [, label]
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
        "row": idx.clone(),
    }
    if rec.main_label is not None:
        meta["label"] = torch.from_numpy(rec.labels[rec.main_label][rows].copy())
    return Samples(rows=rows, rates=rec.rates.index_select(0, idx).contiguous(), meta=meta,
                   neighbors=torch.from_numpy(nb), n_neighbors=torch.from_numpy(cnt))


def _take_meta(meta: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, idx) for k, v in meta.items()}


# --------------------------------------------------------------------------- in-memory samplers


class AnchorSampler:
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
        n = len(samples)
        if n < world_size:
            raise UserError(f"{n} training samples cannot be shared by {world_size} ranks")
        self.samples, self.augment, self.structured, self.mining_view = samples, augment, structured, mining_view
        self.mining_augment = mining_augment or augment  # T_m of x_m
        self.cursor = EpochCursor(n, batch_size, order_seed, rank, world_size)
        self.batch_size, self.steps_per_epoch = self.cursor.batch_size, self.cursor.steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor positions (B,), positive positions (B,)) into the samples."""
        anchor = self.cursor.next()
        s = self.samples
        return anchor, draw_positives(anchor, s.neighbors, s.n_neighbors, self.generator)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        anchor, positive = self.next_indices()
        s, g = self.samples, self.generator
        rates = s.rates.index_select(0, anchor)
        drop = self.augment.dropout_mask(*rates.shape, g) if self.structured else True
        x1 = self.augment(rates, g, drop)
        x2 = self.augment(s.rates.index_select(0, positive), g, drop)
        x_m = self.mining_augment(rates, g, drop) if self.mining_view else None
        return x1, x2, x_m, _take_meta(s.meta, anchor)

    def state_dict(self) -> dict:
        return {"kind": "memory", "generator": self.generator.get_state(), **self.cursor.state_dict(),
                "n_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "memory" or state["n_samples"] != len(self.samples):
            raise UserError(f"the checkpoint's anchor stream state is for {state.get('n_samples')} training samples "
                            f"({state.get('kind')} loading), the data has {len(self.samples)} in memory; "
                            "resume with the same data and config")
        self.generator.set_state(state["generator"])
        self.cursor.load_state_dict(state)


class PoolSampler:
    """Candidate pools for mining, independent of the anchors (own generator and seed).

    ``next(sampler)`` -> ``(x_pool (L, N), meta_pool)``: L training samples drawn uniformly
    (without replacement when L <= n, with replacement otherwise), each augmented by its
    own draw of T_m.
    """

    def __init__(self, samples: Samples, augment: Augmenter, pool_size: int, seed: int):
        if len(samples) == 0:
            raise UserError("no training samples for the mining pool")
        self.samples, self.augment, self.pool_size = samples, augment, pool_size
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, L, g = len(self.samples), self.pool_size, self.generator
        idx = torch.randperm(n, generator=g)[:L] if L <= n else torch.randint(n, (L,), generator=g)
        self.draws += 1
        x = self.augment(self.samples.rates.index_select(0, idx), g)
        return x, _take_meta(self.samples.meta, idx)

    def state_dict(self) -> dict:
        return {"kind": "memory", "generator": self.generator.get_state(), "draws": self.draws,
                "n_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "memory" or state["n_samples"] != len(self.samples):
            raise UserError("the checkpoint's pool stream state does not match the data; "
                            "resume with the same data and config")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


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
class TrainData:
    """The sessions of a run and the order they are trained in.

    A multi-session dataset (``data.path`` a list of stores, or a directory of stores) is
    batched per session: each step draws its anchors AND its pool from one session,
    picked by :meth:`session_at` with probability proportional to the session's training
    samples (a pure function of (seed, step): the same on every rank and after a resume).
    Units differ between sessions, so the model reads each session in through its own
    input layer (:class:`model.SessionEncoder`). The single-session attributes
    (``recording``, ``anchors``, ...) are those of session 0.
    """

    sessions: list[SessionData]
    seed: int = 0

    #: what the data is ("neural" here; :class:`pipeline.images.ImageTrainData` is "images").
    #: The trainer only talks to a TrainData through the members below, so both kinds share
    #: one loop, one ``train_step`` and one checkpoint format.
    kind = "neural"

    def __getattr__(self, name: str):
        if name == "sessions":
            raise AttributeError(name)
        return getattr(self.sessions[0], name)

    def model_input(self) -> int | list[int]:
        """What :func:`pipeline.build.build_model` sizes the encoder's input from: the units
        of the store, or every session's unit count."""
        units = [s.recording.n_units for s in self.sessions]
        return units if self.multi else units[0]

    def normalization_state(self) -> dict | list[dict]:
        """The normalisation a checkpoint stores (evaluation and resume reuse it)."""
        return normalization_state([s.normalization for s in self.sessions])

    def evaluate(self, model, cfg: Config, *, device, run_dir, plots: bool = False) -> dict:
        """Read-outs of every session (:func:`pipeline.evaluate.evaluate_sessions`)."""
        from .evaluate import evaluate_sessions

        return evaluate_sessions(model, self.sessions, cfg, device=device, run_dir=run_dir, plots=plots)

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

    @property
    def data_wait_seconds(self) -> float:
        """Time the trainer spent blocked on the streams so far."""
        return sum(s.anchors.wait_seconds + s.pool.wait_seconds for s in self.sessions)

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


def data_kind(cfg: Config) -> str:
    """``data.kind``, with ``auto`` resolved: "images" when data.path holds an image shard set
    (index.json, or train/val/test sub-folders with one), else "neural" (a recording store,
    a list or a directory of stores; a missing path is left to the store reader to report)."""
    kind = cfg.data.kind
    if kind != "auto":
        return kind
    path = cfg.data.path
    if not path or isinstance(path, list):
        return "neural"
    try:
        fs, root = filesystem(path, cfg.data.storage_options)
        if fs.exists(join_url(root, "zarr.json")):
            return "neural"
        markers = [join_url(root, "index.json")] + [join_url(root, s, "index.json") for s in ("train", "val", "test")]
        return "images" if any(fs.exists(m) for m in markers) else "neural"
    except Exception:  # noqa: BLE001 - unreachable storage: the store reader says what is wrong
        return "neural"


def _use_memory(cfg: Config, rec: Recording, budget_bytes: float) -> bool:
    mode = cfg.data.loading
    if mode == "auto":
        return rec.in_memory or rec.counts_nbytes_float32 <= budget_bytes
    return mode == "memory"


def build_train_data(cfg: Config, recording: Recording | None = None,
                     normalization: Normalization | list[Normalization] | dict | list[dict] | None = None,
                     rank: int = 0, world_size: int = 1, progress: bool = False) -> TrainData:
    """Open the stores of ``cfg.data`` (or use ``recording``), split them, fit each
    session's normalisation on its SSL training samples (unless given, e.g. from a
    checkpoint) and build both streams per session, in memory or streamed
    (``data.loading``; ``auto`` keeps sessions in memory while they fit
    ``data.memory_budget_mb`` together), for ``rank`` of ``world_size``.

    Image shard sets (:func:`data_kind` "images") are handed to
    :func:`pipeline.images.build_image_train_data`, which returns the same interface.
    ``normalization`` may be a checkpoint's stored state (``checkpoint["normalization"]``).
    """
    d = cfg.data
    if recording is None and data_kind(cfg) == "images":
        from .images import build_image_train_data

        return build_image_train_data(cfg, normalization, rank=rank, world_size=world_size)
    if isinstance(normalization, dict) or (isinstance(normalization, list) and normalization
                                           and isinstance(normalization[0], dict)):
        if isinstance(normalization, dict) and normalization.get("kind") == "images":
            raise UserError("the checkpoint was written by a run on image shards, data.path is a recording store; "
                            "resume with the same data, or use another run.dir to start over")
        normalization = normalizations_from(normalization)
    if cfg.model.encoder != "mlp":
        raise UserError(f"data.path is neural data (recording stores): model.encoder must be mlp, not "
                        f"{cfg.model.encoder!r} (image encoders need image shards)")
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
        sessions.append(_build_session(cfg, rec, norm, rank, world_size, progress, in_memory))
    return TrainData(sessions, seed=cfg.run.seed)


def _build_session(cfg: Config, rec: Recording, normalization: Normalization | None, rank: int, world_size: int,
                   progress: bool, in_memory: bool) -> SessionData:
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
    seed, B, sid = cfg.run.seed, cfg.optim.batch_size, rec.store_id
    anchor_seed, order_seed = derive_seed(seed, 1, rank, sid), derive_seed(seed, 4, sid)
    pool_seed = derive_seed(seed, 2, rank, sid)
    mining_view = cfg.effective_mining_weight > 0 and cfg.method.mining_view == "separate"
    samples = None
    if in_memory:
        rec.load_rates()
        samples = training_samples(rec, np.flatnonzero(mask), d.jitter_max_bins)
        normalization = normalization or Normalization.fit(samples.rates)
        augment = Augmenter(cfg.augment, normalization)
        mining_augment = augment if cfg.method.mining_augment else no_augmentation(normalization)
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
        mining_augment = augment if cfg.method.mining_augment else no_augmentation(normalization)
        anchors = BlockAnchorStream(rec, mask, augment, B, settings, seed=anchor_seed, order_seed=order_seed,
                                    jitter_max_bins=d.jitter_max_bins, rank=rank, world_size=world_size,
                                    structured=cfg.augment.structured, mining_view=mining_view,
                                    mining_augment=mining_augment)
        pool = BlockPoolStream(rec, mask, mining_augment, cfg.method.pool_size, settings, seed=pool_seed,
                               order_seed=derive_seed(seed, 5, rank, sid))
    context = None
    if cfg.effective_mining_weight > 0 and cfg.method.mining_context_bins > 0:
        if samples is None:
            raise UserError(f"{rec.url}: method.mining_context_bins needs the training samples in memory "
                            "(its bank holds one representation per sample); set data.loading=memory if they fit, "
                            "or method.mining_context_bins=0")
        context = MiningContext(samples.rows, rec.trial, rec.bin_start_s, rec.bin_size_s,
                                cfg.method.mining_context_bins, cfg.model.out_dim)
    gap = d.min_time_gap_s
    if gap is None:
        gap = 0.0 if rec.has_trials else (d.jitter_max_bins + 1) * rec.bin_size_s
    log.info("%s: %d bins x %d units (%s); splits train/val/test %d/%d/%d bins; %d SSL training samples; "
             "%d steps per epoch", rec.url, rec.n_rows, rec.n_units, "in memory" if samples else "streamed",
             len(splits["train"]), len(splits["val"]), len(splits["test"]), n_samples, anchors.steps_per_epoch)
    depth = d.prefetch_batches
    return SessionData(rec, splits, normalization, Prefetcher(anchors, depth, "anchors"),
                       Prefetcher(pool, depth, "pool"), float(gap), n_samples, samples, context)
