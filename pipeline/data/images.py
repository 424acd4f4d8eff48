"""The trainer's data for an image shard set: selections, the session, ImageTrainData.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.methods import DataNeeds
from preprocess.errors import UserError
from preprocess.shard_format import INDEX, SPLITS, read_index
from preprocess.store import filesystem, join_url

from .image_shards import ShardSet, _SizeMismatch, load_image_tensors
from .image_streams import build_image_streams
from .image_views import ImageNormalization
from .interface import SessionList
from .stages import Prefetcher, ordered_map

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the trainer's data
#
# pipeline.train talks to its data only through the TrainData interface (pipeline.data):
# ``sessions`` (each with ``anchors``/``pool`` streams, ``normalization``, ``min_time_gap_s``,
# ``n_samples``), ``steps_per_epoch``, ``session_at``, ``model_input()``,
# ``normalization_state()``, ``evaluate(...)``, ``state_dict``/``load_state_dict``,
# ``pin_memory``, ``close``. ImageTrainData is that interface over one image shard set.


@dataclass(frozen=True)
class Selection:
    """Which images: a shard set (``data.path`` or one of its split sub-folders) and the
    ``[lo, hi)`` range of its sample indices."""

    url: str
    split: str | None  # the sub-folder of data.path, None = data.path itself
    lo: int
    hi: int

    @property
    def range(self) -> tuple[int, int]:
        return self.lo, self.hi

    @property
    def n_samples(self) -> int:
        return self.hi - self.lo

    def describe(self) -> str:
        return f"{self.url} [{self.lo}, {self.hi})"


def _choose_split(key: str, value, present: list[str], has_root: bool, root: str, train: str | None = None):
    """The sub-folder (None = the root set) that ``images.<key>`` names, ``auto`` resolved."""
    if value == "auto":
        if key == "train_split":
            if "train" in present:
                return "train"
            if has_root:
                return None
            if len(present) == 1:
                return present[0]
            raise UserError(f"{root}: holds the splits {', '.join(present)} but no 'train'; "
                            "choose one with --set images.train_split=NAME")
        return next((s for s in ("test", "val") if s in present and s != train), train)
    if value is None:
        if not has_root:
            raise UserError(f"images.{key} is null (data.path itself) but {root} has no index.json"
                            + (f"; its splits are {', '.join(present)}" if present else ""))
        return None
    if value not in present:
        raise UserError(f"images.{key} is {value!r} but {root} has no {value}/index.json"
                        + (f"; its splits are {', '.join(present)}" if present
                           else "; data.path is one set: use images.train_split/eval_split null"))
    return value


def _range(key: str, value, n: int) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, hi, _ = slice(*value).indices(n)
    if hi <= lo:
        raise UserError(f"images.{key} {list(value)} selects none of the {n} samples")
    return lo, hi


def resolve_selections(cfg) -> tuple[Selection, Selection]:
    """(training selection, eval selection) of ``cfg.data.path`` and ``cfg.images``.

    auto: train on ``train`` (else the root set, else the only split), evaluate on ``test``
    (else ``val``, else the training set). When both are one set, the ranges must not
    overlap; without ranges its last ``images.eval_fraction`` is evaluated on and the rest
    trained on (the MNIST t10k shards: samples 0-7999 / 8000-9999).
    """
    d, im = cfg.data, cfg.images
    if not d.path:
        raise UserError("data.path is not set: pass --set data.path=SHARDS (a folder written by "
                        "`python -m preprocess.shard_images`)")
    if isinstance(d.path, list):
        raise UserError("data.path: image training reads one shard set (a folder with index.json, or with "
                        "train/ and test/ sub-folders), not a list")
    root = str(d.path)
    fs, path = filesystem(root, d.storage_options)
    try:
        has_root = fs.exists(join_url(path, INDEX))
        present = [s for s in SPLITS if fs.exists(join_url(path, s, INDEX))]
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{root}: cannot list the storage ({type(err).__name__}: {err}); check data.path and "
                        "data.storage_options")
    if not has_root and not present:
        raise UserError(f"{root}: no image shard set there (no index.json); create one with "
                        "`python -m preprocess.shard_images`")
    train = _choose_split("train_split", im.train_split, present, has_root, root)
    evals = _choose_split("eval_split", im.eval_split, present, has_root, root, train)

    def url(split):
        return join_url(root, split) if split else root

    def count(split) -> int:
        return int(read_index(url(split), d.storage_options)["num_samples"])

    n_train = count(train)
    tr = _range("train_range", im.train_range, n_train)
    if evals == train:
        ev = _range("eval_range", im.eval_range, n_train)
        if tr is None and ev is None:
            cut = n_train - max(1, round(n_train * im.eval_fraction))
            tr, ev = (0, cut), (cut, n_train)
        elif tr is None:  # the rest of the set, when the eval range sits at one end of it
            tr = (ev[1], n_train) if ev[0] == 0 else (0, ev[0]) if ev[1] == n_train else None
        elif ev is None:
            ev = (tr[1], n_train) if tr[0] == 0 else (0, tr[0]) if tr[1] == n_train else None
        if tr is None or ev is None or tr[1] <= tr[0] or ev[1] <= ev[0]:
            raise UserError(f"{url(train)}: training and evaluation use this one set; give both images.train_range "
                            f"and images.eval_range (e.g. [0, {n_train * 4 // 5}] and "
                            f"[{n_train * 4 // 5}, {n_train}])")
        if tr[0] < ev[1] and ev[0] < tr[1]:
            raise UserError(f"images.train_range {list(tr)} and images.eval_range {list(ev)} overlap in "
                            f"{url(train)}: the evaluation images must never be trained on")
    else:
        tr = tr or (0, n_train)
        n_eval = count(evals)
        ev = _range("eval_range", im.eval_range, n_eval) or (0, n_eval)
    return Selection(url(train), train, *tr), Selection(url(evals), evals, *ev)


def load_selection(selection: Selection, size: int, storage_options: dict | None = None, threads: int = 4,
                   read_retries: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The un-augmented images of a selection for evaluation: (uint8 (n, C, S, S), labels
    (n,), sample indices (n,)). Images of another size are resized (shorter side to S,
    bicubic, antialiased) and centre-cropped to S x S, the views' side."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as v2f

    sset = ShardSet(selection.url, storage_options, selection.range, read_retries=read_retries)

    def fit(image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (size, size):
            return image
        image = v2f.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return v2f.center_crop(image, [size, size])

    try:
        images, labels = load_image_tensors(selection.url, shard_set=sset, threads=threads)
        images = fit(images)
    except _SizeMismatch:
        images = torch.empty((sset.n_samples, sset.channels, size, size), dtype=torch.uint8)
        labels = torch.empty(sset.n_samples, dtype=torch.int64)
        for items in ordered_map(sset.read, sset.shards, threads, threads):
            for sample, image, cls in items:
                images[sample - sset.lo], labels[sample - sset.lo] = fit(image), cls
    return images.contiguous(), labels, torch.arange(sset.lo, sset.hi, dtype=torch.int64)


@dataclass
class ImageSession:
    """The one "session" of an image run: its streams and what evaluation needs."""

    anchors: Prefetcher  # -> (x1, x2, x_m, meta)
    pool: Prefetcher  # -> (x_pool, meta_pool)
    normalization: ImageNormalization
    train: Selection
    eval: Selection
    classes: list[str]
    channels: int
    image_size: int
    min_time_gap_s: float = 0.0  # images have no time: only the anchor's own image is excluded (trial)
    mining_context: None = None  # mining by temporal context is for recordings (pipeline/context.py)

    @property
    def n_samples(self) -> int:
        return self.train.n_samples

    @property
    def streamed(self) -> bool:
        return bool(self.anchors.streamed)

    def close(self) -> None:
        self.anchors.shutdown()
        self.pool.shutdown()


@dataclass
class ImageTrainData(SessionList):
    """:class:`pipeline.data.interface.TrainData` over an image shard set: one session, the anchor
    and pool streams of :func:`build_image_streams`, ``model_input()`` = the image
    channels, the normalisation constants in checkpoints, and :meth:`evaluate` = linear
    probe + weighted kNN (+ the mining pictures)."""

    storage_options: dict | None = None
    read_threads: int = 4
    read_retries: int = 3
    _cache: dict | None = None

    kind = "images"

    def model_input(self) -> int:
        return self.sessions[0].channels

    def normalization_state(self) -> dict:
        s = self.sessions[0]
        return {"kind": "images", **s.normalization.state_dict(), "image_size": s.image_size,
                "channels": s.channels}

    def images(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (n, C, S, S), labels) of the "train" or "eval" selection, loaded once."""
        s = self.sessions[0]
        if self._cache is None:
            self._cache = {}
        if which not in self._cache:
            source = s.anchors.source
            if which == "train" and not s.streamed and tuple(source.images.shape[-2:]) == (s.image_size,) * 2:
                self._cache[which] = (source.images, source.labels)  # the anchors' own tensor
            else:
                sel = s.train if which == "train" else s.eval
                self._cache[which] = load_selection(sel, s.image_size, self.storage_options, self.read_threads,
                                                    self.read_retries)[:2]
        return self._cache[which]


