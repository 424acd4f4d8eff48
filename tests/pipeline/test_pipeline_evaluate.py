"""pipeline.evaluate: reach metric math, read-outs, the CLI (JSON, embeddings export, errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import main

from pipeline.kinds import evaluate_run

from pipeline.readout.pictures import save_plots

from pipeline.readout.probes import LOGREG_CS, REACH_ALPHAS
from pipeline.build import build_model
from pipeline.checkpoint import load_checkpoint
from pipeline.config import build_config
from pipeline.data.augment import Normalization
from pipeline.data.recording import load_recording
from pipeline.readout.probes import angle_accuracy, circular_error, classification_readout, reach_readout
from pipeline.loop import train
from preprocess.errors import run_cli
from pipeline_helpers import REPO, make_store, tiny_overrides

EPS = 1e-6


def _xy(angle):
    angle = np.atleast_1d(np.asarray(angle, dtype=float))
    return np.stack([np.cos(angle), np.sin(angle)], 1)


# --------------------------------------------------------------------------- metric math


def test_circular_error_wraps_around():
    assert circular_error(2 * np.pi - 0.1, 0.0) == pytest.approx(0.1)
    assert circular_error(0.1, 2 * np.pi - 0.1) == pytest.approx(0.2)
    assert circular_error(np.pi, 0.0) == pytest.approx(np.pi)
    assert circular_error(-np.pi / 2, 3 * np.pi / 2) == pytest.approx(0.0, abs=1e-12)


def test_angle_accuracy_thresholds():
    assert angle_accuracy(_xy(2 * np.pi - 0.1), np.array([0.0])) == (1.0, 1.0)
    assert angle_accuracy(_xy(np.pi / 8 - EPS), np.array([0.0])) == (1.0, 1.0)
    assert angle_accuracy(_xy(np.pi / 8 + EPS), np.array([0.0])) == (0.0, 1.0)  # wrong for acc, right for delta
    assert angle_accuracy(_xy(-(np.pi / 8 + EPS)), np.array([0.0])) == (0.0, 1.0)
    assert angle_accuracy(_xy(3 * np.pi / 16 + EPS), np.array([0.0])) == (0.0, 0.0)
    # direction 7 (315 deg) predicted at 350 deg: 35 deg off
    assert angle_accuracy(_xy(np.deg2rad(350)), np.array([7 * np.pi / 4])) == (0.0, 0.0)
    assert angle_accuracy(_xy(np.deg2rad(340)), np.array([7 * np.pi / 4])) == (0.0, 1.0)
    acc, delta = angle_accuracy(np.zeros((0, 2)), np.zeros(0))
    assert np.isnan(acc) and np.isnan(delta)


def test_reach_readout_on_separable_and_random_features():
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 8, n)
        feats = np.c_[_xy(y * np.pi / 4) * 3, rng.normal(size=(n, 5))] + rng.normal(scale=0.1, size=(n, 7))
        return feats, y

    (ftr, ytr), (fva, yva), (fte, yte) = split(400), split(100), split(200)
    out = reach_readout(ftr, ytr, fva, yva, fte, yte)
    assert out["reach_acc"] > 0.95 and out["reach_delta_acc"] >= out["reach_acc"]
    assert out["reach_test_bins"] == 200 and out["reach_alpha"] in REACH_ALPHAS
    noise = reach_readout(rng.normal(size=(400, 7)), ytr, rng.normal(size=(100, 7)), yva,
                          rng.normal(size=(200, 7)), yte)
    assert noise["reach_acc"] < 0.3
    # pure: same inputs, same outputs
    assert reach_readout(ftr, ytr, fva, yva, fte, yte) == out


def test_classification_readout():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] * 2 + rng.normal(scale=0.3, size=(300, 3))
    out = classification_readout(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])
    assert out["accuracy"] > 0.9 and out["macro_f1"] > 0.9 and out["C"] in LOGREG_CS
    assert classification_readout(x[:5], np.zeros(5, int), x[5:9], y[5:9], x[9:12], y[9:12]) == {}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    store = make_store(folder, n_trials=40, bins_per_trial=12, n_units=16)
    run, _ = train(build_config(overrides=tiny_overrides(store, folder / "run", steps=20)))
    return run


def _cli(args):
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_evaluate_prints_json_and_exports_embeddings_in_store_order(run_dir, tmp_path):
    out_npz = tmp_path / "emb.npz"
    proc = _cli(["--run", str(run_dir), "--export-embeddings", str(out_npz)])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    results = json.loads(lines[0])
    for key in ("reach_acc", "reach_delta_acc", "reach_val_acc", "reach_alpha", "reach_test_bins",
                "accuracy", "macro_f1", "target_accuracy", "target_macro_f1"):
        assert key in results, key
    assert 0.0 <= results["reach_acc"] <= results["reach_delta_acc"] <= 1.0
    assert (run_dir / "mined_label_agreement.png").is_file()

    npz = np.load(out_npz)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = build_config(ckpt["config"])
    rec = load_recording(cfg.data.path)
    emb = npz["embedding"]
    assert emb.shape == (rec.n_rows, cfg.model.out_dim) and emb.dtype == np.float32
    assert np.array_equal(npz["trial"], rec.trial) and np.array_equal(npz["bin_start_s"], rec.bin_start_s)
    # row i is the frozen encoder (eval mode) on row i's normalised, un-augmented rates
    model = build_model(cfg, rec.n_units)
    model.load_state_dict(ckpt["model"])
    model.eval()
    norm = Normalization.from_state_dict(ckpt["normalization"])
    rows = [0, 7, 100, rec.n_rows - 1]
    with torch.no_grad():
        direct = model.encoder(norm(rec.rates[rows])).numpy()
    assert np.allclose(emb[rows], direct, atol=1e-5)


def test_evaluate_in_process_matches_training_eval(run_dir, monkeypatch):
    import pipeline.kinds

    calls = []
    monkeypatch.setattr(pipeline.kinds, "set_threads", lambda threads, images=False: calls.append((threads, images)))
    results = evaluate_run(run_dir, plots=False)
    # the run's thread policy is applied before the read-outs (BLAS at a thread per core had
    # made a standalone evaluation 3x slower than the same read-outs at the end of training)
    cfg = build_config(load_checkpoint(run_dir / "checkpoint.pt")["config"])
    assert calls == [(cfg.run.threads, False)]
    trained = json.loads((run_dir / "eval.json").read_text())
    assert results["reach_acc"] == trained["reach_acc"] and results["step"] == trained["step"] == 20


def test_evaluate_tsne_plot(run_dir, tmp_path):
    rec = load_recording(build_config(load_checkpoint(run_dir / "checkpoint.pt")["config"]).data.path)
    emb = np.random.default_rng(0).normal(size=(rec.n_rows, 4)).astype(np.float32)
    written = save_plots(tmp_path, emb, rec)
    assert [p.name for p in written] == ["tsne.png", "mined_label_agreement.png"]


@pytest.mark.parametrize("make_args, code, needle", [
    (lambda tmp, run: ["--run", str(tmp / "missing")], 1, "no such run directory"),
    (lambda tmp, run: ["--run", str(tmp)], 1, "no checkpoint"),
    (lambda tmp, run: ["--run", str(run), "--data", str(tmp / "nope.zarr")], 1, "no recording store"),
    (lambda tmp, run: [], 2, "--run"),
])
def test_evaluate_errors_are_one_line(run_dir, tmp_path, capsys, make_args, code, needle):
    rc = run_cli(main, make_args(tmp_path, run_dir), "evaluate")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and needle in err[0]
    assert "Traceback" not in err[0]


def test_evaluate_cli_bad_run_dir_subprocess(tmp_path):
    proc = _cli(["--run", str(tmp_path / "nothing")])
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_evaluate_help():
    proc = _cli(["--help"])
    assert proc.returncode == 0 and "--export-embeddings" in proc.stdout
