"""Streaming data layer: the stages on plain lists, block streams (jitter pairs and
exclusion across block boundaries, rank sharding, exact resume), zarr on disk and on a
local S3 server, and failures that must be clear errors rather than hangs."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import exclusion_mask, mine_views
from pipeline.config import build_config
from pipeline.data.augment import Augmenter, Normalization
from pipeline.data.jitter import jitter_table
from pipeline.data.neural import training_mask
from pipeline.kinds import build_train_data
from pipeline.data.recording import ArrayReader, Recording, open_store, split_rows
from pipeline.data.stages import Prefetcher, ShuffleBuffer, epoch_order, ordered_map, retry, shard_for_rank
from pipeline.data.streams import BlockAnchorStream, BlockPoolStream, StreamSettings
from pipeline_helpers import reach_arrays, write_store
from preprocess.errors import UserError

# --------------------------------------------------------------------------- stages on plain lists


def test_epoch_order_is_a_deterministic_permutation():
    a, b, c = epoch_order(50, 3, 0), epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert sorted(a.tolist()) == list(range(50)) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_shard_for_rank_is_disjoint_and_covering():
    items = list(range(23))
    parts = [shard_for_rank(items, r, 4) for r in range(4)]
    assert sorted(sum(parts, [])) == items and sum(len(p) for p in parts) == 23
    with pytest.raises(ValueError):
        shard_for_rank(items, 4, 4)


def test_epoch_cursor_shards_epochs_by_rank_and_resumes():
    from pipeline.data.stages import EpochCursor

    cursors = [EpochCursor(23, 4, order_seed=9, rank=r, world_size=3) for r in range(3)]
    assert {c.steps_per_epoch for c in cursors} == {1} and {c.n_rank for c in cursors} == {7}
    epoch0 = [set(c.order(0).tolist()) for c in cursors]
    assert not (epoch0[0] & epoch0[1]) and not (epoch0[1] & epoch0[2]) and not (epoch0[0] & epoch0[2])
    c = EpochCursor(50, 8, order_seed=1)
    [c.next() for _ in range(9)]  # into the second epoch
    state, expect = c.state_dict(), [c.next() for _ in range(5)]
    d = EpochCursor(50, 8, order_seed=1)
    d.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expect, [d.next() for _ in range(5)]))


def test_ordered_map_keeps_order_bounds_work_and_raises_in_place():
    def slow(x):
        time.sleep(0.01 * ((x * 7) % 3))  # later items often finish first
        return x * x

    assert list(ordered_map(slow, range(12), threads=4, read_ahead=3)) == [x * x for x in range(12)]

    def fail_at_5(x):
        if x == 5:
            raise KeyError("five")
        return x

    got = []
    with pytest.raises(KeyError):
        for v in ordered_map(fail_at_5, range(10), threads=3, read_ahead=3):
            got.append(v)
    assert got == [0, 1, 2, 3, 4]
    # an infinite input is fine: only read_ahead items are ever in flight
    it = ordered_map(lambda x: x, iter(int, 1), threads=2, read_ahead=2)
    assert [next(it) for _ in range(3)] == [0, 0, 0]
    it.close()


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow")
        return "ok"

    assert retry(flaky, attempts=4, transient=lambda e: isinstance(e, TimeoutError), base_delay_s=0.001) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("gone")), attempts=4,
              transient=lambda e: isinstance(e, TimeoutError), base_delay_s=0.001)
    assert len(calls) == 1


def test_shuffle_buffer_draws_every_row_exactly_once():
    buf, g = ShuffleBuffer(), torch.Generator().manual_seed(0)
    seen = []
    for start in range(0, 100, 10):
        buf.add({"row": torch.arange(start, start + 10), "x": torch.arange(start, start + 10).float()[:, None] * 2})
        if len(buf) >= 25:
            got = buf.take(7, g)
            assert torch.equal(got["x"][:, 0], got["row"].float() * 2)  # columns stay aligned
            seen += got["row"].tolist()
    while len(buf):
        seen += buf.take(min(7, len(buf)), g)["row"].tolist()
    assert sorted(seen) == list(range(100)) and seen != sorted(seen)


class _Counter:
    """A resumable source on a plain list (what Prefetcher expects)."""

    def __init__(self, fail_at=None):
        self.i, self.fail_at = 0, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise KeyError("broken source")
        self.i += 1
        return self.i

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_prefetcher_state_is_that_of_the_items_handed_out():
    p = Prefetcher(_Counter(), depth=3)
    assert [next(p) for _ in range(4)] == [1, 2, 3, 4]
    time.sleep(0.05)  # the producer runs ahead...
    assert p.state_dict() == {"i": 4}  # ...but the state is that of what was consumed
    q = Prefetcher(_Counter(), depth=3)
    q.load_state_dict(p.state_dict())
    assert [next(q) for _ in range(3)] == [5, 6, 7] == [next(p) for _ in range(3)]
    p.close()
    assert next(p) == 8  # close() rewinds the source to the last item handed out
    p.close(), q.close()


def test_prefetcher_reraises_source_errors_instead_of_hanging():
    p = Prefetcher(_Counter(fail_at=2), depth=2)
    assert [next(p), next(p)] == [1, 2]
    with pytest.raises(KeyError):
        next(p)


# --------------------------------------------------------------------------- block streams


def _recording(trial: np.ndarray, n_units: int = 3, chunk_rows: int = 8, seed: int = 0,
               bin_start_s: np.ndarray | None = None) -> Recording:
    """A recording whose counts encode their row (counts[r, 0] = r % 60000) behind an ArrayReader."""
    T = len(trial)
    counts = np.random.default_rng(seed).integers(0, 5, (T, n_units)).astype(np.uint16)
    counts[:, 0] = np.arange(T) % 60000
    times = np.arange(T) * 0.1 if bin_start_s is None else bin_start_s
    return Recording(url="<memory>", bin_start_s=times, trial=trial.astype(np.int64), labels={}, behavior={},
                     bin_size_s=0.1, reader=ArrayReader(counts, 0.1, chunk_rows), _n_units=n_units)


def _identity_augment(n_units: int) -> Augmenter:
    cfg = build_config().augment
    cfg.dropout_max = cfg.noise_std = cfg.pepper_p = 0.0
    return Augmenter(cfg, Normalization(torch.zeros(n_units), torch.ones(n_units)))


def _row_of(x: torch.Tensor) -> np.ndarray:
    return np.rint(x[:, 0].numpy() * 0.1).astype(np.int64)  # rates are counts / 0.1 s


@st.composite
def _layouts(draw):
    n_trials = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, 15), min_size=n_trials, max_size=n_trials))
    gaps = draw(st.lists(st.integers(0, 4), min_size=n_trials, max_size=n_trials))
    trial = []
    for t, (n, gap) in enumerate(zip(lengths, gaps)):
        trial += [-1] * gap + [t] * n
    trial = np.array(trial)
    # sometimes a time gap in the recording (a pause): pairs must not jump it
    times = np.arange(len(trial)) * 0.1
    if draw(st.booleans()):
        times[len(trial) // 2:] += 5.0
    sample_p = draw(st.sampled_from([1.0, 0.7, 0.4]))
    keep = np.random.default_rng(draw(st.integers(0, 1000))).random(len(trial)) < sample_p
    return trial, times, keep, draw(st.integers(1, 9)), draw(st.integers(0, 3)), draw(st.sampled_from([1, 2, 3]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts())
def test_jitter_pairs_and_exclusion_hold_across_block_boundaries(layout):
    trial, times, keep, block_rows, J, world = layout
    if not keep.any():
        keep[0] = True
    rec = _recording(trial, bin_start_s=times)
    n_blocks = len(np.unique(np.flatnonzero(keep) // block_rows))
    world = min(world, n_blocks)
    settings_ = StreamSettings(block_rows, buffer_rows=5, read_threads=2, read_ahead=2)
    aug = _identity_augment(3)
    rows_all = np.flatnonzero(keep)
    nb, cnt = jitter_table(rows_all, trial, times, 0.1, J)  # the in-memory reference
    allowed = {int(r): ({int(rows_all[j]) for j in nb[i, :cnt[i]]} or {int(r)}) for i, r in enumerate(rows_all)}
    seen = []
    for rank in range(world):
        stream = BlockAnchorStream(rec, keep, aug, 4, settings_, seed=rank, order_seed=11, jitter_max_bins=J,
                                   rank=rank, world_size=world)
        pool = BlockPoolStream(rec, keep, aug, 6, settings_, seed=100 + rank, order_seed=7 + rank)
        for _ in range(6):
            x1, x2, x_m, meta = next(stream)
            a, p = _row_of(x1), _row_of(x2)
            assert np.array_equal(a, meta["row"].numpy())  # rates belong to the rows in meta
            for ai, pi in zip(a, p):  # the positive is an in-memory jitter neighbour (same trial, window)
                assert pi in allowed[ai]
            assert np.array_equal(meta["trial"].numpy(), trial[a]) and np.array_equal(meta["time"].numpy(), times[a])
            xp, pmeta = next(pool)
            assert keep[_row_of(xp)].all() and np.array_equal(_row_of(xp), pmeta["row"].numpy())
            assert np.array_equal(pmeta["time"].numpy(), times[pmeta["row"].numpy()])  # exact candidate times
            gap = 0.35
            exclude = exclusion_mask(meta["trial"], pmeta["trial"], meta["time"], pmeta["time"], gap)
            idx = mine_views(torch.randn(len(a), 4), torch.randn(len(xp), 4), 2, torch.Generator(), exclude)
            for i, j in enumerate(idx.tolist()):
                if j < 0:
                    continue
                ta, tp = trial[a[i]], pmeta["trial"][j].item()
                assert ta < 0 or ta != tp  # never the anchor's own trial
                assert abs(times[a[i]] - pmeta["time"][j].item()) >= gap
        seen.append(stream)
    if world > 1:  # ranks read disjoint blocks in every epoch
        shards = [set(s.epoch_blocks(0).tolist()) for s in seen]
        assert sum(len(s) for s in shards) == n_blocks and len(set().union(*shards)) == n_blocks


def test_two_ranks_see_disjoint_anchors_in_memory_and_streamed(tmp_path):
    trial = np.repeat(np.arange(40), 10)
    rec = _recording(trial, chunk_rows=16)
    keep = np.ones(len(trial), bool)
    aug = _identity_augment(3)
    settings_ = StreamSettings(16, buffer_rows=32, read_threads=2)
    per_rank = []
    for rank in range(2):
        s = BlockAnchorStream(rec, keep, aug, 20, settings_, seed=rank, order_seed=5, jitter_max_bins=1,
                              rank=rank, world_size=2)
        rows = np.concatenate([_row_of(next(s)[0]) for _ in range(5)])  # 100 of the 200 rows per rank
        blocks = s.epoch_blocks(0)
        mine = np.concatenate([np.arange(*s.blocks[b]) for b in blocks])
        assert np.isin(rows, mine).all()
        per_rank.append(set(rows.tolist()))
    assert not per_rank[0] & per_rank[1]

    store = write_store(str(tmp_path / "s.zarr"), reach_arrays(n_trials=30), chunk_rows=32)
    memory = []
    for rank in range(2):
        cfg = build_config(overrides=[f"data.path={store}", "data.loading=memory", "optim.batch_size=16"])
        data = build_train_data(cfg, rank=rank, world_size=2)
        memory.append({r for _ in range(data.steps_per_epoch) for r in next(data.sessions[0].anchors)[3]["row"].tolist()})
        data.close()
    assert memory[0] and memory[1] and not memory[0] & memory[1]


def test_block_stream_resumes_the_exact_sequence():
    trial = np.repeat(np.arange(30), 9)
    rec = _recording(trial, chunk_rows=10)
    keep = np.random.default_rng(1).random(len(trial)) < 0.8
    aug = Augmenter(build_config().augment, Normalization(torch.zeros(3), torch.ones(3)))
    settings_ = StreamSettings(10, buffer_rows=40, read_threads=3)

    def make():
        return (Prefetcher(BlockAnchorStream(rec, keep, aug, 16, settings_, seed=3, order_seed=4, jitter_max_bins=2)),
                Prefetcher(BlockPoolStream(rec, keep, aug, 24, settings_, seed=5, order_seed=6)))

    anchors, pool = make()
    for _ in range(7):  # more than an epoch of blocks: the state crosses an epoch boundary
        next(anchors), next(pool)
    state = {"a": anchors.state_dict(), "p": pool.state_dict()}
    expect = [(next(anchors), next(pool)) for _ in range(20)]
    anchors2, pool2 = make()
    anchors2.load_state_dict(state["a"])
    pool2.load_state_dict(state["p"])
    got = [(next(anchors2), next(pool2)) for _ in range(20)]
    for (ea, ep), (ga, gp) in zip(expect, got):
        assert all(torch.equal(u, v) for u, v in zip(ea[:3], ga[:3]))
        assert torch.equal(ea[3]["row"], ga[3]["row"]) and torch.equal(ep[0], gp[0])
    for s in (anchors, pool, anchors2, pool2):
        s.close(rewind=False)


# --------------------------------------------------------------------------- zarr stores


@pytest.fixture
def chunked_store(tmp_path):
    arrays = reach_arrays(n_trials=60, bins_per_trial=12, n_units=12, seed=3)
    return write_store(str(tmp_path / "chunked.zarr"), arrays, chunk_rows=40), arrays


def _cfg(store, *extra, **kw):
    values = {"data.path": store, "optim.batch_size": 32, "method.pool_size": 48, "data.min_speed": 5.0,
              "data.shuffle_buffer_rows": 64, "data.read_threads": 2, **kw}
    return build_config(overrides=[f"{k}={v}" for k, v in values.items()] + list(extra))


def test_streamed_store_matches_memory_statistics_and_rows(chunked_store):
    store, arrays = chunked_store
    mem = build_train_data(_cfg(store, **{"data.loading": "memory"}))
    streamed = build_train_data(_cfg(store, **{"data.loading": "stream"}))
    assert streamed.sessions[0].streamed and not mem.sessions[0].streamed and streamed.sessions[0].recording.rates is None
    assert torch.allclose(mem.sessions[0].normalization.mean, streamed.sessions[0].normalization.mean, rtol=1e-6)
    assert torch.allclose(mem.sessions[0].normalization.std, streamed.sessions[0].normalization.std, rtol=1e-5)
    assert streamed.steps_per_epoch == mem.steps_per_epoch
    rows = np.concatenate([next(streamed.sessions[0].anchors)[3]["row"].numpy() for _ in range(streamed.steps_per_epoch)])
    assert set(rows.tolist()) <= set(mem.sessions[0].samples.rows.tolist())
    # rates read in blocks equal the counts / bin size exactly
    rec = open_store(store)
    assert torch.equal(rec.read_rates(37, 121), torch.from_numpy(arrays["counts"][37:121].astype(np.float32) / 0.1))
    mem.close(), streamed.close()


def test_training_on_a_streamed_store_resumes_exactly(chunked_store, tmp_path):
    store, _ = chunked_store
    extra = {"data.loading": "stream", "data.shuffle_buffer_rows": 64, "data.read_threads": 2}
    _assert_resumes_exactly(store, tmp_path, extra, steps=16, every=6, kill_at_fetch=10)


def _assert_resumes_exactly(store: str, tmp_path, extra: dict, steps: int, every: int, kill_at_fetch: int):
    """A run killed after its checkpoint at ``every`` and resumed ends with the weights of an
    uninterrupted one; returns the uninterrupted run's directory."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.loop import train
    from pipeline_helpers import tiny_overrides, train_killed_at_fetch

    full, _ = train(build_config(overrides=tiny_overrides(store, tmp_path / "full", steps=steps, **extra)))
    cfg = build_config(overrides=tiny_overrides(store, tmp_path / "cut", steps=steps, **extra,
                                                **{"train.checkpoint_every": every}))
    train_killed_at_fetch(cfg, fetch=kill_at_fetch)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == every
    train(cfg)
    a = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    return full


