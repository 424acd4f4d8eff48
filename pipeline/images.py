"""The image data path of the trainer: WebDataset shards -> anchor and pool streams, plus
the image evaluation helpers (linear probe, weighted kNN, embeddings, pictures).

    shards (index.json + shard-NNNNNN.tar, written by preprocess.shard_images; any fsspec URL)
      small set (decoded size <= memory_budget_mb): decoded once into uint8 (n, C, H, W)
          anchors: epoch_order(order_seed, epoch) -> shard_for_rank -> equal count per rank -> B
          pool:    an independent uniform draw of L per step (own generator)
      large set: streamed
          epoch_order(shards) -> shard_for_rank (anchors only) -> ordered_map(read + decode, threads)
          -> shuffle buffer of decoded images -> B (anchors) or L (pool)
      -> views: T (two per anchor), T_m (one per anchor and one per candidate)

The streams have the interface of the neural ones (:mod:`pipeline.data`, :mod:`pipeline.streams`),
so the trainer uses them unchanged::

    anchors: next() -> (x1, x2, x_m | None, meta)     x* (B, C, S, S) float32, normalised
    pool:    next() -> (x_pool (L, C, S, S), meta)
    meta:    store int64 (0), time float64 (= sample index), trial int64 (= sample index),
             row int64 (sample index in the split), label int64 (class; monitoring only)

``trial`` is the sample index, so the trainer's same-trial exclusion
(:func:`model.miner.exclusion_mask`) keeps an anchor from mining its own image in the pool.
``time`` is the sample index too: keep the mining time gap at 0 for images.

Augmentations (paper App. C; torchvision.transforms.v2 semantics). T = RandomResizedCrop(S,
scale (0.2, 1), ratio (3/4, 4/3), bicubic, antialias) -> RandomHorizontalFlip(0.5) ->
ToDtype(float32, scale) -> RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], 0.8) ->
RandomGrayscale(0.1) -> Normalize. T_m = RandomResizedCrop(scale (0.8, 1)) -> flip -> Normalize
(App. C names only the crop; the authors' code, nerdslab/myow scripts/cifar-train.py, also
flips: we follow the code). MNIST (App. G reports "Crop only" and "All"): ``"mnist"`` is
crop only (T: crop (0.2, 1), T_m: crop (0.8, 1), no flip, no colour), ``"mnist-all"`` the full
T. :meth:`ViewSpec.to_v2` builds the equivalent ``v2.Compose`` (the reference the tests
compare against).

Batching: only the crop runs per sample (``v2.functional.resized_crop`` on uint8, ~25k
images/s); flip, the four colour-jitter ops (each sample with its own factors *and its own
random op order*, as ColorJitter), grayscale and normalisation run on the whole batch with
the same formulas as ``v2.functional`` (equal to 1e-5, tested). The views are made in the
Prefetcher's producer thread, limited to ``augment_threads`` (1) intra-op threads: these
small ops ran 3-6x slower with 2 OpenMP threads on 2 cores.

Determinism: every random draw (epoch order aside, which is a pure function of (seed,
epoch)) is made from the stream's own ``torch.Generator``: crop boxes, flips, jitter
factors and orders, grayscale decisions, pool indices and buffer picks. Nothing touches
torch's global RNG. (``torch.random.fork_rng`` + ``manual_seed`` around v2 transforms
would not be deterministic here: the anchor and pool streams run in two Prefetcher threads
at once and would race on the one global generator.) So two streams with the same seed
give the same batches, and a stream restored from ``state_dict()`` continues exactly.

Normalisation: per-channel constants by transform set (``normalize="preset"``): MNIST
(0.1307, 0.3081), the MNIST training set's statistics; CIFAR-10's training set
(0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) (the authors' code uses the
widespread, slightly wrong std (0.2023, 0.1994, 0.2010); ours is the true one); ImageNet's
for ``"imagenet"``. ``normalize="fit"`` computes them from the training images instead
(exact in memory; the first ``FIT_SAMPLES`` selected samples when streamed), or pass
``(mean, std)``. The streams carry it as ``.normalization`` for evaluation.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as TF

from preprocess.errors import UserError
from preprocess.shard_images import _tar_samples, read_index
from preprocess.store import filesystem, join_url

from .data import TrainData
from .recording import is_transient
from .stages import EpochCursor, Prefetcher, derive_seed, epoch_order, ordered_map, retry, shard_for_rank

log = logging.getLogger(__name__)

__all__ = [
    "ImageSession",
    "ImageTrainData",
    "Selection",
    "build_image_train_data",
    "evaluate_image_run",
    "evaluate_images",
    "load_selection",
    "resolve_selections",
    "NORMALIZATION_PRESETS",
    "TRANSFORM_SETS",
    "ImageAnchorSampler",
    "ImageAugment",
    "ImageNormalization",
    "ImagePoolSampler",
    "ShardAnchorStream",
    "ShardPoolStream",
    "ShardSet",
    "ViewSpec",
    "build_image_streams",
    "decode_image",
    "embed_images",
    "knn_accuracy",
    "limit_intra_op_threads",
    "linear_probe",
    "linear_probe_details",
    "load_image_tensors",
    "save_confusion",
    "save_mining_grid",
    "to_uint8",
]

FIT_SAMPLES = 10000  # samples a streamed set's normalisation is fitted on (normalize="fit")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # v2.functional.rgb_to_grayscale


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class ViewSpec:
    """One class of view transformations (T or T_m): crop, flip, colour, grayscale."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.1

    def jitter_ranges(self) -> list[tuple[float, float]]:
        """(low, high) of the four factors, as ColorJitter derives them from the strengths."""
        b, c, s, h = self.jitter
        return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]

    def to_v2(self, size: int, mean: Sequence[float], std: Sequence[float]):
        """The equivalent torchvision.transforms.v2 pipeline for one uint8 (C, H, W) image
        (reference only: it draws from torch's global RNG, one image at a time)."""
        from torchvision.transforms import InterpolationMode, v2

        steps = [v2.RandomResizedCrop(size, scale=self.crop_scale, ratio=self.crop_ratio,
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)]
        if self.flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(self.flip_p))
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if self.jitter is not None and self.jitter_p > 0:
            steps.append(v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_p))
        if self.gray_p > 0:
            steps.append(v2.RandomGrayscale(self.gray_p))
        steps.append(v2.Normalize(list(mean), list(std)))
        return v2.Compose(steps)


