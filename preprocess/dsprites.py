"""``python -m preprocess.dsprites OUT``: a procedural dSprites set with latent holes (paper App. I).

dSprites (Matthey et al. 2017) renders 3 shapes (square, ellipse, heart) at 6 scales,
40 orientations and a grid of positions as binary images. The paper's App. I experiment:
half of the orientation values and half of the scale values are kept (drawn with
``--seed``), "only the corresponding images" (a kept orientation AND a kept scale) are
considered, a random ``--rate`` of them is the training set and "the remaining images form
the test set". ``--test kept`` (default, the paper's) therefore tests on the kept-latent
images not sampled for training: latent combinations (e.g. positions) never trained on,
with scale and orientation values that were. ``--test unseen`` instead tests on images
with an orientation or a scale that was not kept (extrapolation to latent values never
seen in training; this module's earlier behaviour). ``--test-max`` caps the test set at a
random (seeded) subset. The task is the shape.

Written through the image path (:func:`preprocess.shard_images.write_shards`), so the
trainer reads it like any shard set: ``OUT/train/`` and ``OUT/test/`` WebDataset shards
with ``index.json`` (classes ``square``, ``ellipse``, ``heart``; PNG, mode L, 0/255).

To fit a CPU the images are ``--size`` pixels (default 32; the original 64) on a
``--positions`` x ``--positions`` grid (default 8; the original 32): 3 x 6 x 40 x 64 =
46,080 images instead of 737,280. The sampling design is the paper's.

Usage: python -m preprocess.dsprites OUT [--rate 0.075] [--seed 0] [--size 32] [--positions 8]
       [--test {kept,unseen}] [--test-max 3000] [--overwrite] [--no-progress]
"""

from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from .errors import OneLineParser, UsageError, run_cli, setup_logging
from .images_common import ImageSet, encode_png
from .shard_writer import write_shards