def test_mining_context_works_on_a_streamed_store_and_resumes_exactly(chunked_store, tmp_path):
    store, _ = chunked_store
    mem = build_train_data(_cfg(store, **{"data.loading": "memory", "method.mining_context_bins": 2}))
    streamed = build_train_data(_cfg(store, **{"data.loading": "stream", "method.mining_context_bins": 2}))
    a, b = mem.sessions[0].mining_context, streamed.sessions[0].mining_context
    assert streamed.sessions[0].streamed and b is not None  # the same bank over the same training rows
    assert np.array_equal(a.rows, b.rows) and torch.equal(a.neighbors, b.neighbors)
    mem.close(), streamed.close()
    extra = {"data.loading": "stream", "method.mining_context_bins": 2}
    full = _assert_resumes_exactly(store, tmp_path, extra, steps=12, every=5, kill_at_fetch=8)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    assert '"loss_mined": null' not in lines[-1]  # the mined branch ran, with the context search


def test_a_mining_context_over_the_memory_budget_is_refused_before_the_store_is_read(chunked_store, monkeypatch):
    import pipeline.data.neural as neural

    store, _ = chunked_store
    monkeypatch.setattr(neural, "fit_normalization_stats", lambda *a, **k: pytest.fail("the store was read"))
    with pytest.raises(UserError, match=r"method.mining_context_bins.*data.memory_budget_mb=0.001"):
        build_train_data(_cfg(store, **{"data.loading": "stream", "method.mining_context_bins": 2,
                                        "data.memory_budget_mb": 0.001}))


