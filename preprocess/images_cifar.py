"""CIFAR-10/100 python batches as image sets, read with ``RestrictedUnpickler``: an
unpickler that resolves only the numpy names an array needs, so a batch file cannot run
code. Owns the batch layout (data, labels, meta class names) and its checks.
"""

from __future__ import annotations

import pickle
import re
from typing import Callable, Iterator

import numpy as np

from .errors import UserError
from .images_common import ImageSet, Sample, encode_png, list_folder

CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
CIFAR_SIDE = 32


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
    files = list_folder(fs, path)[0]
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
                yield encode_png(np.ascontiguousarray(image)), "png", label

    return samples
