"""pipeline.distributed: collectives on 2 spawned gloo ranks, DDP on MYOW, world of one, rank logging.

Multi-rank tests start 2 processes with the environment torchrun would set; each child
runs a module-level function (picklable by spawn) and saves its result to tmp_path, and
the parent asserts on both results. A failing child writes its traceback; every wait is
bounded, so a broken collective fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from model import MLPEncoder, MYOW, mine_views
from pipeline.distributed import DistEnv, RankFilter, all_gather_pool, all_reduce_mean, barrier, broadcast_object, configure_rank_logging, init_distributed, shutdown, wrap_ddp
from preprocess.errors import UserError

WORLD = 2
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        env = init_distributed("cpu", timeout_s=30)
        try:
            torch.save(fn(env), out / f"rank{rank}.pt")
        finally:
            shutdown(env)
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Results are saved and the group is gone: skip interpreter finalization, where a late
    # gloo worker thread can still abort the process (see pipeline.distributed.shutdown).
    os._exit(0)


def _run_ranks(fn, tmp_path: Path, monkeypatch) -> list:
    """Run ``fn(env)`` on WORLD spawned gloo ranks; returns their results in rank order."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # children inherit it before importing torch
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(fn, rank, tmp_path)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("rank*.err")))
    assert [p.exitcode for p in procs] == [0] * WORLD, errors or "a rank hung or died"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# --------------------------------------------------------------------------- all_gather_pool

POOL_SIZES = {0: 3, 1: 5}
D = 4


