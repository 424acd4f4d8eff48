"""Image views: T and T_m (paper App. C), batched colour ops, normalisation.

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
the same formulas as ``v2.functional`` (equal to 1e-5, tested).

Normalisation: per-channel constants by transform set (``normalize="preset"``): MNIST
(0.1307, 0.3081), the MNIST training set's statistics; CIFAR-10's training set
(0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) (the authors' code uses the
widespread, slightly wrong std (0.2023, 0.1994, 0.2010); ours is the true one); ImageNet's
for ``"imagenet"``. ``normalize="fit"`` computes them from the training images instead
(exact in memory; the first ``FIT_SAMPLES`` selected samples when streamed), or pass
``(mean, std)``. The streams carry it as ``.normalization`` for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from preprocess.errors import UserError

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
    # dSprites with local views: App. I runs the test where "the augmentations provided to the
    # network are too local" to drive learning in BYOL, so T barely moves an image (crop 0.85-1,
    # near-square ratio 0.9-1.1) and MYOW's mined views must bridge the latent holes
    "dsprites-local": (ViewSpec(crop_scale=(0.85, 1.0), crop_ratio=(0.9, 1.1), **_CROP_ONLY),
                       ViewSpec(crop_scale=(0.9, 1.0), **_CROP_ONLY), "mnist"),
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


