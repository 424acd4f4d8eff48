"""``python -m preprocess.shard_images SOURCE --out URL_PREFIX``: image sets -> WebDataset shards.

SOURCE (a folder, as a path or any fsspec URL) is detected, or forced with --format:

    mnist        idx files: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (also test-*, and
                 the "images.idx3-ubyte" spelling); t10k/test -> the test split
    cifar        CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) or
                 CIFAR-100 (train, test, meta); SOURCE may also be the folder holding
                 cifar-10-batches-py/ or cifar-100-python/
    imagefolder  one sub-folder per class (class index = position in the sorted folder
                 names), image files (.jpg .jpeg .png .bmp .gif .webp) anywhere below it;
                 a root whose only folders are train/ and val/ and/or test/, each such a
                 tree, gives one set per split (class indices from train/)

Output layout (one shard set per split; an ImageFolder without splits is one set at
URL_PREFIX itself)::

    URL_PREFIX/train/shard-000000.tar ... index.json     MNIST, CIFAR, split ImageFolder
    URL_PREFIX/test/shard-000000.tar ...  index.json     (only the splits the source has)
    URL_PREFIX/shard-000000.tar ... index.json           flat ImageFolder

Each tar is a WebDataset shard of at most --shard-size samples, in source order
(ImageFolder: by class, then by path). A sample is ``KEY.cls`` (the class index as ASCII
digits) and ``KEY.EXT`` (the image), KEY = the sample's index in its split, ``%08d``.
MNIST/CIFAR pixels are stored losslessly as PNG (mode L / RGB); ImageFolder files are
stored byte for byte with their own extension (lower-cased). Tars carry mtime 0, so the
same input always gives the same bytes. ``index.json`` (schema ``myow.images/1``) lists the
shards with their sample counts, the class names, the source and the image mode.

Publication: ``index.json`` is the completion marker; a prefix without it is incomplete
and ``read_index`` refuses it. Locally the whole output is written into a hidden
``.NAME.partial-PID-*`` folder next to URL_PREFIX and renamed into place (a killed run's
folder is removed by the next run). On object storage (no rename) shards are written to a
local temporary folder, each uploaded as soon as it is closed and then deleted (local disk
holds one shard at a time), under a ``.myow-partial`` object; the index files are
uploaded after every shard of every split, and the marker is removed last. The next run
clears a prefix that only holds a killed run's leftovers (marker, no index). An existing
set is replaced only with --overwrite (on object storage the old set is deleted when the
first new shard is uploaded); anything else at URL_PREFIX is never replaced.

CIFAR batches are pickles. Unpickling runs whatever callables a file names, so they are
read with an unpickler that only resolves the three numpy names an array needs (see
``RestrictedUnpickler``); anything else in the file is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import __version__
from .errors import OneLineParser, UsageError, UserError, run_cli, setup_logging
from .store import PARTIAL_MARKER, _pid_alive, filesystem, is_local, join_url

log = logging.getLogger("preprocess.shard_images")
PROG = "python -m preprocess.shard_images"

SCHEMA = "myow.images/1"
CREATED_BY = f"myow-stream {__version__}"
INDEX = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
SPLITS = ("train", "val", "test")
FORMATS = ("mnist", "cifar", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# shards are cut by count only, so every shard but the last holds exactly --shard-size
# samples and readers can split work evenly from index.json alone
MAX_SHARD_BYTES = float("inf")
IDX_FILE = re.compile(r"(?:.+[-_.])?(train|t10k|test)-(images|labels)[-.]idx([13])-ubyte(\.gz)?")
IDX_CHUNK = 1024  # images decoded per read from an idx stream
IDX_CHUNK_BYTES = 64 << 20  # ... and at most this many bytes per read
IDX_MAX_SIDE = 4096  # largest idx image side accepted (MNIST is 28): a damaged header is refused
READ_BYTES = 16 << 20  # reads are cut into pieces: a header announcing more than the file holds costs nothing
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
CIFAR_SIDE = 32
OUR_INDEX = re.compile(rf"(?:(?:{'|'.join(SPLITS)})/)?index\.json")  # where this command writes indexes

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


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Shard MNIST idx files, CIFAR-10/100 python batches or an ImageFolder tree into "
                    "WebDataset tars plus an index.json per split, published atomically.",
        epilog="Examples:\n"
               "  python -m preprocess.shard_images mnist/ --out shards/mnist            # -> train/, test/\n"
               "  python -m preprocess.shard_images cifar-10-batches-py --out s3://bucket/cifar10 \\\n"
               "      --storage-options '{\"endpoint_url\": \"http://minio:9000\"}'\n"
               "  python -m preprocess.shard_images photos/ --out shards/photos --shard-size 2000\n"
               "Layout: MNIST and CIFAR give URL_PREFIX/train/ and URL_PREFIX/test/ (the parts present); "
               "an ImageFolder gives one set at URL_PREFIX, or one per split when its root holds only "
               "train/, val/, test/. Each set is shard-NNNNNN.tar files and index.json (written last: "
               "a set without it is incomplete). Samples are KEY.png (MNIST/CIFAR, lossless) or the "
               "original file (ImageFolder) and KEY.cls, the class index.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="MNIST folder, CIFAR batches folder or ImageFolder root "
                                                    "(path or URL)")
    p.add_argument("--out", required=True, metavar="URL_PREFIX",
                   help="where to write the shards (path, memory://, s3://...)")
    p.add_argument("--format", choices=FORMATS, help="force the source format (default: detect)")
    p.add_argument("--shard-size", type=int, default=10000, metavar="N",
                   help="samples per shard (default 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out")
    p.add_argument("--storage-options", metavar="JSON", default="{}",
                   help="fsspec storage options for SOURCE and --out, as JSON (e.g. endpoint, credentials)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_storage_options(text: str) -> dict:
    try:
        options = json.loads(text)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise UsageError(f"--storage-options: not a JSON object ({err})")
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.shard_size < 1:
        raise UsageError(f"--shard-size {args.shard_size}: must be at least 1")
    storage_options = parse_storage_options(args.storage_options)
    started = time.perf_counter()
    image_sets = read_source(args.source, args.format, storage_options)
    indexes = write_shards(image_sets, args.out, storage_options, args.shard_size, args.overwrite,
                           progress=not args.no_progress)
    parts = ", ".join(f"{s.split + ' ' if s.split else ''}{i['num_samples']} images in {len(i['shards'])} "
                      f"shard{'s' if len(i['shards']) > 1 else ''}" for s, i in zip(image_sets, indexes))
    print(f"wrote {args.out}: {parts} ({image_sets[0].format}), in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- sources


def read_source(source: str, fmt: str | None, storage_options: dict | None = None) -> list[ImageSet]:
    """The splits of ``source``, validated as far as possible without reading every image."""
    fs, path = filesystem(source, storage_options)
    if is_local(source):
        source = path  # absolute, for index.json's record of the source
    try:
        if not fs.exists(path):
            raise UserError(f"{source}: no such file or directory; check the SOURCE path")
        if not fs.isdir(path):
            hint = "; extract the archive first" if path.endswith((".tar.gz", ".tgz", ".zip")) else ""
            raise UserError(f"{source}: SOURCE must be a folder of MNIST idx files, CIFAR batches or an "
                            f"ImageFolder tree{hint}")
        files, dirs = _list_folder(fs, path)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{source}: cannot read ({type(err).__name__}: {err}); check the path and --storage-options")
    # the folder around the batches that torchvision's download leaves
    cifar_dirs = sorted(dirs & set(CIFAR_FOLDERS))
    if cifar_dirs and fmt in (None, "cifar") and _detect(files, set()) is None:
        if len(cifar_dirs) > 1:
            raise UserError(f"{source}: holds both {' and '.join(cifar_dirs)}; pass one of them as SOURCE")
        return cifar_sets(fs, f"{path}/{cifar_dirs[0]}", source)
    fmt = fmt or _detect(files, dirs)
    if fmt is None:
        raise UserError(f"{source}: neither MNIST idx files, CIFAR batches nor class sub-folders found; "
                        "point SOURCE at the folder holding them (or force a format with --format)")
    return {"mnist": mnist_sets, "cifar": cifar_sets, "imagefolder": imagefolder_sets}[fmt](fs, path, source)


def _list_folder(fs, path: str) -> tuple[set[str], set[str]]:
    """(file names, folder names) directly inside ``path``, hidden ones left out."""
    files, dirs = set(), set()
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("."):
            (dirs if entry["type"] == "directory" else files).add(name)
    return files, dirs


def _detect(files: set[str], dirs: set[str]) -> str | None:
    if files & {"data_batch_1", "test_batch", "batches.meta"} or ({"train", "test", "meta"} & files
                                                                  and not {"train", "test"} & dirs):
        return "cifar"
    if any(IDX_FILE.fullmatch(f) for f in files):
        return "mnist"
    if dirs:
        return "imagefolder"
    return None


def _png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a (H, W) uint8 (mode L) or (H, W, 3) uint8 (mode RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- MNIST idx


def mnist_sets(fs, path: str, source: str) -> list[ImageSet]:
    """One set per part (train, test) of the idx files in ``path``."""
    parts: dict[str, dict[str, str]] = {}
    for name in sorted(_list_folder(fs, path)[0]):
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
                    yield _png(pixels[j]), "png", int(labels[start + j])
            if stream.read(1):
                raise UserError(f"{path}: more bytes than its header's {n} images; download it again")

    return samples


# -- CIFAR python batches


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class ForbiddenPickle(pickle.UnpicklingError):
    """A pickle names a global that ``RestrictedUnpickler`` does not resolve."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without letting the file run code.

    A pickle can only reach a callable through ``find_class`` (GLOBAL, STACK_GLOBAL and
    the extension-registry opcodes all go through it), and REDUCE/BUILD/NEWOBJ only call
    what it returned. The batches hold dicts, lists, strings, ints and numpy arrays; an
    array is pickled as ``_reconstruct(ndarray, (0,), b'b')`` (an empty array), a
    ``dtype(...)`` and two ``__setstate__`` calls that fill in shape and raw bytes. So
    exactly those names resolve (``_reconstruct`` under its numpy 1 and numpy 2 module
    names); any other global, e.g. ``os.system``, is refused before it is called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        resolve = self.ALLOWED.get((module, name))
        if resolve is None:
            raise ForbiddenPickle(f"refused global {module}.{name}")
        return resolve()

    def persistent_load(self, pid):
        raise ForbiddenPickle("refused persistent id")


