"""The selection protocol's read-out (trial-grouped nested CV), the mining options
(pool from the batch, online-space candidates, T_m = identity, the label oracle), the
label classifiers (weighted F1, class weighting, the supervised label baseline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.kinds import build_train_data
from pipeline.readout.probes import classification_readout, reach_cv_readout, trial_folds
from pipeline.supervised import fit_supervised, supervised_task
from pipeline.data.recording import load_recording
from pipeline.loop import train
from pipeline_helpers import make_store, tiny_overrides


def _reach_features(n_trials=40, bins=6, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, 8, n_trials), bins)
    groups = np.repeat(np.arange(n_trials) * 3 + 7, bins)  # any ids, in recording order
    angle = y * np.pi / 4
    feats = np.c_[np.cos(angle), np.sin(angle), rng.normal(size=(len(y), 4))] + rng.normal(scale=noise, size=(len(y), 6))
    return feats, y, groups


def test_trial_folds_are_contiguous_blocks_of_whole_trials():
    groups = np.repeat([5, 3, 9, 1, 4, 8, 2], [2, 3, 1, 2, 2, 1, 3])
    fold = trial_folds(groups, 3)
    per_trial = {g: set(fold[groups == g]) for g in np.unique(groups)}
    assert all(len(f) == 1 for f in per_trial.values())  # a trial is never split
    in_order = [per_trial[g].pop() for g in [5, 3, 9, 1, 4, 8, 2]]  # recording order
    assert in_order == sorted(in_order) and set(in_order) == {0, 1, 2}  # consecutive trials


def test_reach_cv_readout_separable_and_random():
    feats, y, groups = _reach_features()
    res = reach_cv_readout(feats, y, groups, n_folds=5)
    assert res["reach_cv_acc"] > 0.95 and res["reach_cv_bins"] == len(y) and res["reach_cv_folds"] == 5
    rng = np.random.default_rng(1)
    res = reach_cv_readout(rng.normal(size=feats.shape), y, groups, n_folds=5)
    assert res["reach_cv_acc"] < 0.4


def test_reach_cv_readout_never_uses_a_folds_own_labels():
    """Changing the labels of one fold changes nothing of the predictions for that fold: its
    accuracy against the ORIGINAL labels is the same (the fold neither fits nor chooses alpha)."""
    feats, y, groups = _reach_features(noise=1.0)
    fold = trial_folds(groups, 4)
    base = reach_cv_readout(feats, y, groups, n_folds=4)
    y2 = y.copy()
    y2[fold == 2] = (y2[fold == 2] + 3) % 8
    changed = reach_cv_readout(feats, y2, groups, n_folds=4)
    # fold 2's accuracy, scored against its true labels: recompute via the shifted labels
    shifted_acc = changed["reach_cv_fold_acc"][2]
    assert shifted_acc < base["reach_cv_fold_acc"][2]  # now scored against wrong labels
    # ...and the other folds DO change (fold 2 is in their fitting set): the test can fail
    assert changed["reach_cv_fold_acc"] != base["reach_cv_fold_acc"]


def test_classification_readout_reports_weighted_f1_and_can_balance():
    rng = np.random.default_rng(0)
    n = 600
    y = np.where(rng.random(n) < 0.9, 0, 1)  # imbalanced
    x = np.c_[y + rng.normal(scale=0.8, size=n), rng.normal(size=(n, 3))]
    res = classification_readout(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:])
    assert {"weighted_f1", "val_weighted_f1", "balanced"} <= set(res)
    assert 0 < res["weighted_f1"] <= 1 and res["macro_f1"] <= res["weighted_f1"] + 0.2
    only_plain = classification_readout(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:],
                                        class_weights=(None,))
    assert only_plain["balanced"] is False


def test_supervised_label_classifier_on_a_store_without_reach(tmp_path):
    store = make_store(tmp_path, "lab", n_trials=60)
    import zarr
    g = zarr.open_group(store, mode="r+")
    del g["behavior/velocity"]  # no reach task: the main label (target) is classified
    rec = load_recording(store)
    cfg = load_config(None, [f"data.path={store}", "method.name=supervised", "train.epochs=30", "model.hidden_dim=16",
                             "model.num_blocks=2", "model.out_dim=8", "optim.batch_size=64",
                             "optim.lr=0.01", "run.threads=1"])
    rows, label = supervised_task(rec, cfg)
    assert label == "target"
    res = fit_supervised(cfg, rec, rows, label=label)
    assert {"target_weighted_f1", "weighted_f1", "accuracy", "macro_f1", "target_best_epoch"} <= set(res)
    assert res["accuracy"] > 0.3  # 8 classes: chance 0.125


@pytest.mark.parametrize("extra", [{"method.pool": "batch"}, {"method.mining_space": "online"},
                                   {"method.mining_augment": False, "method.mining_view": "separate"},
                                   {"method.oracle": True},
                                   {"method.oracle": True, "method.oracle_error_rate": 1.0}])
def test_mining_options_train(tmp_path, extra):
    store = make_store(tmp_path, "m")
    cfg = load_config(None, tiny_overrides(store, tmp_path / "run", steps=12, **extra))
    run_dir, results = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mined = [r for r in rows if r["mined_valid_ratio"] is not None]
    assert mined and all(r["mined_same_trial_ratio"] == 0.0 for r in mined)
    if extra.get("method.oracle"):  # every pair right; with an error rate of 1, every pair wrong
        expect = 0.0 if extra.get("method.oracle_error_rate") else 1.0
        assert all(r["mined_label_agreement_ratio"] == expect for r in mined)
    assert np.isfinite(results["reach_acc"])


def test_mining_augment_false_leaves_the_pool_unaugmented(tmp_path):
    store = make_store(tmp_path, "p")
    cfg = load_config(None, tiny_overrides(store, tmp_path / "r", **{"method.mining_augment": False,
                                                                      "method.mining_view": "separate"}))
    data = build_train_data(cfg)
    s = data.sessions[0]
    x_pool, meta = next(s.pool)
    clean = s.normalization(s.samples.rates[torch.searchsorted(torch.from_numpy(s.samples.rows), meta["row"])])
    assert torch.allclose(x_pool, clean)
    x1, _, x_m, ameta = next(s.anchors)
    clean_m = s.normalization(s.samples.rates[torch.searchsorted(torch.from_numpy(s.samples.rows), ameta["row"])])
    assert torch.allclose(x_m, clean_m) and not torch.allclose(x1, clean_m)
    data.close()


def test_bad_mining_option_values_are_named():
    with pytest.raises(ConfigError, match="method.pool"):
        load_config(None, ["method.pool=everything"])
    with pytest.raises(ConfigError, match="method.mining_space"):
        load_config(None, ["method.mining_space=latent"])


# --------------------------------------------------------------------------- mining by temporal context


def test_mining_context_averages_within_trial_neighbours_only():
    from pipeline.data.context import MiningContext

    rows = np.array([0, 1, 2, 3, 5, 6])  # row 4 is not a training sample (a gap)
    trial = np.array([0, 0, 0, 1, 1, 1, 1])
    times = np.arange(7) * 0.1
    ctx = MiningContext(rows, trial, times, 0.1, window=1, dim=2)
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # nothing banked yet: the context of a sample is its own unit-norm representation
    assert torch.allclose(ctx.smooth(torch.tensor([1, 3]), y), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    bank = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    ctx.update(torch.from_numpy(rows), bank * 3)
    got = ctx.smooth(torch.tensor([1, 2, 3, 5]), torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]]))
    # row 1: itself + rows 0, 2 (trial 0); row 2: itself + row 1 (row 3 is trial 1);
    # row 3: itself only (row 2 another trial, row 4 no sample); row 5: itself + row 6 (row 4 missing)
    expect = torch.tensor([[3 / 3, 0], [1 / 2, 1 / 2], [1.0, 0], [1 / 2, 1 / 2]])
    assert torch.allclose(got, expect)
    state = ctx.state_dict()
    other = MiningContext(rows, trial, times, 0.1, window=1, dim=2)
    other.load_state_dict(state)
    assert torch.equal(other.bank, ctx.bank) and torch.equal(other.filled, ctx.filled)


def test_mining_context_aligned_concatenates_neighbours_in_time_order():
    """aligned(): own and banked neighbours at offsets -W..W in order, zeros where absent,
    unit norm overall (a diagnostic of benchmarks/mining_diagnosis.py)."""
    from pipeline.data.context import MiningContext

    rows = np.array([0, 1, 2, 3])
    trial = np.array([0, 0, 0, 1])
    ctx = MiningContext(rows, trial, np.arange(4) * 0.1, 0.1, window=1, dim=2)
    ctx.update(torch.from_numpy(rows), torch.tensor([[1.0, 0], [0, 1.0], [2.0, 0], [0, 3.0]]))
    got = ctx.aligned(torch.tensor([0, 1]), torch.tensor([[0.0, 5.0], [1.0, 0.0]]))
    # row 0: no -1 neighbour, own (0, 1), +1 = row 1 (0, 1); row 1: row 0, own, row 2
    expect = torch.tensor([[0, 0, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.float32)
    assert torch.allclose(got, expect / expect.norm(dim=1, keepdim=True))


def test_mining_context_run_resumes_exactly(tmp_path):
    from pipeline.checkpoint import load_checkpoint
    from pipeline_helpers import train_killed_at_fetch

    store = make_store(tmp_path, "c")
    extra = {"method.mining_context_bins": 2}
    full = tmp_path / "full"
    train(load_config(None, tiny_overrides(store, full, steps=16, **extra)))
    cut = tmp_path / "cut"
    cfg = load_config(None, tiny_overrides(store, cut, steps=16, **extra, **{"train.checkpoint_every": 8}))
    train_killed_at_fetch(cfg, fetch=12)
    assert load_checkpoint(cut / "checkpoint.pt")["data"][0]["sessions"][0]["mining_context"]["filled"].any()
    train(cfg)
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["loss_total"], r["mined_label_agreement_ratio"]) for r in read(cut)] == \
        [(r["loss_total"], r["mined_label_agreement_ratio"]) for r in read(full)]


# --------------------------------------------------------------------------- real data: the sleep recording

SLEEP_NPZ = Path(__file__).parents[2] / ".." / "shared" / "data" / "sleep-mouse-ca1-12h" / "mouse-ca1-12h-4s.npz"


@pytest.mark.skipif(not SLEEP_NPZ.exists(), reason="../shared/data/sleep-mouse-ca1-12h is absent")
def test_shipped_sleep_config_trains_with_time_exclusion_and_context(tmp_path):
    from preprocess import bin_spikes

    store = tmp_path / "sleep.zarr"
    assert bin_spikes.main([str(SLEEP_NPZ), "--out", str(store), "--no-progress"]) == 0
    cfg = load_config(str(Path(__file__).parents[2] / "configs" / "sleep_myow.yaml"),
                      [f"data.path={store}", f"run.dir={tmp_path / 'run'}", "train.max_steps=20", "train.log_every=5",
                       "run.threads=1", "run.progress=false", "eval.tsne=false"])
    run_dir, results = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mined = [r for r in rows if r["mined_valid_ratio"] is not None]
    assert mined and all(r["mined_time_gap_seconds"] >= 1800 for r in mined)  # >= 30 min away
    assert {"arousal_weighted_f1", "arousal_macro_f1", "arousal_accuracy", "weighted_f1"} <= set(results)
    assert results["weighted_f1"] > 0.5


def test_mutual_and_context_target_knobs_train_and_are_validated(tmp_path):
    store = make_store(tmp_path, "k")
    base = {"method.mining_context_bins": 2}
    runs = {}
    for name, extra in {"plain": {}, "mutual": {"method.mining_mutual_k": 2},
                        "target": {"method.mining_context_target": True},
                        "confident": {"method.mining_keep_fraction": 0.5},
                        "all_k": {"method.mining_all_k": True}}.items():
        run_dir = tmp_path / name
        train(load_config(None, tiny_overrides(store, run_dir, steps=8, **base, **extra)))
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss_mined"] for r in rows if r["loss_mined"] is not None]
        assert runs[name] and all(math.isfinite(v) for v in runs[name])
        if name == "confident":  # half of the anchors keep their mined view
            assert all(0.4 <= r["mined_valid_ratio"] <= 0.6 for r in rows if r["mined_valid_ratio"] is not None)
    assert all(runs[n] != runs["plain"] for n in ("mutual", "target", "confident", "all_k"))  # each knob changes the step
    with pytest.raises(ConfigError, match="method.mining_keep_fraction"):
        load_config(None, tiny_overrides(store, tmp_path / "y", **{"method.mining_keep_fraction": 0}))
    with pytest.raises(ConfigError, match="method.mining_context_target"):
        load_config(None, tiny_overrides(store, tmp_path / "x", **{"method.mining_context_target": True}))


def test_prospective_recordings_hold_the_non_test_trials_forwards_and_backwards(tmp_path):
    """The prospective protocol's two recordings: the non-test trials only (never a test
    trial), in recording order and in reversed trial order, each trial's bins in order,
    every per-bin array cut alike and the scalars kept."""
    from benchmarks.selection import non_test_recordings

    bins = np.array([3, 2, 4, 3, 2, 3, 4, 2, 3, 3])  # 10 trials
    trial = np.repeat(np.arange(10) + 100, bins)
    within = np.concatenate([np.arange(b) for b in bins])
    n = len(trial)
    src = tmp_path / "rec.npz"
    np.savez(src, counts=np.arange(n * 2).reshape(n, 2), trial=trial, bin_in_trial=within,
             target=trial % 8, bin_size=np.float64(0.1), velocity=np.ones((n, 2)))
    (fwd_name, fwd), (bwd_name, bwd) = non_test_recordings(str(src), [0.7, 0.1, 0.2], str(tmp_path), 0)
    assert (fwd_name, bwd_name) == ("fwd", "bwd")
    with np.load(fwd) as f, np.load(bwd) as b:
        assert list(dict.fromkeys(f["trial"])) == list(range(100, 108))  # the 2 test trials are gone
        assert list(dict.fromkeys(b["trial"])) == list(range(107, 99, -1))
        for z in (f, b):
            assert float(z["bin_size"]) == 0.1 and z["counts"].shape == (bins[:8].sum(), 2)
            for t in range(100, 108):
                rows = z["trial"] == t
                assert list(z["bin_in_trial"][rows]) == list(range(bins[t - 100]))  # bins in order
                np.testing.assert_array_equal(z["counts"][rows], np.arange(n * 2).reshape(n, 2)[trial == t])


def test_selection_merge_pools_earlier_outputs_and_refuses_mismatches(tmp_path, capsys):
    """--merge: runs of several outputs pooled (a run found twice kept once), paired over the
    seeds every candidate ran; a candidate with other settings in another output is refused."""
    from benchmarks.selection import merge

    def run(cand, seed, acc):
        return {"recording": "r", "candidate": cand, "seed": seed, "acc": acc, "delta_acc": acc, "seconds": 1.0,
                "mined_label_agreement_ratio": None}

    a = {"protocol": "prospective", "candidates": {"byol": ["method.name=byol"], "myow": []},
         "runs": [run("byol", 0, 0.60), run("myow", 0, 0.62), run("byol", 1, 0.50), run("myow", 1, 0.55)]}
    b = {"protocol": "prospective", "candidates": {"byol": ["method.name=byol"], "myow": []},
         "runs": [run("byol", 1, 0.50), run("byol", 2, 0.70), run("myow", 2, 0.66), run("byol", 3, 0.1)]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text("noise\n" + json.dumps(a))
    pb.write_text(json.dumps(b))
    merge([str(pa), str(pb)], ["byol", "myow"], "byol")
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1, 2]  # seed 3 has no myow run
    diff = out["summary"]["myow"]["paired_diff"]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.02 + 0.05 - 0.04) / 3)
    b["candidates"]["myow"] = ["method.k=1"]
    pb.write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="other settings"):
        merge([str(pa), str(pb)], ["byol", "myow"], "byol")
