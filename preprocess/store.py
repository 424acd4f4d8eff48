"""The recording store (docs/contracts.md section 4): layout, atomic writer, validating reader.

A recording store is one Zarr v3 group per session. Every array shares the time axis
(one row per bin):

    counts          (T, N) uint16|uint32   spike counts, dimension_names ("time", "unit")
    bin_start_s     (T,)   float64         start of each bin, seconds from recording start
    trial           (T,)   int32           trial index, -1 outside trials
    labels/<name>   (T,)   int             per-bin labels (e.g. target)
    behavior/<name> (T, k) float32         per-bin behaviour (e.g. velocity)
    units/id        (N,)   int64           unit id from the sorter
    units/quality   (N,)   int32 codes     into its ``categories`` attribute: good / mua / noise / unsorted [/ ...]

Publication is atomic: a local store is written into a hidden sibling directory and
renamed into place; on object storage (no rename) every array is written first and the
root ``zarr.json`` last, so until the very end ``zarr.open_group`` finds no group at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from . import __version__
from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "myow.recording/1"
CREATED_BY = f"myow-stream {__version__}"
REQUIRED_ARRAYS = ("counts", "bin_start_s", "trial", "units/id", "units/quality")
QUALITY_CATEGORIES = ("good", "mua", "noise", "unsorted")  # codes 0..3 of units/quality; other labels follow
SUBGROUPS = ("labels", "behavior", "units")
TARGET_CHUNK_BYTES = 1 << 20  # chunks of whole rows of at least ~1 MiB (docs/contracts.md section 4)
CHUNKS_PER_SHARD = 32  # ~32 MiB (raw) shards: few, large objects on object storage
PARTIAL_MARKER = ".myow-partial"  # written first on object storage, removed on success
# counts are mostly 0/1 at fine bins: bit-shuffled LZ4 compresses them ~15x and encodes/decodes
# at ~0.5/1.3 GB/s per core (zarr's default zstd: ~0.3 GB/s encode)
COUNTS_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


# --------------------------------------------------------------------------- URLs


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL."""
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise UserError(f"{url}: cannot open this storage URL ({err}); check the protocol and --storage-options")
    return fs, path.rstrip("/")