_CROP_ONLY = dict(flip_p=0.0, jitter=None, jitter_p=0.0, gray_p=0.0)
#: name -> (T, T_m, normalisation preset)
TRANSFORM_SETS: dict[str, tuple[ViewSpec, ViewSpec, str]] = {
    "cifar": (ViewSpec(), ViewSpec(crop_scale=(0.8, 1.0), jitter=None, jitter_p=0.0, gray_p=0.0), "cifar"),
    "imagenet": (ViewSpec(), ViewSpec(crop_scale=(0.8, 1.0), jitter=None, jitter_p=0.0, gray_p=0.0), "imagenet"),
    "mnist": (ViewSpec(**_CROP_ONLY), ViewSpec(crop_scale=(0.8, 1.0), **_CROP_ONLY), "mnist"),
    "mnist-all": (ViewSpec(), ViewSpec(crop_scale=(0.8, 1.0), **_CROP_ONLY), "mnist"),
    # dSprites (paper App. I): binary shapes that fill a small part of the image, so the crops
    # keep at least half of it (a 0.2 crop would often miss the shape)
    "dsprites": (ViewSpec(crop_scale=(0.5, 1.0), **_CROP_ONLY), ViewSpec(crop_scale=(0.8, 1.0), **_CROP_ONLY), "mnist"),
}

NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ImageNormalization:
    """Per-channel normalisation of images scaled to [0, 1]: (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"normalisation mean {self.mean} and std {self.std}: one positive std per channel")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape), torch.tensor(self.std, device=device).view(shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) float in [0, 1] -> normalised (new tensor)."""
        mean, std = self.tensors(x.device)
        return (x - mean) / std

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) uint8 -> normalised float32."""
        mean, std = self.tensors(images.device)
        return images.float().div_(255).sub_(mean).div_(std)

    @classmethod
    def preset(cls, name: str, channels: int) -> ImageNormalization:
        mean, std = NORMALIZATION_PRESETS[name]
        if len(mean) != channels:
            raise UserError(f"the {name!r} normalisation is for {len(mean)}-channel images, the data has {channels} "
                            "channels; choose another transform set or normalize='fit'")
        return cls(mean, std)

    @classmethod
    def fit(cls, images: Iterator[torch.Tensor] | torch.Tensor) -> ImageNormalization:
        """Mean and std per channel over every pixel of uint8 (C, H, W) images (or an
        (n, C, H, W) tensor), accumulated in float64."""
        total = sq = None
        count = 0
        chunks = images.split(1024) if isinstance(images, torch.Tensor) else (im[None] for im in images)
        for chunk in chunks:
            x = chunk.double().div_(255)
            s, q = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
            total, sq = (s, q) if total is None else (total + s, sq + q)
            count += x.shape[0] * x.shape[2] * x.shape[3]
        if not count:
            raise UserError("no images to fit the normalisation on")
        mean = total / count
        std = (sq / count - mean ** 2).clamp(min=0).sqrt()
        return cls(mean.tolist(), torch.where(std > 1e-6, std, torch.ones_like(std)).tolist())

    def state_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_state_dict(cls, state: dict) -> ImageNormalization:
        return cls(state["mean"], state["std"])


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) float -> (n, 1, H, W) luma (v2's weights)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) RGB in [0, 1] -> HSV, the formulas of v2.functional (PIL's)."""
    r, g, _ = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    crange = maxc - minc
    ones = torch.ones_like(maxc)
    s = crange / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(eqc, ones, crange).unsqueeze(1)).unbind(1)
    neq_r, eq_g = maxc != r, maxc == g
    hg = (rc + 2.0 - bc) * (eq_g & neq_r)
    hr = (bc - gc) * ~neq_r
    hb = (gc + 4.0 - rc) * (neq_r & ~eq_g)
    h = ((hr + hg + hb) / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), 1)


_HSV_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    q = ((1.0 - s * f) * v).clamp(0.0, 1.0)
    t = ((s * f + 1.0 - s) * v).clamp(0.0, 1.0)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), 1)
    select = _HSV_SELECT.to(x.device)[:, i].movedim(0, 1)  # (n, 3, H, W)
    return vpqt.gather(1, select)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (x * r + other * (1.0 - r)).clamp_(0.0, 1.0)


