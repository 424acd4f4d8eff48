"""Writing image sets as WebDataset shard sets and publishing them atomically: the shard
tars and ``index.json`` of every split, a local staging folder renamed into place, or on
object storage an upload one shard at a time under a partial marker (``ShardSetPublisher``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Iterator

from tqdm import tqdm

from . import __version__
from .errors import UserError
from .images_common import ImageSet
from .shard_format import INDEX, SCHEMA, SPLITS
from .store import (PARTIAL_MARKER, AbortOnError, _pid_alive, check_local_parent, filesystem, is_local, join_url,
                    move_into_place)

# log records keep the logger name they had before the split
log = logging.getLogger("preprocess.shard_images")

CREATED_BY = f"myow-stream {__version__}"
SHARD_PATTERN = "shard-%06d.tar"
# shards are cut by count only, so every shard but the last holds exactly --shard-size
# samples and readers can split work evenly from index.json alone
MAX_SHARD_BYTES = float("inf")
OUR_INDEX = re.compile(rf"(?:(?:{'|'.join(SPLITS)})/)?index\.json")  # where this command writes indexes


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


class ShardSetPublisher(AbortOnError):
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
            check_local_parent(self.url, self.path)
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
        move_into_place(self.root, self.path)

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
        # bytes: readers compare it with the file's size (a listing), so a truncated or replaced
        # shard is refused when the set is opened, not midway through a training run
        shards.append({"name": os.path.basename(filename), "samples": written - sum(s["samples"] for s in shards),
                       "bytes": os.path.getsize(filename)})
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
        # the keys wids reads (wids.ShardListDataset("index.json")): the same shards, urls
        # relative to this file
        "wids_version": 1,
        "shardlist": [{"url": shard["name"], "nsamples": shard["samples"]} for shard in shards],
    }
