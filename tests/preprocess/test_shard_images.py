"""``python -m preprocess.shard_images``: exact round trips, object storage, safe unpickling, clean errors."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from preprocess import images_mnist, shard_images
from preprocess.errors import UserError, run_cli
from preprocess.shard_images import SCHEMA, iter_samples, read_index


def run(args: list[str]) -> int:
    return run_cli(shard_images.main, [*args, "--no-progress"], "shard_images")


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def tree(folder: Path) -> dict[str, int]:
    """relative path -> mtime (ns) of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- synthetic sources


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_mnist(folder: Path, n_train: int = 7, n_test: int = 5,
               seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An MNIST-like folder (28x28 idx files, gzipped); returns split -> (images, labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        parts[split] = (images, labels)
    return parts


def make_jpeg_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4,
                     seed: int = 0) -> list[tuple[Path, int]]:
    """An ImageFolder of small JPEGs; returns (file, class index) in the expected order."""
    rng = np.random.default_rng(seed)
    expected = []
    for c, name in enumerate(sorted(classes)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"img_{i:02d}.jpg"
            Image.fromarray(rng.integers(0, 256, size=(9 + i, 7, 3), dtype=np.uint8)).save(path, quality=90)
            expected.append((path, c))
    return expected


def cifar_batch(n: int, seed: int, label_key: bytes = b"labels", n_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"synthetic", label_key: [int(c) for c in rng.integers(0, n_classes, size=n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def cifar_pixels(batch: dict) -> np.ndarray:
    """(n, 32, 32, 3) images of a batch, as the CIFAR page describes its rows."""
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def make_cifar10(folder: Path, writer=pickle.dumps) -> dict[str, list[dict]]:
    folder.mkdir(parents=True)
    batches = {"train": [cifar_batch(3, 1), cifar_batch(4, 2)], "test": [cifar_batch(5, 3)]}
    for i, batch in enumerate(batches["train"], 1):
        (folder / f"data_batch_{i}").write_bytes(writer(batch))
    (folder / "test_batch").write_bytes(writer(batches["test"][0]))
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")]
    (folder / "batches.meta").write_bytes(writer({b"label_names": names, b"num_vis": 3072}))
    return batches


def py2_pickle(obj: dict) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) wrote the original CIFAR batches: str as
    BINSTRING, arrays through numpy.core.multiarray._reconstruct (uint8 arrays only)."""

    def string(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def integer(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return string(v)
        if isinstance(v, int):
            return integer(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8
        dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"  # dtype('u1', 0, 1)
                 + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
        shape = b"(" + b"".join(integer(d) for d in v.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
                + b"\x87R(" + integer(1) + shape + dtype + b"\x89" + string(v.tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in obj.items()) + b"u."


# --------------------------------------------------------------------------- MNIST


def test_real_mnist_t10k_pixel_exact(tmp_path):
    src = shared_path("mnist-t10k")
    with gzip.open(src / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert run([str(src), "--out", str(tmp_path / "mnist"), "--shard-size", "2500"]) == 0
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["test"]
    out = str(tmp_path / "mnist" / "test")
    index = read_index(out)
    assert index["num_samples"] == 10_000 and index["image_mode"] == "L"
    assert index["shards"] == [{"name": f"shard-{i:06d}.tar", "samples": 2500,
                                "bytes": os.path.getsize(f"{out}/shard-{i:06d}.tar")} for i in range(4)]
    assert index["classes"] == [str(c) for c in range(10)] and index["source"]["format"] == "mnist"
    decoded = np.empty_like(images)
    got_labels = np.empty_like(labels)
    for i, (key, data, ext, cls) in enumerate(iter_samples(out)):
        assert key == f"{i:08d}" and ext == "png"
        decoded[i], got_labels[i] = decode(data), cls
    np.testing.assert_array_equal(decoded, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_mnist_train_and_test_splits_deterministic(tmp_path):
    parts = make_mnist(tmp_path / "src")
    write_idx(tmp_path / "src" / "notes-images-idx3-ubyte.txt", np.zeros((1, 2, 2)))  # not an idx name: ignored
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--shard-size", "3"]) == 0
    for split, (images, labels) in parts.items():
        index = read_index(str(tmp_path / "a" / split))
        assert [s["samples"] for s in index["shards"]] == [3] * (len(images) // 3) + (
            [len(images) % 3] if len(images) % 3 else [])
        samples = list(iter_samples(str(tmp_path / "a" / split)))
        np.testing.assert_array_equal(np.stack([decode(s[1]) for s in samples]), images)
        assert [s[3] for s in samples] == labels.tolist()
        with Image.open(io.BytesIO(samples[0][1])) as image:
            assert image.mode == "L" and image.format == "PNG"
    # the same input gives byte-identical shards (tar mtimes are fixed)
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--shard-size", "3"]) == 0
    for shard in sorted((tmp_path / "a").rglob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.relative_to(tmp_path / "a")).read_bytes()
    # webdataset itself reads them: keys, decoded images and integer classes
    import webdataset

    urls = [str(tmp_path / "a" / "train" / s["name"]) for s in read_index(str(tmp_path / "a" / "train"))["shards"]]
    read_back = list(webdataset.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls"))
    assert [(k, c) for k, _, c in read_back] == [(f"{i:08d}", int(c)) for i, c in enumerate(parts["train"][1])]
    np.testing.assert_array_equal(np.stack([image for _, image, _ in read_back]), parts["train"][0])
    # a reader without webdataset: plain tarfile sees KEY.cls and KEY.png members
    with tarfile.open(tmp_path / "a" / "train" / "shard-000000.tar") as tar:
        assert tar.getnames()[:2] == ["00000000.cls", "00000000.png"]
        assert tar.extractfile("00000000.cls").read() == str(parts["train"][1][0]).encode()


def test_shard_format_reads_what_the_command_writes(tmp_path):
    """``preprocess.shard_format`` is the reading side the trainer imports: ``read_index`` and
    ``tar_samples`` (one (key, {field: bytes}) per sample); shard_images re-exports them."""
    from preprocess import shard_format

    parts = make_mnist(tmp_path / "src", n_train=5)
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--shard-size", "2"]) == 0
    index = shard_format.read_index(str(tmp_path / "o" / "train"))
    assert index["schema"] == shard_format.SCHEMA and [s["samples"] for s in index["shards"]] == [2, 2, 1]
    grouped = []
    for shard in index["shards"]:
        with tarfile.open(tmp_path / "o" / "train" / shard["name"]) as tar:
            grouped += list(shard_format.tar_samples(tar))
    assert [key for key, _ in grouped] == [f"{i:08d}" for i in range(5)]
    assert all(sorted(fields) == ["cls", "png"] for _, fields in grouped)
    assert [int(fields["cls"]) for _, fields in grouped] == parts["train"][1].tolist()
    np.testing.assert_array_equal(np.stack([decode(fields["png"]) for _, fields in grouped]), parts["train"][0])
    assert [(k, d) for k, d, _, _ in shard_format.iter_samples(str(tmp_path / "o" / "train"))] == \
        [(k, f["png"]) for k, f in grouped]
    assert shard_images.read_index is read_index is shard_format.read_index
    assert shard_images.iter_samples is iter_samples is shard_format.iter_samples
    assert shard_images.tar_samples is shard_format.tar_samples


def test_mnist_uncompressed_idx_files(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "src").mkdir()
    write_idx(tmp_path / "src" / "train-images.idx3-ubyte", images, compress=False)
    write_idx(tmp_path / "src" / "train-labels.idx1-ubyte", np.array([2, 0, 1]), compress=False)
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    samples = list(iter_samples(str(tmp_path / "o" / "train")))
    np.testing.assert_array_equal(np.stack([decode(s[1]) for s in samples]), images)
    assert [s[3] for s in samples] == [2, 0, 1]
    assert read_index(str(tmp_path / "o" / "train"))["classes"] == ["0", "1", "2"]


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_jpegs_byte_exact(tmp_path):
    expected = make_jpeg_folder(tmp_path / "photos")
    (tmp_path / "photos" / "cat" / "notes.txt").write_text("not an image: skipped")
    (tmp_path / "photos" / ".cache").mkdir()  # hidden: not a class
    assert run([str(tmp_path / "photos"), "--out", str(tmp_path / "shards"), "--shard-size", "5"]) == 0
    index = read_index(str(tmp_path / "shards"))
    assert index["classes"] == ["cat", "dog", "eel"] and index["image_mode"] is None
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    assert index["source"] == {"format": "imagefolder", "path": str(tmp_path / "photos")}
    samples = list(iter_samples(str(tmp_path / "shards")))
    assert [(s[0], s[2], s[3]) for s in samples] == [(f"{i:08d}", "jpg", c) for i, (_, c) in enumerate(expected)]
    assert [s[1] for s in samples] == [p.read_bytes() for p, _ in expected]


def test_imagefolder_train_val_splits_share_train_classes(tmp_path):
    make_jpeg_folder(tmp_path / "ds" / "train", classes=("a", "b", "c"), per_class=2)
    val = make_jpeg_folder(tmp_path / "ds" / "val", classes=("b", "c"), per_class=1, seed=1)
    assert run([str(tmp_path / "ds"), "--out", str(tmp_path / "o")]) == 0
    assert read_index(str(tmp_path / "o" / "train"))["num_samples"] == 6
    index = read_index(str(tmp_path / "o" / "val"))
    assert index["classes"] == ["a", "b", "c"]
    assert [(s[1], s[3]) for s in iter_samples(str(tmp_path / "o" / "val"))] == [(val[0][0].read_bytes(), 1),
                                                                                 (val[1][0].read_bytes(), 2)]


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("writer", [pickle.dumps, py2_pickle], ids=["python3-pickle", "python2-cpickle"])
def test_cifar10_round_trip_pixel_exact(tmp_path, writer):
    batches = make_cifar10(tmp_path / "dl" / "cifar-10-batches-py", writer)
    # SOURCE may be the batches folder or the folder torchvision downloads it into
    for source in (tmp_path / "dl" / "cifar-10-batches-py", tmp_path / "dl"):
        out = tmp_path / f"out-{source.name}"
        assert run([str(source), "--out", str(out), "--shard-size", "4"]) == 0
        for split, parts in batches.items():
            index = read_index(str(out / split))
            assert index["classes"][:3] == ["airplane", "automobile", "bird"] and index["image_mode"] == "RGB"
            samples = list(iter_samples(str(out / split)))
            np.testing.assert_array_equal(np.stack([decode(s[1]) for s in samples]),
                                          np.concatenate([cifar_pixels(b) for b in parts]))
            assert [s[3] for s in samples] == [c for b in parts for c in b[b"labels"]]


def test_cifar100_fine_labels(tmp_path):
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    train, test = cifar_batch(6, 4, b"fine_labels", 100), cifar_batch(2, 5, b"fine_labels", 100)
    (src / "train").write_bytes(pickle.dumps(train))
    (src / "test").write_bytes(pickle.dumps(test))
    (src / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                             b"coarse_label_names": [b"x"] * 20}))
    assert run([str(src), "--out", str(tmp_path / "o")]) == 0
    assert read_index(str(tmp_path / "o" / "test"))["classes"][99] == "c99"
    samples = list(iter_samples(str(tmp_path / "o" / "train")))
    np.testing.assert_array_equal(np.stack([decode(s[1]) for s in samples]), cifar_pixels(train))
    assert [s[3] for s in samples] == train[b"fine_labels"]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path, capsys):
    batches_dir = tmp_path / "cifar-10-batches-py"
    make_cifar10(batches_dir)
    marker = tmp_path / "pwned"
    batch = cifar_batch(2, 0)
    batch[b"labels"] = _Evil(marker)
    (batches_dir / "data_batch_2").write_bytes(pickle.dumps(batch))
    out = tmp_path / "o"
    assert run([str(batches_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data_batch_2" in err and "system" in err and "refused" in err, err
    assert not marker.exists()  # the callable was never reached
    assert not out.exists() and not list(tmp_path.glob(".o.partial*"))


# --------------------------------------------------------------------------- object storage


def test_s3_round_trip_on_moto(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    parts = make_mnist(tmp_path / "src", n_train=7, n_test=2)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(str(tmp_path / "src"), f"{bucket[5:]}/mnist-src", recursive=True)  # the source on S3 too
    out = f"{bucket}/mnist"
    args = [f"{bucket}/mnist-src", "--out", out, "--shard-size", "3", "--storage-options", json.dumps(options)]
    assert run(args) == 0
    assert sorted(fs.ls(f"{bucket[5:]}/mnist/train")) == [f"{bucket[5:]}/mnist/train/{n}" for n in
                                                          ("index.json", "shard-000000.tar", "shard-000001.tar",
                                                           "shard-000002.tar")]
    for split, (images, labels) in parts.items():
        index = read_index(f"{out}/{split}", options)
        assert index["num_samples"] == len(images) and index["source"]["path"] == f"{bucket}/mnist-src"
        samples = list(iter_samples(f"{out}/{split}", options))
        np.testing.assert_array_equal(np.stack([decode(s[1]) for s in samples]), images)
        assert [s[3] for s in samples] == labels.tolist()
    # exists -> refused; --overwrite replaces it (a smaller set: no stale shards remain)
    assert run(args) == 1
    assert run([*args[:-4], "--shard-size", "10", *args[-2:], "--overwrite"]) == 0
    listing = sorted(fs.ls(f"{bucket[5:]}/mnist/train", refresh=True))
    assert listing == [f"{bucket[5:]}/mnist/train/{n}" for n in ("index.json", "shard-000000.tar")]


def test_failure_mid_upload_leaves_no_index_on_object_storage(tmp_path, s3_bucket, monkeypatch):
    import s3fs

    bucket, options = s3_bucket
    make_mnist(tmp_path / "src", n_train=9)
    real_png = images_mnist.encode_png
    calls = []

    def failing_png(pixels):
        calls.append(1)
        if len(calls) == 8:  # after two shards of 3 were uploaded
            raise RuntimeError("disk on fire")
        return real_png(pixels)

    monkeypatch.setattr(images_mnist, "encode_png", failing_png)
    with pytest.raises(RuntimeError):
        shard_images.main([str(tmp_path / "src"), "--out", f"{bucket}/m", "--shard-size", "3", "--no-progress",
                           "--storage-options", json.dumps(options)])
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert not fs.exists(f"{bucket[5:]}/m")
    with pytest.raises(UserError, match="index.json is missing"):
        read_index(f"{bucket}/m/train", options)


def test_shards_without_index_read_as_incomplete(tmp_path):
    make_mnist(tmp_path / "src")
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    (tmp_path / "o" / "test" / "index.json").unlink()
    with pytest.raises(UserError, match="no complete image shard set"):
        read_index(str(tmp_path / "o" / "test"))
    with pytest.raises(UserError, match="its splits are .*/o/train"):
        read_index(str(tmp_path / "o"))


# --------------------------------------------------------------------------- existing output


def test_existing_output_untouched_without_overwrite(tmp_path, capsys):
    make_jpeg_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    assert run([str(tmp_path / "photos"), "--out", str(out)]) == 0
    before = tree(out)
    assert run([str(tmp_path / "photos"), "--out", str(out), "--shard-size", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert tree(out) == before
    assert run([str(tmp_path / "photos"), "--out", str(out), "--shard-size", "2", "--overwrite"]) == 0
    assert len(read_index(str(out))["shards"]) == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_foreign_folder_is_never_replaced(tmp_path, capsys):
    make_jpeg_folder(tmp_path / "photos")
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert run([str(tmp_path / "photos"), "--out", str(precious), "--overwrite"]) == 1
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert "not an image shard set" in capsys.readouterr().err


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        shard_images.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and "--shard-size" in out and "index.json" in out


# --------------------------------------------------------------------------- bad inputs


def _corrupt_gz(p: Path) -> Path:
    make_mnist(p / "src")
    data = (p / "src" / "train-images-idx3-ubyte.gz").read_bytes()
    (p / "src" / "train-images-idx3-ubyte.gz").write_bytes(data[:len(data) // 2])
    return p / "src"


def _wrong_magic(p: Path) -> Path:
    make_mnist(p / "src")
    write_idx(p / "src" / "t10k-images-idx3-ubyte.gz", np.zeros(5, np.uint8))  # an idx1 file under an idx3 name
    return p / "src"


def _label_count(p: Path) -> Path:
    make_mnist(p / "src")
    write_idx(p / "src" / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    return p / "src"


def _missing_labels(p: Path) -> Path:
    make_mnist(p / "src")
    (p / "src" / "train-labels-idx1-ubyte.gz").unlink()
    return p / "src"


def _not_an_image(p: Path) -> Path:
    make_jpeg_folder(p / "photos")
    (p / "photos" / "dog" / "img_02.jpg").write_bytes(b"<html>404 not found</html>")
    return p / "photos"


def _truncated_png(p: Path) -> Path:
    (p / "photos" / "x").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(p / "photos" / "x" / "a.png")
    Image.fromarray(np.arange(300, dtype=np.uint8).reshape(10, 10, 3)).save(p / "photos" / "x" / "b.png")
    data = (p / "photos" / "x" / "b.png").read_bytes()
    (p / "photos" / "x" / "b.png").write_bytes(data[:-20])
    return p / "photos"


def _empty_class(p: Path) -> Path:
    make_jpeg_folder(p / "photos")
    (p / "photos" / "fox").mkdir()
    return p / "photos"


def _no_classes(p: Path) -> Path:
    (p / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(p / "flat" / "a.png")
    return p / "flat"


def _cifar_not_pickle(p: Path) -> Path:
    make_cifar10(p / "c")
    (p / "c" / "test_batch").write_bytes(b"garbage, not a pickle")
    return p / "c"


def _cifar_bad_shape(p: Path) -> Path:
    make_cifar10(p / "c")
    batch = cifar_batch(2, 0)
    batch[b"data"] = batch[b"data"][:, :100]
    (p / "c" / "test_batch").write_bytes(pickle.dumps(batch))
    return p / "c"


def _cifar_bad_label(p: Path) -> Path:
    make_cifar10(p / "c")
    batch = cifar_batch(2, 0)
    batch[b"labels"] = [3, 10]
    (p / "c" / "data_batch_1").write_bytes(pickle.dumps(batch))
    return p / "c"


def _empty(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


def _src(p: Path) -> Path:
    make_mnist(p / "src", n_train=2, n_test=1)
    return p / "src"


BAD_INPUTS = {
    "missing source": (lambda p: [str(p / "nope"), "--out", str(p / "o")], 1, "no such file"),
    "source is a file": (lambda p: [str((p / "x.tar.gz").write_bytes(b"x") and p / "x.tar.gz"), "--out", str(p / "o")],
                         1, "extract the archive"),
    "empty folder": (lambda p: [str(_empty(p)), "--out", str(p / "o")], 1, "neither MNIST"),
    "corrupt gz": (lambda p: [str(_corrupt_gz(p)), "--out", str(p / "o")], 1, "train-images-idx3-ubyte.gz: corrupt"),
    "wrong idx magic": (lambda p: [str(_wrong_magic(p)), "--out", str(p / "o")], 1, "not an idx3 file"),
    "label count": (lambda p: [str(_label_count(p)), "--out", str(p / "o")], 1, "4 labels for 5 images"),
    "missing labels": (lambda p: [str(_missing_labels(p)), "--out", str(p / "o")], 1,
                       "labels file train-labels-idx1-ubyte.gz is missing"),
    "forced mnist without idx": (lambda p: [str(_empty_class(p)), "--out", str(p / "o"), "--format", "mnist"], 1,
                                 "no MNIST idx files"),
    "undecodable image": (lambda p: [str(_not_an_image(p)), "--out", str(p / "o")], 1,
                          "img_02.jpg: not an image"),
    "truncated png": (lambda p: [str(_truncated_png(p)), "--out", str(p / "o")], 1, "b.png: not a decodable image"),
    "class without images": (lambda p: [str(_empty_class(p)), "--out", str(p / "o")], 1, "fox: class folder"),
    "no class folders": (lambda p: [str(_no_classes(p)), "--out", str(p / "o"), "--format", "imagefolder"], 1,
                         "no class sub-folders"),
    "cifar not a pickle": (lambda p: [str(_cifar_not_pickle(p)), "--out", str(p / "o")], 1,
                           "test_batch: not a readable CIFAR"),
    "cifar data shape": (lambda p: [str(_cifar_bad_shape(p)), "--out", str(p / "o")], 1, "shape (n, 3072)"),
    "cifar label range": (lambda p: [str(_cifar_bad_label(p)), "--out", str(p / "o")], 1, "'labels'[1] is 10"),
    "shard size zero": (lambda p: [str(_src(p)), "--out", str(p / "o"), "--shard-size", "0"], 2, "--shard-size"),
    "shard size text": (lambda p: [str(_src(p)), "--out", str(p / "o"), "--shard-size", "many"], 2, "--shard-size"),
    "unknown format": (lambda p: [str(_src(p)), "--out", str(p / "o"), "--format", "tiff"], 2, "--format"),
    "bad storage options": (lambda p: [str(_src(p)), "--out", str(p / "o"), "--storage-options", "{oops"], 2,
                            "--storage-options"),
    "out parent missing": (lambda p: [str(_src(p)), "--out", str(p / "no" / "such" / "o")], 1, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_no_output(tmp_path, capsys, case):
    make_args, code, needle = BAD_INPUTS[case]
    args = make_args(tmp_path)
    assert run(args) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert needle in err, err
    assert "Traceback" not in err
    out = Path(args[args.index("--out") + 1])
    assert not out.exists()
    assert not list(out.parent.glob(".*partial*")) if out.parent.exists() else True


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    opts = ('{"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", '
            '"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}')
    assert run([str(_src(tmp_path)), "--out", "s3://nobucket/x", "--storage-options", opts]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "s3://nobucket/x" in err


def test_read_index_refuses_foreign_json(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(UserError, match=SCHEMA):
        read_index(str(tmp_path))


def test_staging_folder_of_a_killed_run_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.partial-{dead.pid}-0000abcd"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard-000000.tar").write_bytes(b"half")
    assert run([str(_src(tmp_path)), "--out", str(tmp_path / "o")]) == 0
    assert not stale.exists() and read_index(str(tmp_path / "o" / "train"))["num_samples"] == 2


def test_killed_upload_leftovers_are_cleared_but_foreign_shards_kept(tmp_path, s3_bucket, capsys):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    src, opts = str(_src(tmp_path)), json.dumps(options)
    # what a killed run leaves: the marker and some shards, no index
    fs.pipe({f"{bucket[5:]}/left/.myow-partial": b"x", f"{bucket[5:]}/left/train/shard-000000.tar": b"half"})
    assert run([src, "--out", f"{bucket}/left", "--storage-options", opts]) == 0
    assert read_index(f"{bucket}/left/train", options)["num_samples"] == 2
    assert not fs.exists(f"{bucket[5:]}/left/.myow-partial")
    # somebody else's shards (no marker, no index of ours) are never replaced
    fs.pipe({f"{bucket[5:]}/theirs/shard-000000.tar": b"precious"})
    assert run([src, "--out", f"{bucket}/theirs", "--storage-options", opts, "--overwrite"]) == 1
    assert "never replaced" in capsys.readouterr().err
    assert fs.cat(f"{bucket[5:]}/theirs/shard-000000.tar") == b"precious"


def test_wids_reads_the_index(tmp_path):
    wids = pytest.importorskip("wids")
    parts = make_mnist(tmp_path / "src")
    assert run([str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--shard-size", "3"]) == 0
    images, labels = parts["train"]
    dataset = wids.ShardListDataset(str(tmp_path / "a" / "train" / "index.json"), transformations=[])
    assert len(dataset) == len(images)
    sample = dataset[len(images) - 1]  # the last sample of the last shard
    assert int(sample[".cls"].read()) == labels[-1]
    np.testing.assert_array_equal(decode(sample[".png"].read()), images[-1])
