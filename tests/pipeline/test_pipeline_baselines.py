"""The paper's baselines (RP, TS, AE, pi-VAE) through the unchanged trainer: each trains,
learns, checkpoints, resumes exactly and is read out by pipeline.evaluate like MYOW."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import build_config, load_config
from pipeline.kinds import build_train_data, evaluate_run
from pipeline.loop import train
from pipeline.methods import build_method
from pipeline_helpers import REPO, make_store, tiny_overrides, train_killed_at_fetch
from preprocess.errors import UserError

BASELINES = {"rp": {}, "ts": {}, "ae": {}, "pivae": {"method.label_classes": 8}}  # SimCLR: test_pipeline_simclr


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("baselines"), n_trials=40, bins_per_trial=12, n_units=16)


def _overrides(store, run_dir, name, steps=12, **extra):
    return tiny_overrides(store, run_dir, steps=steps, **{"method.name": name, "data.min_speed": 0.0,
                                                           **BASELINES.get(name, {}), **extra})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_trains_learns_and_reads_out(store, tmp_path, name):
    cfg = build_config(overrides=_overrides(store, tmp_path / "r", name, steps=30, **{"optim.lr": 5e-3}))
    assert not build_method(cfg).needs.candidate_pool
    run_dir, results = train(cfg)
    rows = _metrics(run_dir)
    assert all(r["loss_mined"] is None and r["mined_valid_ratio"] is None for r in rows)
    first, last = np.mean([r["loss_total"] for r in rows[:5]]), np.mean([r["loss_total"] for r in rows[-5:]])
    assert last < first, (name, first, last)  # the method's loss falls
    assert "reach_acc" in results
    again = evaluate_run(run_dir, plots=False)  # pipeline.evaluate rebuilds the method's model
    assert again["reach_acc"] == results["reach_acc"]
    if name in ("rp", "ts"):
        assert 0.0 <= rows[-1]["pretext_accuracy"] <= 1.0
    if name == "pivae":
        assert rows[-1]["poisson_nll"] > 0 and rows[-1]["kl"] >= 0


@pytest.mark.parametrize("name", sorted(BASELINES) + ["simclr"])
def test_baseline_resumes_exactly(store, tmp_path, name):
    full = tmp_path / "full"
    train(build_config(overrides=_overrides(store, full, name)))
    cut = tmp_path / "cut"
    cfg = build_config(overrides=_overrides(store, cut, name, **{"train.checkpoint_every": 5}))
    train_killed_at_fetch(cfg, fetch=8)
    train(cfg)
    assert [r["loss_total"] for r in _metrics(cut)] == [r["loss_total"] for r in _metrics(full)]
    a = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ae_target_is_the_clean_view_and_pivae_the_counts(store, tmp_path):
    for name in ("ae", "pivae"):
        cfg = build_config(overrides=_overrides(store, tmp_path / name, name))
        data = build_train_data(cfg, needs=build_method(cfg).needs)
        try:
            session = data.sessions[0]
            x1, _, target, meta = next(session.anchors)
            rates = session.samples.rates[torch.searchsorted(torch.from_numpy(session.samples.rows), meta["row"])]
            if name == "ae":
                assert torch.allclose(target, session.normalization(rates), atol=1e-6)
                assert not torch.allclose(x1, target)  # the input is augmented
            else:
                counts = rates * session.recording.bin_size_s
                assert torch.equal(target, counts.round()) and torch.allclose(target, counts, atol=1e-3)
        finally:
            data.close()


def test_pivae_refuses_labels_beyond_its_classes(store, tmp_path):
    cfg = build_config(overrides=_overrides(store, tmp_path / "p", "pivae", **{"method.label_classes": 2}))
    with pytest.raises(UserError, match="method.label_classes=8"):
        train(cfg)
    assert not (tmp_path / "p").exists()  # refused before the run wrote anything


def test_pivae_needs_its_classes_and_baselines_refuse_images():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="method.label_classes"):
        build_config({"method": {"name": "pivae"}})
    with pytest.raises(ConfigError, match="neural-data baseline"):
        build_config({"method": {"name": "rp"}, "data": {"kind": "images"}, "model": {"encoder": "convnet"}})


@pytest.mark.parametrize("name", ["rp", "ts", "ae", "pivae", "simclr", "supervised", "myow", "byol"])
@pytest.mark.parametrize("task", ["reach", "sleep"])
def test_shipped_config_of_every_method_loads(task, name):
    cfg = load_config(str(REPO / "configs" / f"{task}_{name}.yaml"))
    assert cfg.method.name == name


def test_supervised_writes_nothing_when_its_data_fails(tmp_path):
    from pipeline.supervised import train_supervised

    cfg = load_config(str(REPO / "configs" / "reach_supervised.yaml"),
                      [f"data.path={tmp_path / 'missing.zarr'}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(UserError):
        train_supervised(cfg)
    assert not (tmp_path / "run").exists()


def test_trial_gap_is_refused_for_images():
    from pipeline.kinds import check_kind

    cfg = build_config({"data": {"kind": "images", "min_trial_gap": 3}, "model": {"encoder": "convnet"}})
    with pytest.raises(UserError, match="data.min_trial_gap is for neural data"):
        check_kind(cfg, "images")
    check_kind(build_config({"data": {"kind": "images"}, "model": {"encoder": "convnet"}}), "images")  # 0 is fine
