"""Bad inputs to pipeline.train / pipeline.evaluate / the demo: each fails with one line
``<prog>: error: ...`` naming the file or key and the fix (exit 2 usage, 1 data), no
traceback, and leaves no run directory or output behind and no existing file changed."""

from __future__ import annotations

import copy
import hashlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.demo as demo
import pipeline.evaluate as ev
import pipeline.loop as loop
import pipeline.readout.neural as readout_neural
import pipeline.startup as startup
import pipeline.train as train_mod
from pipeline.config import build_config
from preprocess.errors import run_cli
from pipeline_helpers import REPO, make_store, tiny_overrides

TRAIN, EVAL = "python -m pipeline.train", "python -m pipeline.evaluate"
HAS_PROC = Path("/proc/self").is_dir()


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("robust-store"), n_trials=20, bins_per_trial=12, n_units=8)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    """A finished 2-step run (its checkpoint is the base of the crafted ones)."""
    run_dir = tmp_path_factory.mktemp("robust-run") / "run"
    train_mod.train(build_config(overrides=tiny_overrides(store, run_dir, steps=2)))
    return run_dir


def snapshot(path: Path) -> dict | None:
    """Every file and directory under ``path`` with its content hash (None: path absent)."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def fails(capsys, main, argv, prog, code, *needles):
    """Run ``main(argv)`` through run_cli: exit ``code``, exactly one stderr line
    ``prog: error: ...`` holding every needle, no traceback, nothing on stdout."""
    rc = run_cli(main, argv, prog)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err and out == ""
    return lines[0]


def train_argv(store: str, run_dir: Path, **extra) -> list[str]:
    argv = []
    for item in tiny_overrides(store, run_dir, steps=2, **extra):
        argv += ["--set", item]
    return argv


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- 1. start-up failures


@pytest.mark.parametrize("extra, code, needle", [
    ({"metrics.port": "BUSY"}, 1, "metrics.port"),
    ({"metrics.port": "BUSY", "metrics.host": "192.0.2.1"}, 1, "metrics.host"),  # not an address of this machine
    ({"metrics.port": "BUSY", "metrics.host": "bad..host"}, 1, "metrics.host"),
    ({"optim.lr": "inf"}, 2, "optim.lr"),
    ({"optim.lr": ".nan"}, 2, "optim.lr"),
    ({"optim.lr": 0}, 2, "optim.lr"),
    ({"data.min_time_gap_s": ".inf"}, 2, "data.min_time_gap_s"),
    ({"run.seed": 2**70}, 2, "run.seed"),
    ({"run.seed": -1}, 2, "run.seed"),
])
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_failed_start_writes_nothing(store, tmp_path, capsys, busy_port, extra, code, needle, existing):
    run_dir = tmp_path / "runs" / "r"
    if existing:
        run_dir.mkdir(parents=True)
        (run_dir / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    extra = {k: (busy_port if v == "BUSY" else v) for k, v in extra.items()}
    fails(capsys, train_mod.main, train_argv(store, run_dir, **extra), TRAIN, code, needle)
    assert snapshot(tmp_path) == before  # no run.dir, no config.yaml / metrics.jsonl, nothing changed


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "afile", "exists and is not a directory"),
    (lambda tmp: tmp / "afile" / "sub", "is a file"),
    pytest.param(lambda tmp: Path("/proc/self/myow-run"), "not writable",
                 marks=pytest.mark.skipif(not HAS_PROC, reason="needs /proc")),
    pytest.param(lambda tmp: Path("/proc/self"), "not writable",
                 marks=pytest.mark.skipif(not HAS_PROC, reason="needs /proc")),
])
def test_bad_run_dir_is_one_line(store, tmp_path, capsys, make, needle):
    (tmp_path / "afile").write_text("not a run")
    before = snapshot(tmp_path)
    fails(capsys, train_mod.main, train_argv(store, make(tmp_path)), TRAIN, 1, "run.dir", needle)
    assert snapshot(tmp_path) == before


def test_start_up_failure_after_mkdir_removes_what_it_created(store, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(startup, "atomic_write_text", broken)
    fails(capsys, train_mod.main, train_argv(store, tmp_path / "a" / "b"), TRAIN, 1, "run.dir", "No space left")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- 4. YAML files


@pytest.mark.parametrize("content, needles", [
    (b"optim:\n  lr: 0.1\n  name: adam\xe9\n", ["not UTF-8 text"]),
    (b"optim:\n  lr: 1\n   bad: 2\n", ["YAML syntax error", "line 3, column 7"]),
    (b"optim:\n  lr: [1, 2\n", ["YAML syntax error", "line 3, column 1"]),
    (b"optim: [\n", ["YAML syntax error", "line 2, column 1"]),
    (b"- 1\n- 2\n", ["mapping of sections"]),
])
def test_bad_yaml_config_is_one_line(store, tmp_path, capsys, content, needles):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    line = fails(capsys, train_mod.main, ["--config", str(path), *train_argv(store, tmp_path / "r")], TRAIN, 2,
                 f"--config {path}", *needles)
    assert "\\x" not in line and not (tmp_path / "r").exists()


def test_config_directory_is_one_line(tmp_path, capsys):
    fails(capsys, train_mod.main, ["--config", str(tmp_path)], TRAIN, 2, "is a directory")


def test_non_utf8_config_subprocess(store, tmp_path):
    path = tmp_path / "latin1.yaml"
    content = "optim:\n  name: adamw  # réglé\n".encode("latin-1")
    path.write_bytes(content)
    offset = content.index(bytes([0xE9]))
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(path),
                           *train_argv(store, tmp_path / "r")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"{TRAIN}: error: --config {path}: not UTF-8 text (byte 0xe9 at "
                                                f"offset {offset}); save the file as UTF-8"]
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 5. absurd sizes


@pytest.mark.parametrize("key, value", [
    ("data.jitter_max_bins", "1e7"), ("model.hidden_dim", "2e8"), ("optim.batch_size", "1e9"),
    ("method.pool_size", "1e9"), ("method.k", "1e9"), ("model.out_dim", "1e9"), ("model.predictor_hidden", "1e9"),
    ("model.num_blocks", "1e6"), ("model.mined_predictor_hidden", "1e9"), ("model.projector", "[1000000, 8]"),
])
def test_absurd_sizes_are_refused_at_validation(store, tmp_path, capsys, key, value):
    fails(capsys, train_mod.main, train_argv(store, tmp_path / "r", **{key: value}), TRAIN, 2, f"'{key}'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overrides, needle", [
    (["model.hidden_dim=65536"], "model.hidden_dim"),  # 65536^2 x 3 hidden blocks
    (["model.out_dim=65536", "model.predictor_hidden=65536"], "model.predictor_hidden"),
    (["optim.batch_size=1048576", "method.pool_size=1048576"], "method.pool_size"),
])
def test_absurd_combinations_are_refused(overrides, needle):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        build_config(overrides=overrides)


def test_shipped_configs_are_within_the_bounds():
    from pipeline.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path, ["data.path=x"])


# --------------------------------------------------------------------------- 6. checkpoints


class _NotAllowed:
    pass


def _craft(kind: str, good: dict, path: Path) -> None:
    ckpt = copy.deepcopy(good)
    if kind == "garbage":
        path.write_bytes(b"garbage\x00" * 32)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "pickled-object":
        torch.save({"model": _NotAllowed()}, path)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        if kind == "wrong-shape":
            key = next(iter(ckpt["model"]))
            ckpt["model"][key] = torch.zeros(3, 3)
        elif kind == "step-abc":
            ckpt["step"] = "abc"
        elif kind == "config-not-weights":
            ckpt["config"]["model"]["hidden_dim"] = 32
        elif kind == "config-section":
            ckpt["config"]["model"] = 5
        elif kind == "normalization":
            ckpt["normalization"] = {"mean": 5}
        elif kind == "optimizer":
            ckpt["optimizer"]["param_groups"] = []
        elif kind == "rng":
            ckpt["rng"] = [{"torch": 5}]
        torch.save(ckpt, path)


CHECKPOINTS = [  # (kind, train needle, evaluate needle or None when evaluate does not read that part)
    ("garbage", "not a readable checkpoint", "not a readable checkpoint"),
    ("truncated", "truncated or corrupt", "truncated or corrupt"),
    ("pickled-object", "Python objects", "Python objects"),
    ("directory", "is a directory", "is a directory"),
    ("wrong-shape", "model weights", "model weights"),
    ("step-abc", "step is 'abc'", "step is 'abc'"),
    ("config-not-weights", "model weights", "model weights"),
    ("config-section", "config section 'model'", "config section 'model'"),
    ("normalization", "normalization", "normalization"),
    ("optimizer", "optimizer state", None),
    ("rng", "random state", None),
]


@pytest.mark.parametrize("kind, train_needle, eval_needle", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_bad_checkpoint_is_one_line(store, trained, tmp_path, capsys, kind, train_needle, eval_needle):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    good = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    _craft(kind, good, run_dir / "checkpoint.pt")
    before = snapshot(run_dir)
    extra = {"model.hidden_dim": 32} if kind == "config-not-weights" else {}  # the config agrees, the weights not
    line = fails(capsys, train_mod.main, train_argv(store, run_dir, **extra), TRAIN, 1,
                 f"{run_dir / 'checkpoint.pt'}", train_needle, "delete it or use another run.dir")
    assert "weights_only" not in line and "--run" not in line
    assert snapshot(run_dir) == before
    if eval_needle:
        line = fails(capsys, ev.main, ["--run", str(run_dir), "--no-plots"], EVAL, 1,
                     f"{run_dir / 'checkpoint.pt'}", eval_needle, "--run")
        assert "weights_only" not in line
        assert snapshot(run_dir) == before


def test_resume_on_other_data_is_one_line_subprocess(tmp_path):
    """Refused while the data loads (the store at data.path was replaced: other unit count):
    stderr is the error alone, run as the user runs it (logging on; INFO lines of the
    loading are held back until the run starts)."""
    store = make_store(tmp_path / "data", n_trials=20, bins_per_trial=12, n_units=8)
    run_dir = tmp_path / "run"
    train_mod.train(build_config(overrides=tiny_overrides(store, run_dir, steps=2)))
    shutil.rmtree(store)
    assert make_store(tmp_path / "data", n_trials=20, bins_per_trial=12, n_units=10) == store
    before = snapshot(run_dir)
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *train_argv(store, run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{TRAIN}: error: "), proc.stderr
    assert "has 10 units" in lines[0]
    assert snapshot(run_dir) == before


def test_held_logs_pass_on_success_and_drop_on_error(caplog):
    import logging

    from pipeline.runtime import held_logs

    log = logging.getLogger("pipeline.test_hold")
    with caplog.at_level(logging.INFO):
        with held_logs():
            log.info("held")
            log.warning("at once")
            assert [r.getMessage() for r in caplog.records] == ["at once"]
        assert [r.getMessage() for r in caplog.records] == ["at once", "held"]
        caplog.clear()
        with pytest.raises(RuntimeError):
            with held_logs():
                log.info("dropped")
                raise RuntimeError
        assert caplog.records == []
        log.info("after")
        assert [r.getMessage() for r in caplog.records] == ["after"]


# --------------------------------------------------------------------------- 2. embeddings export


@pytest.fixture
def no_evaluation(monkeypatch):
    """The export target must be refused before any evaluation."""
    def boom(*args, **kwargs):
        raise AssertionError("evaluated before checking --export-embeddings")

    monkeypatch.setattr(readout_neural, "evaluate_session", boom)


@pytest.mark.parametrize("make, extra, code, needle", [
    (lambda tmp: tmp / "other.npz", [], 1, "--overwrite"),  # an existing unrelated file
    (lambda tmp: tmp / "out", [], 1, "is a directory"),
    (lambda tmp: tmp / "missing" / "e.npz", [], 1, "does not exist"),
    pytest.param(lambda tmp: Path("/proc/self/e.npz"), [], 1, "not writable",
                 marks=pytest.mark.skipif(not HAS_PROC, reason="needs /proc")),
    (lambda tmp: "", [], 2, "empty file name"),
    (lambda tmp: None, ["--overwrite"], 2, "--overwrite"),
])
def test_bad_export_target_is_refused_before_evaluating(trained, tmp_path, capsys, no_evaluation, make, extra,
                                                        code, needle):
    (tmp_path / "other.npz").write_text("precious, not embeddings")
    (tmp_path / "out").mkdir()
    before, run_before = snapshot(tmp_path), snapshot(trained)
    target = make(tmp_path)
    argv = ["--run", str(trained), "--no-plots", *extra]
    if target is not None:
        argv += ["--export-embeddings", str(target)]
    fails(capsys, ev.main, argv, EVAL, code, needle)
    assert snapshot(tmp_path) == before and snapshot(trained) == run_before


def test_export_overwrite_replaces_the_file(trained, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "emb.npz"
    out.write_text("old")
    assert run_cli(ev.main, ["--run", str(trained), "--no-plots", "--export-embeddings", str(out), "--overwrite"],
                   EVAL) == 0
    capsys.readouterr()
    assert np.load(out)["embedding"].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]  # no temporary file left


def test_evaluate_run_dir_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails(capsys, ev.main, ["--run", str(tmp_path / "f")], EVAL, 1, "is a file")


# --------------------------------------------------------------------------- 3. the demo resumes


def _demo_overrides(run_dir: Path | None, steps: int) -> list[str]:
    values = {"run.threads": 1, "run.progress": False, "run.device": "cpu", "train.max_steps": steps,
              "train.log_every": 1, "optim.batch_size": 32, "method.pool_size": 64, "model.hidden_dim": 16,
              "model.num_blocks": 2, "model.out_dim": 8, "model.predictor_hidden": 16, "eval.tsne": False,
              "optim.warmup_epochs": 1, "method.mining_ramp_epochs": 1}
    if run_dir is not None:
        values["run.dir"] = str(run_dir)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_UNITS", 8)
    monkeypatch.setattr(demo, "DEMO_TRIALS", 24)


def test_demo_stop_then_rerun_resumes(tmp_path, capsys, small_demo, monkeypatch):
    from pipeline.checkpoint import load_checkpoint

    run_dir = tmp_path / "demo"
    monkeypatch.setattr(loop.StopRequest, "requested", lambda self, env: True)  # as if Ctrl-C at step 1
    assert run_cli(demo.run_demo, _demo_overrides(run_dir, 3), TRAIN) == 0
    out = capsys.readouterr().out
    assert "stopped at step 1" in out and "rerun the same command to resume" in out
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 1
    nwb = snapshot(run_dir / "session.nwb")

    monkeypatch.undo()
    monkeypatch.setattr(demo, "DEMO_UNITS", 8)
    monkeypatch.setattr(demo, "DEMO_TRIALS", 24)
    assert run_cli(demo.run_demo, _demo_overrides(run_dir, 3), TRAIN) == 0  # the same command resumes
    out, err = capsys.readouterr()
    assert "already holds a run" not in err and "--overwrite" not in err
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3 and (run_dir / "eval.json").is_file()
    assert snapshot(run_dir / "session.nwb") == nwb  # the simulated session was reused


def test_demo_interrupted_before_a_checkpoint_names_how_to_resume(tmp_path, capsys, small_demo, monkeypatch):
    import preprocess.simulate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)  # no run.dir: runs/demo-<time> here
    monkeypatch.setattr(preprocess.simulate, "simulate_reach_session", interrupted)
    line = fails(capsys, demo.run_demo, _demo_overrides(None, 2), TRAIN, 130, "interrupted",
                 "--set run.dir=runs/demo-")
    assert "--overwrite" not in line


@pytest.mark.parametrize("setup, needle", [
    (lambda d: d.write_text("x"), "exists and is not a directory"),
    (lambda d: (d.mkdir(), (d / "checkpoint.pt").write_text("x")), "not a demo run"),
    (lambda d: (d.mkdir(), (d / "session.zarr").mkdir()), "not a recording store"),
])
def test_demo_bad_run_dir_is_one_line(tmp_path, capsys, small_demo, setup, needle):
    run_dir = tmp_path / "demo"
    setup(run_dir)
    before = snapshot(tmp_path)
    line = fails(capsys, train_mod.main, ["--demo", "--set", f"run.dir={run_dir}"], TRAIN, 1, needle)
    assert "--overwrite" not in line and snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 7. checked before the data


@pytest.mark.parametrize("kind, needle", [
    ("wrong-shape", "model weights"), ("config-not-weights", "model weights"), ("optimizer", "optimizer state"),
    ("rng", "random state"), ("normalization", "normalization"),
])
def test_bad_checkpoint_is_refused_before_reading_the_data(store, trained, tmp_path, capsys, monkeypatch, kind,
                                                           needle):
    """The checkpoint's model, optimizer and random states are restored into a throwaway model
    sized from its normalisation before the data is read: one line, no log line before it."""
    def boom(*args, **kwargs):
        raise AssertionError("the data was read before the checkpoint was checked")

    monkeypatch.setattr(startup, "build_train_data", boom)
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    good = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    _craft(kind, good, run_dir / "checkpoint.pt")
    before = snapshot(run_dir)
    extra = {"model.hidden_dim": 32} if kind == "config-not-weights" else {}
    fails(capsys, train_mod.main, train_argv(store, run_dir, **extra), TRAIN, 1, f"{run_dir / 'checkpoint.pt'}",
          needle, "delete it or use another run.dir")
    assert snapshot(run_dir) == before


def test_precheck_leaves_the_random_state_alone(store, trained):
    import random

    import numpy as np

    from pipeline.checkpoint import load_checkpoint
    from pipeline.distributed import init_distributed
    from pipeline.methods import build_method

    cfg = build_config(overrides=tiny_overrides(store, trained, steps=2))
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    startup.precheck_resume(ckpt, cfg, build_method(cfg), init_distributed("cpu"), trained / "checkpoint.pt")
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


# --------------------------------------------------------------------------- 8. image shards, threads


def _image_shards(folder: Path) -> Path:
    """Tiny MNIST-like idx files (48 training images) sharded 16 per tar."""
    import gzip
    import struct

    import numpy as np

    from preprocess import shard_images

    rng = np.random.default_rng(0)
    src = folder / "idx"
    src.mkdir(parents=True)
    for prefix, n in (("train", 48), ("t10k", 16)):
        for kind, array in (("images-idx3", rng.integers(0, 255, (n, 28, 28))), ("labels-idx1", np.arange(n) % 4)):
            header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (src / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    out = folder / "shards"
    assert shard_images.main([str(src), "--out", str(out), "--shard-size", "16", "--no-progress"]) == 0
    return out


def test_truncated_shard_in_a_streamed_run_writes_nothing(tmp_path, capsys):
    shards = _image_shards(tmp_path / "data")
    capsys.readouterr()
    tar = shards / "train" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    run_dir = tmp_path / "runs" / "img"
    values = {"data.path": shards, "data.loading": "stream", "run.dir": run_dir, "run.threads": 1,
              "run.progress": False, "run.device": "cpu", "train.max_steps": 2, "model.encoder": "convnet",
              "model.out_dim": 8, "model.projector": "[16,8]", "model.predictor_hidden": 16,
              "model.mined_projector": "[16,8]", "method.k": 1, "method.pool_size": 8, "optim.batch_size": 8,
              "images.transform": "mnist", "images.image_size": 16}
    argv = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    fails(capsys, train_mod.main, argv, TRAIN, 1, f"{tar}: 3000 bytes, index.json says", "re-create the shard set")
    assert not (tmp_path / "runs").exists()


def test_thread_that_cannot_start_is_one_line(store, tmp_path, capsys, monkeypatch):
    """Out of threads or memory (a ulimit): the prefetcher's thread does not start; its cleanup
    then fails too. Both end as one line."""
    import threading

    from pipeline.data import stages

    def no_thread(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)  # never started
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(stages.Prefetcher, "_start", no_thread)
    fails(capsys, train_mod.main, train_argv(store, tmp_path / "r"), TRAIN, 1, "cannot start a thread",
          "ulimit")


def test_thread_limit_reaches_blas_libraries_loaded_later_subprocess():
    """set_threads(1) before scipy/scikit-learn are imported (the read-outs import them
    lazily): their own OpenBLAS/libgomp must start with one thread too (two made every
    logistic fit of the final read-out ~50x slower on a busy 2-core machine)."""
    code = ("import threadpoolctl\nfrom pipeline.runtime import set_threads\nset_threads(1)\n"
            "import sklearn.linear_model, scipy.optimize\n"
            "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1]", proc.stdout
