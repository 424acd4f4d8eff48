"""pipeline.data: splits, normalisation, augmentations, temporal jitter, samplers and their state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, build_config
from pipeline.data.augment import Augmenter, Normalization
from pipeline.data.jitter import jitter_table
from pipeline.data.recording import load_recording, split_rows
from pipeline.kinds import build_train_data
from pipeline_helpers import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("data"), n_trials=40, bins_per_trial=12, n_units=16)


@pytest.fixture(scope="module")
def store_no_trials(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("data_nt"), n_trials=40, bins_per_trial=12, n_units=16, trials=False)


def _cfg(store, **extra):
    values = {"data.path": store, "optim.batch_size": 32, "method.pool_size": 64, **extra}
    return build_config(overrides=[f"{k}={v}" for k, v in values.items()])


# --------------------------------------------------------------------------- splits


def test_split_by_trial_order_keeps_trials_whole():
    # 10 trials of uneven length, ids not in numeric order, gaps (-1) between some
    trial = np.array([5, 5, -1, 3, 3, 3, 9, -1, -1, 0, 0, 1, 2, 2, 2, 2, 7, 8, 8, 4, -1])
    splits = split_rows(trial, (0.7, 0.1, 0.2))
    rows = np.concatenate([splits[s] for s in ("train", "val", "test")])
    assert np.array_equal(np.sort(rows), np.arange(len(trial)))  # every row exactly once
    order = [5, 3, 9, 0, 1, 2, 7, 8, 4]  # recording order of first bins
    n = len(order)
    expect = {"train": order[:int(n * 0.7)], "val": order[int(n * 0.7):int(n * 0.8)], "test": order[int(n * 0.8):]}
    for name, ids in expect.items():
        assert set(trial[splits[name]]) - {-1} == set(ids), name
    for a in ("train", "val", "test"):  # no trial in two splits
        for b in ("train", "val", "test"):
            if a < b:
                assert not (set(trial[splits[a]]) - {-1}) & (set(trial[splits[b]]) - {-1})
    # rows outside trials follow the last trial before them; the splits are time blocks
    assert splits["train"].max() < splits["val"].min() < splits["test"].min()


def test_split_chewie_like_counts():
    trial = np.repeat(np.arange(159), 3)
    splits = split_rows(trial, (0.7, 0.1, 0.2))
    assert [len(np.unique(trial[splits[s]])) for s in ("train", "val", "test")] == [111, 16, 32]


def test_split_by_time_blocks_without_trials():
    splits = split_rows(np.full(1000, -1), (0.7, 0.1, 0.2))
    assert np.array_equal(splits["train"], np.arange(700))
    assert np.array_equal(splits["val"], np.arange(700, 800))
    assert np.array_equal(splits["test"], np.arange(800, 1000))


def test_recording_and_training_samples(store):
    rec = load_recording(store)
    assert rec.rates.shape == (480, 16) and rec.rates.dtype == torch.float32
    assert rec.bin_size_s == pytest.approx(0.1) and rec.has_trials and rec.main_label == "target"
    data = build_train_data(_cfg(store, **{"data.min_speed": 5.0}))
    rows = data.sessions[0].samples.rows
    speed = np.linalg.norm(rec.behavior["velocity"], axis=1)
    assert (speed[rows] > 5).all() and set(rows) <= set(data.sessions[0].splits["train"])
    assert len(rows) == sum((speed[r] > 5) for r in data.sessions[0].splits["train"])
    all_rows = build_train_data(_cfg(store, **{"data.min_speed": 0})).sessions[0].samples.rows
    assert np.array_equal(all_rows, data.sessions[0].splits["train"])


def test_normalization_uses_training_samples_and_guards_zero_std():
    rates = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0]])
    norm = Normalization.fit(rates)
    assert torch.allclose(norm.mean, torch.tensor([2.0, 0.0, 5.0]))
    assert norm.std[1] == 1.0 and norm.std[2] == 1.0  # dead / constant units: std -> 1
    assert torch.isfinite(norm(torch.rand(4, 3))).all()
    again = Normalization.from_state_dict(norm.state_dict())
    assert torch.equal(again.mean, norm.mean) and torch.equal(again.std, norm.std)


# --------------------------------------------------------------------------- augmentations


def _augmenter(**kwargs):
    return Augmenter(AugmentConfig(**kwargs), Normalization(torch.zeros(50), torch.ones(50)))


def test_augment_shapes_determinism_and_no_mutation():
    aug = _augmenter()
    rates = torch.rand(64, 50) * 20
    before = rates.clone()
    a = aug(rates, torch.Generator().manual_seed(3))
    b = aug(rates, torch.Generator().manual_seed(3))
    c = aug(rates, torch.Generator().manual_seed(4))
    assert a.shape == (64, 50) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(rates, before)


def test_dropout_rate_bounds():
    aug = _augmenter(dropout_max=0.2, noise_std=0.0, pepper_p=0.0)
    rates = torch.full((4000, 50), 10.0)
    out = aug(rates, torch.Generator().manual_seed(0))
    dropped = (out == 0).float().mean(1)  # per-sample dropout rate ~ U(0, 0.2)
    assert dropped.max() <= 0.2 + 4 * (0.2 * 0.8 / 50) ** 0.5
    assert dropped.mean().item() == pytest.approx(0.1, abs=0.01)
    assert set(out.unique().tolist()) <= {0.0, 10.0}
    none = _augmenter(dropout_max=0.0, noise_std=0.0, pepper_p=0.0)(rates, torch.Generator())
    assert torch.equal(none, rates)


def test_pepper_and_noise_apply_to_a_share_of_samples():
    aug = _augmenter(dropout_max=0.0, noise_std=0.0, pepper_p=0.3, pepper_value=1.5, pepper_apply_p=0.5)
    out = aug(torch.zeros(4000, 50), torch.Generator().manual_seed(0))
    touched = (out != 0).any(1)
    assert touched.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert set(out.unique().tolist()) <= {0.0, 1.5}
    assert (out[touched] == 1.5).float().mean().item() == pytest.approx(0.3, abs=0.02)
    noise = _augmenter(dropout_max=0.0, pepper_p=0.0, noise_std=1.5, noise_apply_p=0.5)
    out = noise(torch.zeros(4000, 50), torch.Generator().manual_seed(0))
    noisy = (out != 0).all(1)
    assert noisy.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert out[noisy].std().item() == pytest.approx(1.5, rel=0.05)


def test_bernoulli_masks_exact_at_the_ends_unbiased_between():
    gen = torch.Generator().manual_seed(0)
    assert Augmenter._bernoulli((5000,), 1.0, gen).all() and not Augmenter._bernoulli((5000,), 0.0, gen).any()
    assert Augmenter._bernoulli((200_000,), 0.3, gen).float().mean().item() == pytest.approx(0.3, abs=0.005)
    p = torch.tensor([[0.0], [0.25], [0.999]])  # per-row probabilities broadcast over columns
    mask = Augmenter._bernoulli((3, 100_000), p, gen)
    assert mask.shape == (3, 100_000) and mask.dtype == torch.bool
    assert mask.float().mean(1).tolist() == pytest.approx([0.0, 0.25, 0.999], abs=0.006)


def test_augment_order_dropout_then_normalise():
    # a dropped unit is 0 Hz before z-scoring: (0 - mean) / std after it
    aug = Augmenter(AugmentConfig(dropout_max=1.0, noise_std=0.0, pepper_p=0.0),
                    Normalization(torch.full((50,), 4.0), torch.full((50,), 2.0)))
    out = aug(torch.full((200, 50), 10.0), torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {-2.0, 3.0}


# --------------------------------------------------------------------------- jitter and samplers


def test_jitter_table_stays_in_trial_and_window():
    trial = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
    times = np.arange(10) * 0.1
    rows = np.array([0, 1, 2, 4, 5, 6, 8, 9])  # row 3 and 7 are not training samples
    nb, cnt = jitter_table(rows, trial, times, 0.1, 2)
    for i, r in enumerate(rows):
        got = {int(rows[j]) for j in nb[i, :cnt[i]]}
        expect = {int(s) for s in rows if s != r and trial[s] == trial[r] and abs(s - r) <= 2}
        assert got == expect
        assert (nb[i, cnt[i]:] == -1).all()


def test_anchor_pairs_within_trial_and_window(store):
    data = build_train_data(_cfg(store, **{"data.jitter_max_bins": 2, "data.min_speed": 5.0}))
    s, trial = data.sessions[0].samples, load_recording(store).trial
    for _ in range(20):
        a, p = data.sessions[0].anchors.next_indices()
        ra, rp = s.rows[a.numpy()], s.rows[p.numpy()]
        assert (trial[ra] == trial[rp]).all() and (np.abs(ra - rp) <= 2).all()
        # the anchor is its own positive only when it has no neighbour
        assert torch.equal(a == p, s.n_neighbors[a] == 0)


def test_anchor_epochs_are_permutations(store):
    data = build_train_data(_cfg(store, **{"optim.batch_size": 32}))
    n = len(data.sessions[0].samples)
    sampler = data.sessions[0].anchors
    assert sampler.steps_per_epoch == n // 32
    batches = [sampler.next_indices()[0] for _ in range(sampler.steps_per_epoch)]
    flat = torch.cat(batches)
    assert len(flat) == sampler.steps_per_epoch * 32 and len(flat.unique()) == len(flat)
    assert sampler.cursor.epoch == 0
    sampler.next_indices()
    assert sampler.cursor.epoch == 1


def test_small_data_gives_one_batch_of_everything(store):
    data = build_train_data(_cfg(store, **{"optim.batch_size": 10_000}))
    x1, x2, x_m, meta = next(data.sessions[0].anchors)
    assert data.steps_per_epoch == 1 and x1.shape[0] == len(data.sessions[0].samples)
    assert set(meta["row"].tolist()) == set(data.sessions[0].samples.rows.tolist())


def test_batches_and_metadata(store):
    data = build_train_data(_cfg(store))
    x1, x2, x_m, meta = next(data.sessions[0].anchors)
    assert x1.shape == x2.shape == x_m.shape == (32, 16)
    assert not torch.equal(x1, x_m)  # x_m is its own draw of the anchor
    assert set(meta) == {"store", "time", "trial", "trial_rank", "row", "label"}
    rec = load_recording(store)
    rows = meta["row"].numpy()
    assert np.array_equal(meta["trial"].numpy(), rec.trial[rows])
    assert np.allclose(meta["time"].numpy(), rec.bin_start_s[rows])
    x_pool, meta_pool = next(data.sessions[0].pool)
    assert x_pool.shape == (64, 16) and meta_pool["trial"].shape == (64,)
    byol = build_train_data(_cfg(store, **{"method.name": "byol"}))
    assert next(byol.sessions[0].anchors)[2] is None  # no mining view needed


def test_sampler_state_dict_resume_gives_identical_continuation(store):
    cfg = _cfg(store)
    a = build_train_data(cfg)
    for _ in range(7):
        next(a.sessions[0].anchors), next(a.sessions[0].pool)
    state = a.state_dict()
    expect = [(next(a.sessions[0].anchors), next(a.sessions[0].pool)) for _ in range(10)]
    b = build_train_data(cfg)
    b.load_state_dict(state)
    for (anchors, pool), (exp_anchors, exp_pool) in zip([(next(b.sessions[0].anchors), next(b.sessions[0].pool)) for _ in range(10)], expect):
        for got, exp in zip(anchors[:3] + pool[:1], exp_anchors[:3] + exp_pool[:1]):
            assert torch.equal(got, exp)
        assert torch.equal(anchors[3]["row"], exp_anchors[3]["row"])


def test_pool_sampler_is_independent_of_anchor_sampler(store):
    cfg = _cfg(store)
    a, b = build_train_data(cfg), build_train_data(cfg)
    for _ in range(5):
        next(b.sessions[0].pool)  # drawing pools must not change the anchor stream
    for _ in range(5):
        assert torch.equal(next(a.sessions[0].anchors)[0], next(b.sessions[0].anchors)[0])
    # and the pool has its own seed: different rows than the anchors would draw
    c = build_train_data(cfg)
    assert not torch.equal(next(c.sessions[0].pool)[1]["row"][:32], next(c.sessions[0].anchors)[3]["row"])
    other = build_train_data(_cfg(store, **{"run.seed": 1}))
    assert not torch.equal(next(other.sessions[0].pool)[1]["row"], next(build_train_data(cfg).sessions[0].pool)[1]["row"])


def test_pool_with_and_without_replacement(store):
    data = build_train_data(_cfg(store, **{"method.pool_size": 50}))
    rows = next(data.sessions[0].pool)[1]["row"]
    assert len(rows.unique()) == 50  # L <= n: no repeats
    big = build_train_data(_cfg(store, **{"method.pool_size": 1000}))
    assert next(big.sessions[0].pool)[0].shape[0] == 1000  # L > n: with replacement


def test_store_without_trials(store_no_trials):
    data = build_train_data(_cfg(store_no_trials, **{"data.jitter_max_bins": 2}))
    assert not data.sessions[0].recording.has_trials
    assert data.sessions[0].min_time_gap_s == pytest.approx(0.3)  # auto: (jitter + 1) bins
    a, p = data.sessions[0].anchors.next_indices()
    ra, rp = data.sessions[0].samples.rows[a.numpy()], data.sessions[0].samples.rows[p.numpy()]
    assert (np.abs(ra - rp) <= 2).all()
    assert data.sessions[0].splits["train"].max() < data.sessions[0].splits["val"].min()


def test_min_trial_gap_on_a_store_without_trials_is_an_error(store_no_trials):
    from preprocess.errors import UserError
    with pytest.raises(UserError, match="min_trial_gap needs trials"):
        build_train_data(_cfg(store_no_trials, **{"data.min_trial_gap": 3}))


def test_training_samples_empty_train_split_is_an_error(store):
    from preprocess.errors import UserError
    with pytest.raises(UserError, match="min_speed"):
        build_train_data(_cfg(store, **{"data.min_speed": 1000}))


def test_trial_ranks_follow_recording_order():
    from pipeline.data.recording import trial_ranks

    trial = np.array([7, 7, -1, 2, 2, 9, -1, 4])
    assert trial_ranks(trial).tolist() == [0, 0, -1, 1, 1, 2, -1, 3]
    assert trial_ranks(np.array([-1, -1])).tolist() == [-1, -1]