def _brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x, f):
    gray = _grayscale(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean((1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return x if x.shape[1] == 1 else _blend(x, _grayscale(x), f)


def _hue(x, f):
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + f.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # ColorJitter's fn_idx 0..3


class ImageAugment:
    """One view class (a :class:`ViewSpec`) applied to a batch, output ``size`` x ``size``.

    ``augment(images, generator)``: images a uint8 (n, C, H, W) tensor or a list of uint8
    (C, H_i, W_i) tensors (any sizes); returns (n, C, size, size) float32, normalised.
    ``draw`` + ``apply`` split the random draws from their application (for tests).
    """

    def __init__(self, spec: ViewSpec, size: int, normalization: ImageNormalization):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as v2f

        self.spec, self.size, self.normalization = spec, int(size), normalization
        self._resized_crop, self._bicubic = v2f.resized_crop, InterpolationMode.BICUBIC
        self._mean, self._std = normalization.tensors()
        lo, hi = spec.crop_ratio
        self._log_ratio = (math.log(lo), math.log(hi))

    def draw(self, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random parameter of n views, vectorised, in a fixed order of draws.

        The crop box follows RandomResizedCrop.make_params exactly: up to 10 tries of
        (area ~ U(scale) x H W, log aspect ratio ~ U(log ratio)), the first box that fits
        wins, else the central crop clamped to the ratio range; then a uniform position.
        """
        s, g = self.spec, generator
        n = len(heights)
        H, W = heights.double(), widths.double()
        area = (H * W)[:, None]
        target = area * (torch.rand(n, 10, generator=g, dtype=torch.float64)
                         * (s.crop_scale[1] - s.crop_scale[0]) + s.crop_scale[0])
        log_r = torch.rand(n, 10, generator=g, dtype=torch.float64) * (self._log_ratio[1] - self._log_ratio[0]) \
            + self._log_ratio[0]
        ratio = log_r.exp()
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
        ok = fits.any(1)
        first = fits.double().argmax(1)
        w = w.gather(1, first[:, None]).squeeze(1)
        h = h.gather(1, first[:, None]).squeeze(1)
        # fallback: central crop (whole image, clamped to the ratio range)
        in_ratio = W / H
        lo_r, hi_r = min(s.crop_ratio), max(s.crop_ratio)
        fw = torch.where(in_ratio < lo_r, W, torch.where(in_ratio > hi_r, torch.round(H * hi_r), W))
        fh = torch.where(in_ratio < lo_r, torch.round(W / lo_r), H)
        w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
        u_top, u_left = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        top = torch.where(ok, torch.floor(u_top * (H - h + 1)).clamp(max=H - h), torch.floor((H - h) / 2))
        left = torch.where(ok, torch.floor(u_left * (W - w + 1)).clamp(max=W - w), torch.floor((W - w) / 2))
        params = {"top": top.long(), "left": left.long(), "height": h.long(), "width": w.long(),
                  "flip": torch.rand(n, generator=g) < s.flip_p}
        if s.jitter is not None and s.jitter_p > 0:
            params["jitter"] = torch.rand(n, generator=g) < s.jitter_p
            params["order"] = torch.rand(n, 4, generator=g).argsort(1)  # a uniform permutation per sample
            u = torch.rand(n, 4, generator=g)
            params["factors"] = torch.stack([u[:, k] * (hi - lo) + lo for k, (lo, hi) in enumerate(s.jitter_ranges())], 1)
        if s.gray_p > 0:
            params["gray"] = torch.rand(n, generator=g) < s.gray_p
        return params

    def crop(self, images, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample resized crops (v2.functional.resized_crop, bicubic, antialias): uint8."""
        n = len(images)
        C = images[0].shape[0]
        S = self.size
        out = torch.empty((n, C, S, S), dtype=torch.uint8)
        boxes = zip(params["top"].tolist(), params["left"].tolist(), params["height"].tolist(),
                    params["width"].tolist())
        for i, (t, l, h, w) in enumerate(boxes):
            image = images[i]
            if t == 0 and l == 0 and h == S and w == S and image.shape[-2:] == (S, S):
                out[i] = image
            else:
                out[i] = self._resized_crop(image, t, l, h, w, [S, S], interpolation=self._bicubic, antialias=True)
        return out

    def apply(self, images, params: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """The views of ``images`` for drawn ``params``: crop, flip, jitter, gray, normalise."""
        x = self.crop(images, params).float().div_(255)  # ToDtype(float32, scale=True)
        flip = params["flip"]
        if flip.any():
            x[flip] = x[flip].flip(-1)
        if "jitter" in params and x.shape[1] in (1, 3):
            on, order, factors = params["jitter"], params["order"], params["factors"]
            ops = range(4) if x.shape[1] == 3 else range(2)  # saturation and hue leave 1 channel alone
            for position in range(4):
                for op in ops:
                    sel = (on & (order[:, position] == op)).nonzero().squeeze(1)
                    if len(sel):
                        x[sel] = _JITTER_OPS[op](x[sel], factors[sel, op])
        if "gray" in params and x.shape[1] == 3:
            sel = params["gray"].nonzero().squeeze(1)
            if len(sel):
                x[sel] = _grayscale(x[sel]).expand(-1, 3, -1, -1)
        if normalize:
            x.sub_(self._mean).div_(self._std)
        return x

    def __call__(self, images, generator: torch.Generator) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            n, _, H, W = images.shape
            heights, widths = torch.full((n,), H), torch.full((n,), W)
        else:
            heights = torch.tensor([im.shape[-2] for im in images])
            widths = torch.tensor([im.shape[-1] for im in images])
        return self.apply(images, self.draw(heights, widths, generator))


# --------------------------------------------------------------------------- shards


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Image bytes -> uint8 (channels, H, W) (1 = grayscale "L", 3 = RGB), decoded by PIL
    (which releases the GIL while decoding, so reader threads decode in parallel).
    torchvision.io would be ~3x faster on small PNGs but is deprecated since 0.29."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and channels == 1:
            image.draft("L", image.size)
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def _resolve_range(index_range, n: int) -> tuple[int, int]:
    if index_range is None:
        return 0, n
    lo, hi = index_range
    lo, hi, _ = slice(lo, hi).indices(n)
    if hi <= lo:
        raise UserError(f"index_range {tuple(index_range)} selects no sample of the {n} in the set")
    return lo, hi


Item = tuple[int, torch.Tensor, int]  # (sample index, uint8 (C, H, W), class)


class ShardSet:
    """An image shard set (index.json + tars) and a contiguous selection of its samples.

    Sample ``i`` of the split is the i-th sample in shard order (the ``%08d`` key
    ``preprocess.shard_images`` gives it); ``index_range = (lo, hi)`` keeps samples
    lo..hi-1 (Python slice semantics, negative values count from the end).
    """

    def __init__(self, url: str, storage_options: dict | None = None, index_range=None, *, split: str | None = None,
                 read_retries: int = 3):
        self.url = join_url(url, split) if split else url
        self.storage_options = storage_options or {}
        self.index = read_index(self.url, self.storage_options)
        self.fs, self.path = filesystem(self.url, self.storage_options)
        self.attempts = read_retries + 1
        self.names = [s["name"] for s in self.index["shards"]]
        self.counts = np.array([int(s["samples"]) for s in self.index["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.index["num_samples"])
        self.lo, self.hi = _resolve_range(index_range, self.total)
        self.n_samples = self.hi - self.lo
        #: indices (into names) of the shards holding selected samples
        self.shards = [k for k in range(len(self.names))
                       if self.starts[k] < self.hi and self.starts[k] + self.counts[k] > self.lo]
        self.classes = list(self.index.get("classes") or [])
        self.channels = 1 if self.index.get("image_mode") == "L" else 3

    def shard_of(self, sample: int) -> int:
        return int(np.searchsorted(self.starts, sample, side="right") - 1)

    def _bytes(self, k: int) -> bytes:
        return retry(lambda: self.fs.cat_file(f"{self.path}/{self.names[k]}"), attempts=self.attempts,
                     transient=is_transient, what=f"read {self.url}/{self.names[k]}")

    def read(self, k: int, wanted: set[int] | None = None) -> list[Item]:
        """The selected samples of shard ``k`` (only ``wanted`` ones when given), decoded, in order."""
        where = f"{self.url.rstrip('/')}/{self.names[k]}"
        try:
            data = self._bytes(k)
        except FileNotFoundError:
            raise UserError(f"{where}: missing (index.json lists it); re-create the shard set")
        except Exception as err:
            raise UserError(f"{where}: cannot read ({type(err).__name__}: {err}); check the URL and storage options")
        out: list[Item] = []
        position = -1
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for position, (key, fields) in enumerate(_tar_samples(tar)):
                    sample = int(self.starts[k]) + position
                    if not self.lo <= sample < self.hi or (wanted is not None and sample not in wanted):
                        continue
                    cls = fields.pop("cls", b"")
                    if len(fields) != 1 or not cls.isdigit():
                        raise UserError(f"{where}: sample {key} has fields {sorted(fields)} and cls {cls!r}; "
                                        "expected one image and a class index")
                    (_, raw), = fields.items()
                    try:
                        image = decode_image(raw, self.channels)
                    except Exception as err:
                        raise UserError(f"{where}: sample {key} is not a decodable image ({type(err).__name__}: "
                                        f"{err}); re-create the shard set")
                    out.append((sample, image, int(cls)))
        except (OSError, tarfile.TarError) as err:
            raise UserError(f"{where}: not a readable tar ({type(err).__name__}: {err}); re-create the shard set")
        if position + 1 != self.counts[k]:
            raise UserError(f"{where}: holds {position + 1} samples, index.json says {self.counts[k]}; "
                            "re-create the shard set")
        return out

    def read_samples(self, samples: Sequence[int], threads: int = 4) -> dict[int, Item]:
        """sample index -> item for ``samples`` (their shards read in parallel)."""
        by_shard: dict[int, set[int]] = {}
        for s in samples:
            by_shard.setdefault(self.shard_of(int(s)), set()).add(int(s))
        found: dict[int, Item] = {}
        for items in ordered_map(lambda kv: self.read(kv[0], kv[1]), sorted(by_shard.items()), threads, threads):
            found.update((item[0], item) for item in items)
        missing = {int(s) for s in samples} - set(found)
        if missing:
            raise UserError(f"{self.url}: samples {sorted(missing)[:5]} are not in the shard set any more; "
                            "resume with the data the run was trained on")
        return found

    def first_image(self) -> torch.Tensor:
        """The first sample of the first selected shard (streams only the start of the tar)."""
        k = self.shards[0]
        with self.fs.open(f"{self.path}/{self.names[k]}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for _, fields in _tar_samples(tar):
                fields.pop("cls", None)
                (_, raw), = fields.items()
                return decode_image(raw, self.channels)
        raise UserError(f"{self.url}/{self.names[k]}: empty shard; re-create the shard set")


def load_image_tensors(url: str, storage_options: dict | None = None, index_range=None, *, split: str | None = None,
                       threads: int = 4, shard_set: ShardSet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected samples of a shard set in memory: (images uint8 (n, C, H, W), labels int64 (n,)).

    Every image must have the size of the first one (MNIST, CIFAR, Tiny ImageNet...);
    otherwise a UserError names the first that differs.
    """
    sset = shard_set or ShardSet(url, storage_options, index_range, split=split)
    images = labels = None
    for items in ordered_map(sset.read, sset.shards, threads, threads):
        for sample, image, cls in items:
            if images is None:
                images = torch.empty((sset.n_samples, *image.shape), dtype=torch.uint8)
                labels = torch.empty(sset.n_samples, dtype=torch.int64)
            if image.shape != images.shape[1:]:
                raise _SizeMismatch(f"{sset.url}: sample {sample} is {tuple(image.shape)} (C, H, W), the first "
                                    f"{tuple(images.shape[1:])}; images of different sizes cannot be held in one "
                                    "tensor: stream them (loading='stream')")
            images[sample - sset.lo] = image
            labels[sample - sset.lo] = cls
    return images, labels


class _SizeMismatch(UserError):
    pass


# --------------------------------------------------------------------------- threads


_OPENMP: bool | None = None


def limit_intra_op_threads(n: int | None) -> None:
    """Let torch ops of the calling thread use at most ``n`` intra-op threads.

    Augmenting a batch is many small ops: on 2 cores, 2 OpenMP threads made it 3-6x slower
    than 1 (fork/join overhead, and the trainer's thread competes for the same cores).
    With torch's OpenMP backend the setting is per thread, so a Prefetcher's producer
    thread can take 1 without touching the trainer's threads; with any other backend it
    would be process-wide, so nothing is changed there (nor in the main thread).
    """
    global _OPENMP
    if not n or threading.current_thread() is threading.main_thread():
        return  # only producer threads: never change the trainer's own thread
    if _OPENMP is None:
        _OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if _OPENMP and torch.get_num_threads() != n:
        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------- meta


def _meta(samples: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    samples = samples.to(torch.int64)
    return {"store": torch.zeros(len(samples), dtype=torch.int64), "time": samples.double(),
            "trial": samples.clone(), "row": samples.clone(), "label": labels.to(torch.int64)}


# --------------------------------------------------------------------------- in-memory samplers


class ImageAnchorSampler:
    """Anchor batches from images in memory (the neural AnchorSampler's sampling).

    Each epoch is ``epoch_order(n, order_seed, epoch)`` (the same on every rank); rank r
    takes positions r, r + world_size, ..., trimmed to ``n // world_size`` (equal steps on
    every rank), cut into ``steps_per_epoch`` batches of B. ``next()`` -> (x1, x2, x_m, meta):
    two T views and one T_m view (None without ``mining_view``) of the same B images.
    """

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: ImageAugment, augment_m: ImageAugment,
                 batch_size: int, seed: int, *, order_seed: int, rank: int = 0, world_size: int = 1,
                 mining_view: bool = True, first_sample: int = 0):
        n = len(images)
        if n < world_size:
            raise UserError(f"{n} images cannot be shared by {world_size} ranks")
        self.images, self.labels, self.augment, self.augment_m = images, labels, augment, augment_m
        self.samples = torch.arange(first_sample, first_sample + n, dtype=torch.int64)
        self.mining_view = mining_view
        self.cursor = EpochCursor(n, batch_size, order_seed, rank, world_size)
        self.batch_size, self.steps_per_epoch = self.cursor.batch_size, self.cursor.steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def next_indices(self) -> torch.Tensor:
        return self.cursor.next()

    def __iter__(self):
        return self

    def __next__(self):
        limit_intra_op_threads(self.augment_threads)
        idx = self.next_indices()
        images, g = self.images.index_select(0, idx), self.generator
        x1, x2 = self.augment(images, g), self.augment(images, g)
        x_m = self.augment_m(images, g) if self.mining_view else None
        return x1, x2, x_m, _meta(self.samples[idx], self.labels[idx])

    def state_dict(self) -> dict:
        return {"kind": "images-memory", "generator": self.generator.get_state(), **self.cursor.state_dict(),
                "n_samples": len(self.images), "order_seed": self.cursor.order_seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "images-memory" or state["n_samples"] != len(self.images):
            raise UserError(f"the checkpoint's anchor stream state ({state.get('kind')}, {state.get('n_samples')} "
                            f"images) does not match the data (images-memory, {len(self.images)}); resume with the "
                            "same data and settings")
        self.generator.set_state(state["generator"])
        self.cursor.load_state_dict(state)


class ImagePoolSampler:
    """Candidate pools from images in memory, independent of the anchors (own generator):
    ``next()`` -> (x_pool (L, C, S, S), meta); L images drawn uniformly (without replacement
    when L <= n), one T_m view each."""

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment_m: ImageAugment, pool_size: int, seed: int,
                 first_sample: int = 0):
        if len(images) == 0:
            raise UserError("no images for the mining pool")
        self.images, self.labels, self.augment_m, self.pool_size = images, labels, augment_m, int(pool_size)
        self.samples = torch.arange(first_sample, first_sample + len(images), dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def __iter__(self):
        return self

    def __next__(self):
        limit_intra_op_threads(self.augment_threads)
        n, L, g = len(self.images), self.pool_size, self.generator
        idx = torch.randperm(n, generator=g)[:L] if L <= n else torch.randint(n, (L,), generator=g)
        self.draws += 1
        return self.augment_m(self.images.index_select(0, idx), g), _meta(self.samples[idx], self.labels[idx])

    def state_dict(self) -> dict:
        return {"kind": "images-memory", "generator": self.generator.get_state(), "draws": self.draws,
                "n_samples": len(self.images)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "images-memory" or state["n_samples"] != len(self.images):
            raise UserError("the checkpoint's pool stream state does not match the data; resume with the same data "
                            "and settings")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


# --------------------------------------------------------------------------- streamed


class _ShardStream:
    """Epochs of shuffled shards -> ordered reads (threads) -> shuffle buffer of decoded images.

    State: (epoch, shards consumed this epoch, generator, the sample indices in the buffer,
    in buffer order). Loading it re-reads only the shards those samples live in.
    """

    augment_threads: int | None = 1  # intra-op threads of the thread that augments (see limit_intra_op_threads)

    def __init__(self, shard_set: ShardSet, *, seed: int, order_seed: int, rank: int, world_size: int,
                 shard_by_rank: bool, buffer_size: int, read_threads: int, read_ahead: int, name: str):
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
        self.epoch, self.cursor = 0, 0
        self._reads = None

    def epoch_shards(self, epoch: int) -> list[int]:
        """Shard indices (into ``set.names``) this stream reads in ``epoch``, in order."""
        order = epoch_order(len(self.set.shards), self.order_seed, epoch)
        if self.shard_by_rank:
            order = shard_for_rank(order, self.rank, self.world_size)
        return [self.set.shards[int(i)] for i in order]

    def _schedule(self, epoch: int, cursor: int):
        while True:
            shards = self.epoch_shards(epoch)
            for i in range(cursor, len(shards)):
                yield epoch, i, shards[i], len(shards)
            epoch, cursor = epoch + 1, 0

    def _load(self, item):
        epoch, i, k, n = item
        return epoch, i, n, self.set.read(k)

    def _fill(self, need: int) -> None:
        if self._reads is None:
            self._reads = ordered_map(self._load, self._schedule(self.epoch, self.cursor), self.read_threads,
                                      self.read_ahead)
        while len(self.buffer) < max(need, self.buffer_size):
            epoch, i, n, items = next(self._reads)
            self.buffer.extend(items)
            self.epoch, self.cursor = (epoch + 1, 0) if i + 1 >= n else (epoch, i + 1)

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

    def _stop_reads(self) -> None:
        if self._reads is not None:
            self._reads.close()
            self._reads = None

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
        self._stop_reads()
        self.generator.set_state(state["generator"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order_seed = int(state.get("order_seed", self.order_seed))
        ids = state["buffer"].tolist()
        found = self.set.read_samples(ids, self.read_threads) if ids else {}
        self.buffer = [found[i] for i in ids]

    def close(self) -> None:
        self._stop_reads()

    def __iter__(self):
        return self


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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, images_uint8: torch.Tensor, normalize: ImageNormalization,
                 device: str | torch.device = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Frozen-encoder representations of un-augmented images: (n, C, H, W) uint8 -> (n, D)
    float32 on the CPU (the encoder runs in eval mode; its mode is restored afterwards)."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = []
        for chunk in images_uint8.split(batch_size):
            x = normalize.normalize_uint8(chunk.to(device, non_blocking=True))
            out.append(encoder(x).float().cpu())
        return torch.cat(out) if out else torch.empty(0)
    finally:
        encoder.train(was_training)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int):
    W = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(x @ W + b, y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe_details(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         test_labels: torch.Tensor, *, l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                         val_fraction: float = 0.2, seed: int = 0, max_iter: int = 300,
                         device: str | torch.device = "cpu") -> dict:
    """Multinomial logistic regression on frozen features, the L2 weight chosen on a
    validation split carved from TRAIN (stratified, ``val_fraction`` of each class; the test
    set is never looked at), then refitted on all of train and scored on test.

    Features are standardised with train statistics; full-batch L-BFGS in float32.
    Returns {"accuracy", "l2", "val_accuracy": {l2: acc}, "n_train", "n_test"}.
    """
    xtr, xte = train_features.float().to(device), test_features.float().to(device)
    ytr, yte = train_labels.long().to(device), test_labels.long().to(device)
    mean = xtr.mean(0)
    std = xtr.std(0).clamp(min=1e-6) if len(xtr) > 1 else torch.ones_like(mean)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    n_classes = int(max(ytr.max().item(), yte.max().item() if len(yte) else 0)) + 1
    rng = np.random.default_rng(seed)
    labels = ytr.cpu().numpy()
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(len(members) * val_fraction))
        if 0 < k < len(members):
            val[rng.choice(members, k, replace=False)] = True
    scores = {}
    if val.any() and len(l2_grid) > 1:
        fit, held = torch.from_numpy(~val).to(device), torch.from_numpy(val).to(device)
        for l2 in l2_grid:
            W, b = _fit_logistic(xtr[fit], ytr[fit], n_classes, float(l2), max_iter)
            scores[float(l2)] = ((xtr[held] @ W + b).argmax(1) == ytr[held]).float().mean().item()
        best = max(scores.values())
        chosen = max(l2 for l2, s in scores.items() if s >= best - 1e-12)  # ties: the stronger penalty
    else:
        chosen = float(l2_grid[len(l2_grid) // 2])
    W, b = _fit_logistic(xtr, ytr, n_classes, chosen, max_iter)
    accuracy = ((xte @ W + b).argmax(1) == yte).float().mean().item() if len(yte) else float("nan")
    return {"accuracy": accuracy, "l2": chosen, "val_accuracy": scores, "n_train": len(ytr), "n_test": len(yte)}


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, **kwargs) -> float:
    """Test accuracy of the linear probe of :func:`linear_probe_details`."""
    return linear_probe_details(train_features, train_labels, test_features, test_labels, **kwargs)["accuracy"]


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, temperature: float = 0.1, chunk_size: int = 1024,
                 num_classes: int | None = None) -> float:
    """Weighted kNN monitor (Wu et al. 2018, as in BYOL-style training logs): cosine
    similarity to every training feature, the k nearest vote for their class with weight
    exp(sim / temperature); accuracy of the top-scoring class."""
    tr = TF.normalize(train_feats.float(), dim=1)
    te = TF.normalize(test_feats.float().to(tr.device), dim=1)
    ytr, yte = train_labels.long().to(tr.device), test_labels.long().to(tr.device)
    C = num_classes or int(max(ytr.max().item(), yte.max().item() if len(yte) else 0)) + 1
    k = min(int(k), len(tr))
    correct = 0
    for start in range(0, len(te), chunk_size):
        sim = te[start:start + chunk_size] @ tr.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), C, device=tr.device).scatter_add_(1, ytr[idx], (w / temperature).exp())
        correct += (votes.argmax(1) == yte[start:start + chunk_size]).sum().item()
    return correct / max(1, len(te))


# --------------------------------------------------------------------------- pictures


def to_uint8(x: torch.Tensor, normalization: ImageNormalization | None = None) -> torch.Tensor:
    """Normalised float views (n, C, H, W) back to uint8 images (for pictures)."""
    if normalization is not None:
        mean, std = normalization.tensors(x.device)
        x = x * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _show(ax, image: torch.Tensor) -> None:
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def save_mining_grid(path, anchors: torch.Tensor, mined: torch.Tensor, n: int = 8, *,
                     anchor_labels: torch.Tensor | None = None, mined_labels: torch.Tensor | None = None,
                     class_names: Sequence[str] | None = None, title: str | None = None) -> None:
    """A PNG of anchor (top row) / mined view (bottom row) pairs, as the paper's Figure 2.

    anchors, mined: (N, C, H, W) uint8 (see :func:`to_uint8` for normalised views); the
    first ``n`` pairs are drawn; with labels, each image is captioned with its class.
    """
    n = min(n, len(anchors), len(mined))
    if n == 0:
        raise ValueError("save_mining_grid: no pairs to draw")
    fig = _figure(1.3 * n, 3.4)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, (images, labels) in enumerate(((anchors, anchor_labels), (mined, mined_labels))):
            ax = axes[row][i]
            _show(ax, images[i])
            if labels is not None:
                c = int(labels[i])
                ax.set_title(class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c),
                             fontsize=8)
        axes[0][i].set_ylabel("anchor" if i == 0 else "", fontsize=8)
        axes[1][i].set_ylabel("mined" if i == 0 else "", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def save_confusion(path, anchor_labels: torch.Tensor, mined_labels: torch.Tensor, class_names: Sequence[str], *,
                   title: str = "mining class confusion") -> np.ndarray:
    """A PNG of the mining class-confusion matrix (paper Figure S6): rows the anchor's class,
    columns the mined view's class, each row normalised to sum 1. Pairs with a negative
    label (no mined view) are left out. Returns the (C, C) int64 count matrix."""
    C = len(class_names)
    a = torch.as_tensor(anchor_labels).long().cpu()
    m = torch.as_tensor(mined_labels).long().cpu()
    keep = (a >= 0) & (m >= 0) & (a < C) & (m < C)
    counts = torch.zeros(C * C, dtype=torch.int64).index_add_(0, a[keep] * C + m[keep],
                                                              torch.ones(int(keep.sum()), dtype=torch.int64))
    counts = counts.view(C, C).numpy()
    rates = counts / np.maximum(1, counts.sum(1, keepdims=True))
    side = max(4.0, 0.45 * C + 2)
    fig = _figure(side, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(C), labels=list(class_names), rotation=90, fontsize=7)
    ax.set_yticks(range(C), labels=list(class_names), fontsize=7)
    ax.set_xlabel("mined view class")
    ax.set_ylabel("anchor class")
    agreement = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"{title} (agreement {agreement:.1%})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return counts


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


SELECTION_SPLITS = ("train", "val", "test")


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
        has_root = fs.exists(join_url(path, "index.json"))
        present = [s for s in SELECTION_SPLITS if fs.exists(join_url(path, s, "index.json"))]
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
class ImageTrainData(TrainData):
    """:class:`pipeline.data.TrainData` over an image shard set: one session, the anchor
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

    def evaluate(self, model, cfg, *, device, run_dir=None, plots: bool = False) -> dict:
        s = self.sessions[0]
        train_x, train_y = self.images("train")
        eval_x, eval_y = self.images("eval")
        return evaluate_images(model, cfg, s.normalization, train_x, train_y, eval_x, eval_y, classes=s.classes,
                               device=device, run_dir=run_dir, plots=plots)


def build_image_train_data(cfg, normalization: dict | None = None, *, rank: int = 0,
                           world_size: int = 1) -> ImageTrainData:
    """The trainer's data for an image shard set (``cfg.data.path``, ``cfg.images``).

    ``normalization``: a checkpoint's stored state (resume): its constants and view size
    are reused, so a ``normalize: fit`` run continues with the statistics it started with.
    """
    from .config import IMAGE_ENCODERS

    d, im = cfg.data, cfg.images
    if cfg.model.encoder not in IMAGE_ENCODERS:
        raise UserError(f"{d.path} holds images: set model.encoder to one of {', '.join(IMAGE_ENCODERS)} "
                        f"(it is {cfg.model.encoder!r}; see configs/mnist_myow.yaml, configs/cifar10_myow.yaml)")
    if cfg.method.name == "supervised":
        raise UserError("method.name supervised is the neural-data baseline; image runs take myow or byol")
    if d.min_time_gap_s:
        raise UserError("data.min_time_gap_s is for neural data: images have no time, mining only excludes the "
                        "anchor's own image; leave it null")
    if normalization is not None and not (isinstance(normalization, dict) and normalization.get("kind") == "images"):
        raise UserError("the checkpoint was written by a run on a recording store, data.path holds images; resume "
                        "with the same data, or use another run.dir to start over")
    train_sel, eval_sel = resolve_selections(cfg)
    if normalization is not None:
        normalize = (tuple(normalization["mean"]), tuple(normalization["std"]))
        image_size = normalization.get("image_size") or im.image_size
    else:
        normalize = im.normalize if isinstance(im.normalize, str) else (tuple(im.normalize[0]), tuple(im.normalize[1]))
        image_size = im.image_size
    mining_view = cfg.effective_mining_weight > 0 and cfg.method.mining_view == "separate"
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


# --------------------------------------------------------------------------- image evaluation


def _class_names(classes: Sequence[str], *labels: torch.Tensor) -> list[str]:
    n = max([len(classes)] + [int(y.max()) + 1 for y in labels if len(y)])
    return [classes[i] if i < len(classes) else str(i) for i in range(n)]


def evaluate_images(model, cfg, normalization: ImageNormalization, train_images: torch.Tensor,
                    train_labels: torch.Tensor, eval_images: torch.Tensor, eval_labels: torch.Tensor, *,
                    classes: Sequence[str] = (), device="cpu", run_dir=None, plots: bool = False,
                    return_features: bool = False):
    """The image read-outs of a (frozen) MYOW/BYOL model.

    The online encoder embeds the un-augmented training and eval selections (eval mode);
    ``linear_accuracy``: the logistic-regression probe of :func:`linear_probe_details`,
    trained on the training selection (its L2 weight chosen on a split of the TRAINING
    selection: the eval images are only scored), scored on the eval selection;
    ``knn_accuracy``: weighted kNN (``eval.knn_k``, ``eval.knn_temperature``).

    With ``plots`` (and ``run_dir``): ``eval.mining_anchors`` eval images are mined, as in
    training, against a pool of ``method.pool_size`` training images (online y of the
    anchors, target y' of the pool, a random pick among the ``method.k`` nearest;
    :func:`model.miner.mine_views`; the two selections share no image, so nothing is
    excluded): ``mined_views.png`` shows anchor / mined pairs (paper Figure 2),
    ``mining_confusion.png`` the mining class-confusion matrix (Figure S6), and
    ``mining_class_agreement`` their share of same-class pairs. ``mined_label_agreement.png``
    plots the training-time agreement from metrics.jsonl.

    Returns the metrics dict (and the eval features (n, D) with ``return_features``).
    """
    from model import mine_views

    from .evaluate import save_agreement_plot

    device = torch.device(device)
    train_f = embed_images(model.encoder, train_images, normalization, device)
    eval_f = embed_images(model.encoder, eval_images, normalization, device)
    probe = linear_probe_details(train_f, train_labels, eval_f, eval_labels, seed=cfg.run.seed, device=device)
    results = {
        "linear_accuracy": probe["accuracy"],
        "knn_accuracy": knn_accuracy(train_f, train_labels, eval_f, eval_labels, k=cfg.eval.knn_k,
                                     temperature=cfg.eval.knn_temperature),
        "linear_l2": probe["l2"],
        "linear_val_accuracy": max(probe["val_accuracy"].values()) if probe["val_accuracy"] else None,
        "train_images": len(train_labels), "eval_images": len(eval_labels),
    }
    if plots and run_dir is not None and len(eval_labels) and len(train_labels):
        from pathlib import Path

        run_dir = Path(run_dir)
        names = _class_names(classes, train_labels, eval_labels)
        g = torch.Generator().manual_seed(cfg.run.seed)
        anchors = torch.randperm(len(eval_labels), generator=g)[:cfg.eval.mining_anchors]
        pool = torch.randperm(len(train_labels), generator=g)[:cfg.method.pool_size]
        pool_y = embed_images(model.target["encoder"], train_images[pool], normalization, device)
        picked = mine_views(eval_f[anchors], pool_y, cfg.method.k, g)  # (A,) into the pool, never -1 here
        mined = pool[picked]
        a_labels, m_labels = eval_labels[anchors], train_labels[mined]
        save_mining_grid(run_dir / "mined_views.png", eval_images[anchors], train_images[mined], n=10,
                         anchor_labels=a_labels, mined_labels=m_labels, class_names=names,
                         title=f"eval anchors (top) and the views they mine among {len(pool)} training images")
        counts = save_confusion(run_dir / "mining_confusion.png", a_labels, m_labels, names,
                                title=f"mining class confusion, {len(anchors)} eval anchors")
        results["mining_class_agreement"] = float(np.trace(counts) / max(1, counts.sum()))
        p = torch.bincount(train_labels.long(), minlength=len(names)).double() / len(train_labels)
        save_agreement_plot(run_dir, float((p ** 2).sum()), "class")
    return (results, eval_f) if return_features else results


def evaluate_image_run(run_dir, cfg, ckpt: dict, data: str | None = None, export: str | None = None,
                       plots: bool = True) -> dict:
    """``python -m pipeline.evaluate --run RUN_DIR`` for a run on image shards: rebuild the
    model from the checkpoint (the image channels and normalisation constants are stored
    in it), load the run's training and eval selections (``data`` replaces data.path) and
    evaluate with :func:`evaluate_images`. ``export`` writes ``embedding`` (n, D) float32 of
    the eval selection, with ``sample`` and ``label``, atomically."""
    from .build import build_model
    from .evaluate import export_arrays
    from .train import set_threads

    set_threads(cfg.run.threads, images=True)  # as at the end of training (see set_threads)
    state = ckpt["normalization"]
    norm = ImageNormalization.from_state_dict(state)
    if data is not None:
        cfg.data.path = data
    train_sel, eval_sel = resolve_selections(cfg)
    d = cfg.data
    size = int(state.get("image_size") or cfg.images.image_size or _native_size(train_sel, d))
    train_x, train_y, _ = load_selection(train_sel, size, d.storage_options, d.read_threads, d.read_retries)
    eval_x, eval_y, samples = load_selection(eval_sel, size, d.storage_options, d.read_threads, d.read_retries)
    model = build_model(cfg, norm.channels)
    model.load_state_dict(ckpt["model"])
    use_cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device)
    classes = ShardSet(train_sel.url, d.storage_options, train_sel.range).classes
    results, eval_f = evaluate_images(model, cfg, norm, train_x, train_y, eval_x, eval_y, classes=classes,
                                      device=device, run_dir=run_dir, plots=plots, return_features=True)
    if export:
        export_arrays(export, embedding=eval_f.numpy().astype(np.float32), sample=samples.numpy(),
                      label=eval_y.numpy())
    results["step"] = int(ckpt["step"])
    return results


def _native_size(selection: Selection, d) -> int:
    first = ShardSet(selection.url, d.storage_options, selection.range).first_image()
    return int(min(first.shape[-2:]))
