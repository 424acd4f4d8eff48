"""pipeline.data.image_* and readout.images: view transforms (== torchvision v2), deterministic and resumable anchor/pool
streams in memory and streamed from shards (local and S3), rank sharding, own-image exclusion,
the evaluation helpers and the pictures."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from model.miner import exclusion_mask, mine_views
from preprocess import shard_images
from preprocess.errors import UserError
from pipeline.data.image_shards import load_image_tensors
from pipeline.data.image_streams import build_image_streams
from pipeline.data.image_views import ImageAugment, ImageNormalization, TRANSFORM_SETS, ViewSpec
from pipeline.readout.images import embed_images
from pipeline.readout.pictures import save_confusion, save_mining_grid, to_uint8
from pipeline.readout.probes import knn_accuracy, linear_probe_details
from pipeline.data.stages import Prefetcher

B, L = 16, 24


# --------------------------------------------------------------------------- synthetic shard sets


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_mnist(folder: Path, n_train: int = 240, n_test: int = 60, seed: int = 0) -> dict:
    """MNIST-like idx files: a bright bar whose position encodes the class, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        parts[prefix] = (images, labels)
    return parts


def make_folder(folder: Path, n_per_class: int = 20, classes: int = 3, sizes=None, seed: int = 1) -> None:
    """An RGB ImageFolder (PNG), 32x32 unless ``sizes`` gives (H, W) per image."""
    rng = np.random.default_rng(seed)
    k = 0
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = sizes[k % len(sizes)] if sizes else (32, 32)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:03d}.png")
            k += 1


def shard(source: Path | str, out: str, shard_size: int, storage_options: str = "{}") -> None:
    assert shard_images.main([str(source), "--out", out, "--shard-size", str(shard_size), "--no-progress",
                              "--storage-options", storage_options]) == 0


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("images")
    parts = make_mnist(root / "mnist")
    shard(root / "mnist", str(root / "mnist-shards"), 40)  # train: 6 shards of 40, test: 2 shards
    make_folder(root / "folder")
    shard(root / "folder", str(root / "folder-shards"), 12)  # 60 RGB images in 5 shards
    return {"root": root, "mnist": str(root / "mnist-shards"), "folder": str(root / "folder-shards"),
            "parts": parts}


def streams(url: str, **kw) -> tuple[Prefetcher, Prefetcher]:
    args = dict(batch_size=B, pool_size=L, seed=0, transform="mnist", split="train")
    args.update(kw)
    return build_image_streams(url, None, **args)