def _local_pool(rank: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    y = torch.arange(n * D, dtype=torch.float32).reshape(n, D) + 100 * rank
    meta = {"trial": torch.arange(n, dtype=torch.int64) + 10 * rank,
            # float64 times that float32 could not hold exactly
            "time": 1e6 + rank + torch.arange(n, dtype=torch.float64) * 1e-7,
            "label": torch.full((n,), rank, dtype=torch.int32)}
    return y, meta


def _gather_fn(env: DistEnv) -> dict:
    y, meta = _local_pool(env.rank, POOL_SIZES[env.rank])
    pool_y, pool_meta = all_gather_pool(y.requires_grad_(), meta, env)
    empty_y, empty_meta = all_gather_pool(*_local_pool(env.rank, 2 * env.rank), env)  # rank 0 has none
    none_y, none_meta = all_gather_pool(*_local_pool(env.rank, 0), env)
    return {"env": env, "y": pool_y, "meta": pool_meta, "requires_grad": pool_y.requires_grad,
            "empty_y": empty_y, "empty_meta": empty_meta, "none": (none_y.shape, none_meta["time"].dtype)}


def test_all_gather_pool_unequal_sizes_rank_order_exact_metadata(tmp_path, monkeypatch):
    results = _run_ranks(_gather_fn, tmp_path, monkeypatch)
    parts = [_local_pool(rank, POOL_SIZES[rank]) for rank in range(WORLD)]
    want_y = torch.cat([y for y, _ in parts])
    assert want_y.shape == (8, D)
    for rank, res in enumerate(results):
        assert (res["env"].rank, res["env"].world_size, res["env"].backend) == (rank, WORLD, "gloo")
        assert res["env"].is_main == (rank == 0) and res["env"].distributed
        assert torch.equal(res["y"], want_y) and not res["requires_grad"]
        assert list(res["meta"]) == ["trial", "time", "label"]  # the caller's key order
        for key in ("trial", "time", "label"):
            want = torch.cat([m[key] for _, m in parts])
            assert res["meta"][key].dtype == want.dtype and torch.equal(res["meta"][key], want), key
        # rank 0 contributes 0 rows, rank 1 two
        assert torch.equal(res["empty_y"], _local_pool(1, 2)[0])
        assert torch.equal(res["empty_meta"]["time"], _local_pool(1, 2)[1]["time"])
        assert res["none"] == ((0, D), torch.float64)  # no candidates anywhere


# --------------------------------------------------------------------------- small collectives


def _reduce_fn(env: DistEnv) -> dict:
    values = {"loss": 1.0 + env.rank, "none": None, "rank0_only": 4.0 if env.rank == 0 else None,
              "nan_on_1": float("nan") if env.rank == 1 else 0.5}
    chosen = broadcast_object({"run_dir": f"runs/from-rank-{env.rank}"}, env)
    barrier(env)
    return {"mean": all_reduce_mean(values, env), "chosen": chosen}


def test_all_reduce_mean_keeps_none_and_broadcast_object(tmp_path, monkeypatch):
    for res in _run_ranks(_reduce_fn, tmp_path, monkeypatch):
        mean = res["mean"]
        assert mean["loss"] == 1.5 and mean["none"] is None
        assert mean["rank0_only"] == 4.0  # averaged over the ranks that have it
        assert mean["nan_on_1"] != mean["nan_on_1"]  # NaN reaches every rank
        assert res["chosen"] == {"run_dir": "runs/from-rank-0"}


# --------------------------------------------------------------------------- DDP on MYOW


def _myow_step(model: MYOW, net, x: torch.Tensor, pool_x: torch.Tensor, gather) -> None:
    """One MYOW step as train_step runs it: two losses summed, ONE backward."""
    loss_aug, y1 = net(x, x.flip(0), mode="augmented_loss", return_representation=True)
    pool_y, _ = gather(model.target_representation(pool_x), {})
    idx = mine_views(y1.detach(), pool_y, 2, torch.Generator().manual_seed(0))
    (loss_aug + 0.5 * net(y1, pool_y, idx, mode="mined_loss")).backward()


def _ddp_fn(env: DistEnv) -> dict:
    torch.manual_seed(0)  # identical model on both ranks, as the trainer seeds it
    model = MYOW(MLPEncoder(6, hidden_dim=16, num_blocks=2, out_dim=8), None, 16, None, 16)
    reference = copy.deepcopy(model)  # same step without DDP: this rank's local gradient
    torch.manual_seed(1 + env.rank)  # different data per rank
    x, pool_x = torch.randn(10, 6), torch.randn(12, 6)

    _myow_step(reference, reference, x, pool_x, lambda y, m: all_gather_pool(y, m, env))
    ddp = wrap_ddp(model, env)
    optimizer = torch.optim.SGD(model.online_parameters(), lr=0.1)
    _myow_step(model, ddp, x, pool_x, lambda y, m: all_gather_pool(y, m, env))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    model.update_target(0.9)
    return {"local_grads": {n: p.grad for n, p in reference.named_parameters() if p.requires_grad},
            "grads": grads, "params": {n: p.detach() for n, p in model.named_parameters()},
            "buffers": dict(model.named_buffers()), "ddp": type(ddp).__name__}


def test_wrap_ddp_averages_gradients_and_keeps_ranks_identical(tmp_path, monkeypatch):
    r0, r1 = _run_ranks(_ddp_fn, tmp_path, monkeypatch)
    assert r0["ddp"] == "DistributedDataParallel"
    for name, grad in r0["grads"].items():
        assert torch.equal(grad, r1["grads"][name]), name
        # the reduced gradient is the mean of the ranks' local ones (the data differ)
        torch.testing.assert_close(grad, (r0["local_grads"][name] + r1["local_grads"][name]) / 2,
                                   rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(r0["local_grads"][n], r1["local_grads"][n]) for n in r0["grads"])
    for name, param in r0["params"].items():  # online and EMA target
        assert torch.equal(param, r1["params"][name]), name
    assert any(name.startswith("target.") for name in r0["params"])
    # running BN statistics are rank-local (no buffer sync per forward; rank 0's are used)
    assert not torch.equal(r0["buffers"]["encoder.net.1.running_mean"], r1["buffers"]["encoder.net.1.running_mean"])


# --------------------------------------------------------------------------- world of one


def test_world_of_one_needs_no_process_group(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert env.is_main and not env.distributed
    assert not dist.is_initialized()
    y, meta = torch.randn(3, 4), {"time": torch.zeros(3, dtype=torch.float64)}
    pool_y, pool_meta = all_gather_pool(y, meta, env)
    assert pool_y is y and pool_meta is meta
    assert all_reduce_mean({"a": 1.0, "b": None}, env) == {"a": 1.0, "b": None}
    assert broadcast_object("x", env) == "x"
    module = torch.nn.Linear(2, 2)
    assert wrap_ddp(module, env, sync_bn=True) is module
    barrier(env)
    shutdown(env)
    shutdown(env)
    assert not dist.is_initialized()


def test_device_errors_are_one_line_user_errors(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="run.device"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            init_distributed("cuda")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        init_distributed("cpu")


# --------------------------------------------------------------------------- logging


def test_rank_filter_and_configure_rank_logging():
    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("pipeline.train", level, __file__, 1, "msg", None, None)

    info, warning = record(logging.INFO), record(logging.WARNING)
    assert not RankFilter(1).filter(info)
    assert RankFilter(1).filter(warning) and warning.rank == 1
    assert RankFilter(0).filter(info) and info.rank == 0

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, rec):
            self.records.append(rec)

    # Only our handler on root meanwhile: the filter must not stick to pytest's handlers.
    root, handler = logging.getLogger(), Collect()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        env = DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
        configure_rank_logging(env)
        configure_rank_logging(env)
        assert sum(isinstance(f, RankFilter) for f in handler.filters) == 1
        child = logging.getLogger("pipeline.test_distributed")  # propagated, not logged on root
        child.info("dropped on rank 1")
        child.warning("kept")
    finally:
        root.handlers = old_handlers
        root.setLevel(old_level)
    assert [(r.getMessage(), r.rank) for r in handler.records] == [("kept", 1)]
