"""pipeline.train on image shards: a short convnet run writes the run directory (metrics,
checkpoint, eval.json with linear/kNN accuracy, the mining pictures), resumes exactly,
``pipeline.evaluate --run`` re-evaluates it, data kind detection and image selections,
the image configs, and one-line errors for bad image settings."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import evaluate as evaluate_mod
from pipeline import train as train_mod
from pipeline.build import build_model
from pipeline.checkpoint import load_checkpoint
from pipeline.config import TRANSFORMS, build_config, load_config
from pipeline.kinds import data_kind
from pipeline.data.image_views import TRANSFORM_SETS
from pipeline.data.images import resolve_selections
from pipeline.loop import train
from preprocess import shard_images
from preprocess.errors import run_cli
from pipeline_helpers import REPO, make_store, train_killed_at_fetch

N_TRAIN, N_TEST = 96, 48


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _mnist_like(folder: Path, parts=(("train", N_TRAIN), ("t10k", N_TEST)), seed: int = 0) -> Path:
    """MNIST idx files whose class is the row of a bright bar (4 classes), plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for prefix, n in parts:
        labels = np.arange(n) % 4
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 3 + 6 * c:6 + 6 * c, 4:24] = 250
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-images")
    out = {}
    for name, parts in (("full", (("train", N_TRAIN), ("t10k", N_TEST))), ("t10k", (("t10k", 50),))):
        source = _mnist_like(root / f"{name}-idx", parts)
        out[name] = str(root / f"{name}-shards")
        assert shard_images.main([str(source), "--out", out[name], "--shard-size", "40", "--no-progress"]) == 0
    return out


