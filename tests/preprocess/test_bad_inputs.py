"""Bad inputs to the preprocessing commands fail cleanly: exactly one line on stderr naming the
file or option, exit code 2 (usage) or 1 (data), no traceback, no output, existing outputs
untouched. Every input is tiny; each case is refused before anything large is allocated."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_phy
from preprocess import bin_spikes, shard_images, simulate
from preprocess.errors import run_cli
from preprocess.sources import DEFAULT_MAX_BINS, MAX_UNITS
from preprocess.store import unit_quality


def assert_one_line(capsys, prog: str, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"{prog}: error: "), err
    assert needle in err, err
    assert "Traceback" not in err
    return err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A small Phy folder and a small NWB file, shared by the cases (which copy what they change)."""
    base = tmp_path_factory.mktemp("sources")
    make_phy(base / "phy", n_units=6, duration_s=5.0)
    session = simulate.simulate_reach_session(n_units=4, n_trials=8, seed=1)
    simulate.write_nwb(session, base / "session.nwb")
    return base


# --------------------------------------------------------------------------- bin_spikes inputs


def _copy_phy(src: Path, p: Path) -> Path:
    return Path(shutil.copytree(src / "phy", p / "phy"))


def _params(src: Path, p: Path, text: str) -> Path:
    folder = _copy_phy(src, p)
    (folder / "params.py").write_text(f"sample_rate = {text}\n")
    return folder


def _file(p: Path, name: str, data: bytes) -> Path:
    (p / name).write_bytes(data)
    return p / name


def _truncated_nwb(src: Path, p: Path) -> Path:
    return _file(p, "t.nwb", (src / "session.nwb").read_bytes()[:1000])


def _npz_as_nwb(src: Path, p: Path) -> Path:
    np.savez(p / "x.npz", counts=np.zeros((3, 2), np.uint16), bin_size=0.1)
    return Path(shutil.copy(p / "x.npz", p / "x.nwb"))


def _hdf5_not_nwb(src: Path, p: Path) -> Path:
    import h5py

    with h5py.File(p / "h.nwb", "w") as f:
        f["data"] = np.arange(5)
    return p / "h.nwb"


def _nwb_float_label(src: Path, p: Path) -> Path:
    from pynwb import NWBHDF5IO

    session = simulate.simulate_reach_session(n_units=3, n_trials=4, seed=2)
    nwb = simulate.build_nwbfile(session)
    nwb.trials.add_column(name="reward", description="a float label column", data=np.array([1.0, 2.0, 1e30, 3.0]))
    with NWBHDF5IO(str(p / "l.nwb"), mode="w") as io_:
        io_.write(nwb)
    return p / "l.nwb"


def _nwb_without_resolution(src: Path, p: Path) -> Path:
    """An NWB file whose units table does not give its spike-time resolution (most files)."""
    from pynwb import NWBHDF5IO

    nwb = simulate.build_nwbfile(simulate.simulate_reach_session(n_units=3, n_trials=4, seed=2))
    nwb.units.fields.pop("resolution", None)
    with NWBHDF5IO(str(p / "nores.nwb"), mode="w") as io_:
        io_.write(nwb)
    return p / "nores.nwb"


def _times(src: Path, p: Path, edit) -> Path:
    folder = _copy_phy(src, p)
    times = np.load(folder / "spike_times.npy")
    np.save(folder / "spike_times.npy", edit(times))
    return folder


def _empty_times(src: Path, p: Path) -> Path:
    folder = _copy_phy(src, p)
    (folder / "spike_times.npy").write_bytes(b"")
    return folder


def _empty_arrays(src: Path, p: Path) -> Path:
    folder = _copy_phy(src, p)
    np.save(folder / "spike_times.npy", np.zeros((0, 1), np.uint64))
    np.save(folder / "spike_clusters.npy", np.zeros(0, np.int32))
    return folder


def _last_spike(value: int):
    def edit(times):
        times = times.copy()
        times[-1] = value
        return times
    return edit


def _many_clusters(src: Path, p: Path) -> Path:
    folder = p / "many"
    folder.mkdir()
    n = MAX_UNITS + 10
    np.save(folder / "spike_times.npy", (np.arange(n, dtype=np.uint64) * 3)[:, None])
    np.save(folder / "spike_clusters.npy", np.arange(n, dtype=np.int32))
    (folder / "params.py").write_text("sample_rate = 30000.0\n")
    return folder