def load_cifar_pickle(fs, path: str) -> dict[str, object]:
    """A CIFAR batch or meta file as a dict with str keys (Python 2's str keys and Python 3's
    bytes keys alike), read with ``RestrictedUnpickler``."""
    try:
        with fs.open(path, "rb") as f:
            # latin1: the original batches were written by Python 2, whose str holds raw bytes
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except ForbiddenPickle as err:
        raise UserError(f"{path}: {err}; this is not a plain CIFAR batch and is not loaded (it could run code)")
    except Exception as err:
        raise UserError(f"{path}: not a readable CIFAR python batch ({type(err).__name__}: {err}); "
                        "download it again")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def cifar_sets(fs, path: str, source: str) -> list[ImageSet]:
    """CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) in ``path``: train and test sets."""
    files = _list_folder(fs, path)[0]
    train10 = sorted((f for f in files if re.fullmatch(r"data_batch_\d+", f)), key=lambda f: int(f.rsplit("_", 1)[1]))
    if train10 or "test_batch" in files:
        variant, label_key, meta, names_key = 10, "labels", "batches.meta", "label_names"
        parts = {"train": train10, "test": ["test_batch"] if "test_batch" in files else []}
    elif {"train", "test"} & files:
        variant, label_key, meta, names_key = 100, "fine_labels", "meta", "fine_label_names"
        parts = {split: [split] if split in files else [] for split in ("train", "test")}
    else:
        raise UserError(f"{source}: no CIFAR batches (data_batch_1..5 and test_batch, or CIFAR-100's train "
                        "and test) in this folder")
    classes = [str(c) for c in range(variant)]
    if meta in files:
        names = load_cifar_pickle(fs, f"{path}/{meta}").get(names_key)
        if not isinstance(names, list) or len(names) != variant:
            raise UserError(f"{path}/{meta}: '{names_key}' is not a list of {variant} class names")
        classes = []
        for i, name in enumerate(names):
            if isinstance(name, bytes):
                try:
                    name = name.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}/{meta}: '{names_key}'[{i}] is {name[:40]!r}, not UTF-8 text; "
                                    "fix the class names in the meta file (or remove it: classes are then "
                                    "numbered)") from None
            classes.append(str(name))
    return [ImageSet(split, "cifar", source, classes, "RGB", None,
                     _cifar_samples(fs, [f"{path}/{b}" for b in batches], label_key, variant))
            for split, batches in parts.items() if batches]


