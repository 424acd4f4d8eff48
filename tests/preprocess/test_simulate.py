"""Tests of the simulated center-out reach session (preprocess.simulate)."""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocess.simulate import ReachSession, main, simulate_reach_session, write_nwb, write_phy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_session() -> ReachSession:
    return simulate_reach_session()


@pytest.fixture(scope="module")
def small_session() -> ReachSession:
    return simulate_reach_session(n_units=12, n_trials=24, seed=3)


def _fields(s: ReachSession) -> dict:
    return {k: v for k, v in vars(s).items()}


# --------------------------------------------------------------------------- simulation


def test_same_seed_same_session_other_seed_differs():
    a = simulate_reach_session(n_units=10, n_trials=16, seed=7)
    b = simulate_reach_session(n_units=10, n_trials=16, seed=7)
    c = simulate_reach_session(n_units=10, n_trials=16, seed=8)
    for name, value in _fields(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        else:
            assert value == other, name
    assert not np.array_equal(a.spike_samples, c.spike_samples)


def test_shapes_dtypes_and_order(default_session):
    s = default_session
    n_spikes = s.spike_samples.shape[0]
    assert s.sample_rate_hz == 30000.0
    assert s.spike_samples.dtype == np.uint64 and s.spike_samples.shape == (n_spikes,)
    assert s.spike_units.dtype == np.int32 and s.spike_units.shape == (n_spikes,)
    assert n_spikes > 10000
    assert np.all(np.diff(s.spike_samples.astype(np.int64)) >= 0)
    assert int(s.spike_samples[-1]) < s.duration_s * s.sample_rate_hz
    assert len(s.unit_quality) == 60 and set(s.unit_quality) <= {"good", "mua", "noise"}
    assert s.unit_quality.count("good") == 42 and s.unit_quality.count("noise") == 3
    assert s.spike_units.min() >= 0 and s.spike_units.max() < 60
    assert np.all(np.bincount(s.spike_units, minlength=60) > 0)
    # rates are plausible: every unit fires between 1 and 100 Hz on average
    mean_rate = np.bincount(s.spike_units, minlength=60) / s.duration_s
    assert mean_rate.min() > 1.0 and mean_rate.max() < 100.0
    assert 180.0 <= s.duration_s <= 600.0


def test_trials_sorted_non_overlapping_and_balanced(default_session):
    s = default_session
    n = len(s.trial_start_s)
    assert n == 200
    for arr in (s.trial_start_s, s.trial_stop_s):
        assert arr.dtype == np.float64 and arr.shape == (n,)
    assert np.all(s.trial_stop_s > s.trial_start_s)
    gaps = s.trial_start_s[1:] - s.trial_stop_s[:-1]
    assert gaps.min() >= 0.5 and gaps.max() <= 1.5
    assert s.trial_start_s[0] > 0 and s.trial_stop_s[-1] < s.duration_s
    assert s.trial_target.dtype.kind == "i" and s.trial_target.min() == 0 and s.trial_target.max() == 7
    assert np.all(np.bincount(s.trial_target, minlength=8) == 25)
    assert not np.array_equal(s.trial_target[:8], np.arange(8))  # random order


def test_behaviour_covers_session_and_reaches_the_targets(default_session):
    s = default_session
    m = len(s.behavior_t)
    assert s.behavior_t.dtype == np.float64 and np.all(np.diff(s.behavior_t) > 0)
    assert s.behavior_t[0] <= 0.0 + 1e-12 and s.behavior_t[-1] >= s.duration_s - 0.011
    assert s.position.shape == (m, 2) and s.position.dtype == np.float32
    assert s.velocity.shape == (m, 2) and s.velocity.dtype == np.float32
    speed = np.hypot(s.velocity[:, 0], s.velocity[:, 1])
    assert 25.0 <= speed.max() <= 40.0
    # the hand is at the center when a trial starts and ~8 cm out in the target direction at its end
    at_start = np.searchsorted(s.behavior_t, s.trial_start_s)
    at_stop = np.searchsorted(s.behavior_t, s.trial_stop_s) - 1
    assert np.abs(s.position[at_start]).max() < 0.05
    angle = s.trial_target * np.pi / 4
    expected = 8.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    assert np.linalg.norm(s.position[at_stop] - expected, axis=1).max() < 1.5
    # peak speed of each reach is bell-shaped: reached mid-movement, zero at both ends
    for i in range(0, 200, 37):
        sel = (s.behavior_t >= s.trial_start_s[i]) & (s.behavior_t <= s.trial_stop_s[i])
        v = speed[sel]
        assert v[0] < 0.5 and v[-1] < 0.5 and 20.0 < v.max() < 40.0


def _reach_counts(s: ReachSession) -> np.ndarray:
    """(n_trials, n_units) spike counts between reach onset and offset."""
    t = s.spike_times_s
    out = np.zeros((len(s.trial_start_s), len(s.unit_quality)))
    for i, (a, b) in enumerate(zip(s.reach_start_s, s.reach_stop_s)):
        lo, hi = np.searchsorted(t, [a, b])
        out[i] = np.bincount(s.spike_units[lo:hi], minlength=out.shape[1]) / (b - a)
    return out


def test_rates_during_reaches_depend_on_the_target(default_session):
    s = default_session
    rates = _reach_counts(s)
    y = s.trial_target
    good = np.array([q == "good" for q in s.unit_quality])
    # one-way ANOVA F statistic per unit across the 8 targets
    grand = rates.mean(axis=0)
    groups = [rates[y == k] for k in range(8)]
    between = sum(len(g) * (g.mean(axis=0) - grand) ** 2 for g in groups) / 7
    within = sum(((g - g.mean(axis=0)) ** 2).sum(axis=0) for g in groups) / (len(y) - 8)
    f = between / np.maximum(within, 1e-12)
    assert np.mean(f[good] > 3.0) >= 0.8  # F(7, 192) > 3.0 is p < 0.005
    noise = np.array([q == "noise" for q in s.unit_quality])
    assert np.median(f[noise]) < 3.0


def test_reach_direction_is_linearly_decodable_from_100ms_counts(default_session):
    s = default_session
    t = s.spike_times_s
    X, y, trial = [], [], []
    for i, (a, b) in enumerate(zip(s.reach_start_s, s.reach_stop_s)):
        for w in np.arange(a, b - 0.1 + 1e-9, 0.1):
            lo, hi = np.searchsorted(t, [w, w + 0.1])
            X.append(np.bincount(s.spike_units[lo:hi], minlength=len(s.unit_quality)))
            y.append(s.trial_target[i])
            trial.append(i)
    X, y, trial = np.sqrt(np.array(X, float)), np.array(y), np.array(trial)
    train = trial < 140
    # least-squares linear read-out onto one-hot targets (split by trial order, as in the pipeline)
    A = np.hstack([X, np.ones((len(X), 1))])
    W, *_ = np.linalg.lstsq(A[train], np.eye(8)[y[train]], rcond=None)
    acc = np.mean(np.argmax(A[~train] @ W, axis=1) == y[~train])
    assert acc > 0.3  # chance is 0.125


def test_generation_is_fast():
    import time

    t0 = time.perf_counter()
    simulate_reach_session(seed=11)
    assert time.perf_counter() - t0 < 5.0  # ~0.5 s on one core; generous for loaded CI machines


# --------------------------------------------------------------------------- Phy


def _params(path: Path) -> dict:
    params = {}
    for node in ast.parse(path.read_text()).body:
        assert isinstance(node, ast.Assign), ast.dump(node)
        params[node.targets[0].id] = ast.literal_eval(node.value)
    return params


def test_write_phy_folder(small_session, tmp_path):
    s = small_session
    folder = tmp_path / "out" / "phy"
    assert write_phy(s, folder) == str(folder)
    times = np.load(folder / "spike_times.npy", allow_pickle=False)
    clusters = np.load(folder / "spike_clusters.npy", allow_pickle=False)
    assert times.dtype == np.uint64 and times.shape == (len(s.spike_samples), 1)
    assert clusters.dtype == np.int32 and clusters.shape == (len(s.spike_samples),)
    assert np.array_equal(times[:, 0], s.spike_samples) and np.array_equal(clusters, s.spike_units)
    with open(folder / "cluster_group.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["cluster_id"]) for r in rows] == list(range(12))
    assert [r["group"] for r in rows] == s.unit_quality
    params = _params(folder / "params.py")
    assert params["sample_rate"] == 30000.0 and isinstance(params["sample_rate"], float)
    assert params["dtype"] == "int16" and params["hp_filtered"] is False
    with open(folder / "trials.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["start_s", "stop_s", "target"]
    assert np.array_equal([float(r["start_s"]) for r in rows], s.trial_start_s)
    assert np.array_equal([float(r["stop_s"]) for r in rows], s.trial_stop_s)
    assert np.array_equal([int(r["target"]) for r in rows], s.trial_target)
    assert not [p for p in folder.parent.iterdir() if p.name != "phy"]  # no temporary left over
    # writing again into the existing folder replaces the files
    write_phy(simulate_reach_session(n_units=5, n_trials=8, seed=1), folder)
    assert len(np.load(folder / "spike_clusters.npy")) != len(s.spike_units)
    assert not [p for p in folder.parent.iterdir() if p.name != "phy"]


# --------------------------------------------------------------------------- NWB


def test_write_nwb_reads_back(small_session, tmp_path):
    from pynwb import NWBHDF5IO, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries, Position, SpatialSeries

    s = small_session
    path = tmp_path / "session.nwb"
    assert write_nwb(s, path) == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["session.nwb"]
    with NWBHDF5IO(str(path), mode="r") as io_:
        nwb = io_.read()
        units = nwb.units
        assert len(units) == 12
        assert list(units.id[:]) == list(range(12))
        assert [str(q) for q in units["quality"][:]] == s.unit_quality
        for u in range(12):
            got = np.asarray(units["spike_times"][u])
            want = s.spike_samples[s.spike_units == u].astype(np.float64) / 30000.0
            assert got.dtype == np.float64 and np.array_equal(got, want)
        trials = nwb.trials
        assert len(trials) == 24
        assert np.array_equal(trials["start_time"][:], s.trial_start_s)
        assert np.array_equal(trials["stop_time"][:], s.trial_stop_s)
        target = np.asarray(trials["target"][:])
        assert target.dtype.kind == "i" and np.array_equal(target, s.trial_target)
        module = nwb.processing["behavior"]
        pos_container = module["Position"]
        assert isinstance(pos_container, Position)
        pos = pos_container.spatial_series["position"]
        assert isinstance(pos, SpatialSeries)
        assert np.array_equal(pos.data[:], s.position) and np.array_equal(pos.timestamps[:], s.behavior_t)
        bts = [c for c in module.data_interfaces.values() if isinstance(c, BehavioralTimeSeries)]
        assert len(bts) == 1
        vel = bts[0].time_series["velocity"]
        assert isinstance(vel, TimeSeries) and vel.unit == "cm/s"
        assert np.array_equal(vel.data[:], s.velocity) and np.array_equal(vel.timestamps[:], s.behavior_t)


# --------------------------------------------------------------------------- command line


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main([str(out), "--units", "6", "--trials", "8", "--seed", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "phy"), str(out / "session.nwb")]
    assert (out / "phy" / "spike_times.npy").exists() and (out / "phy" / "trials.tsv").exists()
    before = (out / "phy" / "spike_times.npy").read_bytes()

    assert main([str(out), "--units", "6", "--trials", "8", "--seed", "5"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and "Traceback" not in err
    assert (out / "phy" / "spike_times.npy").read_bytes() == before

    assert main([str(out), "--units", "6", "--trials", "8", "--seed", "5", "--overwrite"]) == 0
    assert (out / "phy" / "spike_times.npy").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["phy", "session.nwb"]  # no temporaries left


def test_cli_single_format_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "only_nwb"
    assert main([str(out), "--units", "4", "--trials", "8", "--format", "nwb"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["session.nwb"]
    # phy is not there yet: writing it is not an overwrite
    assert main([str(out), "--units", "4", "--trials", "8", "--format", "phy"]) == 0
    capsys.readouterr()
    assert main([str(out), "--units", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--units" in err


def test_cli_process_exit_codes_and_help(tmp_path):
    env = dict(os.environ)
    help_ = subprocess.run([sys.executable, "-m", "preprocess.simulate", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0
    for word in ("OUT_DIR", "--seed", "--units", "--trials", "--format", "--overwrite"):
        assert word in help_.stdout
    (tmp_path / "phy").mkdir()
    proc = subprocess.run([sys.executable, "-m", "preprocess.simulate", str(tmp_path), "--format", "phy"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "already exists" in proc.stderr and proc.stdout == ""
