"""``python -m preprocess.bin_spikes``: exactness, formats, object storage, atomicity, clean errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import REPO, make_phy, shared_path
from preprocess import bin_spikes, binning, block_tasks
from preprocess.errors import run_cli
from preprocess.store import SCHEMA, open_recording, unit_quality


def run(args: list[str]) -> int:
    return run_cli(bin_spikes.main, [*args, "--no-progress"], "bin_spikes")


def run_ok(args: list[str]) -> zarr.Group:
    assert run(args) == 0
    out = args[args.index("--out") + 1]
    return open_recording(out, _options(args))


def _options(args):
    if "--storage-options" in args:
        import json

        return json.loads(args[args.index("--storage-options") + 1])
    return None


def histogram(times, clusters, unit_ids, n_rows, spb):
    edges = np.arange(n_rows + 1, dtype=np.int64) * spb
    return np.stack([np.histogram(times[clusters == u].astype(np.int64), bins=edges)[0] for u in unit_ids], 1)


# --------------------------------------------------------------------------- exactness


def test_real_phy_good_units_50ms_equal_per_unit_histogram(tmp_path):
    phy = shared_path("phy-neuropixels-2min")
    g = run_ok([str(phy), "--out", str(tmp_path / "s.zarr"), "--bin-size", "0.05", "--sample-rate", "30000"])
    times = np.load(phy / "spike_times.npy").reshape(-1)
    clusters = np.load(phy / "spike_clusters.npy")
    ids = g["units/id"][:]
    assert len(ids) == 140 and set(unit_quality(g)) == {"good"}
    counts = g["counts"][:]
    ref = histogram(times, clusters, ids, counts.shape[0], 1500)
    np.testing.assert_array_equal(counts, ref)
    assert counts.dtype == np.uint16
    assert int(g.attrs["n_spikes"]) == int(np.isin(clusters, ids).sum())
    assert g["counts"].metadata.dimension_names == ("time", "unit")
    assert g.attrs["schema"] == SCHEMA and g.attrs["sample_rate_hz"] == 30000.0
    assert g.attrs["source"]["content_hash"].startswith("sha256-tree64M:")
    # correctly rounded k * 1/20 (k * 0.05 in floats is off by an ulp for a third of the bins)
    np.testing.assert_array_equal(g["bin_start_s"][:], np.arange(counts.shape[0]) / 20)
    assert (g["trial"][:] == -1).all()


@pytest.mark.parametrize("ids, units, times_dtype, rate", [
    ([0, 1, 2, 3, 4, 5], "all", np.uint64, 30000),  # column = cluster id: no lookup
    ([3, 9, 17, 40, 41, 60], "all", np.int64, 30000),  # every cluster kept, through the table
    ([3, 9, 17, 40, 41, 60], "good", np.uint64, 30000),  # some clusters dropped
    ([2, 70_000, 70_001, 90_000, 5, 6], "all", np.uint64, 30000),  # ids too large for a table: binary search
    ([0, 1, 2, 3, 4, 5], "all", np.uint64, "29999.7"),  # fractional samples per bin: the general path
])
def test_every_column_lookup_and_sample_clock_is_exact(tmp_path, ids, units, times_dtype, rate):
    times, clusters = make_phy(tmp_path / "phy", n_units=6, on_edges=40, bin_samples=300)
    ids = np.array(ids, dtype=np.int32)
    clusters = ids[clusters]
    np.save(tmp_path / "phy" / "spike_clusters.npy", clusters)
    np.save(tmp_path / "phy" / "spike_times.npy", times.astype(times_dtype)[:, None])
    groups = ["good" if k % 3 else "mua" for k in range(len(ids))]
    (tmp_path / "phy" / "cluster_group.tsv").write_text(
        "cluster_id\tgroup\n" + "".join(f"{u}\t{g}\n" for u, g in zip(ids.tolist(), groups)))
    g = run_ok([str(tmp_path / "phy"), "--out", str(tmp_path / "s.zarr"), "--bin-size", "0.01", "--units", units,
                "--sample-rate", str(rate)])
    kept = np.sort(ids if units == "all" else ids[[k for k, grp in enumerate(groups) if grp == "good"]])
    assert g["units/id"][:].tolist() == kept.tolist()
    counts = g["counts"][:]
    spb = binning.to_fraction("0.01") * binning.to_fraction(str(rate))
    edges = np.array([binning.first_sample(k, spb) for k in range(counts.shape[0] + 1)], dtype=np.int64)
    ref = np.stack([np.histogram(times[clusters == u].astype(np.int64), bins=edges)[0] for u in kept], 1)
    np.testing.assert_array_equal(counts, ref)
    assert int(g.attrs["n_spikes"]) == int(np.isin(clusters, kept).sum())


def test_edge_spikes_counted_once(tmp_path):
    times, clusters = make_phy(tmp_path / "phy", on_edges=50, bin_samples=300)
    g = run_ok([str(tmp_path / "phy"), "--out", str(tmp_path / "s.zarr"), "--bin-size", "0.01", "--units", "all"])
    counts = g["counts"][:]
    assert counts.sum() == len(times)  # the original code counts each edge spike twice
    np.testing.assert_array_equal(counts, histogram(times, clusters, np.arange(6), counts.shape[0], 300))


def test_units_selection_and_labels_merge(tmp_path):
    make_phy(tmp_path / "phy", n_units=6, groups=["good", "mua", "noise", "good", "mua", "good"])
    (tmp_path / "phy" / "cluster_KSLabel.tsv").write_text("cluster_id\tKSLabel\n0\tmua\n1\tgood\n2\tgood\n")
    sizes = {}
    for units in ("good", "mua", "all"):
        g = run_ok([str(tmp_path / "phy"), "--out", str(tmp_path / f"{units}.zarr"), "--units", units])
        sizes[units] = g["units/id"][:].tolist()
        if units == "good":  # curated cluster_group.tsv wins over KSLabel
            assert unit_quality(g) == ["good"] * 3
    assert sizes == {"good": [0, 3, 5], "mua": [0, 1, 3, 4, 5], "all": [0, 1, 2, 3, 4, 5]}


def test_trials_table_gives_trial_and_labels(tmp_path):
    make_phy(tmp_path / "phy", duration_s=10)
    table = tmp_path / "trials.tsv"
    table.write_text("start_s\tstop_s\ttarget\tcue\n1.0\t2.0\t3\tleft\n4.0\t5.5\t7\tright\n")
    g = run_ok([str(tmp_path / "phy"), "--out", str(tmp_path / "s.zarr"), "--bin-size", "0.5",
                "--trials", str(table)])
    trial = g["trial"][:]
    assert trial.tolist()[:12] == [-1, -1, 0, 0, -1, -1, -1, -1, 1, 1, 1, -1]
    assert g["labels/target"][:].tolist()[:12] == [-1, -1, 3, 3, -1, -1, -1, -1, 7, 7, 7, -1]
    assert g["labels/cue"].attrs["categories"] == ["left", "right"]


def test_count_dtype_promoted_to_uint32(tmp_path):
    folder = tmp_path / "phy"
    folder.mkdir()
    times = np.repeat(np.arange(0, 100_000, dtype=np.uint64), 1)  # one unit spiking every sample
    np.save(folder / "spike_times.npy", times)
    np.save(folder / "spike_clusters.npy", np.zeros(len(times), dtype=np.int32))
    g = run_ok([str(folder), "--out", str(tmp_path / "s.zarr"), "--bin-size", "3", "--sample-rate", "30000",
                "--units", "all"])
    assert g["counts"].dtype == np.uint32
    assert g["counts"][0, 0] == 90_000 and int(g["counts"][:].sum()) == 100_000


def test_overflowing_nwb_counts_are_rewritten_as_uint32(tmp_path):
    """NWB gives no bound on a bin's count: uint16 first, then the same staging store is
    recreated as uint32, and no block may write through an array opened for uint16 (the
    other blocks were written in the first attempt: dask runs them before the first one)."""
    from datetime import datetime, timezone
    from fractions import Fraction

    from pynwb import NWBHDF5IO, NWBFile

    from preprocess import sources
    from preprocess.store import StoreLayout

    nwb = NWBFile(session_description="t", identifier="x", session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    busy = np.linspace(0.0, 0.999, 70_000)  # 70,000 spikes in the first 1-s bin
    nwb.add_unit(spike_times=np.concatenate([busy, [9.5]]))
    nwb.add_unit(spike_times=np.array([0.5, 2.5, 7.5]))
    path = tmp_path / "busy.nwb"
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    rec = sources.read_source(str(path), "nwb", str(path), Fraction(1), "all", None, None)
    out = str(tmp_path / "b.zarr")
    summary = bin_spikes.write_recording(rec, out, {}, overwrite=False, scheduler="synchronous", progress=False,
                                         layout=StoreLayout(rec.n_rows, rec.n_units, chunk_rows=2, shard_rows=2))
    assert summary["dtype"] == "uint32" and rec.n_rows >= 10
    counts = open_recording(out)["counts"][:]
    assert counts.dtype == np.uint32
    assert counts[0].tolist() == [70_000, 1] and counts[9].tolist() == [1, 0] and int(counts.sum()) == 70_004


def test_opened_arrays_are_reused_within_an_attempt_only(tmp_path):
    url = str(tmp_path / "a.zarr")
    zarr.create_array(url, shape=(4,), dtype="uint16")
    first = block_tasks.opened_array(url, {}, "attempt-1")
    assert block_tasks.opened_array(url, {}, "attempt-1") is first
    zarr.create_array(url, shape=(4,), dtype="uint32", overwrite=True)
    again = block_tasks.opened_array(url, {}, "attempt-2")
    assert again is not first and again.dtype == np.uint32


def test_many_blocks_parallel_processes_exact(tmp_path):
    times, clusters = make_phy(tmp_path / "phy", n_units=200, duration_s=400, rate_hz=1)
    out = tmp_path / "s.zarr"
    assert run_cli(bin_spikes.main, [str(tmp_path / "phy"), "--out", str(out), "--bin-size", "0.001",
                                     "--units", "all", "--scheduler", "processes", "--workers", "2",
                                     "--no-progress"], "b") == 0
    g = open_recording(str(out))
    assert len(g["counts"].shape) == 2 and g["counts"].shards is not None
    n_shards = -(-g["counts"].shape[0] // g["counts"].shards[0])
    assert n_shards >= 4
    np.testing.assert_array_equal(g["counts"][:], histogram(times, clusters, np.arange(200), g["counts"].shape[0], 30))


def test_the_command_itself_runs_its_blocks_in_worker_processes(tmp_path):
    """As ``python -m``, the command's module is __main__: its tasks must still pickle (a
    thread-local cache reached from a __main__ function once made every block task fail)."""
    times, clusters = make_phy(tmp_path / "phy", n_units=20, duration_s=60, rate_hz=5)
    out = tmp_path / "s.zarr"
    done = subprocess.run([sys.executable, "-m", "preprocess.bin_spikes", str(tmp_path / "phy"), "--out", str(out),
                           "--bin-size", "0.01", "--units", "all", "--scheduler", "processes", "--workers", "2",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    g = open_recording(str(out))
    np.testing.assert_array_equal(g["counts"][:], histogram(times, clusters, np.arange(20), g["counts"].shape[0], 300))


# --------------------------------------------------------------------------- npz and NWB


def test_chewie_npz_reproduced_exactly(tmp_path):
    npz = shared_path("reach-chewie-2013-10-03", "chewie-2013-10-03-binned-100ms.npz")
    g = run_ok([str(npz), "--out", str(tmp_path / "c.zarr")])
    d = np.load(npz)
    np.testing.assert_array_equal(g["counts"][:], d["counts"])
    assert g["counts"].dtype == d["counts"].dtype
    np.testing.assert_array_equal(g["trial"][:], d["trial"])
    for name in ("target", "bin_in_trial"):
        np.testing.assert_array_equal(g[f"labels/{name}"][:], d[name])
        assert g[f"labels/{name}"].dtype == d[name].dtype
    for name in ("position", "velocity", "acceleration", "force"):
        np.testing.assert_array_equal(g[f"behavior/{name}"][:], d[name])
    assert g.attrs["bin_size_s"] == 0.1


def test_nwb_written_by_pynwb_is_binned(tmp_path):
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries

    nwb = NWBFile(session_description="t", identifier="x", session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    nwb.add_unit_column("quality", "curation label")
    rng = np.random.default_rng(0)
    unit_times = [np.sort(rng.uniform(0, 10, size=n)) for n in (50, 80, 30)]
    unit_times[0][:3] = [0.3, 0.5, 1.0]  # exactly on 0.1-s edges
    unit_times[0].sort()
    for t, q in zip(unit_times, ("good", "mua", "good")):
        nwb.add_unit(spike_times=t, quality=q)
    nwb.add_trial_column("target", "reach target")
    nwb.add_trial(start_time=1.0, stop_time=2.0, target=2)
    nwb.add_trial(start_time=3.0, stop_time=4.0, target=5)
    module = nwb.create_processing_module("behavior", "behaviour")
    ts_t = np.arange(0, 10, 0.01)
    vel = np.stack([np.sin(ts_t), np.cos(ts_t)], 1)
    module.add(BehavioralTimeSeries(time_series=[TimeSeries(name="velocity", data=vel, unit="cm/s", timestamps=ts_t)]))
    path = tmp_path / "s.nwb"
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    g = run_ok([str(path), "--out", str(tmp_path / "n.zarr"), "--bin-size", "0.1", "--units", "good"])
    counts = g["counts"][:]
    assert counts.shape[1] == 2 and unit_quality(g) == ["good", "good"]
    assert counts.dtype == np.uint16  # unknown bound: uint16 first, uint32 only on overflow
    edges = g["bin_start_s"][:]
    for col, t in enumerate([unit_times[0], unit_times[2]]):
        ref = np.array([np.sum((t >= edges[k]) & (t < (edges[k + 1] if k + 1 < len(edges) else np.inf)))
                        for k in range(len(edges))])
        np.testing.assert_array_equal(counts[:, col], ref)
    trial = g["trial"][:]
    assert trial[10] == 0 and trial[20] == -1 and trial[30] == 1
    assert g["labels/target"][10] == 2 and g["labels/target"][30] == 5
    v = g["behavior/velocity"][:]
    assert v.shape == (len(edges), 2) and v.dtype == np.float32
    np.testing.assert_allclose(v[5], vel[50:60].mean(0), rtol=1e-5)


# --------------------------------------------------------------------------- object storage


def test_s3_round_trip_on_moto(tmp_path, s3_bucket):
    import json

    import s3fs

    bucket, options = s3_bucket
    times, clusters = make_phy(tmp_path / "phy", n_units=4)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(str(tmp_path / "phy"), f"{bucket[5:]}/phy", recursive=True)  # the source on S3 too
    out = f"{bucket}/rec.zarr"
    args = [f"{bucket}/phy", "--out", out, "--bin-size", "0.01", "--units", "all",
            "--storage-options", json.dumps(options)]
    g = run_ok(args)
    np.testing.assert_array_equal(g["counts"][:], histogram(times, clusters, np.arange(4), g["counts"].shape[0], 300))
    # plain zarr, through fsspec, reads it too
    plain = zarr.open_group(out, mode="r", storage_options=options)
    assert plain.attrs["schema"] == SCHEMA
    assert not fs.exists(f"{bucket[5:]}/rec.zarr/.myow-partial")
    # exists -> refused; --overwrite replaces it
    assert run(args) == 1
    assert run([*args, "--overwrite"]) == 0


def test_s3_via_aws_endpoint_url_env(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    make_phy(tmp_path / "phy", n_units=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    g = run_ok([str(tmp_path / "phy"), "--out", f"{bucket}/env.zarr", "--units", "all"])
    assert g["counts"].shape[1] == 3


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    make_phy(tmp_path / "phy")
    opts = '{"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}'
    assert run([str(tmp_path / "phy"), "--out", "s3://nobucket/x.zarr", "--storage-options", opts]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "s3://nobucket/x.zarr" in err


def test_memory_url_output(tmp_path):
    make_phy(tmp_path / "phy", n_units=3)
    g = run_ok([str(tmp_path / "phy"), "--out", "memory://stores/m.zarr", "--units", "all"])
    assert g["counts"].shape[1] == 3


# --------------------------------------------------------------------------- atomicity


def _synthetic_long_phy(folder: Path) -> None:
    make_phy(folder, n_units=200, duration_s=1800, rate_hz=4, seed=3)


def _start_long_run(folder: Path, out: Path) -> subprocess.Popen:
    """Start binning the long recording at 1 ms; return once its staging folder exists."""
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.bin_spikes", str(folder), "--out", str(out),
                             "--bin-size", "0.001", "--units", "all", "--no-progress", "--scheduler", "threads"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir()):
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def long_run_seconds(tmp_path_factory) -> float:
    """How long the long run writes on this machine (from its staging folder to its exit):
    the kills below land at shares of it, not at fixed times a faster machine outruns."""
    tmp = tmp_path_factory.mktemp("long")
    _synthetic_long_phy(tmp / "phy")
    proc = _start_long_run(tmp / "phy", tmp / "s.zarr")
    started = time.time()
    assert proc.wait(timeout=300) == 0
    return time.time() - started


@pytest.mark.parametrize("kill_share", [0.2, 0.6])
def test_sigkill_mid_write_leaves_no_store(tmp_path, kill_share, long_run_seconds):
    _synthetic_long_phy(tmp_path / "phy")
    out = tmp_path / "s.zarr"
    proc = _start_long_run(tmp_path / "phy", out)
    time.sleep(kill_share * long_run_seconds)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if finished:
        pytest.skip("the run finished before it could be killed")
    if out.exists():  # killed between publishing and exiting: publication is atomic, so the store is whole
        assert open_recording(str(out)).attrs["n_spikes"] > 0
        pytest.skip("the run published its store before it could be killed")
    with pytest.raises(Exception):
        zarr.open_group(str(out), mode="r")
    # the next run cleans the dead run's staging folder and succeeds
    assert run([str(tmp_path / "phy"), "--out", str(out), "--bin-size", "0.01", "--units", "all"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    open_recording(str(out))


def test_failure_mid_write_on_object_storage_leaves_no_group(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    make_phy(tmp_path / "phy", n_units=3)
    import preprocess.bin_spikes as mod

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(block_tasks, "per_bin_block", broken)
    import json

    with pytest.raises(RuntimeError):
        mod.main([str(tmp_path / "phy"), "--out", f"{bucket}/f.zarr", "--units", "all", "--no-progress",
                  "--storage-options", json.dumps(options)])
    import s3fs

    assert not s3fs.S3FileSystem(**options, skip_instance_cache=True).exists(f"{bucket[5:]}/f.zarr/zarr.json")


def test_existing_output_untouched_without_overwrite(tmp_path, capsys):
    make_phy(tmp_path / "phy")
    out = tmp_path / "s.zarr"
    run_ok([str(tmp_path / "phy"), "--out", str(out)])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run([str(tmp_path / "phy"), "--out", str(out), "--bin-size", "0.5"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    g = run_ok([str(tmp_path / "phy"), "--out", str(out), "--bin-size", "0.5", "--overwrite"])
    assert g.attrs["bin_size_s"] == 0.5


def test_foreign_folder_is_never_replaced(tmp_path, capsys):
    make_phy(tmp_path / "phy")
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert run([str(tmp_path / "phy"), "--out", str(precious), "--overwrite"]) == 1
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert "not a recording store" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad inputs


def _phy(tmp_path, **kw) -> Path:
    make_phy(tmp_path / "phy", **kw)
    return tmp_path / "phy"


def _npz(tmp_path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


BAD_INPUTS = {
    "missing source": (lambda p: [str(p / "nope"), "--out", str(p / "o.zarr")], 1, "no such file"),
    "unknown format": (lambda p: [str((p / "x.csv").write_text("a") and p / "x.csv"), "--out", str(p / "o.zarr")],
                       1, "unknown format"),
    "folder without spikes": (lambda p: [str((p / "d").mkdir() or p / "d"), "--out", str(p / "o.zarr")], 1,
                              "spike_times.npy"),
    "length mismatch": (lambda p: [str(_mismatch(p)), "--out", str(p / "o.zarr")], 1, "spike_clusters.npy"),
    "unsorted times": (lambda p: [str(_unsorted(p)), "--out", str(p / "o.zarr"), "--units", "all"], 1, "not sorted"),
    "negative times": (lambda p: [str(_negative(p)), "--out", str(p / "o.zarr"), "--units", "all"], 1, "negative"),
    "float times": (lambda p: [str(_float_times(p)), "--out", str(p / "o.zarr")], 1, "dtype"),
    "bin size zero": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--bin-size", "0"], 2, "--bin-size"),
    "bin size negative": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--bin-size", "-1"], 2, "--bin-size"),
    "bin size longer than recording": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--bin-size", "100"],
                                       1, "longer than the recording"),
    "unknown units label": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--units", "best"], 2, "--units"),
    "no unit with label": (lambda p: [str(_phy(p, groups=["mua"] * 6)), "--out", str(p / "o.zarr")], 1,
                           "--units mua or all"),
    "no sample rate": (lambda p: [str(_phy(p, params=False)), "--out", str(p / "o.zarr")], 1, "--sample-rate"),
    "npz without counts": (lambda p: [str(_npz(p, rates=np.zeros((3, 2)))), "--out", str(p / "o.zarr")], 1,
                           "'counts' is missing"),
    "npz counts 1-D": (lambda p: [str(_npz(p, counts=np.zeros(5, np.uint16), bin_size=0.1)), "--out",
                                  str(p / "o.zarr")], 1, "2 dimensions"),
    "npz label length": (lambda p: [str(_npz(p, counts=np.zeros((5, 2), np.uint16), bin_size=0.1,
                                             target=np.zeros(4, np.int64))), "--out", str(p / "o.zarr")], 1,
                         "'target' has 4 rows"),
    "npz corrupt": (lambda p: [str((p / "c.npz").write_bytes(b"PK\x03\x04garbage") and p / "c.npz"), "--out",
                               str(p / "o.zarr")], 1, "c.npz"),
    "bad storage options": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--storage-options", "{oops"], 2,
                            "--storage-options"),
    "trials overlap": (lambda p: [str(_phy(p)), "--out", str(p / "o.zarr"), "--trials", str(_trials(p))], 1,
                       "overlap"),
    "out parent missing": (lambda p: [str(_phy(p)), "--out", str(p / "no" / "such" / "o.zarr")], 1,
                           "does not exist"),
}


def _mismatch(p: Path) -> Path:
    folder = _phy(p)
    np.save(folder / "spike_clusters.npy", np.zeros(3, dtype=np.int32))
    return folder


def _unsorted(p: Path) -> Path:
    folder = _phy(p)
    t = np.load(folder / "spike_times.npy")
    t[[5, 50]] = t[[50, 5]]
    np.save(folder / "spike_times.npy", t)
    return folder


def _negative(p: Path) -> Path:
    folder = _phy(p)
    t = np.load(folder / "spike_times.npy").astype(np.int64)
    t[0] = -5
    np.save(folder / "spike_times.npy", t)
    return folder


def _float_times(p: Path) -> Path:
    folder = _phy(p)
    np.save(folder / "spike_times.npy", np.load(folder / "spike_times.npy").astype(np.float64) / 30000)
    return folder


def _trials(p: Path) -> Path:
    path = p / "trials.tsv"
    path.write_text("start_s\tstop_s\n1\t3\n2\t4\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_no_output(tmp_path, capsys, case):
    make_args, code, needle = BAD_INPUTS[case]
    args = make_args(tmp_path)
    assert run(args) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert needle in err, err
    assert "Traceback" not in err
    out = Path(args[args.index("--out") + 1])
    assert not out.exists()
    assert not [p for p in out.parent.glob(".*partial*")] if out.parent.exists() else True


def test_cli_subprocess_no_traceback_and_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "preprocess.bin_spikes", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o.zarr")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "preprocess.bin_spikes", "--help"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "--bin-size" in proc.stdout and "--scheduler" in proc.stdout


def test_params_py_is_never_executed(tmp_path):
    folder = _phy(tmp_path, params=False)
    marker = tmp_path / "pwned"
    (folder / "params.py").write_text(f"import os\nos.system('touch {marker}')\nopen('{marker}', 'w')\n"
                                      "sample_rate = 30000.0\nn_channels_dat = 2 + 3\n")
    g = run_ok([str(folder), "--out", str(tmp_path / "o.zarr")])
    assert not marker.exists()
    assert g.attrs["sample_rate_hz"] == 30000.0


def test_params_py_computed_value_is_not_evaluated(tmp_path, capsys):
    folder = _phy(tmp_path, params=False)
    (folder / "params.py").write_text("sample_rate = __import__('os').getpid()\n")
    assert run([str(folder), "--out", str(tmp_path / "o.zarr")]) == 1
    assert "--sample-rate" in capsys.readouterr().err


def test_existing_dask_distributed_scheduler(tmp_path):
    distributed = pytest.importorskip("distributed")
    times, clusters = make_phy(tmp_path / "phy", n_units=5)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
                                  scheduler_port=0, dashboard_address=None) as cluster:
        g = run_ok([str(tmp_path / "phy"), "--out", str(tmp_path / "d.zarr"), "--units", "all", "--bin-size", "0.01",
                    "--scheduler", cluster.scheduler_address])
    np.testing.assert_array_equal(g["counts"][:], histogram(times, clusters, np.arange(5), g["counts"].shape[0], 300))


def test_unreachable_scheduler_is_one_line(tmp_path, capsys):
    make_phy(tmp_path / "phy")
    assert run([str(tmp_path / "phy"), "--out", str(tmp_path / "o.zarr"), "--scheduler", "tcp://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--scheduler" in err and "\n" not in err
    assert not (tmp_path / "o.zarr").exists()


def _nwb_with_voltage(path, duration_s=20.0):
    """An NWB file as labs write it: units, raw voltage in acquisition, LFP in processing and
    a behavioural series; returns (velocity timestamps, velocity (n, 2))."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries
    from pynwb.ecephys import LFP, ElectricalSeries
    from pynwb.misc import IntervalSeries

    nwb = NWBFile(session_description="t", identifier="v", session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    rng = np.random.default_rng(1)
    for n in (40, 60):
        nwb.add_unit(spike_times=np.sort(rng.uniform(0, duration_s, size=n)))
    device = nwb.create_device(name="probe")
    group = nwb.create_electrode_group(name="shank", description="s", location="CA1", device=device)
    for _ in range(4):
        nwb.add_electrode(group=group, location="CA1")
    region = nwb.create_electrode_table_region(list(range(4)), "all")
    raw = rng.integers(-500, 500, size=(int(duration_s * 1000), 4)).astype(np.int16)
    nwb.add_acquisition(ElectricalSeries(name="raw", data=raw, electrodes=region, rate=1000.0))
    ecephys = nwb.create_processing_module("ecephys", "lfp")
    ecephys.add(LFP(electrical_series=ElectricalSeries(name="lfp", data=raw[::10].astype(np.float32),
                                                       electrodes=region, rate=100.0)))
    nwb.add_acquisition(IntervalSeries(name="laser", data=[1, -1], timestamps=[2.0, 3.0]))
    module = nwb.create_processing_module("behavior", "behaviour")
    t = np.arange(0, duration_s, 0.01)
    vel = np.stack([np.sin(t), np.cos(t)], 1)
    module.add(BehavioralTimeSeries(time_series=[TimeSeries(name="velocity", data=vel, unit="cm/s", timestamps=t)]))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return t, vel


def test_nwb_voltage_is_not_behaviour_and_behaviour_is_read_in_chunks(tmp_path, monkeypatch):
    from preprocess import source_nwb

    _, vel = _nwb_with_voltage(tmp_path / "v.nwb")
    whole = run_ok([str(tmp_path / "v.nwb"), "--out", str(tmp_path / "a.zarr"), "--bin-size", "0.1", "--units", "all"])
    assert sorted(k for k in whole["behavior"].keys()) == ["velocity"]  # raw, LFP, intervals: not binned
    v = whole["behavior/velocity"][:]
    np.testing.assert_allclose(v[5], vel[50:60].mean(0), rtol=1e-5)
    monkeypatch.setattr(source_nwb, "BEHAVIOUR_CHUNK_VALUES", 14)  # 7 samples of 2 values per read
    chunked = run_ok([str(tmp_path / "v.nwb"), "--out", str(tmp_path / "b.zarr"), "--bin-size", "0.1", "--units", "all"])
    np.testing.assert_allclose(chunked["behavior/velocity"][:], v, rtol=1e-6)


@pytest.fixture(scope="module")
def voltage_nwb(tmp_path_factory):
    path = tmp_path_factory.mktemp("voltage") / "v.nwb"
    _, vel = _nwb_with_voltage(path, duration_s=5.0)
    return path, vel


@pytest.mark.parametrize("names, stored", [
    (["velocity"], ["velocity"]),
    (["raw"], ["raw"]),  # named explicitly, voltage is binned too
    (["lfp", "velocity", "lfp"], ["lfp", "velocity"]),  # repeatable; a repeated name counts once
])
def test_nwb_behavior_option_bins_only_the_named_series(voltage_nwb, tmp_path, names, stored):
    path, vel = voltage_nwb
    args = [str(path), "--out", str(tmp_path / "s.zarr"), "--bin-size", "0.1", "--units", "all"]
    g = run_ok([*args, *[a for n in names for a in ("--behavior", n)]])
    assert sorted(g["behavior"].keys()) == stored
    if "velocity" in stored:
        np.testing.assert_allclose(g["behavior/velocity"][5], vel[50:60].mean(0), rtol=1e-5)
    if "raw" in stored:
        assert g["behavior/raw"].shape == (g["counts"].shape[0], 4)  # 4 channels of 1 kHz raw, averaged


def test_nwb_behavior_option_unknown_name_lists_the_series(voltage_nwb, tmp_path, capsys):
    path, _ = voltage_nwb
    out = tmp_path / "s.zarr"
    assert run([str(path), "--out", str(out), "--units", "all", "--behavior", "velocity", "--behavior", "speed"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"bin_spikes: error: --behavior speed: {path} has no TimeSeries of that name; its TimeSeries "
                   "are: laser (IntervalSeries), lfp (ElectricalSeries), raw (ElectricalSeries), velocity (TimeSeries)")
    assert not out.exists()


def test_nwb_series_of_the_same_name_get_the_same_names_in_both_modes(tmp_path):
    """Two 'velocity' series (acquisition and behaviour): the second is prefixed by its
    container, and --behavior names them exactly as the default mode stores them."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries

    nwb = NWBFile(session_description="t", identifier="c", session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    nwb.add_unit(spike_times=np.sort(np.random.default_rng(0).uniform(0, 5, size=30)))
    t = np.arange(0, 5, 0.01)
    nwb.add_acquisition(TimeSeries(name="velocity", data=np.sin(t), unit="cm/s", timestamps=t))
    module = nwb.create_processing_module("behavior", "behaviour")
    module.add(BehavioralTimeSeries(name="wheel", time_series=[
        TimeSeries(name="velocity", data=np.cos(t), unit="cm/s", timestamps=t)]))
    with NWBHDF5IO(str(tmp_path / "c.nwb"), "w") as io:
        io.write(nwb)
    args = [str(tmp_path / "c.nwb"), "--bin-size", "0.1", "--units", "all"]
    default = run_ok([*args, "--out", str(tmp_path / "a.zarr")])
    assert sorted(default["behavior"].keys()) == ["velocity", "wheel_velocity"]
    named = run_ok([*args, "--out", str(tmp_path / "b.zarr"), "--behavior", "wheel_velocity"])
    assert sorted(named["behavior"].keys()) == ["wheel_velocity"]
    np.testing.assert_array_equal(named["behavior/wheel_velocity"][:], default["behavior/wheel_velocity"][:])
    np.testing.assert_allclose(default["behavior/wheel_velocity"][5], np.cos(t[50:60]).mean(), rtol=1e-5)


def test_uint16_counts_chunks_are_at_least_one_mib(tmp_path):
    counts = np.random.default_rng(0).poisson(0.5, size=(20000, 60)).astype(np.uint16)
    np.savez(tmp_path / "b.npz", counts=counts, bin_size=0.01)
    g = run_ok([str(tmp_path / "b.npz"), "--out", str(tmp_path / "b.zarr")])
    arr = g["counts"]
    assert arr.dtype == np.uint16 and arr.chunks[1] == 60
    assert arr.chunks[0] * 60 * arr.dtype.itemsize >= 1 << 20  # whole rows, >= 1 MiB
    np.testing.assert_array_equal(arr[:], counts)


def test_tensorstore_opens_the_store(tmp_path):
    """Every array, units/quality too, is plain Zarr v3 that tensorstore's zarr3 driver reads."""
    ts = pytest.importorskip("tensorstore")
    times, clusters = make_phy(tmp_path / "phy", n_units=4)
    out = tmp_path / "s.zarr"
    g = run_ok([str(tmp_path / "phy"), "--out", str(out), "--bin-size", "0.01", "--units", "all"])

    def read(name):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / name)}}
        return ts.open(spec, read=True).result().read().result()

    np.testing.assert_array_equal(read("counts"), g["counts"][:])
    np.testing.assert_array_equal(read("bin_start_s"), g["bin_start_s"][:])
    codes = read("units/quality")
    categories = g["units/quality"].attrs["categories"]
    assert [categories[c] for c in codes] == unit_quality(g) == ["mua", "good", "good", "mua"]


@pytest.mark.parametrize("threads", [1, 3])
def test_cluster_pre_pass_counts_every_chunk_once(tmp_path, monkeypatch, threads):
    """The pre-pass counts chunks on threads and merges them in any order into the same
    per-cluster counts; a bad chunk (negative id) still fails with its one-line error."""
    import functools

    from preprocess import source_phy
    from preprocess.errors import UserError

    ids = np.random.default_rng(0).integers(0, 70_000, 1000).astype(np.int32)  # dense and sparse chunks
    ids[:500] %= 50
    path = tmp_path / "spike_clusters.npy"
    np.save(path, ids)
    monkeypatch.setattr(source_phy, "iter_npy_chunks", functools.partial(source_phy.iter_npy_chunks, step=37))
    got_ids, got_counts = source_phy.cluster_spike_counts(str(path), threads)
    ref_ids, ref_counts = np.unique(ids, return_counts=True)
    assert np.array_equal(got_ids, ref_ids) and np.array_equal(got_counts, ref_counts)
    ids[900] = -3
    np.save(path, ids)
    with pytest.raises(UserError, match="negative cluster ids"):
        source_phy.cluster_spike_counts(str(path), threads)
