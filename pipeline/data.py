"""Training data for MYOW on a recording store: splits, normalisation, augmentations and
the two independent samplers.

    store --load_recording--> Recording (every row, in memory)
          --split_rows------> train / val / test rows (by trial order, or time blocks)
          --training_samples-> Samples: the SSL training rows (train split [, moving bins])
    AnchorSampler: epochs of B anchors -> (x1, x2, x_m, meta)
        x1 = t(s), x2 = t'(s') with s' a temporal-jitter neighbour of s in the same trial,
        x_m = t_m(s) a third, independent draw of the anchor itself (T_m = T)
    PoolSampler (own generator and seed): L uniform training samples -> (x_pool, meta_pool)

``meta`` is a dict of (n,) tensors: ``store`` (recording id), ``time`` (bin_start_s),
``trial`` (-1 = none), ``row`` (store row) and ``label`` (the main label, for monitoring
only: labels are never used for training). Samplers are iterators with
``state_dict()/load_state_dict()`` (generator state + epoch/cursor), so a resumed run
draws exactly the batches the uninterrupted run would have drawn.

Everything is held in memory here; a streaming reader for large stores can replace
``Samples`` + the two samplers behind the same ``next(sampler)`` interface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.store import iter_arrays, open_recording

from .config import AugmentConfig, Config

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

__all__ = ["Recording", "load_recording", "hand_speed", "split_rows", "Normalization", "Augmenter",
           "Samples", "training_samples", "jitter_table", "AnchorSampler", "PoolSampler", "TrainData",
           "build_train_data", "derive_seed", "SPLITS"]


# --------------------------------------------------------------------------- recording


@dataclass
class Recording:
    """Every per-bin array of one recording store, in memory (T rows, N units)."""

    url: str
    rates: torch.Tensor  # (T, N) float32 firing rates in Hz (counts / bin_size_s)
    bin_start_s: np.ndarray  # (T,) float64
    trial: np.ndarray  # (T,) int64, -1 = outside trials
    labels: dict[str, np.ndarray]  # name -> (T,) int64
    behavior: dict[str, np.ndarray]  # name -> (T, k) float32
    bin_size_s: float
    store_id: int = 0

    @property
    def n_rows(self) -> int:
        return self.rates.shape[0]

    @property
    def n_units(self) -> int:
        return self.rates.shape[1]

    @property
    def has_trials(self) -> bool:
        return bool((self.trial >= 0).any())

    @property
    def main_label(self) -> str | None:
        """``target`` when present, else the first label by name, else None."""
        if "target" in self.labels:
            return "target"
        return min(self.labels) if self.labels else None


def load_recording(url: str, storage_options: dict | None = None, store_id: int = 0) -> Recording:
    """Read a recording store (DESIGN section 4) into memory; UserError on a bad store."""
    group = open_recording(url, storage_options)
    bin_size = group.attrs.get("bin_size_s")
    if not isinstance(bin_size, (int, float)) or bin_size <= 0:
        raise UserError(f"{url}: attribute 'bin_size_s' is {bin_size!r}; expected a positive number of seconds")
    labels, behavior = {}, {}
    for name, arr in iter_arrays(group):
        if name.startswith("labels/"):
            labels[name.split("/", 1)[1]] = np.asarray(arr[...], dtype=np.int64)
        elif name.startswith("behavior/"):
            values = np.asarray(arr[...], dtype=np.float32)
            behavior[name.split("/", 1)[1]] = values[:, None] if values.ndim == 1 else values
    counts = np.asarray(group["counts"][...])
    rates = torch.from_numpy(counts.astype(np.float32) / np.float32(bin_size))
    return Recording(url=url, rates=rates.contiguous(),
                     bin_start_s=np.asarray(group["bin_start_s"][...], dtype=np.float64),
                     trial=np.asarray(group["trial"][...], dtype=np.int64),
                     labels=labels, behavior=behavior, bin_size_s=float(bin_size), store_id=store_id)


def hand_speed(rec: Recording) -> np.ndarray | None:
    """(T,) norm of ``behavior/velocity`` (cm/s), or None when the store has no velocity."""
    vel = rec.behavior.get("velocity")
    return None if vel is None else np.linalg.norm(vel.astype(np.float64), axis=1)


# --------------------------------------------------------------------------- splits


def _cut(n: int, fractions) -> tuple[int, int]:
    """Numbers of items in train and train+val for ``n`` items (floor, train >= 1)."""
    f_train, f_val = float(fractions[0]), float(fractions[1])
    n_train = max(1, int(np.floor(n * f_train + 1e-9)))
    n_trainval = max(n_train, int(np.floor(n * (f_train + f_val) + 1e-9)))
    return n_train, min(n_trainval, n)


def split_rows(trial: np.ndarray, fractions=(0.7, 0.1, 0.2)) -> dict[str, np.ndarray]:
    """Split store rows into train/val/test by time, never by random rows.

    With trials: trials are ordered by their first row (recording order); the first
    ``floor(n * f_train)`` trials are train, the next ones up to ``floor(n * (f_train +
    f_val))`` val, the rest test. A row outside trials (-1) goes with the last trial
    before it (the first trial's split before the first trial). Without trials: the
    first ``floor(T * f_train)`` rows are train, then val, then test (time blocks).

    Args:
        trial: (T,) int trial id per row, -1 = none.
        fractions: (train, val, test), summing to 1.

    Returns:
        {"train", "val", "test"} -> sorted int64 row indices; every row in exactly one.
    """
    trial = np.asarray(trial)
    T = trial.shape[0]
    split_of = np.zeros(T, dtype=np.int8)
    in_trial = trial >= 0
    if in_trial.any():
        ids, first = np.unique(trial[in_trial], return_index=True)
        rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")  # recording order of each id
        n_train, n_trainval = _cut(len(ids), fractions)
        split_of_rank = np.zeros(len(ids), dtype=np.int8)
        split_of_rank[n_train:n_trainval] = 1
        split_of_rank[n_trainval:] = 2
        row_split = split_of_rank[rank[np.searchsorted(ids, trial[in_trial])]]
        rows_in = np.flatnonzero(in_trial)
        # rows outside trials follow the last trial row before them
        last = np.maximum.accumulate(np.where(in_trial, np.arange(T), -1))
        last[last < 0] = rows_in[0]
        split_of[:] = row_split[np.searchsorted(rows_in, last)]
    elif T:
        n_train, n_trainval = _cut(T, fractions)
        split_of[n_train:n_trainval] = 1
        split_of[n_trainval:] = 2
    return {name: np.flatnonzero(split_of == i).astype(np.int64) for i, name in enumerate(SPLITS)}


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
        mean = x.mean(0)
        std = x.std(0) if x.shape[0] > 1 else torch.zeros_like(mean)
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
    def _rows(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
        """Indices of the rows (each with probability p) an augmentation applies to."""
        if p >= 1:
            return torch.arange(n)
        return (torch.rand(n, generator=generator) < p).nonzero().squeeze(1)

    def dropout_mask(self, n: int, n_units: int, generator: torch.Generator) -> torch.Tensor | None:
        """(n, N) bool, True = unit dropped; per-sample rate ~ U(0, dropout_max), applied
        to a sample with probability dropout_apply_p. None when dropout is off."""
        c = self.cfg
        if c.dropout_max <= 0 or c.dropout_apply_p <= 0:
            return None
        rate = torch.rand(n, 1, generator=generator) * c.dropout_max
        if c.dropout_apply_p < 1:
            rate *= torch.rand(n, 1, generator=generator) < c.dropout_apply_p
        return torch.rand(n, n_units, generator=generator) < rate

    def __call__(self, rates: torch.Tensor, generator: torch.Generator,
                 drop: torch.Tensor | None | bool = True) -> torch.Tensor:
        """Augment and normalise a batch.

        Args:
            rates: (n, N) float32 firing rates (Hz); not modified.
            generator: torch.Generator for every random draw.
            drop: True = draw a dropout mask here; a (n, N) bool mask = use it (structured
                dropout shared between views); None/False = no dropout.

        Returns:
            (n, N) float32 normalised augmented view (a new contiguous tensor).
        """
        c = self.cfg
        n, n_units = rates.shape
        if drop is True:
            drop = self.dropout_mask(n, n_units, generator)
        x = rates.masked_fill(drop, 0.0) if isinstance(drop, torch.Tensor) else rates.clone()
        # Pepper and noise: random numbers are drawn only for the rows they apply to (about
        # half of them by default); generating them is most of the cost of augmentation.
        if c.pepper_p > 0 and c.pepper_apply_p > 0 and c.pepper_value != 0:
            rows = self._rows(n, c.pepper_apply_p, generator)
            pepper = torch.rand(len(rows), n_units, generator=generator) < c.pepper_p
            x.index_add_(0, rows, pepper.to(x.dtype), alpha=c.pepper_value)
        if c.noise_std > 0 and c.noise_apply_p > 0:
            rows = self._rows(n, c.noise_apply_p, generator)
            x.index_add_(0, rows, torch.randn(len(rows), n_units, generator=generator), alpha=c.noise_std)
        return x.sub_(self.mean).mul_(self.inv_std)


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


def jitter_table(rows: np.ndarray, trial: np.ndarray, bin_start_s: np.ndarray, bin_size_s: float,
                 max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Temporal-jitter neighbours of each training sample among the training samples.

    j is a neighbour of i when j != i, both are training samples, they have the same
    trial id (-1 == -1 for recordings without trials), their store rows differ by at
    most ``max_bins`` and their start times by at most (max_bins + 0.5) bins (so a gap in
    the recording is never jumped).

    Args:
        rows: (n,) ascending store rows of the training samples.
        trial, bin_start_s: (T,) per store row.

    Returns:
        neighbors (n, 2*max_bins) int64 positions into ``rows`` (valid first, -1 pad) and
        counts (n,) int64.
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
    order = np.argsort(~ok, axis=1, kind="stable")  # valid columns first
    neighbors = np.take_along_axis(np.where(ok, pos, -1), order, axis=1)
    return neighbors, ok.sum(1).astype(np.int64)


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


def derive_seed(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for stream ``stream`` of run seed ``seed`` (SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 63), *stream]).generate_state(1, np.uint64)[0] >> 1)


def _take_meta(meta: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, idx) for k, v in meta.items()}


# --------------------------------------------------------------------------- samplers


class AnchorSampler:
    """Anchor batches: each epoch is a random permutation of the training samples cut into
    ``steps_per_epoch = max(1, n // B)`` batches of B (the last partial batch is dropped;
    with fewer than B samples, one batch of all of them).

    ``next(sampler)`` -> ``(x1, x2, x_m, meta)``: x1, x2, x_m (B, N) float32 normalised
    views (x2 of a jitter neighbour, x_m a third draw of the anchor; None when
    ``mining_view`` is False, i.e. BYOL), meta of the anchors.
    """

    def __init__(self, samples: Samples, augment: Augmenter, batch_size: int, seed: int,
                 structured: bool = False, mining_view: bool = True):
        if len(samples) == 0:
            raise UserError("no training samples: the train split is empty after filtering "
                            "(check data.split and data.min_speed)")
        self.samples, self.augment, self.structured = samples, augment, structured
        self.mining_view = mining_view
        n = len(samples)
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = max(1, n // batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.cursor = 0, 0
        self.perm = torch.randperm(n, generator=self.generator)

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor positions (B,), positive positions (B,)) into the samples."""
        if self.cursor >= self.steps_per_epoch:
            self.epoch += 1
            self.cursor = 0
            self.perm = torch.randperm(len(self.samples), generator=self.generator)
        B = self.batch_size
        anchor = self.perm[self.cursor * B:(self.cursor + 1) * B]
        self.cursor += 1
        count = self.samples.n_neighbors.index_select(0, anchor)
        u = torch.rand(B, generator=self.generator)
        k = torch.minimum((u * count).long(), (count - 1).clamp(min=0))
        if self.samples.neighbors.shape[1]:
            picked = self.samples.neighbors[anchor, k]
            positive = torch.where(count > 0, picked, anchor)  # no neighbour: the anchor itself
        else:
            positive = anchor.clone()
        return anchor, positive

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        anchor, positive = self.next_indices()
        s, g = self.samples, self.generator
        rates = s.rates.index_select(0, anchor)
        drop = self.augment.dropout_mask(*rates.shape, g) if self.structured else True
        x1 = self.augment(rates, g, drop)
        x2 = self.augment(s.rates.index_select(0, positive), g, drop)
        x_m = self.augment(rates, g, drop) if self.mining_view else None
        return x1, x2, x_m, _take_meta(s.meta, anchor)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "cursor": self.cursor,
                "perm": self.perm.clone()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["perm"]) != len(self.samples):
            raise UserError(f"checkpoint sampler state is for {len(state['perm'])} training samples, "
                            f"the data has {len(self.samples)}; resume with the same data and config")
        self.generator.set_state(state["generator"])
        self.epoch, self.cursor, self.perm = int(state["epoch"]), int(state["cursor"]), state["perm"].clone()


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
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