def _trials_tsv(p: Path, rows: str) -> Path:
    return _file(p, "trials.tsv", ("start_s\tstop_s\ttarget\n1\t2\t0\n" + rows).encode())


def _npz(p: Path, **arrays) -> Path:
    np.savez(p / "b.npz", **arrays)
    return p / "b.npz"


def _big_counts(dtype, value) -> np.ndarray:
    counts = np.zeros((5, 2), dtype)
    counts[2, 1] = value
    return counts


C = np.zeros((5, 2), np.uint16)
PHY = lambda s, p: _copy_phy(s, p)  # noqa: E731
NWB = lambda s, p: s / "session.nwb"  # noqa: E731

# name -> (source builder (src, tmp) -> path, extra args, exit code, needle)
BIN_CASES = {
    # 1. unreadable .nwb files
    "nwb truncated": (_truncated_nwb, [], 1, "t.nwb: not a readable NWB file"),
    "nwb random bytes": (lambda s, p: _file(p, "r.nwb", np.random.default_rng(0).bytes(4096)), [], 1,
                         "r.nwb: not a readable NWB file"),
    "nwb empty file": (lambda s, p: _file(p, "e.nwb", b""), [], 1, "e.nwb: not a readable NWB file"),
    "nwb is an npz": (_npz_as_nwb, [], 1, "x.nwb: not a readable NWB file"),
    "nwb is hdf5 but not nwb": (_hdf5_not_nwb, [], 1, "h.nwb"),
    # 2. bounds on the output's size, checked before allocating
    "bin size 1e-12 phy": (PHY, ["--bin-size", "1e-12"], 1, "--bin-size 1e-12: shorter than one sample period"),
    "bin size below a sample": (PHY, ["--bin-size", "1e-7"], 1, "shorter than one sample period"),
    "bin size 1e-12 nwb": (_nwb_without_resolution, ["--bin-size", "1e-12", "--units", "all"], 1, "--max-bins"),
    "bin size below the nwb resolution": (NWB, ["--bin-size", "1e-7", "--units", "all"], 1,
                                          "--bin-size 1e-07: shorter than the spike-time resolution"),
    "nwb behaviour beyond memory": (_nwb_without_resolution, ["--bin-size", "1e-7", "--units", "all"], 1,
                                    "GiB of memory, more than 1 GiB; use a larger --bin-size or select fewer "
                                    "series with --behavior NAME"),
    "bin size 1e-400": (PHY, ["--bin-size", "1e-400"], 2, "--bin-size 1e-400: out of range"),
    "bin size 1e999999999": (PHY, ["--bin-size", "1e999999999"], 2, "--bin-size 1e999999999: out of range"),
    "bin size with 40 digits": (PHY, ["--bin-size", "0.0100000000000000000000000000000000001"], 2, "--bin-size"),
    "trials stop 1e9": (PHY, ["--trials", "{tmp}/trials.tsv"], 1, "trials.tsv: the last trial ends at 1e+09 s"),
    "trials stop 1e300": (PHY, ["--trials", "{tmp}/trials.tsv"], 1, "trials.tsv: the last trial ends at 1e+300 s"),
    "spike at sample 2**62": (lambda s, p: _times(s, p, _last_spike(2**62)), ["--units", "all"], 1,
                              "spike_times.npy: last spike at sample 4611686018427387904"),
    "spike at sample 2**64-1": (lambda s, p: _times(s, p, _last_spike(2**64 - 1)), ["--units", "all"], 1,
                                "spike_times.npy: last spike"),
    "spike beyond --max-bins": (lambda s, p: _times(s, p, _last_spike(2**45)), ["--units", "all"], 1,
                                "spike_times.npy: the last spike"),
    "max bins exceeded": (PHY, ["--max-bins", "10"], 1, "more than --max-bins 10"),
    "max bins zero": (PHY, ["--max-bins", "0"], 2, "--max-bins 0: must be between"),
    "max bins text": (PHY, ["--max-bins", "lots"], 2, "--max-bins 'lots'"),
    "npz rows beyond --max-bins": (lambda s, p: _npz(p, counts=C, bin_size=0.1), ["--max-bins", "3"], 1,
                                   "'counts' has 5 rows"),
    "too many distinct clusters": (_many_clusters, ["--units", "all"], 1, f"more than {MAX_UNITS} distinct cluster"),
    # 3. other tracebacks
    "empty spike_times.npy file": (_empty_times, ["--units", "all"], 1, "spike_times.npy: not a readable .npy"),
    "no spikes": (_empty_arrays, ["--units", "all"], 1, "spike_times.npy: no spikes"),
    "params sample_rate True": (lambda s, p: _params(s, p, "True"), [], 1, "params.py: no positive 'sample_rate"),
    "params sample_rate 1e999": (lambda s, p: _params(s, p, "1e999"), [], 1, "params.py: no positive 'sample_rate"),
    "params sample_rate nan": (lambda s, p: _params(s, p, "float('nan')"), [], 1, "params.py: no positive"),
    "params deep parentheses": (lambda s, p: _params(s, p, "(" * 300 + "1" + ")" * 300), [], 1,
                                "params.py: cannot parse"),
    "params deep subscripts": (lambda s, p: _params(s, p, "x" + "[0]" * 100000), [], 1, "params.py: cannot parse"),
    "params deep unary minus": (lambda s, p: _params(s, p, "-" * 100000 + "1"), [], 1,
                                "params.py: cannot parse (an expression is nested too deeply"),
    "params huge integer": (lambda s, p: _params(s, p, "1" + "0" * 40), [], 1, "params.py: sample_rate"),
    "sample rate 1e999": (PHY, ["--sample-rate", "1e999"], 2, "--sample-rate 1e999: out of range"),
    "sample rate inf": (PHY, ["--sample-rate", "inf"], 2, "--sample-rate 'inf': not a number"),
    "sample rate nan": (PHY, ["--sample-rate", "nan"], 2, "--sample-rate 'nan': not a number"),
    "sample rate negative": (PHY, ["--sample-rate", "-30000"], 2, "--sample-rate -30000: must be > 0"),
    "scheduler bogus": (PHY, ["--scheduler", "bogus"], 2, "--scheduler 'bogus'"),
    "scheduler address without port": (PHY, ["--scheduler", "tcp://"], 2, "--scheduler"),
    "workers -1": (PHY, ["--workers", "-1"], 2, "--workers -1: must be between 1 and"),
    "behavior on a phy folder": (PHY, ["--behavior", "velocity"], 2, "--behavior applies to NWB files only"),
    "behavior on an npz": (lambda s, p: _npz(p, counts=C, bin_size=0.1), ["--behavior", "v"], 2,
                           "--behavior applies to NWB files only"),
    "behavior name missing": (NWB, ["--behavior", "speed", "--units", "all"], 1,
                              "session.nwb has no TimeSeries of that name; its TimeSeries are: "
                              "position (SpatialSeries), velocity (TimeSeries)"),
    "behavior empty name": (NWB, ["--behavior", ""], 2, "--behavior: empty name"),
    "workers 0": (PHY, ["--workers", "0"], 2, "--workers 0"),
    "workers text": (PHY, ["--workers", "many"], 2, "--workers 'many'"),
    "npz bin_size string": (lambda s, p: _npz(p, counts=C, bin_size=np.array("0.1")), [], 1, "'bin_size' must be"),
    "npz bin_size tiny": (lambda s, p: _npz(p, counts=C, bin_size=5e-324), [], 1, "'bin_size' must be"),
    "npz trial 0-d": (lambda s, p: _npz(p, counts=C, bin_size=0.1, trial=np.array(3)), [], 1, "'trial' is a scalar"),
    "npz bin_start_s 0-d": (lambda s, p: _npz(p, counts=C, bin_size=0.1, bin_start_s=np.array(3.0)), [], 1,
                            "'bin_start_s' is a scalar"),
    "npz bin_start_s text": (lambda s, p: _npz(p, counts=C, bin_size=0.1, bin_start_s=np.array(list("abcde"))), [],
                             1, "'bin_start_s' has dtype"),
    "npz bin_start_s nan": (lambda s, p: _npz(p, counts=C, bin_size=0.1, bin_start_s=np.array([0, 1, np.nan, 3, 4.])),
                            [], 1, "'bin_start_s' must be 1-D, finite"),
    # 4. silent corruption, now refused
    "trial label 1e30 in tsv": (PHY, ["--trials", "{tmp}/trials.tsv"], 1, "column 'target': value 1e+30 does not fit"),
    "trial label 1e30 in nwb": (_nwb_float_label, [], 1, "trials column 'reward': value 1e+30 does not fit"),
    "npz count 2**63+5": (lambda s, p: _npz(p, counts=_big_counts(np.uint64, 2**63 + 5), bin_size=0.1), [], 1,
                          "'counts'[2, 1] is 9.22337e+18, more than 4294967295"),
    "npz count 2**32": (lambda s, p: _npz(p, counts=_big_counts(np.int64, 2**32), bin_size=0.1), [], 1,
                        "more than 4294967295"),
    "npz float count 1e30": (lambda s, p: _npz(p, counts=_big_counts(np.float64, 1e30), bin_size=0.1), [], 1,
                             "more than 4294967295"),
    "npz behaviour beyond float32": (lambda s, p: _npz(p, counts=C, bin_size=0.1, speed=np.array([0, 1, 1e300, 2, 3.])),
                                     [], 1, "'speed': value 1e+300 is beyond the float32 range"),
    "npz float count inf": (lambda s, p: _npz(p, counts=_big_counts(np.float64, np.inf), bin_size=0.1), [], 1,
                            "non-integer values"),
}
TRIALS = {"trials stop 1e9": "3\t1e9\t1\n", "trials stop 1e300": "3\t1e300\t1\n",
          "trial label 1e30 in tsv": "3\t4\t1e30\n"}