def test_streamed_sessions_share_the_memory_budget_for_their_mining_context_banks(tmp_path):
    from pipeline_helpers import make_store

    folder = tmp_path / "sessions"
    make_store(folder, "a", n_trials=30, n_units=16, seed=1), make_store(folder, "b", n_trials=30, n_units=16, seed=2)
    (folder / "a.npz").unlink(), (folder / "b.npz").unlink()
    extra = {"data.loading": "stream", "method.mining_context_bins": 2}
    data = build_train_data(_cfg(str(folder), **extra))
    banks = [s.mining_context.nbytes for s in data.sessions]
    data.close()
    budget_mb = (max(banks) + 1) / (1 << 20)  # room for either bank, not for both
    with pytest.raises(UserError, match=r"over what is left of data.memory_budget_mb"):
        build_train_data(_cfg(str(folder), **extra, **{"data.memory_budget_mb": budget_mb}))


def test_a_store_deleted_mid_run_is_a_clear_error_not_a_hang(chunked_store):
    store, _ = chunked_store
    data = build_train_data(_cfg(store, **{"data.loading": "stream"}))
    next(data.sessions[0].anchors)
    shutil.rmtree(store)
    result = {}

    def consume():
        try:
            for _ in range(200):
                next(data.sessions[0].anchors)
        except UserError as err:
            result["error"] = str(err)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the stream hung after its store was deleted"
    assert store in result["error"] and "deleted or is corrupt" in result["error"]
    data.close()


