"""MNIST idx files as image sets: finding the train/test idx pairs of a folder, checking
their headers and labels, and streaming the images (plain or gzipped idx) as PNG samples.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import zlib
from typing import Callable, Iterator

import numpy as np

from .errors import UserError
from .images_common import ImageSet, Sample, encode_png, list_folder
from .shard_format import SPLITS

IDX_FILE = re.compile(r"(?:.+[-_.])?(train|t10k|test)-(images|labels)[-.]idx([13])-ubyte(\.gz)?")
IDX_CHUNK = 1024  # images decoded per read from an idx stream
IDX_CHUNK_BYTES = 64 << 20  # ... and at most this many bytes per read
IDX_MAX_SIDE = 4096  # largest idx image side accepted (MNIST is 28): a damaged header is refused
READ_BYTES = 16 << 20  # reads are cut into pieces: a header announcing more than the file holds costs nothing


def mnist_sets(fs, path: str, source: str) -> list[ImageSet]:
    """One set per part (train, test) of the idx files in ``path``."""
    parts: dict[str, dict[str, str]] = {}
    for name in sorted(list_folder(fs, path)[0]):
        match = IDX_FILE.fullmatch(name)
        if not match:
            continue
        part, kind, dims = match.group(1), match.group(2), match.group(3)
        if (kind, dims) not in (("images", "3"), ("labels", "1")):
            raise UserError(f"{path}/{name}: {kind} must be an idx{3 if kind == 'images' else 1} file; "
                            "rename or remove it")
        split = "train" if part == "train" else "test"
        previous = parts.setdefault(split, {}).get(kind)
        if previous:
            raise UserError(f"{path}: both {previous} and {name} hold the {split} {kind}; keep one of them")
        parts[split][kind] = name
    if not parts:
        raise UserError(f"{source}: no MNIST idx files (e.g. train-images-idx3-ubyte.gz, "
                        "t10k-labels-idx1-ubyte.gz) in this folder")
    found = []
    for split in sorted(parts, key=SPLITS.index):
        names = parts[split]
        if len(names) < 2:
            (kind, have), = names.items()
            other = have.replace("images", "labels").replace("idx3", "idx1") if kind == "images" else \
                have.replace("labels", "images").replace("idx1", "idx3")
            raise UserError(f"{path}/{have}: its {'labels' if kind == 'images' else 'images'} file {other} is "
                            "missing; add it to the folder")
        images, labels = f"{path}/{names['images']}", f"{path}/{names['labels']}"
        shape = _idx_header(fs, images, 3)
        if not (1 <= shape[1] <= IDX_MAX_SIDE and 1 <= shape[2] <= IDX_MAX_SIDE):
            raise UserError(f"{images}: its header announces images of {shape[1]}x{shape[2]} pixels; expected "
                            f"1x1 to {IDX_MAX_SIDE}x{IDX_MAX_SIDE} (MNIST is 28x28): the file is damaged, "
                            "download it again")
        label_values = _read_idx_labels(fs, labels)
        if len(label_values) != shape[0]:
            raise UserError(f"{labels}: {len(label_values)} labels for {shape[0]} images in {images}; "
                            "use the labels file of the same set")
        if shape[0] == 0:
            raise UserError(f"{images}: holds no images")
        found.append((split, images, shape, label_values))
    # idx files name no classes: the digits 0..max label, the same list for every split
    classes = [str(c) for c in range(max(int(labels.max()) for *_, labels in found) + 1)]
    return [ImageSet(split, "mnist", source, classes, "L", shape[0], _mnist_samples(fs, images, shape, labels))
            for split, images, shape, labels in found]


def _open_idx(fs, path: str):
    raw = fs.open(path, "rb")
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


def _read_exact(stream, n: int, path: str) -> bytes:
    pieces, left = [], n
    while left > 0:
        piece = stream.read(min(left, READ_BYTES))
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    if left:
        raise UserError(f"{path}: truncated (ends {left} bytes early); download it again")
    return b"".join(pieces)


def _read_header(stream, path: str, dims: int) -> tuple[int, ...]:
    magic = _read_exact(stream, 4, path)
    if magic[:3] != b"\x00\x00\x08" or magic[3] != dims:
        raise UserError(f"{path}: not an idx{dims} file of unsigned bytes (magic {magic.hex()}, expected "
                        f"000008{dims:02x}); check that the images and labels files are not swapped or damaged")
    return tuple(int(d) for d in np.frombuffer(_read_exact(stream, 4 * dims, path), dtype=">u4"))


@contextlib.contextmanager
def _idx_errors(path: str) -> Iterator[None]:
    """Turn decompression and read failures (bad gzip, CRC mismatch) into one line naming ``path``."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: corrupt or truncated ({type(err).__name__}: {err}); download it again")


def _idx_header(fs, path: str, dims: int) -> tuple[int, ...]:
    with _idx_errors(path), _open_idx(fs, path) as stream:
        return _read_header(stream, path, dims)


def _read_idx_labels(fs, path: str) -> np.ndarray:
    with _idx_errors(path), _open_idx(fs, path) as stream:
        (n,) = _read_header(stream, path, 1)
        labels = np.frombuffer(_read_exact(stream, n, path), dtype=np.uint8)
        if stream.read(1):  # reading to the end also checks the gzip CRC
            raise UserError(f"{path}: more bytes than its header's {n} labels; download it again")
    return labels


def _mnist_samples(fs, path: str, shape: tuple[int, int, int], labels: np.ndarray) -> Callable[[], Iterator[Sample]]:
    n, rows, cols = shape

    def samples() -> Iterator[Sample]:
        with _idx_errors(path), _open_idx(fs, path) as stream:
            _read_header(stream, path, 3)
            per_read = max(1, min(IDX_CHUNK, IDX_CHUNK_BYTES // (rows * cols)))
            for start in range(0, n, per_read):
                k = min(per_read, n - start)
                pixels = np.frombuffer(_read_exact(stream, k * rows * cols, path), np.uint8).reshape(k, rows, cols)
                for j in range(k):
                    yield encode_png(pixels[j]), "png", int(labels[start + j])
            if stream.read(1):
                raise UserError(f"{path}: more bytes than its header's {n} images; download it again")

    return samples
