"""ImageFolder trees as image sets: one sub-folder per class (or train/, val/, test/
splits of such trees), image files kept byte for byte after a check that PIL can read them.
"""

from __future__ import annotations

import io
import logging
from typing import Callable, Iterator

from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .images_common import ImageSet, Sample, list_folder
from .shard_format import SPLITS

# log records keep the logger name they had before the split
log = logging.getLogger("preprocess.shard_images")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def imagefolder_sets(fs, path: str, source: str) -> list[ImageSet]:
    """One set for a class-per-folder tree, or one per split when the root holds only
    train/ (and val/, test/) trees."""
    dirs = list_folder(fs, path)[1]
    split_layout = "train" in dirs and dirs <= set(SPLITS) and bool(list_folder(fs, f"{path}/train")[1])
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
    classes = sorted(list_folder(fs, path)[1])
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
