"""Real data (Chewie-1 of the paper), skipped when ../shared/data is absent."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import build_config
from pipeline.data.recording import hand_speed
from pipeline.kinds import build_train_data
from pipeline.readout.neural import evaluate_embedding
from preprocess import bin_spikes
from pipeline_helpers import CHEWIE_NPZ


@pytest.fixture(scope="module")
def chewie_store(tmp_path_factory) -> str:
    if not CHEWIE_NPZ.exists():
        pytest.skip(f"real data not available: {CHEWIE_NPZ} is absent")
    out = tmp_path_factory.mktemp("chewie") / "chewie.zarr"
    assert bin_spikes.main([str(CHEWIE_NPZ), "--out", str(out), "--no-progress"]) == 0
    return str(out)


def test_chewie_splits_and_training_samples(chewie_store):
    cfg = build_config(overrides=[f"data.path={chewie_store}", "data.min_speed=5"])
    data = build_train_data(cfg)
    rec = data.sessions[0].recording
    assert rec.n_rows == 1640 and rec.n_units == 174
    trials = [len(np.unique(rec.trial[data.sessions[0].splits[s]])) for s in ("train", "val", "test")]
    assert trials == [111, 16, 32]  # 70/10/20 of 159 trials, in recording order
    moving = hand_speed(rec) > 5
    assert [int(moving[data.sessions[0].splits[s]].sum()) for s in ("train", "val", "test")] == [650, 84, 161]
    assert len(data.sessions[0].samples) == 650 and data.steps_per_epoch == 1  # B = 512: one step per epoch


def test_chewie_raw_rates_readout(chewie_store):
    data = build_train_data(build_config(overrides=[f"data.path={chewie_store}"]))
    res = evaluate_embedding(data.sessions[0].recording.rates.numpy(), data.sessions[0].recording, tasks=["reach"])
    assert res["reach_test_bins"] == 161 and res["reach_val_bins"] == 84
    assert 0.5 < res["reach_acc"] < 0.7  # raw-rate baseline (data README: ~0.57)