# --------------------------------------------------------------------------- bundle


@dataclass
class TrainData:
    """Everything training needs from one recording."""

    recording: Recording
    splits: dict[str, np.ndarray]  # store rows per split
    samples: Samples  # the SSL training samples
    normalization: Normalization
    anchors: AnchorSampler
    pool: PoolSampler
    min_time_gap_s: float  # resolved mining time-exclusion window

    @property
    def steps_per_epoch(self) -> int:
        return self.anchors.steps_per_epoch

    def state_dict(self) -> dict:
        return {"anchors": self.anchors.state_dict(), "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.anchors.load_state_dict(state["anchors"])
        self.pool.load_state_dict(state["pool"])


def select_training_rows(rec: Recording, train_rows: np.ndarray, min_speed: float) -> np.ndarray:
    """Train-split rows used for SSL: those with hand speed > min_speed when asked and known."""
    if min_speed <= 0:
        return train_rows
    speed = hand_speed(rec)
    if speed is None:
        log.warning("data.min_speed=%s but %s has no behavior/velocity: training on every bin", min_speed, rec.url)
        return train_rows
    return train_rows[speed[train_rows] > min_speed]


def build_train_data(cfg: Config, recording: Recording | None = None, normalization: Normalization | None = None,
                     rank: int = 0, world_size: int = 1) -> TrainData:
    """Load the store of ``cfg.data`` (unless given), split it, fit the normalisation on the
    SSL training samples (unless given, e.g. from a checkpoint) and build both samplers.

    ``rank``/``world_size`` only decorrelate the samplers' seeds here; a distributed
    sampler will also shard the anchors.
    """
    if recording is None:
        if not cfg.data.path:
            raise UserError("data.path is not set: pass --set data.path=STORE_URL or put it in the config")
        recording = load_recording(cfg.data.path, cfg.data.storage_options)
    splits = split_rows(recording.trial, cfg.data.split)
    rows = select_training_rows(recording, splits["train"], cfg.data.min_speed)
    samples = training_samples(recording, rows, cfg.data.jitter_max_bins)
    if len(samples) == 0:
        raise UserError(f"{recording.url}: no training samples (train split has {len(splits['train'])} bins, "
                        f"none faster than data.min_speed={cfg.data.min_speed}); lower data.min_speed")
    if normalization is None:
        normalization = Normalization.fit(samples.rates)
    if normalization.mean.shape[0] != recording.n_units:
        raise UserError(f"{recording.url}: has {recording.n_units} units, the checkpoint's normalisation "
                        f"{normalization.mean.shape[0]}; use the store the run was trained on")
    augment = Augmenter(cfg.augment, normalization)
    seed = cfg.run.seed
    anchors = AnchorSampler(samples, augment, cfg.optim.batch_size, derive_seed(seed, 1, rank),
                            structured=cfg.augment.structured,
                            mining_view=cfg.effective_mining_weight > 0 and cfg.method.mining_view == "separate")
    pool = PoolSampler(samples, augment, cfg.method.pool_size, derive_seed(seed, 2, rank))
    gap = cfg.data.min_time_gap_s
    if gap is None:
        gap = 0.0 if recording.has_trials else (cfg.data.jitter_max_bins + 1) * recording.bin_size_s
    log.info("%s: %d bins x %d units; splits train/val/test %d/%d/%d bins; %d SSL training samples; "
             "%d steps per epoch", recording.url, recording.n_rows, recording.n_units, len(splits["train"]),
             len(splits["val"]), len(splits["test"]), len(samples), anchors.steps_per_epoch)
    return TrainData(recording, splits, samples, normalization, anchors, pool, float(gap))
