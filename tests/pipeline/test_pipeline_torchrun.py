"""The trainer under torchrun (2 ranks on CPU, gloo): mining in the global pool, Prometheus
metrics from every rank (parsed, and scraped by a real Prometheus server), SIGTERM and
SIGKILL mid-run, and refusal of an incompatible resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.config import build_config
from pipeline_helpers import REPO, make_store, tiny_overrides
from preprocess.errors import UserError

CONTRACT = ("myow_train_steps", "myow_train_samples", "myow_loss", "myow_mining_weight", "myow_learning_rate",
            "myow_ema_momentum", "myow_step_seconds", "myow_data_wait_seconds", "myow_mining_pool_size",
            "myow_mined_same_trial_ratio", "myow_mined_time_gap_seconds", "myow_mined_label_agreement_ratio",
            "myow_embedding_std", "myow_world_size")


def _free_port(consecutive: int = 1) -> int:
    """A port p such that p .. p + consecutive - 1 are free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive >= 65535:
            continue
        try:
            socks = []
            for p in range(port, port + consecutive):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _torchrun(store: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    overrides = tiny_overrides(store, run_dir, steps=steps, **{"run.dist_timeout_s": 60, "train.log_every": 1})
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "pipeline.train",
            *[a for o in overrides + list(extra) for a in ("--set", o)]]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal torchrun and its ranks (torchrun starts the ranks in their own process groups)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in reversed(procs):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("torchrun"), n_trials=60)


# --------------------------------------------------------------------------- global pool


