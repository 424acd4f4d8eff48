"""A simulated center-out reach session: spike-sorted units, trials and hand kinematics.

Used by the tests and by the embedded demo (``python -m pipeline.train`` with no
arguments). Everything is generated from one ``numpy.random.default_rng(seed)``, so a
seed gives the same session bit for bit.

Task (per trial): a hold at the center (0.3-0.7 s), a reach of ``reach_distance_cm``
towards target ``k`` (direction ``k * 45`` degrees, the 8 targets in random order) with a
minimum-jerk (bell-shaped) speed profile of peak ~25-35 cm/s, then a hold at the target
(~0.3 s). The trial ends there; in the inter-trial gap (0.7-1.3 s) the hand returns to
the center, also with a bell-shaped profile.

Units: Poisson neurons whose rate (Hz) is

    baseline + gain * (speed / v_ref) * (1 + cos(movement_dir - preferred_dir))
             [+ position_gain * (1 + p . e_pos / (1.25 D)) / 2   for ~30% of the units]

evaluated on the kinematics ``neural_lead_s`` ahead (motor cortex leads movement).
Baselines are lognormal (~2-20 Hz), preferred directions uniform. Qualities: ~70% "good",
~25% "mua" (higher baseline, weaker tuning), ~5% "noise" (untuned). Spikes are drawn from
the rate on a 1 ms grid by time rescaling (an exact inhomogeneous Poisson process for the
piecewise-constant rate, vectorised over time, a loop over units only) and converted to
integer sample indices with ``floor(t * sample_rate)``.

Outputs: a Phy/Kilosort-style folder (plus ``trials.tsv``) with :func:`write_phy`, an NWB
file with :func:`write_nwb`, or both from the command line::

    python -m preprocess.simulate OUT_DIR [--seed N] [--units N] [--trials N]
                                          [--format phy|nwb|both] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field

import numpy as np

from .errors import OneLineParser, UsageError, UserError, run_cli

PROG = "python -m preprocess.simulate"
N_TARGETS = 8
QUALITIES = ("good", "mua", "noise")
# command-line bounds: memory grows with the trials (~0.5 MB per trial on the 1 ms grid) and
# the spikes with units x trials (~30 spikes per unit and trial); at the bounds ~1-2 GB
MAX_SEED = 2**64 - 1
MAX_UNITS = 1000
MAX_TRIALS = 2000
MAX_UNIT_TRIALS = 500_000


@dataclass
class ReachSession:
    """A simulated session, in memory.

    Spikes of all units are merged and sorted by sample (ties by unit id); cluster ids are
    ``0 .. n_units-1`` and index ``unit_quality``. Trials span from the start of the center
    hold to the end of the target hold; ``reach_start_s``/``reach_stop_s`` bound the
    outgoing movement of each trial (inside the trial).
    """

    sample_rate_hz: float
    duration_s: float
    spike_samples: np.ndarray  # (S,) uint64, sorted
    spike_units: np.ndarray  # (S,) int32 cluster id per spike
    unit_quality: list[str]  # per cluster id: "good" / "mua" / "noise"
    trial_start_s: np.ndarray  # (n_trials,) float64
    trial_stop_s: np.ndarray  # (n_trials,) float64
    trial_target: np.ndarray  # (n_trials,) int64 0..7, direction = target * 45 degrees
    behavior_t: np.ndarray  # (M,) float64 s
    position: np.ndarray  # (M, 2) float32 cm
    velocity: np.ndarray  # (M, 2) float32 cm/s
    # ground truth, for tests and diagnostics
    reach_start_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reach_stop_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    preferred_dir_rad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    baseline_hz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gain_hz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seed: int | None = None

    @property
    def n_units(self) -> int:
        return len(self.unit_quality)

    @property
    def n_trials(self) -> int:
        return len(self.trial_start_s)

    @property
    def spike_times_s(self) -> np.ndarray:
        """Spike times in seconds, exactly ``samples / sample_rate_hz`` in float64."""
        return self.spike_samples.astype(np.float64) / self.sample_rate_hz

    def unit_spike_samples(self, unit: int) -> np.ndarray:
        return self.spike_samples[self.spike_units == unit]


# --------------------------------------------------------------------------- kinematics


def _min_jerk(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-jerk position fraction s(tau) and its derivative ds/dtau, tau clipped to [0, 1]."""
    tau = np.clip(tau, 0.0, 1.0)
    t2 = tau * tau
    s = t2 * tau * (10.0 - 15.0 * tau + 6.0 * t2)
    ds = 30.0 * t2 * (1.0 - 2.0 * tau + t2)
    return s, ds


