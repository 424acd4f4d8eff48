"""Image shard sets: read index.json + tar shards, decode, load a selection into memory.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.shard_format import read_index, tar_samples
from preprocess.store import filesystem, join_url

from .recording import is_transient
from .stages import ordered_map, retry

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
                for position, (key, fields) in enumerate(tar_samples(tar)):
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
            for _, fields in tar_samples(tar):
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