def _rank_step(rank: int, world: int, port: int, out_dir: str) -> None:
    """One train_step on rank ``rank``: fixed anchors and pool per rank, eval-mode BatchNorm
    (running statistics: each row's representation does not depend on its batch)."""
    import functools

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pipeline.distributed import all_gather_pool, init_distributed, shutdown, wrap_ddp

    env = init_distributed("cpu", timeout_s=60)
    anchors, pool, model, opt, cfg, plan = _step_inputs(range(rank, rank + 1))
    net = wrap_ddp(model, env)
    out = _run_step(net, opt, anchors, pool, cfg, plan, functools.partial(all_gather_pool, env=env))
    torch.save({"out": out, "model": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    del net
    shutdown(env)


def _step_inputs(ranks, B: int = 16, L: int = 24):
    """Model, optimizer and the anchors/pools of ``ranks`` (concatenated), fixed by seed."""
    from pipeline.build import build_model, build_optimizer
    from pipeline.step import Plan

    cfg = build_config(overrides=["method.k=1", "method.mining_view=anchor", "optim.name=sgd", "optim.lr=0.5",
                                  "optim.warmup_epochs=0", "method.mining_ramp_epochs=0", "model.hidden_dim=16",
                                  "model.num_blocks=2", "model.out_dim=8", "model.predictor_hidden=16",
                                  "method.mining_weight=1.0"])
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    model.eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    opt = build_optimizer(cfg, model.online_parameters())
    xs, pools = [], []
    for r in ranks:
        g = torch.Generator().manual_seed(100 + r)
        x1, x2 = torch.randn(B, 12, generator=g), torch.randn(B, 12, generator=g)
        meta = {"store": torch.zeros(B, dtype=torch.int64), "time": torch.arange(B, dtype=torch.float64) + 1000 * r,
                "trial": torch.arange(B) + 1000 * r, "row": torch.arange(B) + 1000 * r}
        xp = torch.randn(L, 12, generator=g)
        pmeta = {"store": torch.zeros(L, dtype=torch.int64), "time": torch.arange(L, dtype=torch.float64) + 500 * r,
                 "trial": torch.arange(L) + 500 * r, "row": torch.arange(L) + 500 * r}
        xs.append((x1, x2, meta))
        pools.append((xp, pmeta))
    cat = lambda parts: torch.cat(parts)  # noqa: E731
    anchors = (cat([x[0] for x in xs]), cat([x[1] for x in xs]), None,
               {k: cat([x[2][k] for x in xs]) for k in xs[0][2]})
    pool = (cat([p[0] for p in pools]), {k: cat([p[1][k] for p in pools]) for k in pools[0][1]})
    plan = Plan(steps_per_epoch=1, total_steps=10, warmup_steps=0, mining_warmup_steps=0, mining_ramp_steps=0,
                min_time_gap_s=0.0)
    return anchors, pool, model, opt, cfg, plan


def _run_step(net, opt, anchors, pool, cfg, plan, gather):
    from pipeline.step import train_step

    return train_step(net, opt, anchors, pool, 0, cfg, torch.Generator().manual_seed(0), plan=plan, gather=gather)


def _spawn_two_ranks(target, tmp_path: Path, name: str) -> list[dict]:
    """Run ``target(rank, 2, port, out_dir)`` in 2 spawned processes; their saved ``name{rank}.pt``."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_mine_in_the_global_pool_like_one_rank(tmp_path):
    ranks = _spawn_two_ranks(_rank_step, tmp_path, "rank")

    # the same global pool of 2 x L in one process: each rank's anchors give that rank's losses
    for r in range(2):
        _, global_pool, model, opt, cfg, plan = _step_inputs(range(2))
        anchors = _step_inputs(range(r, r + 1))[0]
        ref = _run_step(model, opt, anchors, global_pool, cfg, plan, lambda y, m: (y, m))
        got = ranks[r]["out"]
        assert got["mining_pool_size"] == 48 == ref["mining_pool_size"]
        for key in ("loss_augmented", "loss_mined", "mined_time_gap_seconds"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # one step over both ranks' anchors at once = DDP's averaged gradients (SGD, equal B)
    anchors, global_pool, model, opt, cfg, plan = _step_inputs(range(2))
    _run_step(model, opt, anchors, global_pool, cfg, plan, lambda y, m: (y, m))
    for key, value in model.state_dict().items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key  # ranks stay identical
        assert torch.allclose(ranks[0]["model"][key].float(), value.float(), atol=1e-5), key


# --------------------------------------------------------------------------- a live 2-rank run


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _wait(condition, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition()
            if value:
                return value
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended early (exit {proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_rank_run_serves_metrics_scraped_by_prometheus_and_stops_on_sigterm(store, tmp_path):
    run_dir = tmp_path / "run"
    port = _free_port(consecutive=2)
    cmd = _torchrun(store, run_dir, 100_000, f"metrics.port={port}", "train.checkpoint_every=100000")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def running(p: int):
            fam = _scrape(p)
            steps = [s.value for s in fam["myow_train_steps"].samples if s.name == "myow_train_steps_total"]
            return fam if steps and steps[0] > 3 else None  # the series appears with the first step

        families = [_wait(lambda p=p: running(p), 120, f"metrics on port {p}", proc) for p in (port, port + 1)]
        for rank, fam in enumerate(families):
            assert set(CONTRACT) <= set(fam), set(CONTRACT) - set(fam)
            assert all(s.labels.get("rank") == str(rank) for s in fam["myow_train_steps"].samples)
            assert fam["myow_world_size"].samples[0].value == 2
            assert fam["myow_mining_pool_size"].samples[0].value == 2 * 64  # world_size x L
            terms = {s.labels["term"] for s in fam["myow_loss"].samples}
            assert terms == {"augmented", "mined", "total"}

        prometheus = shutil.which("prometheus")
        if prometheus:  # the end-to-end scrape (installed by .ci/run)
            web = _free_port()
            (tmp_path / "prometheus.yml").write_text(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                f"  - job_name: myow\n    static_configs:\n      - targets: ['127.0.0.1:{port}', '127.0.0.1:{port + 1}']\n")
            server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{web}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                def both_ranks():
                    url = f"http://127.0.0.1:{web}/api/v1/query?query=myow_train_steps_total"
                    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
                    found = {r["metric"]["rank"]: float(r["value"][1]) for r in body["data"]["result"]}
                    return found if set(found) == {"0", "1"} and min(found.values()) > 0 else None

                assert _wait(both_ranks, 60, "prometheus scraping both ranks", proc)
            finally:
                server.terminate()
                server.wait(10)

        # SIGTERM to the ranks (what a scheduler sends before preemption): every rank
        # checkpoints the same step and exits cleanly, so torchrun exits 0. (A SIGTERM to
        # torchrun itself is forwarded to the ranks, which do the same, but torchrun then
        # reports the signal as its own failure.)
        import psutil

        for worker in psutil.Process(proc.pid).children():
            worker.send_signal(signal.SIGTERM)
        proc.wait(90)
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-3000:]
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        assert ckpt["world_size"] == 2 and len(ckpt["data"]) == 2 and ckpt["step"] == _steps(run_dir)[-1]
        assert "stopped by signal" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    if not prometheus:
        pytest.skip("prometheus is not installed (apt-get install prometheus): the end-to-end scrape did not run")


def test_a_two_rank_run_killed_with_sigkill_resumes_when_rerun(store, tmp_path):
    run_dir = tmp_path / "run"
    cmd = _torchrun(store, run_dir, 60, "train.checkpoint_every=10")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: (run_dir / "checkpoint.pt").exists() and len(_steps(run_dir)) >= 24, 120,
              "a checkpoint and a few more steps", proc)
    finally:
        _kill_tree(proc)  # SIGKILL: no chance to clean up
    killed_at = _steps(run_dir)[-1]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= saved < 60 and killed_at < 60

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert f"resuming {run_dir} at step {saved}" in log, log[-3000:]
    assert _steps(run_dir) == list(range(1, 61))  # continuing, not restarting; nothing twice
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 60
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 60


def test_resume_refuses_another_world_size_or_config(store, tmp_path):
    from pipeline.checkpoint import load_checkpoint
    from pipeline.loop import train
    from pipeline.startup import check_resumable

    run_dir, _ = train(build_config(overrides=tiny_overrides(store, tmp_path / "r", steps=3)))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = build_config(overrides=tiny_overrides(store, run_dir, steps=30))
    check_resumable(ckpt, cfg, 1, run_dir)  # more steps: fine
    with pytest.raises(UserError, match="--nproc_per_node=1"):
        check_resumable(ckpt, cfg, 2, run_dir)
    with pytest.raises(UserError, match="model.hidden_dim"):
        check_resumable(ckpt, build_config(overrides=tiny_overrides(store, run_dir, **{"model.hidden_dim": 32})),
                        1, run_dir)


def test_a_baseline_trains_under_torchrun(store, tmp_path):
    """RP (pairs from the rank-sharded temporal sampler) with 2 ranks: every step on both
    ranks, the samples of both counted, the run read out at the end."""
    run_dir = tmp_path / "rp"
    proc = subprocess.run(_torchrun(store, run_dir, 6, "method.name=rp"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["world_size"] == 2 and rows[-1]["samples"] == 6 * 2 * 32
    assert 0 <= rows[-1]["pretext_accuracy"] <= 1
    assert "reach_acc" in json.loads((run_dir / "eval.json").read_text())


def _simclr_inputs(ranks, B: int = 8):
    """A SimCLR model (eval-mode BatchNorm with running statistics), SGD, and the views of ``ranks``."""
    from pipeline.build import build_optimizer
    from pipeline.methods import build_simclr

    cfg = build_config(overrides=["method.name=simclr", "optim.name=sgd", "optim.lr=0.5", "optim.warmup_epochs=0",
                                  "model.hidden_dim=16", "model.num_blocks=2", "model.out_dim=8",
                                  "model.predictor_hidden=16"])
    torch.manual_seed(0)
    model = build_simclr(cfg, 12)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    views = []
    for r in ranks:
        g = torch.Generator().manual_seed(200 + r)
        views.append((torch.randn(B, 12, generator=g), torch.randn(B, 12, generator=g)))
    x1, x2 = torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views])
    return model, build_optimizer(cfg, model.online_parameters()), (x1, x2, None, {}), cfg


def _simclr_rank_step(rank: int, world: int, port: int, out_dir: str) -> None:
    import functools

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pipeline.baseline_steps import contrastive_step
    from pipeline.distributed import all_gather_with_grad, init_distributed, shutdown, wrap_ddp
    from pipeline.step import Plan

    env = init_distributed("cpu", timeout_s=60)
    model, opt, anchors, cfg = _simclr_inputs(range(rank, rank + 1))
    net = wrap_ddp(model, env)
    plan = Plan(steps_per_epoch=1, total_steps=10, warmup_steps=0, mining_warmup_steps=0, mining_ramp_steps=0,
                min_time_gap_s=0.0)
    out = contrastive_step(net, opt, anchors, None, 0, cfg, torch.Generator(), plan=plan,
                           gather_rows=functools.partial(all_gather_with_grad, env=env))
    torch.save({"out": out, "model": model.state_dict()}, f"{out_dir}/simclr{rank}.pt")
    del net
    shutdown(env)


def test_simclr_negatives_come_from_every_rank(tmp_path):
    """2 ranks x B with the gather = one process with the 2B batch: the same loss and update."""
    from pipeline.baseline_steps import contrastive_step
    from pipeline.step import Plan

    ranks = _spawn_two_ranks(_simclr_rank_step, tmp_path, "simclr")
    model, opt, anchors, cfg = _simclr_inputs(range(2))
    plan = Plan(steps_per_epoch=1, total_steps=10, warmup_steps=0, mining_warmup_steps=0, mining_ramp_steps=0,
                min_time_gap_s=0.0)
    ref = contrastive_step(model, opt, anchors, None, 0, cfg, torch.Generator(), plan=plan)
    for r in range(2):
        assert ranks[r]["out"]["loss_total"] == pytest.approx(ref["loss_total"], rel=1e-5)
    for key, value in model.state_dict().items():
        assert torch.allclose(ranks[0]["model"][key].float(), value.float(), atol=1e-5), key
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
