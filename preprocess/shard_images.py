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
shards with their sample counts and sizes in bytes (``read_index`` compares the sizes with
one listing, so a truncated tar is refused when the set is opened), the class names, the
source and the image mode.

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
import json
import sys
import time

from .errors import OneLineParser, UsageError, UserError, run_cli, setup_logging
from .images_cifar import CIFAR_FOLDERS, ForbiddenPickle, RestrictedUnpickler, cifar_sets, load_cifar_pickle
from .images_common import ImageSet, Sample, encode_png, list_folder
from .images_folder import IMAGE_EXTENSIONS, imagefolder_sets
from .images_mnist import IDX_FILE, mnist_sets
from .shard_format import INDEX, SCHEMA, SPLITS, iter_samples, read_index, tar_samples
from .shard_writer import CREATED_BY, SHARD_PATTERN, ShardSetPublisher, write_shards
from .store import filesystem, is_local

# the readers, the writer and the reading side live in the modules imported above; their
# names stay importable from here
__all__ = [
    "CIFAR_FOLDERS", "CREATED_BY", "FORMATS", "IDX_FILE", "IMAGE_EXTENSIONS", "INDEX", "PROG", "SCHEMA",
    "SHARD_PATTERN", "SPLITS", "ForbiddenPickle", "ImageSet", "RestrictedUnpickler", "Sample",
    "ShardSetPublisher", "build_parser", "cifar_sets", "encode_png", "imagefolder_sets", "iter_samples",
    "list_folder", "load_cifar_pickle", "main", "mnist_sets", "parse_storage_options", "read_index",
    "read_source", "tar_samples", "write_shards",
]

PROG = "python -m preprocess.shard_images"
FORMATS = ("mnist", "cifar", "imagefolder")


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
        files, dirs = list_folder(fs, path)
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


def _detect(files: set[str], dirs: set[str]) -> str | None:
    if files & {"data_batch_1", "test_batch", "batches.meta"} or ({"train", "test", "meta"} & files
                                                                  and not {"train", "test"} & dirs):
        return "cifar"
    if any(IDX_FILE.fullmatch(f) for f in files):
        return "mnist"
    if dirs:
        return "imagefolder"
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main, None, PROG))
