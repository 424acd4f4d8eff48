"""SimCLR through the unchanged trainer: the methods interface plugs a new method into the
same loop, checkpoint, resume and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkpoint import load_checkpoint
from pipeline.config import build_config, load_config
from pipeline.kinds import evaluate_run
from pipeline.loop import train
from pipeline.methods import build_method
from pipeline_helpers import REPO, make_store, tiny_overrides


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("simclr"), n_trials=40, bins_per_trial=12, n_units=16)


def _overrides(store, run_dir, steps=12, **extra):
    return tiny_overrides(store, run_dir, steps=steps, **{"method.name": "simclr", **extra})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_simclr_draws_no_pool_and_learns(store, tmp_path):
    cfg = build_config(overrides=_overrides(store, tmp_path / "r", steps=20))
    assert not build_method(cfg).needs.candidate_pool
    run_dir, results = train(cfg)
    rows = _metrics(run_dir)
    assert all(r["loss_mined"] is None and r["mined_valid_ratio"] is None for r in rows)
    assert rows[-1]["loss_total"] < rows[0]["loss_total"]  # NT-Xent falls
    assert "reach_acc" in results
    again = evaluate_run(run_dir, plots=False)  # pipeline.evaluate rebuilds a SimCLR model
    assert again["reach_acc"] == results["reach_acc"]
    assert "projector.0.weight" in load_checkpoint(run_dir / "checkpoint.pt")["model"]


def test_shipped_simclr_config_loads():
    cfg = load_config(str(REPO / "configs" / "reach_simclr.yaml"))
    assert cfg.method.name == "simclr" and cfg.effective_mining_weight == 0.0