def _kinematics(t: np.ndarray, mv_start: np.ndarray, mv_dur: np.ndarray, mv_from: np.ndarray,
                mv_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hand position (cm) and velocity (cm/s) at times ``t`` for sorted, non-overlapping
    minimum-jerk movements; the hand rests at the center before the first movement and
    at the end point of the last movement between movements."""
    seg = np.searchsorted(mv_start, t, side="right") - 1
    before = seg < 0
    seg = np.maximum(seg, 0)
    tau = (t - mv_start[seg]) / mv_dur[seg]
    s, ds = _min_jerk(tau)
    delta = mv_to[seg] - mv_from[seg]
    pos = mv_from[seg] + delta * s[:, None]
    vel = delta * (ds / mv_dur[seg])[:, None]
    pos[before] = 0.0
    vel[before] = 0.0
    return pos, vel


# --------------------------------------------------------------------------- simulation


def simulate_reach_session(
    n_units: int = 60,
    n_trials: int = 200,
    seed: int = 0,
    sample_rate_hz: float = 30000.0,
    *,
    reach_distance_cm: float = 8.0,
    behavior_rate_hz: float = 100.0,
    grid_s: float = 0.001,
    neural_lead_s: float = 0.1,
    quality_fractions: tuple[float, float, float] = (0.70, 0.25, 0.05),
    position_tuned_fraction: float = 0.3,
    lead_in_s: float = 1.0,
) -> ReachSession:
    """Simulate a center-out reach session (see the module docstring for the model).

    Defaults: 60 units, 200 trials: ~7.8 minutes of recording (~2.3 s per trial with its
    gap; ``n_trials=120`` gives ~4.7 min), ~0.4 M spikes, about half a second to generate.
    Movement times are 0.45-0.6 s, so that the minimum-jerk peak speed (1.875 * D / T) is
    25-33 cm/s for an 8 cm reach.
    """
    if n_units < 1 or n_trials < 1:
        raise ValueError("n_units and n_trials must be >= 1")
    if sample_rate_hz <= 0 or behavior_rate_hz <= 0 or grid_s <= 0:
        raise ValueError("sample_rate_hz, behavior_rate_hz and grid_s must be positive")
    rng = np.random.default_rng(seed)
    D = float(reach_distance_cm)

    # ---- trial structure: 8 targets in random order (balanced blocks of 8)
    blocks = [rng.permutation(N_TARGETS) for _ in range(-(-n_trials // N_TARGETS))]
    target = np.concatenate(blocks)[:n_trials].astype(np.int64)
    hold = rng.uniform(0.3, 0.7, n_trials)  # center hold
    reach = rng.uniform(0.45, 0.60, n_trials)  # movement time: min-jerk peak speed 1.875 * D / T = 25-33 cm/s
    target_hold = rng.uniform(0.25, 0.35, n_trials)
    gap = rng.uniform(0.7, 1.3, n_trials)  # inter-trial interval (after each trial)
    ret_delay = rng.uniform(0.05, 0.15, n_trials)
    ret_dur = rng.uniform(0.45, 0.55, n_trials)  # return ends >= 0.0 s before the next trial
    trial_len = hold + reach + target_hold
    # start times from a cumulative sum of durations (deterministic, non-overlapping)
    starts = lead_in_s + np.concatenate([[0.0], np.cumsum(trial_len + gap)[:-1]])
    stops = starts + trial_len
    duration_s = float(stops[-1] + gap[-1])

    angle = target * (np.pi / 4)
    endpoint = D * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    endpoint += rng.normal(0.0, 0.25, endpoint.shape)  # endpoint scatter (cm)
    reach_on = starts + hold
    reach_off = reach_on + reach
    ret_on = stops + ret_delay

    # movements in time order: reach_0, return_0, reach_1, return_1, ...
    mv_start = np.stack([reach_on, ret_on], axis=1).reshape(-1)
    mv_dur = np.stack([reach, ret_dur], axis=1).reshape(-1)
    zeros = np.zeros_like(endpoint)
    mv_from = np.stack([zeros, endpoint], axis=1).reshape(-1, 2)
    mv_to = np.stack([endpoint, zeros], axis=1).reshape(-1, 2)

    # ---- behaviour at behavior_rate_hz over the whole session
    n_beh = int(np.floor(duration_s * behavior_rate_hz)) + 1
    behavior_t = np.arange(n_beh, dtype=np.float64) / behavior_rate_hz
    pos_b, vel_b = _kinematics(behavior_t, mv_start, mv_dur, mv_from, mv_to)

    # ---- kinematics on the fine grid (cell centres), neural_lead_s ahead
    n_grid = int(np.ceil(duration_s / grid_s))
    t_grid = (np.arange(n_grid, dtype=np.float64) + 0.5) * grid_s
    pos_g, vel_g = _kinematics(t_grid + neural_lead_s, mv_start, mv_dur, mv_from, mv_to)
    speed_g = np.hypot(vel_g[:, 0], vel_g[:, 1])
    v_ref = 1.875 * D / float(np.mean(reach))  # typical peak speed -> speed factor ~1 at peak

    # ---- units
    n_good = int(round(quality_fractions[0] * n_units))
    n_noise = int(round(quality_fractions[2] * n_units))
    n_good = min(n_good, n_units)
    n_noise = min(n_noise, n_units - n_good)
    qual_idx = np.array([0] * n_good + [1] * (n_units - n_good - n_noise) + [2] * n_noise)
    qual_idx = rng.permutation(qual_idx)
    unit_quality = [QUALITIES[q] for q in qual_idx]

    baseline = np.clip(rng.lognormal(np.log(6.5), 0.55, n_units), 1.5, 25.0)
    gain = rng.uniform(8.0, 24.0, n_units)
    pref = rng.uniform(0.0, 2 * np.pi, n_units)
    pos_tuned = rng.random(n_units) < position_tuned_fraction
    pos_gain = np.where(pos_tuned, rng.uniform(3.0, 10.0, n_units), 0.0)
    pos_dir = rng.uniform(0.0, 2 * np.pi, n_units)
    mua = qual_idx == 1
    noise = qual_idx == 2
    baseline[mua] *= 2.5  # several neurons merged
    gain[mua] *= 0.5
    gain[noise] = 0.0
    pos_gain[noise] = 0.0

    # ---- rates: linear in the features [1, speed, vx, vy, px, py], rate = W @ features;
    # speed * (1 + cos(theta - pref)) = speed + v . e_pref (>= 0, no angle needed);
    # position term pos_gain * (1 + p . e_pos / (1.25 D)) / 2 >= 0 (|p| stays below 1.25 D)
    W = np.zeros((n_units, 6))
    W[:, 0] = baseline + 0.5 * pos_gain
    W[:, 1] = gain / v_ref
    W[:, 2] = gain / v_ref * np.cos(pref)
    W[:, 3] = gain / v_ref * np.sin(pref)
    W[:, 4] = 0.5 * pos_gain / (1.25 * D) * np.cos(pos_dir)
    W[:, 5] = 0.5 * pos_gain / (1.25 * D) * np.sin(pos_dir)
    features = np.empty((6, n_grid))
    features[0] = 1.0
    features[1] = speed_g
    features[2:4] = vel_g.T
    features[4:6] = pos_g.T
    del pos_g, vel_g, speed_g

    # ---- spikes, by time rescaling: a unit-rate Poisson process on [0, Lambda(T)] mapped back
    # through the cumulative intensity Lambda (exact for the piecewise-constant rate on the grid);
    # vectorised over time, a few units at a time
    all_t, all_u = [], []
    chunk = 8
    for u0 in range(0, n_units, chunk):
        rates = W[u0:u0 + chunk] @ features  # (units, n_grid) Hz
        np.maximum(rates, 0.0, out=rates)
        cum = np.zeros((rates.shape[0], n_grid + 1))
        np.cumsum(rates, axis=1, out=cum[:, 1:])
        cum *= grid_s
        for j in range(rates.shape[0]):
            c = cum[j]
            lam = np.sort(rng.random(rng.poisson(c[-1])) * c[-1])
            cell = np.clip(np.searchsorted(c, lam, side="right") - 1, 0, n_grid - 1)
            frac = np.clip((lam - c[cell]) / np.maximum(c[cell + 1] - c[cell], 1e-300), 0.0, 1.0)
            all_t.append((cell + frac) * grid_s)
            all_u.append(np.full(lam.size, u0 + j, dtype=np.int32))
    t_all = np.concatenate(all_t) if all_t else np.zeros(0)
    u_all = np.concatenate(all_u) if all_u else np.zeros(0, dtype=np.int32)
    samples = np.floor(t_all * sample_rate_hz).astype(np.uint64)
    n_samples = int(np.floor(duration_s * sample_rate_hz))
    keep = samples < n_samples
    samples, u_all = samples[keep], u_all[keep]
    order = np.argsort(samples, kind="stable")  # units are concatenated in id order -> ties by unit id
    samples, u_all = samples[order], u_all[order]

    return ReachSession(
        sample_rate_hz=float(sample_rate_hz),
        duration_s=duration_s,
        spike_samples=np.ascontiguousarray(samples, dtype=np.uint64),
        spike_units=np.ascontiguousarray(u_all, dtype=np.int32),
        unit_quality=unit_quality,
        trial_start_s=starts.astype(np.float64),
        trial_stop_s=stops.astype(np.float64),
        trial_target=target,
        behavior_t=behavior_t,
        position=pos_b.astype(np.float32),
        velocity=vel_b.astype(np.float32),
        reach_start_s=reach_on,
        reach_stop_s=reach_off,
        preferred_dir_rad=pref,
        baseline_hz=baseline,
        gain_hz=gain,
        seed=seed,
    )


# --------------------------------------------------------------------------- writers


def _tmp_name(path: str, kind: str = "tmp") -> str:
    """A hidden sibling of ``path`` for writing before publishing (created with the umask's
    permissions, unlike ``tempfile``'s private 0700/0600)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _replace_into(tmp_dir: str, folder: str) -> None:
    """Publish the files of ``tmp_dir`` as ``folder``: a rename when ``folder`` is new,
    otherwise file by file (each an atomic replace)."""
    if not os.path.exists(folder):
        os.rename(tmp_dir, folder)
        return
    for name in sorted(os.listdir(tmp_dir)):
        os.replace(os.path.join(tmp_dir, name), os.path.join(folder, name))
    os.rmdir(tmp_dir)


def write_phy(session: ReachSession, folder: str | os.PathLike) -> str:
    """Write a Phy/Kilosort-style folder: ``spike_times.npy`` ((S, 1) uint64 samples),
    ``spike_clusters.npy`` ((S,) int32), ``cluster_group.tsv`` (cluster_id, group),
    ``params.py`` (plain literals) and ``trials.tsv`` (start_s, stop_s, target).

    The folder is created if missing (written beside it, then renamed into place);
    existing files of the same names in it are replaced. Returns the folder.
    """
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(folder)
    os.mkdir(tmp)
    try:
        np.save(os.path.join(tmp, "spike_times.npy"),
                np.ascontiguousarray(session.spike_samples, dtype=np.uint64).reshape(-1, 1))
        np.save(os.path.join(tmp, "spike_clusters.npy"), np.ascontiguousarray(session.spike_units, dtype=np.int32))
        with open(os.path.join(tmp, "cluster_group.tsv"), "w", newline="") as f:
            f.write("cluster_id\tgroup\n")
            for cid, q in enumerate(session.unit_quality):
                f.write(f"{cid}\t{q}\n")
        with open(os.path.join(tmp, "params.py"), "w") as f:
            f.write(f"dat_path = 'recording.dat'\n"
                    f"n_channels_dat = {max(32, len(session.unit_quality))!r}\n"
                    f"dtype = 'int16'\n"
                    f"offset = 0\n"
                    f"sample_rate = {float(session.sample_rate_hz)!r}\n"
                    f"hp_filtered = False\n")
        with open(os.path.join(tmp, "trials.tsv"), "w", newline="") as f:
            f.write("start_s\tstop_s\ttarget\n")
            for a, b, k in zip(session.trial_start_s, session.trial_stop_s, session.trial_target):
                f.write(f"{float(a)!r}\t{float(b)!r}\t{int(k)}\n")
        _replace_into(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build_nwbfile(session: ReachSession):
    """The session as an in-memory ``pynwb.NWBFile``."""
    from hdmf.common import ElementIdentifiers, VectorData, VectorIndex
    from pynwb import NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries, Position, SpatialSeries
    from pynwb.epoch import TimeIntervals
    from pynwb.misc import Units

    seed = session.seed
    nwb = NWBFile(
        session_description="simulated center-out reach session (8 targets, cosine-tuned Poisson units)",
        identifier=f"myow-simulated-reach-seed{seed}-{session.n_units}u-{session.n_trials}t",
        session_start_time=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        experiment_description="generated by preprocess.simulate",
        source_script="preprocess.simulate",
        source_script_file_name="simulate.py",
    )
    # whole columns as arrays (add_unit/add_trial row by row would make hdmf convert every
    # spike time separately when writing)
    rate = float(session.sample_rate_hz)
    order = np.argsort(session.spike_units, kind="stable")  # per unit, still sorted by time
    bounds = np.searchsorted(session.spike_units[order], np.arange(session.n_units + 1))
    times_s = session.spike_samples[order].astype(np.float64) / rate
    spike_times = VectorData(name="spike_times", description="spike times in seconds (= sample / sample_rate)",
                             data=times_s)
    nwb.units = Units(
        name="units", description="simulated sorted units (cluster ids as ids)",
        resolution=1.0 / rate,  # spike times are whole samples: bins shorter than one are refused
        id=ElementIdentifiers(name="id", data=np.arange(session.n_units, dtype=np.int64)),
        columns=[spike_times,
                 VectorIndex(name="spike_times_index", data=bounds[1:].astype(np.int64), target=spike_times),
                 VectorData(name="quality", description="sorting quality: good / mua / noise",
                            data=[str(q) for q in session.unit_quality])])

    n_trials = session.n_trials
    nwb.trials = TimeIntervals(
        name="trials", description="reach trials: center hold, reach, target hold",
        id=ElementIdentifiers(name="id", data=np.arange(n_trials, dtype=np.int64)),
        columns=[VectorData(name="start_time", description="start of the center hold (s)",
                            data=np.asarray(session.trial_start_s, dtype=np.float64)),
                 VectorData(name="stop_time", description="end of the target hold (s)",
                            data=np.asarray(session.trial_stop_s, dtype=np.float64)),
                 VectorData(name="target", description="reach target 0..7; direction = target * 45 degrees",
                            data=np.asarray(session.trial_target, dtype=np.int64))])

    module = nwb.create_processing_module(name="behavior", description="hand kinematics")
    position = Position(name="Position")
    position.add_spatial_series(SpatialSeries(
        name="position", description="hand position relative to the center target",
        data=np.asarray(session.position, dtype=np.float32), timestamps=np.asarray(session.behavior_t, np.float64),
        reference_frame="origin at the center target; +x right, +y up", unit="cm"))
    module.add(position)
    bts = BehavioralTimeSeries(name="BehavioralTimeSeries")
    bts.add_timeseries(TimeSeries(
        name="velocity", description="hand velocity (x, y)", unit="cm/s",
        data=np.asarray(session.velocity, dtype=np.float32), timestamps=np.asarray(session.behavior_t, np.float64)))
    module.add(bts)
    return nwb


def write_nwb(session: ReachSession, path: str | os.PathLike) -> str:
    """Write the session as an NWB (HDF5) file: units table (spike times in seconds =
    samples / rate, text column ``quality``), trials table (``target`` column) and a
    ``behavior`` processing module (Position/"position", BehavioralTimeSeries/"velocity").
    Written beside ``path`` and renamed into place. Returns the path."""
    from pynwb import NWBHDF5IO

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    nwb = build_nwbfile(session)
    tmp = _tmp_name(path) + ".nwb"
    try:
        with NWBHDF5IO(tmp, mode="w") as io_:
            io_.write(nwb)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate a center-out reach session -- 8 targets in random order, minimum-jerk reaches of\n"
                    "8 cm, cosine-tuned Poisson units (70% good, 25% mua, 5% noise) at 30 kHz -- and write it\n"
                    "as a Phy folder (OUT_DIR/phy/, with trials.tsv) and/or an NWB file (OUT_DIR/session.nwb).\n"
                    "The same --seed gives the same files. Existing outputs are kept unless --overwrite.",
        epilog="Bin the output with:\n"
               "  python -m preprocess.bin_spikes OUT_DIR/phy --trials OUT_DIR/phy/trials.tsv --out STORE\n"
               "  python -m preprocess.bin_spikes OUT_DIR/session.nwb --out STORE\n"
               f"Bounds: --units 1..{MAX_UNITS}, --trials 1..{MAX_TRIALS}, units x trials <= {MAX_UNIT_TRIALS} "
               "(a few GB of memory at most). Nothing is written unless the whole session is: OUT_DIR is "
               "created only then, and no empty or partial OUT_DIR is left behind.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, 0 to 2**64-1; the same seed gives the same session (default 0)")
    p.add_argument("--units", type=int, default=60,
                   help=f"number of sorted units/clusters, 1 to {MAX_UNITS} (default 60)")
    p.add_argument("--trials", type=int, default=200,
                   help=f"number of reach trials, ~2.3 s each, 1 to {MAX_TRIALS} (default 200: ~8 min)")
    p.add_argument("--format", choices=("phy", "nwb", "both"), default="both",
                   help="what to write: phy -> OUT_DIR/phy/, nwb -> OUT_DIR/session.nwb, both (default)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in OUT_DIR")
    return p


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def _check_range(option: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UsageError(f"{option} {value}: must be between {low} and {high}")


def _first_missing(path: str) -> str | None:
    """The outermost folder that ``os.makedirs(path)`` would create, or None if ``path`` exists."""
    path, top = os.path.abspath(path), None
    while not os.path.lexists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check_range("--seed", args.seed, 0, MAX_SEED)
    _check_range("--units", args.units, 1, MAX_UNITS)
    _check_range("--trials", args.trials, 1, MAX_TRIALS)
    if args.units * args.trials > MAX_UNIT_TRIALS:
        raise UsageError(f"--units {args.units} x --trials {args.trials} = {args.units * args.trials}: must be at "
                         f"most {MAX_UNIT_TRIALS}; simulate fewer units or trials")
    out = args.out_dir
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a folder; choose another OUT_DIR")
    phy_dir = os.path.join(out, "phy")
    nwb_path = os.path.join(out, "session.nwb")
    targets = ([phy_dir] if args.format in ("phy", "both") else []) + \
              ([nwb_path] if args.format in ("nwb", "both") else [])
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]}: already exists; pass --overwrite to replace it or choose another OUT_DIR")
    try:  # in memory first: a failure here leaves no trace on disk
        session = simulate_reach_session(n_units=args.units, n_trials=args.trials, seed=args.seed)
    except MemoryError:
        raise UserError(f"--units {args.units} --trials {args.trials}: not enough memory to simulate the session; "
                        "simulate fewer units or trials") from None
    created = _first_missing(out)  # removed again if anything below fails
    staged: dict[str, str] = {}  # target -> complete temporary copy next to it
    moved: dict[str, str] = {}  # target -> where its old version (--overwrite) was moved aside
    published = False
    try:
        os.makedirs(out, exist_ok=True)
        if phy_dir in targets:
            staged[phy_dir] = write_phy(session, _tmp_name(phy_dir))
        if nwb_path in targets:
            staged[nwb_path] = write_nwb(session, _tmp_name(nwb_path) + ".nwb")
        # everything is written: publish (renames), then drop what --overwrite replaced
        for target, tmp in staged.items():
            file_over_file = os.path.isfile(tmp) and not (os.path.isdir(target) and not os.path.islink(target))
            if os.path.lexists(target) and not file_over_file:  # os.replace cannot replace it atomically
                moved[target] = _tmp_name(target, "old")
                os.rename(target, moved[target])
            os.replace(tmp, target)
        published = True
        for path in moved.values():
            _remove(path)
    except OSError as err:
        raise UserError(f"{out}: cannot write ({err.strerror or err}); check the folder's permissions and free space")
    except MemoryError:
        raise UserError(f"{out}: not enough memory to write the session; simulate fewer units or trials") from None
    finally:
        if not published:
            with contextlib.suppress(OSError):  # cleaning up must not hide the error being raised
                for tmp in staged.values():
                    if os.path.lexists(tmp):
                        _remove(tmp)
                for target, old in moved.items():  # put back what was moved aside
                    if os.path.lexists(old) and not os.path.lexists(target):
                        os.rename(old, target)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
    for target in targets:
        print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (errors are one line on stderr)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