def make_store(url: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr store rooted at ``url`` (LocalStore for paths, FsspecStore otherwise)."""
    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def join_url(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *[n.strip("/") for n in names if n]])


# --------------------------------------------------------------------------- unit quality


def quality_codes(qualities) -> tuple[np.ndarray, list[str]]:
    """(int32 codes (N,), categories) of per-unit quality labels, stored like the labels:
    integer codes with a ``categories`` attribute, which every Zarr v3 reader (tensorstore
    too) opens; zarr-python's variable-length string dtype is an extension others refuse."""
    names = [str(q) for q in qualities]
    categories = list(QUALITY_CATEGORIES) + sorted(set(names) - set(QUALITY_CATEGORIES))
    code = {c: i for i, c in enumerate(categories)}
    return np.array([code[n] for n in names], dtype=np.int32), categories


def unit_quality(group) -> list[str]:
    """The quality label of every unit of an open store group: int codes + ``categories``,
    or the strings of stores written before codes (both open)."""
    arr = group["units/quality"]
    values = arr[:]
    if np.asarray(values).dtype.kind in "iu":
        categories = list(arr.attrs["categories"])
        return [categories[int(c)] for c in values]
    return [str(q) for q in values]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StoreLayout:
    """Chunk and shard geometry shared by every per-bin array of a store.

    ``chunk_rows`` rows of ``counts`` make a chunk of >= ~1 MiB; a shard holds
    ``shard_rows`` = CHUNKS_PER_SHARD chunks. Writers process whole shards (``blocks()``)
    so that parallel writes never touch the same object.
    """

    n_rows: int
    n_units: int
    chunk_rows: int
    shard_rows: int

    @classmethod
    def for_counts(cls, n_rows: int, n_units: int, itemsize: int = 2,
                   chunk_bytes: int = TARGET_CHUNK_BYTES,
                   chunks_per_shard: int = CHUNKS_PER_SHARD) -> "StoreLayout":
        # itemsize 2: sized for uint16, the dtype of nearly every store, so its chunks are
        # >= 1 MiB as the schema says (sizing for uint32 gave uint16 stores 0.5 MiB chunks); the
        # geometry is fixed before the dtype is known, so a uint32 store gets >= 2 MiB chunks
        row_bytes = max(1, n_units) * itemsize
        chunk_rows = max(1, min(n_rows, math.ceil(chunk_bytes / row_bytes)))
        n_chunks = math.ceil(n_rows / chunk_rows)
        shard_rows = chunk_rows * max(1, min(chunks_per_shard, n_chunks))
        return cls(n_rows, n_units, chunk_rows, shard_rows)

    def blocks(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of whole shards, covering all rows."""
        return [(r, min(r + self.shard_rows, self.n_rows)) for r in range(0, self.n_rows, self.shard_rows)]


def count_dtype(max_count: int) -> np.dtype:
    """uint16 unless a bin could exceed 65535 spikes; counts never wrap."""
    return np.dtype(np.uint16) if max_count <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


# --------------------------------------------------------------------------- writer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _looks_like_store(fs, path: str) -> bool:
    try:
        meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
    except (FileNotFoundError, OSError, ValueError):
        return False
    return meta.get("node_type") == "group" and meta.get("attributes", {}).get("schema", "").startswith("myow.recording/")


def check_local_parent(url: str, path: str) -> None:
    """UserError naming ``--out`` when the local output's parent is missing or not writable."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UserError(f"--out {url}: parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {url}: parent directory {parent} is not writable")


def move_into_place(staging: str, path: str) -> None:
    """Publish the local folder ``staging`` as ``path``: a rename, and when ``path`` exists
    (checked by the caller) it is first renamed aside and removed after, so ``path`` is
    never missing a complete output for longer than two renames."""
    if os.path.exists(path):
        name = f".{os.path.basename(path)}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        trash = os.path.join(os.path.dirname(path), name)
        os.rename(path, trash)
        os.rename(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, path)


class AbortOnError:
    """A writer used as ``with Writer(...) as w: ...; w.commit(...)``: leaving the block by an
    exception calls :meth:`abort`, which removes everything written so far."""

    def abort(self) -> None:  # pragma: no cover - every writer defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class StoreWriter(AbortOnError):
    """Writes one recording store and publishes it atomically.

    Usage::

        with StoreWriter(url, overwrite=False) as writer:
            counts = writer.create_array("counts", shape, dtype, layout, dimension_names=("time", "unit"))
            ...                                   # fill arrays (possibly from other processes)
            writer.commit(attributes)             # publish; nothing is visible before this

    Leaving the ``with`` block by an exception removes everything written so far. A
    process killed mid-write leaves no store that opens: locally only a hidden
    ``.NAME.partial-PID-*`` directory (cleaned by the next run), on object storage only
    objects without a root ``zarr.json`` (and a ``.myow-partial`` marker, which lets the
    next run clear them).
    """

    def __init__(self, url: str, storage_options: dict | None = None, overwrite: bool = False):
        self.url = url
        self.storage_options = storage_options or {}
        self.overwrite = overwrite
        self.local = is_local(url)
        self.fs, self.path = filesystem(url, self.storage_options)
        self._committed = False
        self._check_destination()
        if self.local:
            parent, name = os.path.split(self.path)
            self.staging_url = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                self._clean_stale_partials(parent, name)
                os.makedirs(self.staging_url)
            except OSError as err:  # e.g. /proc, a read-only mount: access() said yes, the kernel says no
                raise UserError(f"--out {self.url}: cannot write in {parent} ({err.strerror or err}); "
                                "choose a writable location for --out") from None
        else:
            self.staging_url = url.rstrip("/")
            self._prepare_remote()

    # -- destination checks
    def _check_destination(self) -> None:
        if self.local:
            check_local_parent(self.url, self.path)
        try:
            exists = self.fs.exists(self.path)
        except Exception as err:  # network, credentials, missing bucket
            raise UserError(f"--out {self.url}: storage is not reachable ({type(err).__name__}: {err}); "
                            "check the URL, credentials and --storage-options")
        if not exists:
            return
        if _looks_like_store(self.fs, self.path):
            if not self.overwrite:
                raise UserError(f"--out {self.url}: a recording store already exists there; "
                                "pass --overwrite to replace it or choose another --out")
            return
        if self.local:
            if os.path.isdir(self.path) and not os.listdir(self.path):
                return
        elif self.fs.exists(f"{self.path}/{PARTIAL_MARKER}") and not self.fs.exists(f"{self.path}/zarr.json"):
            return  # leftovers of an interrupted write of ours: cleared in _prepare_remote
        raise UserError(f"--out {self.url}: exists and is not a recording store; "
                        "remove it yourself or choose another --out (it is never replaced)")

    def _clean_stale_partials(self, parent: str, name: str) -> None:
        prefix = f".{name}.partial-"
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            try:
                pid = int(entry[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                log.info("removing %s left by an interrupted run", os.path.join(parent, entry))
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    def _prepare_remote(self) -> None:
        if self.fs.exists(self.path):
            # the root zarr.json goes first so that the old store stops opening at once
            if self.fs.exists(f"{self.path}/zarr.json"):
                self.fs.rm(f"{self.path}/zarr.json")
            self.fs.rm(self.path, recursive=True)
        self.fs.pipe_file(f"{self.path}/{PARTIAL_MARKER}", b"myow-stream partial write\n")

    # -- writing
    def array_url(self, name: str) -> str:
        return join_url(self.staging_url, name)

    def create_array(self, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...],
                     shards: tuple[int, ...] | None = None, dimension_names: tuple[str, ...] | None = None,
                     attributes: dict | None = None, fill_value: Any = 0, compressors: Any = "auto") -> zarr.Array:
        """Create ``name`` (e.g. "labels/target") with no parent metadata yet (written at commit)."""
        return zarr.create_array(
            store=make_store(self.array_url(name), self.storage_options),
            shape=shape, dtype=dtype, chunks=chunks, shards=shards,
            dimension_names=dimension_names, attributes=attributes or {}, fill_value=fill_value,
            compressors=compressors, overwrite=True,
        )

    def write_array(self, name: str, data: np.ndarray, dimension_names: tuple[str, ...] | None = None,
                    attributes: dict | None = None) -> None:
        """Create and fill a small array (e.g. ``units/*``) as a single chunk."""
        data = np.asarray(data)
        chunks = tuple(max(1, s) for s in data.shape)
        fill = "" if data.dtype.kind in "UO" else 0
        arr = self.create_array(name, data.shape, data.dtype if data.dtype.kind not in "UO" else str,
                                chunks, dimension_names=dimension_names, attributes=attributes, fill_value=fill)
        if data.size:
            arr[...] = data

    def commit(self, attributes: dict) -> None:
        """Write group metadata (sub-groups, then the root last) and publish the store."""
        for group in SUBGROUPS:
            zarr.create_group(store=make_store(self.array_url(group), self.storage_options))
        attrs = {"schema": SCHEMA, "created_by": CREATED_BY, **attributes}
        zarr.create_group(store=make_store(self.staging_url, self.storage_options), attributes=attrs)
        if self.local:
            self._publish_local()
        else:
            self.fs.rm(f"{self.path}/{PARTIAL_MARKER}")
        self._committed = True

    def _publish_local(self) -> None:
        if os.path.exists(self.path):
            if not self.overwrite and not (os.path.isdir(self.path) and not os.listdir(self.path)):
                raise UserError(f"--out {self.url}: appeared while writing; pass --overwrite or choose another --out")
        move_into_place(self.staging_url, self.path)

    def abort(self) -> None:
        if self._committed:
            return
        try:
            if self.local:
                shutil.rmtree(self.staging_url, ignore_errors=True)
            elif self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        except Exception as err:  # never mask the original error
            log.warning("could not clean up %s: %s", self.staging_url, err)



def open_array(url: str, storage_options: dict | None = None, mode: str = "r+") -> zarr.Array:
    """Open one array of a store being written (used by parallel block writers)."""
    return zarr.open_array(store=make_store(url, storage_options, read_only=(mode == "r")), mode=mode)


# --------------------------------------------------------------------------- reader


def open_recording(url: str, storage_options: dict | None = None) -> zarr.Group:
    """Open a published recording store read-only and check it follows the schema.

    Raises ``UserError`` (naming the URL and the fault) for a missing, incomplete or
    foreign store.
    """
    try:
        group = zarr.open_group(store=make_store(url, storage_options, read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise UserError(f"{url}: no recording store there (missing or not completely written); "
                        "create it with `python -m preprocess.bin_spikes`")
    except Exception as err:
        raise UserError(f"{url}: cannot open the recording store ({type(err).__name__}: {err})")
    schema = group.attrs.get("schema")
    if schema != SCHEMA:
        raise UserError(f"{url}: attribute 'schema' is {schema!r}, expected {SCHEMA!r}; "
                        "this is not a recording store of this version")
    for name in REQUIRED_ARRAYS:
        if name not in group:
            raise UserError(f"{url}: array '{name}' is missing; the store is incomplete, re-create it")
    n_rows, n_units = group["counts"].shape
    for name, arr in iter_arrays(group):
        if name.startswith("units/"):
            if arr.shape[0] != n_units:
                raise UserError(f"{url}: '{name}' has {arr.shape[0]} rows, counts has {n_units} units")
        elif arr.shape[0] != n_rows:
            raise UserError(f"{url}: '{name}' has {arr.shape[0]} rows, counts has {n_rows} bins")
    return group


def iter_arrays(group: zarr.Group) -> Iterator[tuple[str, zarr.Array]]:
    """(path, array) for every array of a store, sub-groups included, sorted by path."""
    found = []
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            found.append((name, node))
    return iter(sorted(found, key=lambda item: item[0]))