def _bin_args(case: str, src: Path, tmp: Path) -> list[str]:
    build, extra, _, _ = BIN_CASES[case]
    if case in TRIALS:
        _trials_tsv(tmp, TRIALS[case])
    source = build(src, tmp)
    return [str(source), *[a.format(tmp=tmp) for a in extra]]


@pytest.mark.parametrize("case", sorted(BIN_CASES))
def test_bin_spikes_bad_input_is_one_line(src, tmp_path, capsys, case):
    _, _, code, needle = BIN_CASES[case]
    out = tmp_path / "o.zarr"
    args = [*_bin_args(case, src, tmp_path), "--out", str(out), "--no-progress"]
    assert run_cli(bin_spikes.main, args, "bin_spikes") == code
    assert_one_line(capsys, "bin_spikes", needle)
    assert_nothing_written(out)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_bin_spikes_out_in_unwritable_place(src, capsys):
    assert run_cli(bin_spikes.main, [str(src / "phy"), "--out", "/proc/x.zarr", "--no-progress"], "bin_spikes") == 1
    assert_one_line(capsys, "bin_spikes", "--out /proc/x.zarr")
    assert not os.path.exists("/proc/x.zarr")


@pytest.mark.parametrize("case", ["nwb truncated", "bin size below a sample", "npz count 2**63+5",
                                  "trial label 1e30 in tsv", "scheduler bogus"])