def test_a_corrupt_chunk_is_a_clear_error(chunked_store):
    store, _ = chunked_store
    data = build_train_data(_cfg(store, **{"data.loading": "stream"}))
    shard = sorted((p for p in (__import__("pathlib").Path(store) / "counts").rglob("*") if p.is_file()
                    and p.name != "zarr.json"))[0]
    shard.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(UserError, match="reading counts rows"):
        for _ in range(200):
            next(data.sessions[0].anchors)
            next(data.sessions[0].pool)
    data.close()


# --------------------------------------------------------------------------- object storage


def test_streaming_from_s3_gives_the_local_batches(chunked_store, s3_bucket):
    import json

    from preprocess.store import filesystem

    store, arrays = chunked_store
    bucket, options = s3_bucket
    url = f"{bucket}/chunked.zarr"
    fs, path = filesystem(url, options)
    fs.put(store, path, recursive=True)
    opts = json.dumps(options)
    local = build_train_data(_cfg(store, **{"data.loading": "stream"}))
    remote = build_train_data(_cfg(url, f"data.storage_options={opts}", **{"data.loading": "stream"}))
    assert torch.equal(local.sessions[0].normalization.mean, remote.sessions[0].normalization.mean)
    for _ in range(4):
        a, b = next(local.sessions[0].anchors), next(remote.sessions[0].anchors)
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and torch.equal(a[3]["row"], b[3]["row"])
        assert torch.equal(next(local.sessions[0].pool)[0], next(remote.sessions[0].pool)[0])
    local.close(), remote.close()