def build_image_train_data(cfg, normalization: dict | None = None, *, rank: int = 0,
                           world_size: int = 1, needs: DataNeeds) -> ImageTrainData:
    """The trainer's data for an image shard set (``cfg.data.path``, ``cfg.images``).

    ``normalization``: a checkpoint's stored state (resume): its constants and view size
    are reused, so a ``normalize: fit`` run continues with the statistics it started with.
    """
    d, im = cfg.data, cfg.images
    train_sel, eval_sel = resolve_selections(cfg)
    if normalization is not None:
        normalize = (tuple(normalization["mean"]), tuple(normalization["std"]))
        image_size = normalization.get("image_size") or im.image_size
    else:
        normalize = im.normalize if isinstance(im.normalize, str) else (tuple(im.normalize[0]), tuple(im.normalize[1]))
        image_size = im.image_size
    mining_view = needs.mining_view  # x_m, a separate view to mine with
    anchors, pool = build_image_streams(
        train_sel.url, d.storage_options, batch_size=cfg.optim.batch_size, pool_size=cfg.method.pool_size,
        seed=cfg.run.seed, rank=rank, world_size=world_size, transform=im.transform, mining_view=mining_view,
        index_range=train_sel.range, memory_budget_mb=d.memory_budget_mb, loading=d.loading, image_size=image_size,
        normalize=normalize, shuffle_buffer=im.shuffle_buffer, read_threads=d.read_threads,
        augment_threads=im.augment_threads or None, prefetch=d.prefetch_batches, read_retries=d.read_retries)
    classes = list(anchors.classes)
    session = ImageSession(anchors, pool, anchors.normalization, train_sel, eval_sel, classes, anchors.channels,
                           anchors.image_size)
    log.info("images: training on %s (%d), evaluating on %s (%d); %d steps per epoch", train_sel.describe(),
             train_sel.n_samples, eval_sel.describe(), eval_sel.n_samples, anchors.steps_per_epoch)
    return ImageTrainData([session], seed=cfg.run.seed, storage_options=d.storage_options,
                          read_threads=d.read_threads, read_retries=d.read_retries)