def take(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def assert_same(a, b) -> None:
    """Two lists of batches (tuples of tensors / None / meta dicts) are identical."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, dict):
                assert u.keys() == v.keys()
                for k in u:
                    assert torch.equal(u[k], v[k]), k
            elif u is None:
                assert v is None
            else:
                assert torch.equal(u, v)


def close(*prefetchers) -> None:
    for p in prefetchers:
        p.close(rewind=False)
        if hasattr(p.source, "close"):
            p.source.close()


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name,channels", [("cifar", 3), ("mnist-all", 1), ("mnist", 1)])
def test_views_equal_torchvision_v2_with_the_same_parameters(name, channels):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    spec = TRANSFORM_SETS[name][0]
    norm = ImageNormalization((0.4,) * channels, (0.2,) * channels)
    aug = ImageAugment(spec, 24, norm)
    images = torch.randint(0, 256, (64, channels, 30, 30), dtype=torch.uint8)
    params = aug.draw(torch.full((64,), 30), torch.full((64,), 30), torch.Generator().manual_seed(3))
    out = aug.apply(images, params)
    assert out.shape == (64, channels, 24, 24) and out.dtype == torch.float32
    lo, hi = (0 - 0.4) / 0.2, (1 - 0.4) / 0.2
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for i in range(64):
        y = F.resized_crop(images[i], int(params["top"][i]), int(params["left"][i]), int(params["height"][i]),
                           int(params["width"][i]), [24, 24], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if params["flip"][i]:
            y = F.horizontal_flip(y)
        y = F.to_dtype(y, torch.float32, scale=True)
        if "jitter" in params and params["jitter"][i]:
            for op in params["order"][i].tolist():
                y = ops[op](y, float(params["factors"][i, op]))
        if "gray" in params and params["gray"][i] and channels == 3:
            y = F.rgb_to_grayscale(y, num_output_channels=3)
        y = F.normalize(y, list(norm.mean), list(norm.std))
        torch.testing.assert_close(out[i], y, atol=1e-4, rtol=0)
    if name == "mnist":  # crop only: no flip, no colour
        assert set(params) == {"top", "left", "height", "width", "flip"} and not params["flip"].any()
    else:
        assert 0.6 < params["jitter"].float().mean() < 0.95 and 0.2 < params["flip"].float().mean() < 0.8


def test_crop_boxes_follow_random_resized_crop():
    from torchvision.transforms import v2

    n = 3000
    for (H, W), scale in (((32, 32), (0.2, 1.0)), ((28, 28), (0.8, 1.0)), ((20, 60), (0.8, 1.0))):
        aug = ImageAugment(ViewSpec(crop_scale=scale), 16, ImageNormalization((0.5,), (0.5,)))
        p = aug.draw(torch.full((n,), H), torch.full((n,), W), torch.Generator().manual_seed(0))
        assert ((p["top"] >= 0) & (p["top"] + p["height"] <= H) & (p["left"] >= 0) & (p["left"] + p["width"] <= W)).all()
        ref = v2.RandomResizedCrop(16, scale=scale)
        torch.manual_seed(0)
        boxes = [ref.make_params([torch.zeros(1, H, W)]) for _ in range(n)]
        area = (p["height"] * p["width"]).double() / (H * W)
        ref_area = torch.tensor([b["height"] * b["width"] for b in boxes], dtype=torch.float64) / (H * W)
        assert abs(area.mean() - ref_area.mean()) < 0.02
        if H == W:
            assert area.min() >= scale[0] * 0.85
        else:  # 20x60 never fits a box of ratio <= 4/3 and scale >= 0.8: the central-crop fallback
            assert (p["height"] == 20).all() and (p["width"] == 27).all() and (p["left"] == 16).all()
            assert all(b["height"] == 20 and b["width"] == 27 and b["left"] == 16 for b in boxes)


def test_unknown_transform_and_wrong_normalisation_are_refused(sets):
    with pytest.raises(UserError, match="transform"):
        streams(sets["mnist"], transform="nope")
    with pytest.raises(UserError, match="channel"):
        streams(sets["mnist"], transform="cifar")  # 3-channel constants for 1-channel digits


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_batches_shapes_meta_and_determinism(sets, loading):
    kw = dict(loading=loading, shuffle_buffer=50)
    a, p = streams(sets["mnist"], **kw)
    assert a.streamed == (loading == "stream") and a.image_size == 28 and a.channels == 1
    assert a.normalization.mean == (0.1307,) and a.steps_per_epoch == 240 // B and a.batch_size == B
    x1, x2, x_m, meta = next(a)
    for x in (x1, x2, x_m):
        assert x.shape == (B, 1, 28, 28) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert x.min() >= (0 - 0.1307) / 0.3081 - 1e-5 and x.max() <= (1 - 0.1307) / 0.3081 + 1e-5
    assert not torch.equal(x1, x2)  # two draws of T
    assert set(meta) == {"store", "time", "trial", "row", "label"}
    assert meta["store"].dtype == meta["trial"].dtype == meta["row"].dtype == meta["label"].dtype == torch.int64
    assert meta["time"].dtype == torch.float64
    assert torch.equal(meta["trial"], meta["row"]) and torch.equal(meta["time"], meta["row"].double())
    assert (meta["store"] == 0).all() and len(meta["row"].unique()) == B
    labels = torch.from_numpy(sets["parts"]["train"][1].astype(np.int64))
    assert torch.equal(meta["label"], labels[meta["row"]])
    x_pool, pmeta = next(p)
    assert x_pool.shape == (L, 1, 28, 28) and set(pmeta) == set(meta)
    rest_a, rest_p = take(a, 4), take(p, 4)
    close(a, p)

    a2, p2 = streams(sets["mnist"], **kw)
    assert_same([(x1, x2, x_m, meta)] + rest_a, take(a2, 5))
    assert_same([(x_pool, pmeta)] + rest_p, take(p2, 5))
    close(a2, p2)

    a3, p3 = streams(sets["mnist"], seed=1, **kw)
    y1, _, _, meta3 = next(a3)
    assert not torch.equal(meta3["row"], meta["row"]) or not torch.equal(y1, x1)
    assert not torch.equal(next(p3)[1]["row"], pmeta["row"])
    close(a3, p3)

    a4, p4 = streams(sets["mnist"], mining_view=False, **kw)
    assert next(a4)[2] is None
    close(a4, p4)


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_resume_continues_exactly(sets, loading, tmp_path):
    kw = dict(loading=loading, shuffle_buffer=30, transform="cifar", split=None)
    a, p = streams(sets["folder"], **kw)  # 60 images: several epochs in 12 steps
    take(a, 5), take(p, 7)
    path = tmp_path / "state.pt"
    torch.save({"anchors": a.state_dict(), "pool": p.state_dict()}, path)
    expect_a, expect_p = take(a, 7), take(p, 5)
    close(a, p)
    state = torch.load(path, weights_only=True)
    if loading == "stream":
        assert len(state["anchors"]["buffer"]) > 0 and state["anchors"]["kind"] == "images-stream"
    a2, p2 = streams(sets["folder"], seed=123, **kw)  # different seed: the state must win
    next(a2)  # a started producer is stopped and rewound by load_state_dict
    a2.load_state_dict(state["anchors"])
    p2.load_state_dict(state["pool"])
    assert_same(expect_a, take(a2, 7))
    assert_same(expect_p, take(p2, 5))
    close(a2, p2)


def test_state_of_another_loading_mode_is_refused(sets):
    a, p = streams(sets["mnist"], loading="memory")
    state = a.state_dict()
    close(a, p)
    a2, p2 = streams(sets["mnist"], loading="stream")
    with pytest.raises(UserError, match="does not match"):
        a2.load_state_dict(state)
    close(a2, p2)


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_ranks_get_disjoint_anchors_and_equal_steps(sets, loading):
    kw = dict(loading=loading, world_size=2, shuffle_buffer=16)
    (a0, p0), (a1, p1) = streams(sets["mnist"], rank=0, **kw), streams(sets["mnist"], rank=1, **kw)
    assert a0.steps_per_epoch == a1.steps_per_epoch == 240 // (2 * B)
    n = 4 if loading == "stream" else a0.steps_per_epoch  # streamed: within the first shards of epoch 0
    rows0 = torch.cat([b[3]["row"] for b in take(a0, n)])
    rows1 = torch.cat([b[3]["row"] for b in take(a1, n)])
    assert len(rows0.unique()) == len(rows0) and not set(rows0.tolist()) & set(rows1.tolist())
    if loading == "stream":
        s0, s1 = a0.source.epoch_shards(0), a1.source.epoch_shards(0)
        assert not set(s0) & set(s1) and sorted(s0 + s1) == list(range(6))
    else:
        assert len(rows0) == len(rows1) == 240 // 2 // B * B
    # pools are independent draws per rank
    assert not torch.equal(next(p0)[1]["row"], next(p1)[1]["row"])
    close(a0, p0, a1, p1)
    with pytest.raises(UserError, match="cannot be shared by 7 ranks"):
        streams(sets["mnist"], loading="stream", world_size=7)


def test_index_range_split_and_test_split(sets):
    images, labels = load_image_tensors(sets["mnist"], split="test")
    want_images, want_labels = sets["parts"]["t10k"]
    assert torch.equal(images[:, 0], torch.from_numpy(want_images)) and torch.equal(labels, torch.from_numpy(want_labels.astype(np.int64)))
    head, _ = load_image_tensors(sets["mnist"], split="train", index_range=(0, 200))
    tail, _ = load_image_tensors(sets["mnist"], split="train", index_range=(200, None))
    assert len(head) == 200 and len(tail) == 40
    assert torch.equal(tail[:, 0], torch.from_numpy(sets["parts"]["train"][0][200:]))
    for loading in ("memory", "stream"):
        a, p = streams(sets["mnist"], index_range=(200, 240), loading=loading, batch_size=8, pool_size=8)
        rows = torch.cat([b[3]["row"] for b in take(a, 5)] + [next(p)[1]["row"]])
        assert rows.min() >= 200 and rows.max() < 240
        close(a, p)


def test_trial_meta_keeps_an_anchor_from_mining_its_own_image(sets):
    a, p = streams(sets["mnist"], loading="memory", pool_size=240)  # the pool holds every image
    meta, pmeta = next(a)[3], next(p)[1]
    excluded = exclusion_mask(meta["trial"], pmeta["trial"], meta["time"], pmeta["time"], 0.0)
    assert torch.equal(excluded, meta["row"][:, None] == pmeta["row"][None, :])
    assert excluded.sum(1).eq(1).all()  # exactly its own image, nothing else
    # identical "representations": without the mask the own image would win every time
    feats = torch.randn(240, 8)
    idx = mine_views(feats[meta["row"]], feats[pmeta["row"]], 1, torch.Generator().manual_seed(0), excluded)
    assert (idx >= 0).all() and not (pmeta["row"][idx] == meta["row"]).any()
    close(a, p)


def test_variable_sizes_stream_and_fit_normalisation(tmp_path):
    make_folder(tmp_path / "mixed", n_per_class=6, classes=2, sizes=[(30, 40), (36, 36), (44, 33)])
    shard(tmp_path / "mixed", str(tmp_path / "mixed-shards"), 4)
    with pytest.raises(UserError, match="different sizes"):
        load_image_tensors(str(tmp_path / "mixed-shards"))
    a, p = build_image_streams(str(tmp_path / "mixed-shards"), None, batch_size=4, pool_size=6, seed=0,
                                 transform="imagenet", image_size=24, normalize="fit", shuffle_buffer=8)
    assert a.streamed  # auto: too varied for one tensor
    x1, _, x_m, _ = next(a)
    assert x1.shape == x_m.shape == (4, 3, 24, 24) and next(p)[0].shape == (6, 3, 24, 24)
    # normalize="fit": the statistics of the pixels (uniform noise: mean ~0.5, std ~0.29)
    assert all(abs(m - 0.5) < 0.02 for m in a.normalization.mean)
    assert all(abs(s - 0.289) < 0.02 for s in a.normalization.std)
    close(a, p)


def test_s3_shards_stream_the_same_batches_as_local(sets, s3_bucket):
    import json

    bucket, options = s3_bucket
    shard(Path(sets["root"]) / "folder", f"{bucket}/folder", 12, json.dumps(options))
    for loading in ("memory", "stream"):
        kw = dict(loading=loading, shuffle_buffer=20, transform="cifar", split=None)
        local = streams(sets["folder"], **kw)
        remote = build_image_streams(f"{bucket}/folder", options, batch_size=B, pool_size=L, seed=0, **kw)
        assert remote[0].streamed == (loading == "stream")
        for lo, re in zip(local, remote):
            assert_same(take(lo, 4), take(re, 4))
        close(*local, *remote)


# --------------------------------------------------------------------------- evaluation and pictures


def separable(n: int, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.eye(dim)[:classes] * 10
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_linear_probe_and_knn_on_separable_features():
    xtr, ytr = separable(400)
    xte, yte = separable(200, seed=1)
    details = linear_probe_details(xtr, ytr, xte, yte)
    assert details["accuracy"] > 0.99 and details["l2"] in details["val_accuracy"]
    assert linear_probe_details(xtr, ytr, xte, yte)["accuracy"] > 0.99
    assert knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.1) > 0.99
    # random labels: the probe cannot beat chance by much (nothing leaks from test)
    shuffled = yte[torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_details(xtr, ytr, xte, shuffled)["accuracy"] < 0.5


def test_embed_images_with_a_small_convnet(sets):
    from model.encoders import SmallConvNet

    images, _ = load_image_tensors(sets["mnist"], split="test")
    net = SmallConvNet(1, out_dim=8)
    net.train()
    y = embed_images(net, images, ImageNormalization.preset("mnist", 1), "cpu", batch_size=25)
    assert y.shape == (60, 8) and y.dtype == torch.float32 and net.training
    assert torch.allclose(y[:5], embed_images(net, images[:5], ImageNormalization.preset("mnist", 1)), atol=1e-5)


def test_pictures_are_written(sets, tmp_path):
    a, p = streams(sets["folder"], loading="memory", transform="cifar", split=None)
    _, _, x_m, meta = next(a)
    x_pool, pmeta = next(p)
    anchors, mined = to_uint8(x_m, a.normalization), to_uint8(x_pool[:B], a.normalization)
    assert anchors.dtype == torch.uint8 and anchors.shape == (B, 3, 32, 32)
    save_mining_grid(tmp_path / "grid.png", anchors, mined, n=8, anchor_labels=meta["label"],
                       mined_labels=pmeta["label"][:B], class_names=a.classes)
    counts = save_confusion(tmp_path / "confusion.png", torch.tensor([0, 0, 1, 2, 2, -1]),
                              torch.tensor([0, 1, 1, 2, 0, 2]), ["a", "b", "c"])
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    for name in ("grid.png", "confusion.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as image:
            assert image.size[0] > 200
    close(a, p)


# --------------------------------------------------------------------------- real data


def test_real_mnist_t10k_shards_and_loads(tmp_path):
    source = shared_path("mnist-t10k")
    shard(source, str(tmp_path / "mnist"), 2500)
    images, labels = load_image_tensors(str(tmp_path / "mnist"), split="test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with gzip.open(source / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], np.uint8).reshape(10000, 28, 28).copy()
    assert torch.equal(images[:, 0], torch.from_numpy(raw))
    # the 8000/2000 split of one set, by index
    a, p = build_image_streams(str(tmp_path / "mnist"), None, split="test", index_range=(0, 8000), batch_size=256,
                                 pool_size=256, seed=0, transform="mnist")
    assert not a.streamed and a.n_samples == 8000 and a.steps_per_epoch == 8000 // 256
    assert next(a)[3]["row"].max() < 8000
    held, _ = load_image_tensors(str(tmp_path / "mnist"), split="test", index_range=(8000, 10000))
    assert torch.equal(held, images[8000:])
    close(a, p)
