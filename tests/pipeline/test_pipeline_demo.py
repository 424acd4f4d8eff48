"""The embedded demo (shortened) and the supervised baseline, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import build_config
from pipeline.supervised import train_supervised
from pipeline_helpers import REPO, make_store


def test_demo_shortened_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--demo", "--set", "train.epochs=4",
                           "--set", f"run.dir={run_dir}", "--set", "eval.tsne=false", "--set", "run.progress=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    results = json.loads(lines[0])
    assert 0.0 <= results["reach_acc"] <= 1.0 and results["run_dir"] == str(run_dir)
    assert any("accuracy" in line and "chance" in line for line in lines)
    assert any(line.startswith("run directory:") and str(run_dir) in line for line in lines)
    for name in ("session.nwb", "session.zarr", "config.yaml", "metrics.jsonl", "checkpoint.pt", "eval.json"):
        assert (run_dir / name).exists(), name


@pytest.mark.skipif(os.environ.get("MYOW_FULL_DEMO") != "1", reason="full ~1 minute demo: set MYOW_FULL_DEMO=1")
def test_full_demo_is_clearly_above_chance(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--demo", "--set", f"run.dir={tmp_path / 'd'}",
                           "--set", "run.progress=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[0])
    assert results["reach_acc"] > 0.4 and results["seconds"] < 120


def test_supervised_baseline_runs(tmp_path):
    store = make_store(tmp_path, n_trials=40, bins_per_trial=12, n_units=16)
    cfg = build_config(overrides=[f"data.path={store}", f"run.dir={tmp_path / 'sup'}", "method.name=supervised",
                                  "train.epochs=15", "optim.batch_size=32", "model.dropout=0.1", "run.threads=1"])
    run_dir, results = train_supervised(cfg)
    assert {"reach_acc", "reach_delta_acc", "reach_val_acc", "reach_test_bins"} <= set(results)
    assert results["reach_acc"] > 0.3  # tuned synthetic units: far above chance (0.125)
    assert (run_dir / "eval.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    # its representation is read out and exported like any run's (pipeline.evaluate --run)
    from pipeline.evaluate import main as evaluate_main

    out = tmp_path / "emb.npz"
    assert evaluate_main(["--run", str(run_dir), "--no-plots", "--export-embeddings", str(out)]) == 0
    emb = np.load(out)["embedding"]
    assert emb.shape == (480, cfg.model.out_dim) and np.isfinite(emb).all()
