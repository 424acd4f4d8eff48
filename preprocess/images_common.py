"""What every image-source reader shares: the ``ImageSet`` a reader returns (one split of
a source, its samples produced lazily), the ``Sample`` tuple, listing a folder and the
lossless PNG encoding of pixel arrays.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

Sample = tuple[bytes, str, int]  # (image bytes, extension without the dot, class index)


@dataclass
class ImageSet:
    """One split of a source: the samples written under one directory of the output."""

    split: str  # sub-directory under URL_PREFIX; "" for URL_PREFIX itself
    format: str
    path: str  # the source: an absolute path or the URL given
    classes: list[str]
    image_mode: str | None  # PIL mode of the PNGs written, None when original files are kept
    count: int | None  # number of samples when known before reading them
    samples: Callable[[], Iterator[Sample]]


def list_folder(fs, path: str) -> tuple[set[str], set[str]]:
    """(file names, folder names) directly inside ``path``, hidden ones left out."""
    files, dirs = set(), set()
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("."):
            (dirs if entry["type"] == "directory" else files).add(name)
    return files, dirs


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a (H, W) uint8 (mode L) or (H, W, 3) uint8 (mode RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
