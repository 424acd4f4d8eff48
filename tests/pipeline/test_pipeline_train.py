"""pipeline.train: a short run on a tiny store, determinism, exact resume, checkpoints, CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import train as train_mod
from pipeline.build import build_model, build_optimizer
from pipeline.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from pipeline.config import ConfigError, build_config, load_config
from pipeline.kinds import build_train_data
from pipeline.loop import train
from pipeline.step import Plan, schedules, train_step
from preprocess.errors import UserError, run_cli
from pipeline_helpers import REPO, make_store, tiny_overrides, train_killed_at_fetch

STEP_KEYS = {"loss_augmented", "loss_mined", "loss_total", "mining_weight", "learning_rate", "ema_momentum",
             "mining_pool_size", "mined_same_trial_ratio", "mined_time_gap_seconds",
             "mined_label_agreement_ratio", "embedding_std"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("train"), n_trials=40, bins_per_trial=12, n_units=16)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_smoke_writes_run_and_is_deterministic(store, tmp_path):
    cfg = build_config(overrides=tiny_overrides(store, tmp_path / "a", steps=30))
    run_dir, results = train(cfg)
    assert run_dir == tmp_path / "a"
    for name in ("metrics.jsonl", "config.yaml", "checkpoint.pt", "eval.json", "mined_label_agreement.png"):
        assert (run_dir / name).is_file(), name
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert STEP_KEYS | {"step", "epoch", "samples", "step_seconds", "data_wait_seconds"} <= set(r)
        assert math.isfinite(r["loss_total"]) and math.isfinite(r["loss_augmented"])
        assert r["mined_same_trial_ratio"] == 0.0  # same-trial candidates are excluded
        assert r["mining_pool_size"] == 64 and r["samples"] == 32 * r["step"]
        assert 0.0 <= r["mined_label_agreement_ratio"] <= 1.0
    assert rows[-1]["mining_weight"] == 1.0 and rows[0]["learning_rate"] > 0
    # resolved config, loadable as is
    assert load_config(run_dir / "config.yaml") == cfg
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")  # weights_only=True
    assert set(CHECKPOINT_KEYS) <= set(ckpt) and ckpt["step"] == 30
    assert ckpt["normalization"]["mean"].shape == (16,)
    assert {"reach_acc", "reach_delta_acc", "accuracy", "macro_f1"} <= set(results)

    # same seed -> identical losses
    again, _ = train(build_config(overrides=tiny_overrides(store, tmp_path / "b", steps=30)))
    keys = ("loss_augmented", "loss_mined", "loss_total", "embedding_std", "mined_label_agreement_ratio")
    assert [[r[k] for k in keys] for r in _metrics(again)] == [[r[k] for k in keys] for r in rows]
    other, _ = train(build_config(overrides=tiny_overrides(store, tmp_path / "c", steps=30, **{"run.seed": 1})))
    assert [r["loss_total"] for r in _metrics(other)] != [r["loss_total"] for r in rows]


def test_resume_continues_the_exact_sequence(store, tmp_path):
    full_dir = tmp_path / "full"
    train(build_config(overrides=tiny_overrides(store, full_dir, steps=24)))

    # interrupted run: checkpoint every 10 steps, killed while fetching step 16's batch
    cut_dir = tmp_path / "cut"
    cfg = build_config(overrides=tiny_overrides(store, cut_dir, steps=24, **{"train.checkpoint_every": 10}))
    train_killed_at_fetch(cfg, fetch=16)
    assert load_checkpoint(cut_dir / "checkpoint.pt")["step"] == 10
    assert max(r["step"] for r in _metrics(cut_dir)) == 15

    train(cfg)  # resumes from step 10, rewrites metrics after it
    got, expect = _metrics(cut_dir), _metrics(full_dir)
    assert [r["step"] for r in got] == list(range(1, 25))
    for g, e in zip(got, expect):
        assert (g["loss_total"], g["loss_mined"], g["embedding_std"]) == (e["loss_total"], e["loss_mined"],
                                                                            e["embedding_std"])
    a = torch.load(cut_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(full_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_byol_skips_mining_with_the_same_step(store, tmp_path):
    run_dir, results = train(build_config(overrides=tiny_overrides(store, tmp_path / "byol", steps=10,
                                                                   **{"method.name": "byol", "train.eval_every": 5})))
    evals = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [5, 10] and "reach_acc" in evals[0]
    for r in _metrics(run_dir):
        assert r["mining_weight"] == 0.0 and r["loss_mined"] is None and r["mining_pool_size"] is None
        assert r["loss_total"] == pytest.approx(r["loss_augmented"])
    assert "reach_acc" in results


def test_train_step_contract(store):
    cfg = build_config(overrides=tiny_overrides(store, Path("unused")))
    data = build_train_data(cfg)
    plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
    torch.manual_seed(0)
    model = build_model(cfg, data.sessions[0].recording.n_units)
    opt = build_optimizer(cfg, model.online_parameters())
    gathered = {}

    def gather(pool_y, pool_meta):  # the distributed seam: sees the pool representations + metadata
        gathered["shape"] = tuple(pool_y.shape)
        gathered["keys"] = set(pool_meta)
        return pool_y, pool_meta

    before = [p.detach().clone() for p in model.target.parameters()]
    out = train_step(model, opt, next(data.sessions[0].anchors), next(data.sessions[0].pool), 5, cfg, torch.Generator().manual_seed(0),
                     plan=plan, gather=gather)
    assert STEP_KEYS <= set(out) and all(isinstance(out[k], float) for k in STEP_KEYS)
    assert gathered == {"shape": (64, 8), "keys": {"store", "time", "trial", "trial_rank", "row", "label"}}
    lr, tau, lam = schedules(5, cfg, plan)
    assert opt.param_groups[0]["lr"] == lr == out["learning_rate"] and out["mining_weight"] == lam
    assert out["loss_total"] == pytest.approx(out["loss_augmented"] + lam * out["loss_mined"], abs=1e-5)
    after = list(model.target.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # EMA moved the target


def test_min_trial_gap_keeps_mined_views_that_many_trials_away(store):
    """data.min_trial_gap: with the pool drawn from the same training trials, every mined
    view the step picks is at least that many trials (in recording order) from its anchor."""
    cfg = build_config(overrides=tiny_overrides(store, Path("unused")) + ["data.min_trial_gap=3"])
    data = build_train_data(cfg)
    plan = Plan.build(cfg, data.steps_per_epoch, data.sessions[0].min_time_gap_s)
    assert plan.min_trial_gap == 3
    torch.manual_seed(0)
    model = build_model(cfg, data.sessions[0].recording.n_units)
    opt = build_optimizer(cfg, model.online_parameters())
    seen = {}

    def gather(pool_y, pool_meta):
        seen["pool_rank"] = pool_meta["trial_rank"]
        return pool_y, pool_meta

    anchors, pool = next(data.sessions[0].anchors), next(data.sessions[0].pool)
    from model import miner
    real = miner.mine_views
    picked = {}

    def spy(query, keys, k, generator, exclude, **kw):
        picked["idx"] = real(query, keys, k, generator, exclude, **kw)
        return picked["idx"]

    import pipeline.step as step_mod
    step_mod.mine_views, saved = spy, step_mod.mine_views
    try:
        train_step(model, opt, anchors, pool, 5, cfg, torch.Generator().manual_seed(0), plan=plan, gather=gather)
    finally:
        step_mod.mine_views = saved
    idx = picked["idx"]
    ok = idx >= 0
    assert ok.sum() > 0
    gap = (anchors[-1]["trial_rank"][ok] - seen["pool_rank"][idx[ok]]).abs()
    assert int(gap.min()) >= 3


def test_schedules_follow_the_plan():
    cfg = build_config(overrides=["optim.warmup_epochs=10", "method.mining_ramp_epochs=10", "train.epochs=100",
                                  "optim.lr=0.1", "method.mining_weight=1.0"])
    plan = Plan.build(cfg, steps_per_epoch=2)
    assert plan.total_steps == 200 and plan.warmup_steps == 20 and plan.mining_ramp_steps == 20
    lr0, tau0, lam0 = schedules(0, cfg, plan)
    assert lr0 == pytest.approx(0.1 / 20) and tau0 == pytest.approx(0.98) and lam0 == pytest.approx(1 / 20)
    assert schedules(19, cfg, plan)[0] == pytest.approx(0.1) and schedules(19, cfg, plan)[2] == 1.0
    assert schedules(200, cfg, plan)[1] == pytest.approx(1.0)
    assert build_config(overrides=["train.max_steps=7"]).train.max_steps == 7
    assert Plan.build(build_config(overrides=["train.max_steps=7"]), 3).total_steps == 7


def test_constant_lr_schedule_is_the_base_rate_on_every_step():
    cfg = build_config(overrides=["optim.warmup_epochs=10", "train.epochs=100", "optim.lr=0.1",
                                  "optim.lr_schedule=constant"])
    plan = Plan.build(cfg, steps_per_epoch=2)
    assert {schedules(step, cfg, plan)[0] for step in (0, 5, 19, 100, 199, 250)} == {0.1}
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        build_config(overrides=["optim.lr_schedule=cosine"])


def test_target_init_copies_or_redraws_only_the_target_encoder():
    torch.manual_seed(0)
    copied = build_model(build_config(), in_dim=12)
    torch.manual_seed(0)
    redrawn = build_model(build_config(overrides=["model.target_init=reinit"]), in_dim=12)
    for model in (copied, redrawn):  # the online network is the same draw either way
        assert all(torch.equal(a, b) for a, b in zip(copied.encoder.parameters(), model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(copied.encoder.parameters(),
                                                  copied.target["encoder"].parameters()))
    weights = [(a, b) for a, b in zip(redrawn.encoder.parameters(), redrawn.target["encoder"].parameters())
               if a.dim() == 2]
    assert weights and not any(torch.equal(a, b) for a, b in weights)
    assert all(torch.equal(a, b) for a, b in zip(redrawn.projector.parameters(),
                                                  redrawn.target["projector"].parameters()))
    assert not any(p.requires_grad for p in redrawn.target.parameters())


def test_frozen_encoder_batchnorm_stops_updating_after_the_given_epochs(store, tmp_path):
    bn_keys = lambda state: {k: v for k, v in state.items() if k.startswith("encoder.") and "running_mean" in k}
    # constant schedules: the first 6 steps of a 6- and a 12-step run are then the same
    fixed = {"optim.lr_schedule": "constant", "optim.ema_schedule": "constant"}
    freeze = {"train.freeze_encoder_bn_epochs": 0.75}  # the tiny store: 8 steps per epoch, so step 6
    runs = {}
    for name, steps, extra in (("at6", 6, freeze), ("at12", 12, freeze), ("free", 12, {})):
        train(build_config(overrides=tiny_overrides(store, tmp_path / name, steps=steps, **extra, **fixed)))
        runs[name] = bn_keys(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"])
    assert Plan.build(build_config(overrides=[f"{k}={v}" for k, v in freeze.items()]),
                      steps_per_epoch=8).encoder_bn_frozen_step == 6
    frozen = runs["at12"]
    assert frozen and all(torch.equal(frozen[k], runs["at6"][k]) for k in frozen)  # no update after 6
    assert not all(torch.equal(runs["free"][k], frozen[k]) for k in frozen)  # without the freeze they keep moving
    with pytest.raises(ConfigError, match="train.freeze_encoder_bn_epochs"):
        build_config(overrides=["train.freeze_encoder_bn_epochs=-1"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli(train_mod.main, ["--set", "optim.lrr=1"], "train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: error: unknown config key 'optim.lrr'"]
    assert run_cli(train_mod.main, ["--set", f"data.path={tmp_path / 'nope.zarr'}", "--set",
                                    f"run.dir={tmp_path / 'r'}"], "train") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no recording store" in err[0]
    assert not (tmp_path / "r").exists()  # nothing partial left behind
    assert run_cli(train_mod.main, ["--config", str(tmp_path / "missing.yaml")], "train") == 2


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--set" in out.stdout and "demo" in out.stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_endpoint():
    import urllib.request

    from pipeline.metrics import MetricsServer, make_metrics

    server = MetricsServer("127.0.0.1", _free_port(), rank=0, world_size=1)
    try:
        out = {"loss_augmented": -1.5, "loss_mined": -0.5, "loss_total": -2.0, "mining_weight": 1.0,
               "learning_rate": 0.01, "ema_momentum": 0.99, "mining_pool_size": 64.0,
               "mined_same_trial_ratio": 0.0, "mined_time_gap_seconds": 3.2, "mined_label_agreement_ratio": 0.4,
               "embedding_std": 0.1}
        server.update(out, 32, 0.004, 0.001)
        server.update(out, 64, 0.006, 0.002)
        host, port = server.address
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    finally:
        server.close()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    rank = (("rank", "0"),)
    assert samples[("myow_train_steps_total", rank)] == 2
    assert samples[("myow_train_samples_total", rank)] == 64
    assert samples[("myow_loss", (("rank", "0"), ("term", "mined")))] == -0.5
    assert samples[("myow_mined_same_trial_ratio", rank)] == 0.0
    assert samples[("myow_step_seconds_count", rank)] == 2
    assert samples[("myow_data_wait_seconds_bucket", (("le", "+Inf"), ("rank", "0")))] == 2
    assert samples[("myow_world_size", rank)] == 1
    for name in ("myow_mining_weight", "myow_learning_rate", "myow_ema_momentum", "myow_mining_pool_size",
                 "myow_mined_time_gap_seconds", "myow_mined_label_agreement_ratio", "myow_embedding_std"):
        assert (name, rank) in samples, name
    assert type(make_metrics("127.0.0.1", 0)).__name__ == "NullMetrics"


def test_metrics_port_in_use_is_one_line_error(store, tmp_path):
    import socket

    from preprocess.errors import UserError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = build_config(overrides=tiny_overrides(store, tmp_path / "m", steps=2, **{"metrics.port": port}))
        with pytest.raises(UserError, match="metrics.port"):
            train(cfg)


def test_training_with_metrics_endpoint(store, tmp_path):
    cfg = build_config(overrides=tiny_overrides(store, tmp_path / "p", steps=3, **{"metrics.port": _free_port()}))
    run_dir, _ = train(cfg)
    assert len(_metrics(run_dir)) == 3


def test_mining_view_anchor_reuses_view_one(store, tmp_path):
    """mining_view=anchor draws no third view and mines with y(x1); exclusion still holds."""
    cfg = build_config(overrides=tiny_overrides(store, tmp_path / "anchor", steps=12,
                                                **{"method.mining_view": "anchor"}))
    data = build_train_data(cfg)
    x1, x2, x_m, meta = next(data.sessions[0].anchors)
    assert x_m is None and x1.shape == x2.shape
    run_dir, _ = train(cfg)
    rows = _metrics(run_dir)
    assert all(r["mined_same_trial_ratio"] == 0.0 and math.isfinite(r["loss_total"]) for r in rows)
    assert rows[-1]["loss_mined"] is not None


def test_augmented_loss_can_return_the_online_representation():
    from model import MLPEncoder, MYOW

    torch.manual_seed(0)
    model = MYOW(MLPEncoder(6, 8, 2, 4), None, 8)
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    loss, y1 = model.augmented_loss(x1, x2, return_representation=True)
    assert y1.shape == (5, 4) and y1.requires_grad
    torch.testing.assert_close(loss, model.augmented_loss(x1, x2))


def test_resume_refuses_a_changed_key_and_accepts_keys_the_checkpoint_predates(store, tmp_path):
    run_dir = tmp_path / "r"
    cfg = build_config(overrides=tiny_overrides(store, run_dir, steps=4))
    train(cfg)
    ckpt_path = run_dir / "checkpoint.pt"
    changed = build_config(overrides=tiny_overrides(store, run_dir, steps=6, **{"method.k": 3}))
    with pytest.raises(UserError, match=r"checkpoint's method.k is 5, this config has 3"):
        train(changed)
    # a checkpoint written before method.temperature existed: its method section lacks the key
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["config"]["method"]["temperature"]
    torch.save(ckpt, ckpt_path)
    longer = build_config(overrides=tiny_overrides(store, run_dir, steps=6))
    train(longer)
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, 7))