def test_bin_spikes_bad_input_leaves_existing_store_untouched(src, tmp_path, capsys, case):
    out = tmp_path / "o.zarr"
    assert run_cli(bin_spikes.main, [str(src / "phy"), "--out", str(out), "--no-progress"], "bin_spikes") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    args = [*_bin_args(case, src, tmp_path), "--out", str(out), "--overwrite", "--no-progress"]
    assert run_cli(bin_spikes.main, args, "bin_spikes") == BIN_CASES[case][2]
    assert_one_line(capsys, "bin_spikes", BIN_CASES[case][3])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".o.zarr.*"))


def test_cluster_id_2_to_the_40_is_binned_exactly(src, tmp_path):
    """Cluster ids map through their distinct values: a huge id costs nothing."""
    import zarr

    folder = _copy_phy(src, tmp_path)
    clusters = np.load(folder / "spike_clusters.npy").astype(np.int64)
    clusters[::7] = 2**40
    np.save(folder / "spike_clusters.npy", clusters)
    out = tmp_path / "o.zarr"
    assert run_cli(bin_spikes.main, [str(folder), "--out", str(out), "--units", "all", "--no-progress"], "b") == 0
    g = zarr.open_group(str(out), mode="r")
    ids = g["units/id"][:]
    assert ids[-1] == 2**40 and unit_quality(g)[-1] == "unsorted"
    counts = g["counts"][:]
    times = np.load(folder / "spike_times.npy").reshape(-1).astype(np.int64)
    for col, unit in enumerate(ids):
        expected = np.bincount(times[clusters == unit] // 3000, minlength=counts.shape[0])
        np.testing.assert_array_equal(counts[:, col], expected)
    assert DEFAULT_MAX_BINS == 2**31


def test_bin_spikes_help_documents_the_bounds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bin_spikes.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-bins" in out and str(DEFAULT_MAX_BINS) in out and str(MAX_UNITS) in out


def test_bin_spikes_subprocess_unreadable_nwb_no_traceback(src, tmp_path):
    bad = _truncated_nwb(src, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "preprocess.bin_spikes", str(bad), "--out", str(tmp_path / "o.zarr")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("python -m preprocess.bin_spikes: error: ") and "t.nwb" in proc.stderr
    assert_nothing_written(tmp_path / "o.zarr")


# --------------------------------------------------------------------------- simulate

SIM_CASES = {
    "seed -1": (["--seed", "-1"], "--seed -1: must be between 0 and"),
    "seed 2**64": (["--seed", str(2**64)], "--seed"),
    "units 1e7": (["--units", "1e7"], "--units"),
    "units 10000000": (["--units", "10000000"], f"--units 10000000: must be between 1 and {simulate.MAX_UNITS}"),
    "units 0": (["--units", "0"], "--units 0"),
    "trials 1e8": (["--trials", "1e8"], "--trials"),
    "trials 100000000": (["--trials", "100000000"], "--trials 100000000: must be between 1 and"),
    "units x trials": (["--units", "1000", "--trials", "1000"], "--units 1000 x --trials 1000"),
    "unknown option": (["--bogus"], "unrecognized arguments: --bogus"),
    "unknown format": (["--format", "tiff"], "--format"),
}


@pytest.mark.parametrize("case", sorted(SIM_CASES))
def test_simulate_bad_option_is_one_line_and_creates_nothing(tmp_path, capsys, case):
    args, needle = SIM_CASES[case]
    out = tmp_path / "sim" / "deeper"
    assert simulate.main([str(out), *args]) == 2
    assert_one_line(capsys, simulate.PROG, needle)
    assert not (tmp_path / "sim").exists()


def test_simulate_failure_while_writing_leaves_no_out_dir(tmp_path, capsys, monkeypatch):
    def no_space(session, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(simulate, "write_nwb", no_space)
    out = tmp_path / "new" / "sim"
    assert simulate.main([str(out), "--units", "3", "--trials", "4"]) == 1
    assert_one_line(capsys, simulate.PROG, "No space left on device")
    assert not (tmp_path / "new").exists()  # the phy folder written first is gone with the folders created


def test_simulate_failure_with_overwrite_keeps_the_old_outputs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sim"
    assert simulate.main([str(out), "--units", "3", "--trials", "4"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    def no_space(session, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(simulate, "write_nwb", no_space)
    assert simulate.main([str(out), "--units", "3", "--trials", "4", "--seed", "9", "--overwrite"]) == 1
    assert_one_line(capsys, simulate.PROG, "cannot write")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["phy", "session.nwb"]


def test_simulate_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def oom(**kwargs):
        raise MemoryError

    monkeypatch.setattr(simulate, "simulate_reach_session", oom)
    assert simulate.main([str(tmp_path / "sim"), "--units", "3", "--trials", "4"]) == 1
    assert_one_line(capsys, simulate.PROG, "not enough memory")
    assert not (tmp_path / "sim").exists()


def test_simulate_subprocess_bad_option_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "preprocess.simulate", str(tmp_path / "s"), "--units", "1e7"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--units" in proc.stderr and "usage:" not in proc.stderr
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- shard_images


def _idx(path: Path, dims: tuple[int, ...], data: bytes = b"") -> None:
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(gzip.compress(header + data))


def _mnist(p: Path, images: tuple[int, int, int], data: bytes = b"", labels: int | None = None) -> Path:
    folder = p / "mnist"
    folder.mkdir()
    _idx(folder / "train-images-idx3-ubyte.gz", images, data)
    n = images[0] if labels is None else labels
    _idx(folder / "train-labels-idx1-ubyte.gz", (n,), bytes(min(n, 16)))
    return folder


def _cifar_bad_names(p: Path) -> Path:
    folder = p / "cifar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"labels": [1, 2], b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    names = [f"class{i}".encode() for i in range(10)]
    names[3] = b"caf\xe9\xff"  # latin-1, not UTF-8
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return folder


SHARD_CASES = {
    "idx 0x0 images": (lambda p: _mnist(p, (2, 0, 0)), "images of 0x0 pixels"),
    "idx 65535x65535 images": (lambda p: _mnist(p, (1, 65535, 65535), bytes(100)), "images of 65535x65535 pixels"),
    "idx 1x0 images": (lambda p: _mnist(p, (3, 1, 0)), "images of 1x0 pixels"),
    "idx labels header too large": (lambda p: _mnist(p, (2, 28, 28), bytes(2 * 784), labels=2**32 - 1),
                                    "train-labels-idx1-ubyte.gz: truncated"),
    "idx images header too many": (lambda p: _mnist(p, (2**31, 28, 28), bytes(784), labels=2**31),
                                   "train-labels-idx1-ubyte.gz: truncated"),
    "cifar class name not utf-8": (_cifar_bad_names, "batches.meta: 'label_names'[3] is b'caf\\xe9\\xff', not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_shard_images_bad_input_is_one_line(tmp_path, capsys, case):
    build, needle = SHARD_CASES[case]
    out = tmp_path / "o"
    assert run_cli(shard_images.main, [str(build(tmp_path)), "--out", str(out), "--no-progress"], "shard_images") == 1
    assert_one_line(capsys, "shard_images", needle)
    assert_nothing_written(out)


def _shard_set(tmp_path: Path) -> Path:
    """A tiny MNIST-like set sharded 2 images per tar: returns its train/ folder."""
    rng = np.random.default_rng(0)
    folder = _mnist(tmp_path, (6, 4, 4), rng.integers(0, 255, 96, dtype=np.uint8).tobytes())
    out = tmp_path / "o"
    assert run_cli(shard_images.main, [str(folder), "--out", str(out), "--shard-size", "2", "--no-progress"],
                   "shard_images") == 0
    return out / "train"


@pytest.mark.parametrize("damage, needle", [
    (lambda tar: tar.write_bytes(tar.read_bytes()[:1000]), "shard-000001.tar: 1000 bytes, index.json says"),
    (lambda tar: tar.write_bytes(tar.read_bytes()[:512]), "shard-000001.tar: 512 bytes"),  # on a tar block edge
    (lambda tar: tar.write_bytes(tar.read_bytes() + bytes(512)), "(truncated or replaced)"),
    (lambda tar: tar.unlink(), "shard-000001.tar: missing (index.json lists it)"),
], ids=["truncated", "truncated-on-a-block", "grown", "deleted"])
def test_damaged_shard_is_refused_when_the_set_is_opened(tmp_path, damage, needle):
    """index.json records each tar's size: a damaged shard is found by one listing, before
    a trainer starts (a stream would otherwise meet it mid-run)."""
    from preprocess.errors import UserError
    from preprocess.shard_format import read_index

    train = _shard_set(tmp_path)
    assert [s["samples"] for s in read_index(str(train))["shards"]] == [2, 2, 2]
    damage(train / "shard-000001.tar")
    with pytest.raises(UserError, match=re.escape(needle)):
        read_index(str(train))


def test_shard_set_without_sizes_is_read_as_before(tmp_path):
    import json

    from preprocess.shard_format import iter_samples, read_index

    train = _shard_set(tmp_path)
    index = json.loads((train / "index.json").read_text())
    for shard in index["shards"]:
        del shard["bytes"]  # written before the field existed
    (train / "index.json").write_text(json.dumps(index))
    assert read_index(str(train))["num_samples"] == 6 and len(list(iter_samples(str(train)))) == 6


# --------------------------------------------------------------------------- the last resort


def _chained_thread_failure(argv):
    try:
        raise RuntimeError("can't start new thread")
    except RuntimeError:  # what a producer's cleanup raised when its thread never started
        raise RuntimeError("cannot join thread before it is started")


def _raise(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("main, needle", [
    (_raise(MemoryError()), "out of memory (MemoryError)"),
    (_raise(RuntimeError("can't start new thread")), "cannot start a thread (out of memory or a thread limit)"),
    (_chained_thread_failure, "cannot start a thread"),
    (_raise(ImportError("/x/_sparsetools.so: failed to map segment from shared object")),
     "cannot load a shared library: out of address space"),
], ids=["memory", "thread", "thread-while-cleaning-up", "shared-library"])
def test_running_out_of_resources_is_one_line(capsys, main, needle):
    assert run_cli(main, [], "prog") == 1
    assert_one_line(capsys, "prog", needle)


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raise(ZeroDivisionError("a bug")), [], "prog")