PROG = "python -m preprocess.dsprites"
SHAPES = ("square", "ellipse", "heart")
N_SCALES, N_ORIENTATIONS = 6, 40
SCALES = np.linspace(0.5, 1.0, N_SCALES)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, N_ORIENTATIONS, endpoint=False)
TESTS = ("kept", "unseen")  # --test: kept-latent images not trained on (the paper's), or unseen latent values
HALF_SIZE = 0.2  # half-size of a shape at scale 1, as a fraction of the image side
MARGIN = 0.3  # centres stay this far (a fraction of the side) from the border: no shape is cut


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in its own frame (u, v in half-sizes; the shape spans about [-1, 1])."""
    if shape == 0:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == 1:  # ellipse, 2:1
        return u ** 2 + (v / 0.5) ** 2 <= 1.0
    x, y = 1.15 * u, 1.15 * v + 0.15  # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, centred
    return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0.0


def render(shape: int, scale: float, orientation: float, px: float, py: float, size: int) -> np.ndarray:
    """(size, size) uint8 image, 255 inside the shape: centre (px, py) in [0, 1] of the free
    area, rotated by ``orientation`` (radians), half-size HALF_SIZE * scale * size."""
    c = (np.arange(size) + 0.5)
    cx = (MARGIN + (1 - 2 * MARGIN) * px) * size
    cy = (MARGIN + (1 - 2 * MARGIN) * py) * size
    h = HALF_SIZE * scale * size
    dx, dy = (c[None, :] - cx) / h, (c[:, None] - cy) / h
    cos, sin = np.cos(orientation), np.sin(orientation)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the pixel grid by -orientation
    return np.where(shape_mask(shape, u, v), 255, 0).astype(np.uint8)


def latent_grid(positions: int) -> np.ndarray:
    """(n, 5) int latent indices (shape, scale, orientation, x, y) of every image, C order."""
    axes = [np.arange(n) for n in (len(SHAPES), N_SCALES, N_ORIENTATIONS, positions, positions)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 5)


def split_latents(positions: int, rate: float, seed: int, test_max: int | None,
                  test: str = "kept") -> tuple[np.ndarray, np.ndarray, dict]:
    """(train latents, test latents, description) of the App. I design.

    ``test="kept"``: the images with kept latents that were not drawn for training (the
    paper's "remaining images"); ``test="unseen"``: the images with a scale or an
    orientation that was not kept. ``test_max`` caps the test set (a random subset)."""
    if test not in TESTS:
        raise ValueError(f"test {test!r}: must be one of {', '.join(TESTS)}")
    rng = np.random.default_rng(seed)
    kept_scales = np.sort(rng.choice(N_SCALES, N_SCALES // 2, replace=False))
    kept_orient = np.sort(rng.choice(N_ORIENTATIONS, N_ORIENTATIONS // 2, replace=False))
    grid = latent_grid(positions)
    kept = np.isin(grid[:, 1], kept_scales) & np.isin(grid[:, 2], kept_orient)
    pool = np.flatnonzero(kept)
    train = np.sort(rng.choice(pool, max(1, int(round(rate * len(pool)))), replace=False))
    held = np.setdiff1d(pool, train) if test == "kept" else np.flatnonzero(~kept)
    if test_max is not None and test_max < len(held):
        held = np.sort(rng.choice(held, test_max, replace=False))
    info = {"kept_scales": kept_scales.tolist(), "kept_orientations": kept_orient.tolist(), "rate": rate,
            "seed": seed, "images": len(grid), "kept_images": int(len(pool)), "test": test}
    return grid[train], grid[held], info


def image_set(split: str, latents: np.ndarray, size: int, positions: int, description: str) -> ImageSet:
    def samples() -> Iterator[tuple[bytes, str, int]]:
        for shape, s, o, x, y in latents.tolist():
            img = render(shape, SCALES[s], ORIENTATIONS[o], x / max(positions - 1, 1), y / max(positions - 1, 1), size)
            yield encode_png(img), "png", shape

    return ImageSet(split=split, format="dsprites", path=description, classes=list(SHAPES), image_mode="L",
                    count=len(latents), samples=samples)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Procedural dSprites (square, ellipse, heart; 6 scales, 40 "
                      "orientations, a grid of positions) with the paper's App. I latent holes, as WebDataset "
                      "shards: OUT/train (a --rate of the images whose scale and orientation were kept) and "
                      "OUT/test (--test kept: the other kept-latent images, the paper's; --test unseen: images "
                      "with a scale or orientation never trained on).")
    p.add_argument("out", metavar="OUT", help="output folder or URL prefix (OUT/train, OUT/test)")
    p.add_argument("--rate", type=float, default=0.075, help="share of the kept images trained on (paper: 0.3, "
                   "0.15, 0.075; default 0.075)")
    p.add_argument("--seed", type=int, default=0, help="draws the kept latent values and the samples")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32; dSprites: 64)")
    p.add_argument("--positions", type=int, default=8, help="positions per axis (default 8; dSprites: 32)")
    p.add_argument("--test", choices=TESTS, default="kept", help="test images: kept = the images with kept "
                   "scales and orientations not drawn for training (paper App. I, default); unseen = the images "
                   "with a scale or orientation that was not kept")
    p.add_argument("--test-max", type=int, default=3000, help="at most this many test images, a random subset "
                   "drawn with --seed (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set at OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(False)
    if not 0 < args.rate <= 1:
        raise UsageError(f"--rate {args.rate}: must be in (0, 1]")
    if not 8 <= args.size <= 256:
        raise UsageError(f"--size {args.size}: must be 8..256 pixels")
    if not 1 <= args.positions <= 64:
        raise UsageError(f"--positions {args.positions}: must be 1..64")
    if args.seed < 0 or args.test_max < 0:
        raise UsageError("--seed and --test-max must be >= 0")
    train, test, info = split_latents(args.positions, args.rate, args.seed, args.test_max or None, args.test)
    if not len(test):
        raise UsageError(f"--rate {args.rate} with --test {args.test}: no images are left for the test set")
    description = (f"dsprites(size={args.size}, positions={args.positions}, rate={args.rate}, seed={args.seed}, "
                   f"test={args.test}, kept_scales={info['kept_scales']}, "
                   f"kept_orientations={info['kept_orientations']})")
    sets = [image_set("train", train, args.size, args.positions, description),
            image_set("test", test, args.size, args.positions, description)]
    write_shards(sets, args.out, None, 10000, args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.out}: {len(train)} training images (rate {args.rate} of {info['kept_images']} with kept "
          f"latents), {len(test)} test images " + ("with kept latents not trained on" if args.test == "kept"
                                                    else "with unseen scales or orientations"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
