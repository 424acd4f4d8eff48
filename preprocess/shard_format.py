"""The on-disk format of an image shard set, reading side: ``index.json`` (schema
``myow.images/1``, the completion marker) and the WebDataset tars it lists. Owns the layout
constants, ``read_index``, ``iter_samples`` and ``tar_samples`` (a tar's members grouped into
samples); the writer (``shard_writer``) and the trainer's reader build on it.
"""

from __future__ import annotations

import json
import tarfile
from typing import Iterator

from .errors import UserError
from .store import filesystem, join_url

SCHEMA = "myow.images/1"
INDEX = "index.json"
SPLITS = ("train", "val", "test")


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
    _check_shard_sizes(fs, path, url, index["shards"])
    return index


def _check_shard_sizes(fs, path: str, url: str, shards: list[dict]) -> None:
    """Compare each shard's size with its ``bytes`` in index.json (sets written since the
    field exists; older ones are read as before), from one listing of the folder: a
    truncated, missing or replaced tar is refused when the set is opened."""
    try:
        expected = {s["name"]: int(s["bytes"]) for s in shards}
    except (KeyError, TypeError, ValueError):
        return
    try:
        listing = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size")
                   for entry in fs.ls(path, detail=True)}
    except Exception:  # cannot list (permissions of some object stores): the reader checks each shard
        return
    for name, size in expected.items():
        where = f"{url.rstrip('/')}/{name}"
        if name not in listing:
            raise UserError(f"{where}: missing (index.json lists it); re-create the shard set")
        if listing[name] is not None and int(listing[name]) != size:
            raise UserError(f"{where}: {listing[name]} bytes, index.json says {size} (truncated or replaced); "
                            "re-create the shard set")


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
                for key, fields in tar_samples(tar):
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



def tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict]]:
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