def _cifar_samples(fs, batches: list[str], label_key: str, n_classes: int) -> Callable[[], Iterator[Sample]]:
    def samples() -> Iterator[Sample]:
        for path in batches:  # one batch (~30 MB) in memory at a time
            batch = load_cifar_pickle(fs, path)
            data, labels = batch.get("data"), batch.get(label_key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != 3 * CIFAR_SIDE ** 2 or not len(data):
                found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise UserError(f"{path}: 'data' must be a non-empty uint8 array of shape (n, 3072), found {found}")
            if not isinstance(labels, list) or len(labels) != len(data):
                raise UserError(f"{path}: '{label_key}' must be a list of {len(data)} class indices, one per row "
                                "of 'data'")
            bad = next((i for i, c in enumerate(labels) if not isinstance(c, int) or not 0 <= c < n_classes), None)
            if bad is not None:
                raise UserError(f"{path}: '{label_key}'[{bad}] is {labels[bad]!r}; class indices must be in "
                                f"0..{n_classes - 1}")
            # each row is the red, green and blue planes, each 32x32 row-major
            pixels = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
            for image, label in zip(pixels, labels):
                yield _png(np.ascontiguousarray(image)), "png", label

    return samples


# -- ImageFolder


def imagefolder_sets(fs, path: str, source: str) -> list[ImageSet]:
    """One set for a class-per-folder tree, or one per split when the root holds only
    train/ (and val/, test/) trees."""
    dirs = _list_folder(fs, path)[1]
    split_layout = "train" in dirs and dirs <= set(SPLITS) and bool(_list_folder(fs, f"{path}/train")[1])
    if not split_layout:
        classes = _class_folders(fs, path)
        return [ImageSet("", "imagefolder", source, classes, None, *_imagefolder_files(fs, path, classes, classes))]
    classes = _class_folders(fs, f"{path}/train")
    sets = []
    for split in (s for s in SPLITS if s in dirs):
        present = _class_folders(fs, f"{path}/{split}")
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise UserError(f"{path}/{split}: class folder(s) {', '.join(unknown)} are not in {path}/train; "
                            "every split must use the classes of train/")
        sets.append(ImageSet(split, "imagefolder", source, classes, None,
                             *_imagefolder_files(fs, f"{path}/{split}", present, classes)))
    return sets


def _class_folders(fs, path: str) -> list[str]:
    classes = sorted(_list_folder(fs, path)[1])
    if not classes:
        raise UserError(f"{path}: no class sub-folders; an ImageFolder holds one folder per class "
                        "(e.g. ROOT/cat/001.jpg), or pass --format to read it as MNIST or CIFAR")
    return classes


def _imagefolder_files(fs, root: str, present: list[str],
                       classes: list[str]) -> tuple[int, Callable[[], Iterator[Sample]]]:
    """(number of images, sample factory) of the class folders ``present`` under ``root``;
    class indices are positions in ``classes``."""
    index_of = {name: i for i, name in enumerate(classes)}
    listing: list[tuple[str, int]] = []
    for name in present:
        folder = f"{root}/{name}"
        found = []
        for file in fs.find(folder):
            rel = file[len(folder) + 1:]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if rel.lower().endswith(IMAGE_EXTENSIONS):
                found.append(rel)
            else:
                log.debug("skipping %s: not an image extension", file)
        if not found:
            raise UserError(f"{folder}: class folder without images ({' '.join(IMAGE_EXTENSIONS)}); "
                            "add images or remove the folder")
        listing.extend((f"{folder}/{rel}", index_of[name]) for rel in sorted(found))

    def samples() -> Iterator[Sample]:
        for file, label in listing:
            try:
                data = fs.cat_file(file)
            except Exception as err:
                raise UserError(f"{file}: cannot read ({type(err).__name__}: {err})")
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except UnidentifiedImageError:
                raise UserError(f"{file}: not an image (its content is no format PIL knows); remove or replace it")
            except Exception as err:
                raise UserError(f"{file}: not a decodable image ({type(err).__name__}: {err}); "
                                "remove or replace it")
            yield data, file.rsplit(".", 1)[1].lower(), label

    return len(listing), samples


# --------------------------------------------------------------------------- output


def _classify(fs, path: str) -> str:
    """What is at ``path``: absent, empty, shards (a set of ours with an index), partial (the
    leftovers of an interrupted upload of ours, which carry PARTIAL_MARKER) or foreign."""
    if not fs.exists(path):
        return "absent"
    if not fs.isdir(path):
        return "foreign"
    files = [f[len(path) + 1:] for f in fs.find(path) if f.startswith(path + "/")]
    if not files:
        return "empty"
    for rel in files:
        if OUR_INDEX.fullmatch(rel):
            try:
                if json.loads(fs.cat_file(f"{path}/{rel}")).get("schema", "").startswith("myow.images/"):
                    return "shards"
            except (OSError, ValueError, AttributeError):
                pass
    return "partial" if PARTIAL_MARKER in files else "foreign"


class ShardSetPublisher:
    """Where shards are written, and how the finished output is published.

    Local output: shards go into a hidden staging folder next to URL_PREFIX, renamed into
    place by ``commit``. Remote output: shards go to a local temporary folder and are
    uploaded (then deleted) one by one through ``shard_done``, under a PARTIAL_MARKER
    object that lets the next run recognise and clear the leftovers of a killed one;
    ``commit`` uploads the index files last, then removes the marker. Leaving the ``with``
    block by an exception removes what was written.
    """

    def __init__(self, url: str, storage_options: dict | None, overwrite: bool):
        self.url = url
        self.fs, self.path = filesystem(url, storage_options)
        self.local = is_local(url)
        self.overwrite = overwrite
        self._indexes: dict[str, dict] = {}
        self._started = False  # remote: whether the destination was cleared and written to
        self._committed = False
        self.existing = self._check_destination()
        if self.local:
            parent, name = os.path.split(self.path)
            self._clean_stale_staging(parent, name)
            self.root = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        else:
            self.root = tempfile.mkdtemp(prefix="myow-shards-")
        os.makedirs(self.root, exist_ok=True)

    def _check_destination(self) -> str:
        if self.local:
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                raise UserError(f"--out {self.url}: parent directory {parent} does not exist; create it first")
            if not os.access(parent, os.W_OK):
                raise UserError(f"--out {self.url}: parent directory {parent} is not writable")
        try:
            existing = _classify(self.fs, self.path)
        except Exception as err:  # network, credentials, missing bucket
            raise UserError(f"--out {self.url}: storage is not reachable ({type(err).__name__}: {err}); "
                            "check the URL, credentials and --storage-options")
        if existing == "shards" and not self.overwrite:
            raise UserError(f"--out {self.url}: an image shard set already exists there; "
                            "pass --overwrite to replace it or choose another --out")
        if existing == "foreign":
            raise UserError(f"--out {self.url}: exists and is not an image shard set; "
                            "remove it yourself or choose another --out (it is never replaced)")
        return existing

    @staticmethod
    def _clean_stale_staging(parent: str, name: str) -> None:
        prefix = f".{name}.partial-"
        for entry in os.listdir(parent):
            if entry.startswith(prefix):
                pid = entry[len(prefix):].split("-")[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    log.info("removing %s left by an interrupted run", os.path.join(parent, entry))
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    def split_dir(self, split: str) -> str:
        """Local folder that receives the shards of ``split``."""
        folder = os.path.join(self.root, split) if split else self.root
        os.makedirs(folder, exist_ok=True)
        return folder

    def _start_remote(self) -> None:
        """Empty the remote destination (index files first, so that an old set stops reading
        as complete at once) and mark it partial. Deferred to the first upload: a source
        that fails early leaves an old set alone."""
        if self._started:
            return
        self._started = True
        if self.existing != "absent":
            for rel in (INDEX, *(f"{s}/{INDEX}" for s in SPLITS)):
                if self.fs.exists(f"{self.path}/{rel}"):
                    self.fs.rm(f"{self.path}/{rel}")
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        self.fs.pipe_file(f"{self.path}/{PARTIAL_MARKER}", b"myow-stream partial write\n")

    @contextlib.contextmanager
    def _uploading(self, what: str) -> Iterator[None]:
        """Start the remote output if needed; report a failing upload as one line."""
        try:
            self._start_remote()
            yield
        except Exception as err:
            raise UserError(f"--out {self.url}: uploading {what} failed ({type(err).__name__}: {err}); "
                            "check the storage, credentials and --storage-options, then run again")

    def shard_done(self, split: str, local_file: str) -> None:
        """A shard was closed: upload it now (remote) so local disk holds one shard at a time."""
        if self.local:
            return
        name = os.path.basename(local_file)
        with self._uploading(name):
            self.fs.put_file(local_file, join_url(self.path, split, name))
        os.remove(local_file)

    def add_index(self, split: str, index: dict) -> None:
        self._indexes[split] = index

    def commit(self) -> None:
        """Write every index.json (the completion markers) and publish the output."""
        for split, index in self._indexes.items():
            data = json.dumps(index, indent=1).encode()
            if self.local:
                with open(os.path.join(self.split_dir(split), INDEX), "wb") as f:
                    f.write(data)
            else:
                with self._uploading(INDEX):
                    self.fs.pipe_file(join_url(self.path, split, INDEX), data)
        if self.local:
            self._publish_local()
        else:
            with self._uploading(PARTIAL_MARKER):
                self.fs.rm(f"{self.path}/{PARTIAL_MARKER}")
            shutil.rmtree(self.root, ignore_errors=True)
        self._committed = True

    def _publish_local(self) -> None:
        if os.path.exists(self.path):
            now = _classify(self.fs, self.path)
            if now == "foreign" or (now == "shards" and not self.overwrite):
                raise UserError(f"--out {self.url}: something was written there while sharding; "
                                "check it, then run again (with --overwrite to replace a shard set)")
            trash = os.path.join(os.path.dirname(self.path),
                                 f".{os.path.basename(self.path)}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(self.path, trash)
            os.rename(self.root, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.root, self.path)

    def abort(self) -> None:
        if self._committed:
            return
        shutil.rmtree(self.root, ignore_errors=True)
        if not self.local and self._started:
            try:
                if self.fs.exists(self.path):
                    self.fs.rm(self.path, recursive=True)
            except Exception as err:  # never mask the original error
                log.warning("could not clean up %s: %s", self.url, err)

    def __enter__(self) -> "ShardSetPublisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_shards(image_sets: list[ImageSet], out: str, storage_options: dict | None, shard_size: int,
                 overwrite: bool, progress: bool = True) -> list[dict]:
    """Write every set under ``out`` and publish them; returns their index dicts."""
    import webdataset  # imports torch: only when there is something to write

    known = [s.count for s in image_sets]
    bar = tqdm(total=sum(known) if None not in known else None, desc="sharding", unit="img",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    indexes = []
    try:
        with ShardSetPublisher(out, storage_options, overwrite) as publisher:
            for image_set in image_sets:
                index = _write_set(webdataset, image_set, publisher, shard_size, bar)
                publisher.add_index(image_set.split, index)
                indexes.append(index)
            publisher.commit()
    finally:
        bar.close()
    return indexes


def _write_set(webdataset, image_set: ImageSet, publisher: ShardSetPublisher, shard_size: int, bar: tqdm) -> dict:
    shards: list[dict] = []
    written = 0

    def post(filename: str) -> None:
        # called by ShardWriter after closing a shard, before the next sample is counted
        shards.append({"name": os.path.basename(filename), "samples": written - sum(s["samples"] for s in shards)})
        publisher.shard_done(image_set.split, filename)

    where = os.path.join(publisher.split_dir(image_set.split), SHARD_PATTERN)
    # encoder=False: every field is given as bytes (.cls as ASCII digits), nothing is pickled;
    # mtime=0: the same input gives byte-identical tars
    writer = webdataset.ShardWriter(where, maxcount=shard_size, maxsize=MAX_SHARD_BYTES, post=post, verbose=0,
                                    encoder=False, mtime=0)
    try:
        for data, ext, label in image_set.samples():
            writer.write({"__key__": f"{written:08d}", ext: data, "cls": str(label).encode("ascii")})
            written += 1
            bar.update()
    except BaseException:
        writer.post = None  # the half-written shard must not be uploaded
        writer.close()
        raise
    writer.close()  # sources never yield an empty set, so there is no empty shard to avoid
    return {
        "schema": SCHEMA,
        "shards": shards,
        "num_samples": written,
        "classes": image_set.classes,
        "source": {"format": image_set.format, "path": image_set.path},
        "image_mode": image_set.image_mode,
        "created_by": CREATED_BY,
    }


# --------------------------------------------------------------------------- reading


def read_index(url: str, storage_options: dict | None = None) -> dict:
    """The index of the shard set at ``url``. Raises ``UserError`` for a missing or
    incomplete set (no index.json: not written yet, or interrupted) or a foreign one."""
    fs, path = filesystem(url, storage_options)
    try:
        raw = fs.cat_file(f"{path}/{INDEX}")
    except FileNotFoundError:
        subsets = [join_url(url, s) for s in SPLITS if fs.exists(f"{path}/{s}/{INDEX}")]
        hint = (f"; its splits are {', '.join(subsets)}" if subsets
                else "; create it with `python -m preprocess.shard_images`")
        raise UserError(f"{url}: no complete image shard set there (index.json is missing){hint}")
    except Exception as err:
        raise UserError(f"{url}: cannot read index.json ({type(err).__name__}: {err}); "
                        "check the URL and storage options")
    try:
        index = json.loads(raw)
    except ValueError as err:
        raise UserError(f"{url}/{INDEX}: not JSON ({err}); re-create the shard set")
    if not isinstance(index, dict) or index.get("schema") != SCHEMA:
        found = index.get("schema") if isinstance(index, dict) else None
        raise UserError(f"{url}/{INDEX}: schema is {found!r}, expected {SCHEMA!r}; not an image shard set "
                        "of this version")
    try:
        counted = sum(int(s["samples"]) for s in index["shards"])
        consistent = counted == index["num_samples"] and all(isinstance(s["name"], str) for s in index["shards"])
    except (KeyError, TypeError, ValueError):
        consistent = False
    if not consistent:
        raise UserError(f"{url}/{INDEX}: 'shards' and 'num_samples' do not agree; re-create the shard set")
    return index


def iter_samples(url: str, storage_options: dict | None = None) -> Iterator[tuple[str, bytes, str, int]]:
    """(key, image bytes, extension, class index) of every sample of the set at ``url``,
    in order, read with ``tarfile`` (nothing is unpickled or extracted to disk)."""
    index = read_index(url, storage_options)
    fs, path = filesystem(url, storage_options)
    for shard in index["shards"]:
        shard_url = f"{url.rstrip('/')}/{shard['name']}"
        count = 0
        try:
            with fs.open(f"{path}/{shard['name']}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for key, fields in _tar_samples(tar):
                    cls = fields.pop("cls", b"")
                    if len(fields) != 1 or not cls.isdigit():
                        raise UserError(f"{shard_url}: sample {key} has fields {sorted(fields)} and cls {cls!r}; "
                                        "expected one image and a class index")
                    (ext, data), = fields.items()
                    count += 1
                    yield key, data, ext, int(cls)
        except (OSError, tarfile.TarError) as err:
            raise UserError(f"{shard_url}: cannot read the shard ({type(err).__name__}: {err}); "
                            "re-create the shard set")
        if count != shard["samples"]:
            raise UserError(f"{shard_url}: holds {count} samples, index.json says {shard['samples']}; "
                            "re-create the shard set")


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict]]:
    """(key, {field: bytes}) per sample; a sample's members are consecutive."""
    key, fields = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name_key, _, field = member.name.partition(".")
        if name_key != key:
            if key is not None:
                yield key, fields
            key, fields = name_key, {}
        fields[field] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