def image_overrides(path: str, run_dir: Path, steps: int = 6, **extra) -> list[str]:
    """--set overrides for a fast CPU run on tiny shards (small convnet, 16x16 views)."""
    values = {
        "data.path": path, "run.dir": str(run_dir), "run.threads": 1, "run.progress": False, "run.device": "cpu",
        "train.max_steps": steps, "train.log_every": 1, "train.checkpoint_every": 1000,
        "model.encoder": "convnet", "model.out_dim": 16, "model.projector": "[32,16]", "model.predictor_hidden": 32,
        "model.mined_projector": "[32,16]", "method.k": 1, "method.pool_size": 24, "method.mining_weight": 0.1,
        "method.mining_ramp_epochs": 0, "optim.name": "sgd", "optim.lr": 0.05, "optim.weight_decay": 5e-4,
        "optim.warmup_epochs": 0, "optim.batch_size": 16, "optim.ema_base_tau": 0.99,
        "images.transform": "mnist", "images.image_size": 16, "eval.knn_k": 10, "eval.mining_anchors": 24,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_run(shards, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("image-run") / "run"
    return train(build_config(overrides=image_overrides(shards["full"], run_dir, steps=6, **{"train.eval_every": 3})))


def test_image_run_writes_metrics_checkpoint_eval_and_pictures(image_run):
    run_dir, results = image_run
    for name in ("metrics.jsonl", "config.yaml", "checkpoint.pt", "eval.json", "mined_views.png",
                 "mining_confusion.png", "mined_label_agreement.png"):
        assert (run_dir / name).is_file(), name
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert math.isfinite(r["loss_total"]) and r["mining_pool_size"] == 24 and r["samples"] == 16 * r["step"]
        assert r["mined_same_trial_ratio"] == 0.0  # trial = sample index: an anchor never mines its own image
        assert 0.0 <= r["mined_label_agreement_ratio"] <= 1.0
    evals = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6] and "linear_accuracy" in evals[0] and "knn_accuracy" in evals[0]
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == pytest.approx(results)
    assert 0.0 <= saved["linear_accuracy"] <= 1.0 and 0.0 <= saved["knn_accuracy"] <= 1.0
    assert saved["train_images"] == N_TRAIN and saved["eval_images"] == N_TEST and saved["step"] == 6
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["data_kind"] == "images" and ckpt["step"] == 6
    assert ckpt["normalization"] == {"kind": "images", "mean": [0.1307], "std": [0.3081], "image_size": 16,
                                     "channels": 1}
    assert load_config(run_dir / "config.yaml").images.image_size == 16


def test_evaluate_cli_reevaluates_an_image_run(image_run, tmp_path, capsys):
    run_dir, results = image_run
    (run_dir / "mined_views.png").unlink()
    out = tmp_path / "emb.npz"
    assert evaluate_mod.main(["--run", str(run_dir), "--export-embeddings", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["linear_accuracy"] == pytest.approx(results["linear_accuracy"], abs=1e-6)
    assert again["knn_accuracy"] == pytest.approx(results["knn_accuracy"], abs=1e-6)
    assert again["step"] == 6 and (run_dir / "mined_views.png").is_file()
    with np.load(out) as f:
        assert f["embedding"].shape == (N_TEST, 16) and f["embedding"].dtype == np.float32
        assert f["sample"].tolist() == list(range(N_TEST)) and f["label"].tolist() == [i % 4 for i in range(N_TEST)]


def test_resume_continues_the_exact_sequence(shards, tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    common = {"eval.mining_anchors": 8}
    train(build_config(overrides=image_overrides(shards["full"], full_dir, steps=8, **common)))
    cfg = build_config(overrides=image_overrides(shards["full"], cut_dir, steps=8, **{"train.checkpoint_every": 4},
                                                 **common))
    train_killed_at_fetch(cfg, fetch=7)  # killed while fetching step 7's batch (the stream reads 2 ahead)
    assert load_checkpoint(cut_dir / "checkpoint.pt")["step"] == 4

    train(cfg)  # resumes from step 4
    got, expect = _metrics(cut_dir), _metrics(full_dir)
    assert [r["step"] for r in got] == list(range(1, 9))
    keys = ("loss_total", "loss_mined", "embedding_std", "mined_label_agreement_ratio")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expect]
    a = torch.load(cut_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(full_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_kind_and_selections(shards, tmp_path):
    store = make_store(tmp_path, n_trials=4, bins_per_trial=5, n_units=3)
    assert data_kind(build_config(overrides=[f"data.path={shards['full']}"])) == "images"
    assert data_kind(build_config(overrides=[f"data.path={shards['full']}/test"])) == "images"
    assert data_kind(build_config(overrides=[f"data.path={store}"])) == "neural"
    assert data_kind(build_config(overrides=[f"data.path={tmp_path / 'missing'}"])) == "neural"

    def selections(path, *sets):
        train_sel, eval_sel = resolve_selections(build_config(overrides=[f"data.path={path}", *sets]))
        return (train_sel.split, train_sel.range), (eval_sel.split, eval_sel.range)

    # train/ + test/: trained on train, evaluated on test
    assert selections(shards["full"]) == (("train", (0, N_TRAIN)), ("test", (0, N_TEST)))
    # the t10k set alone: one set, its last eval_fraction evaluated on (10000 -> 8000 / 2000)
    assert selections(shards["t10k"]) == (("test", (0, 40)), ("test", (40, 50)))
    assert selections(f"{shards['t10k']}/test", "images.train_split=null", "images.eval_split=null",
                      "images.eval_range=[0,10]") == ((None, (10, 50)), (None, (0, 10)))
    assert selections(shards["t10k"], "images.train_range=[0,30]", "images.eval_range=[-10,null]") == (
        ("test", (0, 30)), ("test", (40, 50)))
    assert selections(shards["full"], "images.eval_split=train", "images.train_range=[0,64]") == (
        ("train", (0, 64)), ("train", (64, N_TRAIN)))


def test_bad_image_settings_are_one_line_errors(shards, tmp_path, capsys):
    def fails(code, *overrides):
        argv = [a for o in overrides for a in ("--set", o)]
        assert run_cli(train_mod.main, argv, "train") == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert fails(2, "images.transfrom=mnist") == "train: error: unknown config key 'images.transfrom'"
    assert "'images.transform': must be one of" in fails(2, "images.transform=mnsit")
    assert "'images.normalize'" in fails(2, "images.normalize=[[0.5],[0.5,0.5]]")
    assert "'model.encoder'" in fails(2, "data.kind=images", "model.encoder=mlp")
    run = f"run.dir={tmp_path / 'r'}"
    msg = fails(1, f"data.path={shards['t10k']}", "model.encoder=convnet", "images.train_range=[0,30]",
                "images.eval_range=[20,50]", run)
    assert "overlap" in msg
    assert "images.eval_split is 'val'" in fails(1, f"data.path={shards['full']}", "model.encoder=convnet",
                                                 "images.eval_split=val", run)
    assert "model.encoder" in fails(1, f"data.path={shards['full']}", run)  # the default mlp encoder
    assert not (tmp_path / "r").exists()  # nothing partial left behind


def test_image_configs_and_encoders():
    assert set(TRANSFORMS) == set(TRANSFORM_SETS)
    cfgs = {name: load_config(REPO / "configs" / f"{name}.yaml")
            for name in ("cifar10_myow", "cifar10_byol", "mnist_myow", "mnist_byol")}
    for family in ("cifar10", "mnist"):
        myow, byol = cfgs[f"{family}_myow"], cfgs[f"{family}_byol"]
        assert myow.method.name == "myow" and byol.method.name == "byol"
        byol.method.name = "myow"
        assert byol == myow  # the honest baseline: the same settings, lambda = 0
    c = cfgs["cifar10_myow"]
    assert (c.model.encoder, c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
        "resnet18", "sgd", 0.03, 0.9, 5e-4)
    assert (c.train.epochs, c.optim.batch_size, c.method.pool_size, c.method.k, c.method.mining_weight,
            c.method.mining_ramp_epochs, c.optim.ema_base_tau, c.images.transform) == (
        800, 512, 512, 1, 0.1, 10, 0.996, "cifar")
    model = build_model(c, 3)
    dims = [(h[0].in_features, h[0].out_features, h[3].out_features)
            for h in (model.projector, model.predictor, model.mined_projector, model.mined_predictor)]
    assert dims == [(512, 4096, 256), (256, 4096, 256), (256, 4096, 256), (256, 4096, 256)]  # paper App. C
    assert model.encoder.conv1.in_channels == 3 and model.encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    m = cfgs["mnist_myow"]
    assert build_model(m, 1).encoder(torch.zeros(2, 1, 28, 28)).shape == (2, m.model.out_dim)


def test_resnet_step_in_channels_last_memory_format(shards):
    """What the trainer does for ResNets on CUDA (model and image batches in channels_last),
    run on the CPU: the step, the mining and the EMA update work across memory formats."""
    from pipeline.step import Plan, train_step

    cfg = build_config(overrides=image_overrides(shards["full"], Path("unused"), **{
        "model.encoder": "resnet18", "model.projector": "[32,16]", "optim.batch_size": 4, "method.pool_size": 6,
        "images.image_size": 8}))
    torch.manual_seed(0)
    model = build_model(cfg, 1).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.online_parameters(), lr=0.01)
    views = [torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    meta = {"store": torch.zeros(4, dtype=torch.long), "time": torch.arange(4.0), "trial": torch.arange(4),
            "row": torch.arange(4), "label": torch.arange(4) % 2}
    pool_meta = {k: torch.cat([v, v[:2]]) for k, v in meta.items()}
    pool = (torch.randn(6, 1, 8, 8).contiguous(memory_format=torch.channels_last), pool_meta)
    out = train_step(model, opt, (*views, meta), pool, 3, cfg, torch.Generator().manual_seed(0),
                     plan=Plan.build(cfg, steps_per_epoch=2))
    assert math.isfinite(out["loss_total"]) and out["mined_same_trial_ratio"] == 0.0
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