def test_missing_bucket_or_key_is_one_line_naming_the_url(s3_bucket):
    import json

    bucket, options = s3_bucket
    for url in (f"{bucket}/nothing-here.zarr", "s3://no-such-bucket-xyz/s.zarr"):
        cfg = build_config(overrides=[f"data.path={url}", f"data.storage_options={json.dumps(options)}"])
        with pytest.raises(UserError) as err:
            build_train_data(cfg)
        assert url in str(err.value) and "\n" not in str(err.value)


def test_split_and_mask_helpers_agree():
    rec = _recording(np.repeat(np.arange(10), 5))
    splits = split_rows(rec.trial)
    mask = training_mask(rec, splits["train"], 0.0)
    assert np.array_equal(np.flatnonzero(mask), splits["train"])


# --------------------------------------------------------------------------- multi-session


def test_a_directory_of_stores_trains_as_sessions_with_their_own_read_in(tmp_path):
    from pipeline.data.neural import session_urls
    from pipeline.kinds import evaluate_run
    from pipeline.loop import train
    from pipeline_helpers import make_store, tiny_overrides

    folder = tmp_path / "sessions"
    a = make_store(folder, "a", n_trials=30, n_units=16, seed=1)
    b = make_store(folder, "b", n_trials=20, n_units=10, seed=2)
    (folder / "a.npz").unlink(), (folder / "b.npz").unlink()
    assert session_urls(str(folder)) == [a, b] and session_urls([b]) == [b]

    cfg = build_config(overrides=tiny_overrides(str(folder), tmp_path / "run", steps=12,
                                                **{"data.loading": "stream"}))
    data = build_train_data(cfg)
    assert data.multi and [s.recording.n_units for s in data.sessions] == [16, 10]
    picks = [data.session_at(t) for t in range(400)]
    assert picks == [data.session_at(t) for t in range(400)]  # a pure function of the step
    share = picks.count(0) / len(picks)
    expect = data.sessions[0].n_samples / (data.sessions[0].n_samples + data.sessions[1].n_samples)
    assert abs(share - expect) < 0.08
    for i, s in enumerate(data.sessions):  # every batch comes from one session
        assert set(next(s.anchors)[3]["store"].tolist()) == {i} and set(next(s.pool)[1]["store"].tolist()) == {i}
    data.close()

    run_dir, results = train(cfg)
    assert [r["url"] for r in results["sessions"]] == [a, b] and "reach_acc" in results
    assert results["reach_acc"] == pytest.approx(np.mean([r["reach_acc"] for r in results["sessions"]]))
    model_state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert model_state["encoder.read_in.0.weight"].shape[1] == 16 and model_state["encoder.read_in.1.weight"].shape[1] == 10
    one = evaluate_run(run_dir, data=b, plots=False)
    assert one["reach_acc"] == pytest.approx(results["sessions"][1]["reach_acc"]) and "sessions" not in one


def test_counts_reader_retries_transient_storage_errors_and_names_the_store_on_permanent_ones(chunked_store):
    store, arrays = chunked_store
    reader = open_store(store, attempts=4).reader
    real = reader.array

    class Flaky:
        """The counts array behind a connection that drops twice, then works."""

        shape, chunks, calls = real.shape, real.chunks, 0

        def __getitem__(self, key):
            Flaky.calls += 1
            if Flaky.calls <= 2:
                raise ConnectionResetError(104, "Connection reset by peer")
            return real[key]

    reader.array = Flaky()
    got = reader.read_counts(10, 50)
    assert Flaky.calls == 3 and np.array_equal(got, arrays["counts"][10:50])

    class Denied(Flaky):
        def __getitem__(self, key):
            Denied.calls += 1
            raise PermissionError("Access Denied")

    Denied.calls = 0
    reader.array = Denied()
    with pytest.raises(UserError, match="reading counts rows 10:50 failed .PermissionError") as err:
        reader.read_counts(10, 50)
    assert Denied.calls == 1 and store in str(err.value)  # permanent: not retried
