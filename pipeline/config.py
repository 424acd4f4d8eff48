"""Run configuration: one dataclass per stage under one top-level :class:`Config`.

A config is built from defaults, then a YAML file (``--config FILE``), then repeated
``--set key=value`` overrides (the value is parsed as a YAML scalar or flow list/map,
so ``--set optim.lr=2.0e-3``, ``--set data.split=[0.8,0.1,0.1]`` and
``--set run.dir=null`` all work). Unknown keys and values of the wrong type are
reported as one line naming the key (``unknown config key 'optim.lrr'``); cross-field
rules (positive batch size, split fractions summing to 1, ...) are checked by
:meth:`Config.validate` when the config is built.

The resolved config is written to ``config.yaml`` in the run directory and stored (as a
plain dict) in every checkpoint, so a run can be evaluated or resumed on its own.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from model.methods import METHOD_NAMES, NEURAL_ONLY_METHODS

from .config_parse import ConfigError, apply_values, nest_key, parse_override, read_yaml

__all__ = ["Config", "ConfigError", "load_config", "build_config", "config_to_dict", "dump_config", "read_yaml",
           "METHODS", "OPTIMIZERS", "EMA_SCHEDULES", "LR_SCHEDULES", "TARGET_INITS", "DEVICES", "DATA_KINDS",
           "ENCODERS", "IMAGE_ENCODERS",
           "TRANSFORMS"]

METHODS = METHOD_NAMES  # model.methods: the methods the trainer knows
OPTIMIZERS = ("adamw", "sgd")
EMA_SCHEDULES = ("cosine", "constant")
LR_SCHEDULES = ("warmup_cosine", "constant")
TARGET_INITS = ("copy", "reinit")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("auto", "neural", "images")
IMAGE_ENCODERS = ("convnet", "resnet18", "resnet50")  # model/encoders.py; "mlp" is for neural data
ENCODERS = ("mlp", *IMAGE_ENCODERS)
# the view transform sets of pipeline.data.image_views.TRANSFORM_SETS (kept in step by a test; listed
# here so that reading a config never imports torch)
TRANSFORMS = ("cifar", "imagenet", "mnist", "mnist-all", "dsprites", "dsprites-local")
IMAGE_SELECTIONS = ("train", "val", "test")
ARCHITECTURES = ("cascaded", "parallel", "single")
MINING_VIEWS = ("separate", "anchor")
POOLS = ("independent", "batch")
MINING_SPACES = ("target", "online")
LOADINGS = ("auto", "memory", "stream")

# Upper bounds checked by Config.validate: values above them cannot be meant and would
# otherwise allocate gigabytes (or overflow) before failing with a traceback.
MAX_SEED = 2**63 - 1  # run.seed: 0 .. 2**63 - 1 (torch and numpy seed ranges)
MAX_WIDTH = 65536  # model.hidden_dim, out_dim, predictor_hidden, mined_predictor_hidden, projector dims
MAX_BLOCKS = 64  # model.num_blocks
MAX_JITTER_BINS = 1000  # data.jitter_max_bins
MAX_SAMPLES = 2**20  # optim.batch_size, method.pool_size, method.k
MAX_PAIRS = 2**32  # optim.batch_size x method.pool_size: the (B, L) mining masks
MAX_WEIGHTS = 2**30  # estimated weights of the mlp encoder body, and of the projector/predictor heads


# --------------------------------------------------------------------------- stages


@dataclass
class DataConfig:
    # recording store URL (path, file://, s3://, memory://), a list of store URLs, or a
    # directory/prefix of stores: several stores = a multi-session dataset (see pipeline.data);
    # or an image shard set written by preprocess.shard_images (see the images section)
    path: str | list[str] | None = None
    # auto: index.json at data.path (or in its train/val/test sub-folders) = images; a
    # recording store (zarr.json), a list or a directory of stores = neural
    kind: str = "auto"
    storage_options: dict = field(default_factory=dict)  # fsspec options for path
    # train/val/test fractions: by trial order (recording order of first bin), or by time
    # blocks when the store has no trials. The test split is never used for tuning.
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    # SSL trains only on bins with |velocity| > min_speed (cm/s) when > 0 and the store has
    # behavior/velocity (myow-neuro trains on moving bins only); 0 = every training bin.
    min_speed: float = 0.0
    # Mining never pairs an anchor with a candidate closer than this in time (seconds).
    # null = auto: 0 when the store has trials (the same-trial rule already covers the
    # temporal neighbourhood), (jitter_max_bins + 1) bins when it has none.
    min_time_gap_s: float | None = None
    # Mining never pairs an anchor with a candidate fewer than this many trials away, in
    # recording order (trial data only): 0 = off (the paper: only the anchor's own trial is
    # excluded, as 1). Counted in trials, not seconds, so a setting means the same whatever
    # the bins' clock: real times, or the row-index times of a file that holds only some
    # bins of each trial.
    min_trial_gap: int = 0
    # Temporal jitter: the positive view is a training bin of the same trial within
    # +-jitter_max_bins bins (paper: "within 200 ms" = 2 bins of 100 ms).
    jitter_max_bins: int = 2
    # How counts are read: "memory" = once into memory; "stream" = block by block
    # (chunk-aligned reads, a shuffle buffer, reader threads); "auto" = memory when the
    # counts fit memory_budget_mb as float32, else stream.
    loading: str = "auto"
    memory_budget_mb: float = 1024.0
    block_rows: int = 0  # rows per block read when streaming; 0 = whole chunks of >= 4 MiB
    shuffle_buffer_rows: int = 16384  # rows (from many blocks) batches are drawn from
    read_threads: int = 4  # block reads in flight (threads: fsspec/s3fs are not fork-safe)
    read_retries: int = 4  # extra attempts on transient storage errors (exponential backoff)
    prefetch_batches: int = 2  # batches each stream prepares ahead in a background thread


@dataclass
class AugmentConfig:
    """Augmentations in firing-rate units (Hz = counts / bin_size), applied BEFORE the
    z-scoring, in the order dropout -> pepper -> noise -> normalise (myow-neuro; paper
    App. D/J). Every sample of a batch draws its own augmentation."""

    dropout_max: float = 0.2  # per-sample dropout rate ~ U(0, dropout_max)
    dropout_apply_p: float = 1.0  # probability that a sample gets dropout at all
    structured: bool = False  # True: x1, x2 and x_m share one dropout mask (paper Fig. S1)
    noise_std: float = 1.5  # Gaussian noise std (Hz)
    noise_apply_p: float = 0.5
    pepper_p: float = 0.3  # per-unit probability of adding pepper_value
    pepper_value: float = 1.5  # Hz
    pepper_apply_p: float = 0.5


@dataclass
class ModelConfig:
    # mlp (neural data) | convnet (small, CPU-friendly) | resnet18 | resnet50 (CIFAR variant,
    # paper App. C; channels_last on CUDA); image encoders take their input channels from the data
    encoder: str = "mlp"
    hidden_dim: int = 64  # mlp only
    num_blocks: int = 4  # mlp only: Linear-BN-ReLU blocks, then Linear(out_dim) (paper App. D)
    out_dim: int = 32  # representation size D of mlp / convnet (resnet18: 512, resnet50: 2048)
    predictor_hidden: int = 128  # q = MLP(Z, predictor_hidden, Z)
    mined_predictor_hidden: int | None = None  # r; null = predictor_hidden
    projector: list[int] | None = None  # [hidden, out] of g, or null (no projector, paper neural setting)
    mined_projector: list[int] | None = None  # [hidden, out] of h, or null
    architecture: str = "cascaded"  # cascaded | parallel | single (paper App. G)
    # The target network at step 0: "copy" = the online network's weights (Algorithm 1:
    # xi <- theta); "reinit" = the target encoder drawn afresh (myow-neuro calls
    # target_encoder.reset_parameters() after copying; an ablation of that deviation).
    target_init: str = "copy"
    dropout: float = 0.0  # encoder dropout; only the supervised baseline uses it


@dataclass
class MethodConfig:
    name: str = "myow"  # myow | byol (same code, mining weight forced to 0) | simclr | rp | ts | ae | pivae | supervised
    k: int = 5  # mined view drawn uniformly among the k nearest candidates
    pool_size: int = 1024  # L, candidates per step (per rank)
    mining_weight: float = 1.0  # lambda
    mining_warmup_epochs: float = 0.0  # lambda = 0 during these epochs
    mining_ramp_epochs: float = 10.0  # then a linear ramp to mining_weight
    # The anchors' mining input x_m: "separate" = a third draw t_m(s) (paper Algorithm 1);
    # "anchor" = view 1 itself, reusing its online representation (myow-neuro; cheaper).
    mining_view: str = "separate"
    # Where the candidates come from: "independent" = a pool of pool_size training samples
    # drawn by their own stream (paper App. B); "batch" = the step's own anchors (view 1),
    # as myow-neuro does (no pool stream; pool_size is unused).
    pool: str = "independent"
    # The candidates' representation: "target" y' = f'(x) (paper, cheaper) or "online"
    # y = f(x) without gradient (paper App. F, Table S2).
    mining_space: str = "target"
    # T_m, the augmentation of the mining inputs (the anchors' separate mining view and the
    # candidates): true = T (paper, neural data); false = none (the normalised rates).
    mining_augment: bool = True
    # Mining by temporal context: the k-NN search compares representations averaged over
    # each sample's +-W within-trial neighbours (a bank of target representations; see
    # pipeline/context.py). 0 = single bins (paper). Sessions must be held in memory.
    mining_context_bins: int = 0
    # Mutual neighbours: a candidate among an anchor's k nearest is kept only if that anchor
    # is also among the candidate's mining_mutual_k nearest anchors of the batch (a
    # precision filter; anchors left without one are dropped from the mined loss). 0 = off.
    mining_mutual_k: int = 0
    # Confidence filter: only this share of the anchors, those whose nearest allowed
    # candidate is most similar, keep their mined view (the others are left out of the
    # mined loss). 1 = every anchor (paper).
    mining_keep_fraction: float = 1.0
    # The mined loss predicts the mean of all k nearest candidates' target projections
    # instead of one of them drawn at random (paper). false = the paper's random pick.
    mining_all_k: bool = False
    # With mining_context_bins: the mined loss's target is the picked candidate's context
    # average (its +-W neighbours' banked target representations with its own) instead of
    # the single bin. false = the single bin (what the paper predicts).
    mining_context_target: bool = False
    # DIAGNOSTIC ONLY, never a method: mine only among candidates with the anchor's label
    # (labels are otherwise never used for training). benchmarks/mining_diagnosis.py.
    oracle: bool = False
    # DIAGNOSTIC ONLY, with oracle: this share of the anchors (drawn each step) mine only among
    # candidates of ANOTHER label, so the oracle's precision matches a label-free miner's.
    oracle_error_rate: float = 0.0
    # SimCLR: temperature of the NT-Xent loss (model/simclr.py).
    temperature: float = 0.1
    # RP / TS (model/temporal.py, pipeline/data/temporal.py): close = within +-temporal_pos_bins
    # in the same trial; far = >= temporal_neg_bins away in it, or in another trial when
    # temporal_across_trials (never in another recording).
    temporal_pos_bins: int = 2
    temporal_neg_bins: int = 10
    temporal_across_trials: bool = True
    # pi-VAE (model/pivae.py): classes of the main label (labels 0..label_classes-1; -1 =
    # unknown), latent size Z, weight of the KL term.
    label_classes: int = 0
    latent_dim: int = 32
    kl_weight: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 2.0e-3
    weight_decay: float = 2.0e-5
    warmup_epochs: float = 100.0  # linear lr warm-up, then cosine decay to 0
    batch_size: int = 512  # B, anchors per step (per rank)
    momentum: float = 0.9  # sgd only
    ema_base_tau: float = 0.98  # target EMA momentum at step 0
    ema_schedule: str = "cosine"  # cosine: base_tau -> 1; constant: base_tau
    # warmup_cosine: linear warm-up then cosine decay to 0 (paper); constant: optim.lr on every
    # step (what myow-neuro's script does: it computes its schedule but never applies it)
    lr_schedule: str = "warmup_cosine"


@dataclass
class TrainConfig:
    epochs: int = 1000
    max_steps: int | None = None  # overrides epochs when set
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    # An ablation of a myow-neuro behaviour, off (null) by default: after this many epochs the
    # online encoder is put in eval mode for the rest of training (its BatchNorm layers use,
    # and stop updating, their running statistics). Their first linear evaluation does that
    # at epoch 200 of 10000 and nothing puts the encoder back in train mode.
    freeze_encoder_bn_epochs: float | None = None


@dataclass
class RunConfig:
    dir: str | None = None  # null = runs/<method>-<timestamp>
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    threads: int = 0  # torch (and BLAS) threads; 0 = auto: 1 for recordings, cores - 1 for images (pipeline.runtime.set_threads)
    resume: bool = True  # continue from dir/checkpoint.pt when it exists
    progress: bool = True  # tqdm progress bar
    amp: bool = False  # bf16 autocast of the forward passes (GPUs with bf16; off on CPUs)
    sync_bn: bool = False  # BatchNorm statistics over all ranks (SyncBatchNorm; CUDA only)
    dist_timeout_s: float = 1800.0  # a collective waiting longer than this fails instead of hanging


@dataclass
class MetricsConfig:
    port: int = 0  # Prometheus endpoint; 0 disables (each rank serves on port + LOCAL_RANK)
    host: str = "127.0.0.1"


@dataclass
class ImagesConfig:
    """Image shard sets (``data.kind: images``; read by :mod:`pipeline.data.images`).

    What is trained on and what is evaluated on: a *selection* is a split sub-folder of
    ``data.path`` (``train``/``val``/``test``, as preprocess.shard_images writes them, or
    null = data.path itself) and an optional ``[lo, hi)`` range of its sample indices.
    ``auto``: train on ``train`` (else data.path itself, else its only split), evaluate on
    ``test`` (else ``val``); when both are the same set (e.g. the MNIST t10k shards alone)
    and no ranges are given, its last ``eval_fraction`` of samples is the eval selection
    and the rest the training one (10000 -> 8000 / 2000). The two never overlap. The
    linear probe's hyper-parameters are chosen on a split of the TRAINING selection only.

    Loading is configured by the shared data.* keys: ``data.loading`` / ``data.memory_budget_mb``
    (decoded uint8 images in memory when they fit, else streamed from the shards),
    ``data.read_threads``, ``data.read_retries``, ``data.prefetch_batches``,
    ``data.storage_options``. The neural keys (split, jitter, min_speed, augment.*) are unused.
    """

    transform: str = "cifar"  # view transforms T / T_m: cifar | imagenet | mnist (crop only) | mnist-all
    image_size: int | None = None  # side S of the views; null = the images' own side
    # per-channel normalisation: preset (the transform set's constants) | fit (from the
    # training images) | [[mean, ...], [std, ...]]
    normalize: str | list[list[float]] = "preset"
    train_split: str | None = "auto"  # auto | train | val | test | null (data.path itself)
    eval_split: str | None = "auto"
    # [lo, hi) sample indices of the split (Python slice rules: negative = from the end,
    # null = open end), e.g. [0, 8000] and [8000, null]; null = all (or the rest, see above)
    train_range: list[int | None] | None = None
    eval_range: list[int | None] | None = None
    eval_fraction: float = 0.2  # held out when train and eval are one set without ranges
    shuffle_buffer: int | None = None  # streamed: decoded images drawn from; null = auto (<= 10000)
    augment_threads: int = 1  # intra-op threads of each stream's augmenting thread; 0 = torch's default


@dataclass
class EvalConfig:
    tasks: str | list[str] = "auto"  # auto = every task the data has; or e.g. [reach, target]
    reach_min_speed: float = 5.0  # reach read-out only on bins with hand speed > this (cm/s)
    tsne: bool = True  # t-SNE plot at the end of training / in pipeline.evaluate
    knn_k: int = 200  # images: weighted kNN monitor, k neighbours ...
    knn_temperature: float = 0.1  # ... weighted by exp(cosine / temperature)
    mining_anchors: int = 1000  # images: eval anchors mined against a training pool for the figures


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)

    @property
    def effective_mining_weight(self) -> float:
        """lambda actually used: ``method.mining_weight``, or 0 for BYOL (same code path)."""
        return float(self.method.mining_weight) if self.method.name == "myow" else 0.0

    def validate(self) -> "Config":
        """Cross-field checks; raises ConfigError naming the key."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config key '{key}': {msg}")

        d, a, m, me, o, t, r = self.data, self.augment, self.model, self.method, self.optim, self.train, self.run
        for key, value in _float_values(self):
            need(math.isfinite(value), key, f"must be a finite number, got {value}")
        need(len(d.split) == 3, "data.split", f"needs 3 fractions (train, val, test), got {d.split}")
        need(all(f >= 0 for f in d.split), "data.split", f"fractions must be >= 0, got {d.split}")
        need(math.isclose(sum(d.split), 1.0, abs_tol=1e-6), "data.split", f"fractions must sum to 1, got {d.split}")
        need(d.split[0] > 0, "data.split", "the train fraction must be > 0")
        need(d.min_speed >= 0, "data.min_speed", "must be >= 0")
        need(d.min_time_gap_s is None or d.min_time_gap_s >= 0, "data.min_time_gap_s", "must be >= 0 or null")
        need(d.min_trial_gap >= 0, "data.min_trial_gap", "must be >= 0 (0 = off)")
        need(0 <= d.jitter_max_bins <= MAX_JITTER_BINS, "data.jitter_max_bins", f"must be 0..{MAX_JITTER_BINS}")
        need(d.loading in LOADINGS, "data.loading", f"must be one of {', '.join(LOADINGS)}")
        need(d.kind in DATA_KINDS, "data.kind", f"must be one of {', '.join(DATA_KINDS)}")
        need(d.memory_budget_mb >= 0, "data.memory_budget_mb", "must be >= 0")
        for key in ("block_rows", "read_retries"):
            need(getattr(d, key) >= 0, f"data.{key}", "must be >= 0")
        for key in ("shuffle_buffer_rows", "read_threads", "prefetch_batches"):
            need(getattr(d, key) >= 1, f"data.{key}", "must be >= 1")
        for key in ("dropout_max", "dropout_apply_p", "noise_apply_p", "pepper_p", "pepper_apply_p"):
            need(0.0 <= getattr(a, key) <= 1.0, f"augment.{key}", "must be in [0, 1]")
        need(a.noise_std >= 0, "augment.noise_std", "must be >= 0")
        need(m.encoder in ENCODERS, "model.encoder", f"must be one of {', '.join(ENCODERS)}")
        need(m.architecture in ARCHITECTURES, "model.architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        need(m.target_init in TARGET_INITS, "model.target_init", f"must be one of {', '.join(TARGET_INITS)}")
        for key in ("hidden_dim", "out_dim", "predictor_hidden"):
            need(0 < getattr(m, key) <= MAX_WIDTH, f"model.{key}", f"must be 1..{MAX_WIDTH}")
        need(0 <= m.num_blocks <= MAX_BLOCKS, "model.num_blocks", f"must be 0..{MAX_BLOCKS}")
        need(m.mined_predictor_hidden is None or 0 < m.mined_predictor_hidden <= MAX_WIDTH,
             "model.mined_predictor_hidden", f"must be 1..{MAX_WIDTH} or null")
        for key in ("projector", "mined_projector"):
            dims = getattr(m, key)
            need(dims is None or (len(dims) == 2 and min(dims) > 0), f"model.{key}", "must be [hidden, out] or null")
            need(dims is None or max(dims) <= MAX_WIDTH, f"model.{key}", f"sizes must be 1..{MAX_WIDTH}")
        body, heads = _weight_estimate(m)
        need(body <= MAX_WEIGHTS, "model.hidden_dim",
             f"{m.hidden_dim} with model.num_blocks {m.num_blocks} and model.out_dim {m.out_dim} makes ~{body:.3g} "
             f"encoder weights (at most 2**30); lower model.hidden_dim or model.num_blocks")
        need(heads <= MAX_WEIGHTS, "model.predictor_hidden",
             f"the projector/predictor heads would have ~{heads:.3g} weights (at most 2**30); lower "
             "model.predictor_hidden, model.mined_predictor_hidden, model.out_dim or the projector sizes")
        need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        need(me.name in METHODS, "method.name", f"must be one of {', '.join(METHODS)}, got {me.name!r}")
        need(1 <= me.k <= MAX_SAMPLES, "method.k", f"must be 1..{MAX_SAMPLES}")
        need(1 <= me.pool_size <= MAX_SAMPLES, "method.pool_size", f"must be 1..{MAX_SAMPLES}")
        need(me.mining_weight >= 0, "method.mining_weight", "must be >= 0")
        need(0 < me.temperature <= 100, "method.temperature", "must be in (0, 100]")
        need(me.mining_warmup_epochs >= 0, "method.mining_warmup_epochs", "must be >= 0")
        need(me.mining_ramp_epochs >= 0, "method.mining_ramp_epochs", "must be >= 0")
        need(me.mining_view in MINING_VIEWS, "method.mining_view", f"must be one of {', '.join(MINING_VIEWS)}")
        need(me.pool in POOLS, "method.pool", f"must be one of {', '.join(POOLS)}")
        need(0 <= me.mining_context_bins <= 64, "method.mining_context_bins", "must be 0..64")
        need(0.0 <= me.oracle_error_rate <= 1.0 and (me.oracle or me.oracle_error_rate == 0),
             "method.oracle_error_rate", "must be in [0, 1], and needs method.oracle")
        need(0 <= me.mining_mutual_k <= MAX_SAMPLES, "method.mining_mutual_k", f"must be 0..{MAX_SAMPLES}")
        need(0.0 < me.mining_keep_fraction <= 1.0, "method.mining_keep_fraction", "must be in (0, 1]")
        need(not me.mining_context_target or me.mining_context_bins > 0, "method.mining_context_target",
             "needs method.mining_context_bins > 0 (the context average it predicts)")
        need(me.mining_space in MINING_SPACES, "method.mining_space", f"must be one of {', '.join(MINING_SPACES)}")
        need(1 <= me.temporal_pos_bins <= MAX_JITTER_BINS, "method.temporal_pos_bins", f"must be 1..{MAX_JITTER_BINS}")
        need(me.temporal_pos_bins < me.temporal_neg_bins <= 2**31, "method.temporal_neg_bins",
             f"must be more than method.temporal_pos_bins ({me.temporal_pos_bins}) and at most 2**31")
        need(0 <= me.label_classes <= MAX_WIDTH, "method.label_classes", f"must be 0..{MAX_WIDTH}")
        need(me.name != "pivae" or me.label_classes >= 1, "method.label_classes",
             "pivae needs the number of classes of the main label (e.g. 8 reach directions, 3 arousal states)")
        need(1 <= me.latent_dim <= MAX_WIDTH, "method.latent_dim", f"must be 1..{MAX_WIDTH}")
        need(me.kl_weight >= 0, "method.kl_weight", "must be >= 0")
        need(o.name in OPTIMIZERS, "optim.name", f"must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")
        need(o.lr > 0, "optim.lr", "must be > 0")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        need(o.batch_size >= 1, "optim.batch_size", "must be a positive batch size")
        need(o.batch_size <= MAX_SAMPLES, "optim.batch_size", f"must be at most {MAX_SAMPLES}")
        need(me.pool != "independent" or o.batch_size * me.pool_size <= MAX_PAIRS, "method.pool_size",
             f"optim.batch_size x method.pool_size = {o.batch_size * me.pool_size} anchor-candidate pairs per step "
             f"(at most {MAX_PAIRS}); lower one of them")
        need(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
        need(0.0 <= o.ema_base_tau <= 1.0, "optim.ema_base_tau", "must be in [0, 1]")
        need(o.ema_schedule in EMA_SCHEDULES, "optim.ema_schedule", f"must be one of {', '.join(EMA_SCHEDULES)}")
        need(o.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        need(t.epochs >= 1, "train.epochs", "must be >= 1")
        need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        need(t.log_every >= 1, "train.log_every", "must be >= 1")
        need(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        need(t.eval_every >= 0, "train.eval_every", "must be >= 0")
        need(t.freeze_encoder_bn_epochs is None or t.freeze_encoder_bn_epochs >= 0,
             "train.freeze_encoder_bn_epochs", "must be >= 0 or null")
        need(r.device in DEVICES, "run.device", f"must be one of {', '.join(DEVICES)}")
        need(0 <= r.seed <= MAX_SEED, "run.seed", f"must be 0..2**63-1, got {r.seed}")
        need(r.threads >= 0, "run.threads", "must be >= 0")
        need(r.dist_timeout_s > 0, "run.dist_timeout_s", "must be > 0")
        need(0 <= self.metrics.port <= 65535, "metrics.port", "must be 0 (off) or a TCP port")
        need(self.eval.reach_min_speed >= 0, "eval.reach_min_speed", "must be >= 0")
        need(self.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
        need(self.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
        need(self.eval.mining_anchors >= 1, "eval.mining_anchors", "must be >= 1")
        self._validate_images(need)
        if d.kind == "images":
            need(m.encoder in IMAGE_ENCODERS, "model.encoder",
                 f"images need an image encoder ({', '.join(IMAGE_ENCODERS)}), got {m.encoder!r}")
            need(me.name not in NEURAL_ONLY_METHODS, "method.name",
                 f"{me.name} is a neural-data baseline; use myow, byol or simclr")
        elif d.kind == "neural":
            need(m.encoder == "mlp", "model.encoder", f"neural data needs the mlp encoder, got {m.encoder!r}")
        return self

    def _validate_images(self, need) -> None:
        im = self.images
        need(im.transform in TRANSFORMS, "images.transform",
             f"must be one of {', '.join(TRANSFORMS)}, got {im.transform!r}")
        need(im.image_size is None or im.image_size >= 1, "images.image_size", "must be >= 1 or null")
        if isinstance(im.normalize, str):
            need(im.normalize in ("preset", "fit"), "images.normalize",
                 f"must be preset, fit or [[mean, ...], [std, ...]], got {im.normalize!r}")
        else:
            ok = len(im.normalize) == 2 and len(im.normalize[0]) == len(im.normalize[1]) >= 1
            need(ok, "images.normalize", f"must be [[mean, ...], [std, ...]] with one value per channel, "
                                         f"got {im.normalize}")
            need(all(v > 0 for v in im.normalize[1]), "images.normalize", "every std must be > 0")
        for key in ("train_split", "eval_split"):
            value = getattr(im, key)
            need(value is None or value == "auto" or value in IMAGE_SELECTIONS, f"images.{key}",
                 f"must be auto, {', '.join(IMAGE_SELECTIONS)} or null (data.path itself), got {value!r}")
        for key in ("train_range", "eval_range"):
            value = getattr(im, key)
            need(value is None or len(value) == 2, f"images.{key}", f"must be [lo, hi] or null, got {value}")
        need(0.0 < im.eval_fraction < 1.0, "images.eval_fraction", "must be in (0, 1)")
        need(im.shuffle_buffer is None or im.shuffle_buffer >= 1, "images.shuffle_buffer", "must be >= 1 or null")
        need(im.augment_threads >= 0, "images.augment_threads", "must be >= 0")


# --------------------------------------------------------------------------- building


def _weight_estimate(m: ModelConfig) -> tuple[int, int]:
    """Rough weight counts (encoder body without its input layer, projector/predictor heads)
    of ``m``: enough to refuse sizes that would take gigabytes, not an exact count."""
    rep = {"resnet18": 512, "resnet50": 2048}.get(m.encoder, m.out_dim)
    body = m.hidden_dim ** 2 * max(m.num_blocks - 1, 0) + m.hidden_dim * m.out_dim if m.encoder == "mlp" else 0

    def head(projector, hidden: int) -> int:
        weights, z = 0, rep
        if projector:
            weights, z = rep * projector[0] + projector[0] * projector[1], projector[1]
        return weights + 2 * z * hidden

    heads = head(m.projector, m.predictor_hidden) + head(m.mined_projector,
                                                         m.mined_predictor_hidden or m.predictor_hidden)
    return body, heads


def _float_values(cfg: Config):
    """(key, value) of every float in the config, list items included (e.g. ``data.split[1]``)."""
    def walk(key: str, value):
        if isinstance(value, float):
            yield key, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(f"{key}[{i}]", item)

    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            if f.name != "storage_options":  # fsspec's own options: passed through as given
                yield from walk(f"{section.name}.{f.name}", getattr(obj, f.name))


def build_config(values: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- ``values`` (nested dict, e.g. from YAML) <- ``overrides`` (``key=value``), validated."""
    cfg = Config()
    if values:
        apply_values(cfg, values)
    for text in overrides:
        key, value = parse_override(text)
        apply_values(cfg, nest_key(key, value))
    return cfg.validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file ``path`` (optional) <- ``--set`` overrides; validated."""
    return build_config(read_yaml(path) if path else {}, overrides)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON/torch.save weights_only friendly)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (sections in definition order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
