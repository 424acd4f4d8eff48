"""The RP / TS pair and triplet sampler: labels match time gaps, pairs never cross trials
unless allowed, never recordings; ranks share anchors disjointly; the state resumes exactly."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import AugmentConfig
from pipeline.data.augment import Augmenter, Normalization
from pipeline.data.jitter import jitter_table
from pipeline.data.samplers import Samples
from pipeline.data.temporal import TemporalSampler, draw_far

BIN = 0.1


def _samples(n_trials=10, per_trial=8, gap_rows=(), no_trials=False) -> Samples:
    n = n_trials * per_trial
    rows = np.arange(n, dtype=np.int64)
    trial = np.full(n, -1, dtype=np.int64) if no_trials else np.repeat(np.arange(n_trials), per_trial)
    time = rows * BIN + 10.0 * (0 if no_trials else trial)  # trials 10 s apart
    for r in gap_rows:
        time[r:] += 5.0
    nb, cnt = jitter_table(rows, trial, time, BIN, 2)
    rates = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row id in every unit: traceable
    meta = {"store": torch.zeros(n, dtype=torch.int64), "time": torch.from_numpy(time), "trial": torch.from_numpy(trial),
            "row": torch.from_numpy(rows)}
    return Samples(rows, rates, meta, torch.from_numpy(nb), torch.from_numpy(cnt)), trial, time


def _sampler(samples, trial, time, kind, pos=1, neg=4, across=True, seed=0, rank=0, world=1, batch=16):
    nb, cnt = jitter_table(samples.rows, trial, time, BIN, pos)
    augment = Augmenter(AugmentConfig(dropout_max=0.0, noise_std=0.0, pepper_p=0.0), Normalization(
        torch.zeros(3), torch.ones(3)))
    return TemporalSampler(samples, torch.from_numpy(nb), torch.from_numpy(cnt), augment, batch, seed, order_seed=7,
                           kind=kind, neg_gap_s=neg * BIN, across_trials=across, rank=rank, world_size=world)


def _rows(x):
    return x[:, 0].round().long()


def test_pairs_labels_follow_the_time_gaps():
    samples, trial, time = _samples()
    s = _sampler(samples, trial, time, "pairs", pos=1, neg=4)
    labels = []
    for _ in range(20):
        x1, x2, x3, meta = next(s)
        a, b = _rows(x1).numpy(), _rows(x2).numpy()
        lab = meta["temporal_label"].numpy()
        labels.append(lab)
        assert x3 is None and (a != b).all()
        close = lab == 1
        assert (trial[a[close]] == trial[b[close]]).all() and (np.abs(time[a[close]] - time[b[close]]) <= 1.5 * BIN).all()
        same = trial[a] == trial[b]
        assert (np.abs(time[a] - time[b])[~close & same] >= 4 * BIN - 1e-9).all()
    assert 0.3 < np.concatenate(labels).mean() < 0.7


def test_pairs_stay_in_the_trial_when_asked_and_never_jump_a_gap():
    samples, trial, time = _samples(gap_rows=(4,))
    s = _sampler(samples, trial, time, "pairs", pos=2, neg=5, across=False)
    for _ in range(20):
        x1, x2, _, meta = next(s)
        a, b = _rows(x1).numpy(), _rows(x2).numpy()
        assert (trial[a] == trial[b]).all()  # negatives too: never another trial
        close = meta["temporal_label"].numpy() == 1
        assert (np.abs(time[a[close]] - time[b[close]]) <= 2.5 * BIN).all()  # the 5 s gap is never close


def test_triplets_are_in_order_when_positive():
    samples, trial, time = _samples(no_trials=True, n_trials=4, per_trial=50)
    s = _sampler(samples, trial, time, "triplets", pos=2, neg=20)
    for _ in range(20):
        x1, x2, x3, meta = next(s)
        a, b, c = (_rows(x).numpy() for x in (x1, x2, x3))
        pos = meta["temporal_label"].numpy() == 1
        assert (time[a] < time[c]).all() and (time[c] - time[a] <= 4.5 * BIN).all()
        assert ((time[a] < time[b]) & (time[b] < time[c]))[pos].all()
        # a negative middle is far from the anchor, which is one of the two close bins (<= 2 bins from a)
        assert (np.abs(time[b] - time[a]) >= (20 - 4) * BIN - 1e-9)[~pos].all()


def test_draw_far_marks_impossible_anchors():
    trial = torch.zeros(5, dtype=torch.int64)
    time = torch.arange(5, dtype=torch.float64)
    far = draw_far(torch.arange(5), trial, time, neg_gap_s=100.0, across_trials=True,
                   generator=torch.Generator().manual_seed(0))
    assert (far == -1).all()


def test_ranks_take_disjoint_anchors_and_the_state_resumes():
    samples, trial, time = _samples()
    a = _sampler(samples, trial, time, "pairs", rank=0, world=2, batch=8)
    b = _sampler(samples, trial, time, "pairs", rank=1, world=2, batch=8)
    pa = torch.cat([a.cursor.next() for _ in range(a.steps_per_epoch)])
    pb = torch.cat([b.cursor.next() for _ in range(b.steps_per_epoch)])
    assert not set(pa.tolist()) & set(pb.tolist()) and len(pa) == len(pb) == a.steps_per_epoch * 8
    s = _sampler(samples, trial, time, "triplets", pos=2, neg=4, seed=3)
    for _ in range(3):
        next(s)
    state = s.state_dict()
    expected = [next(s) for _ in range(4)]
    t = _sampler(samples, trial, time, "triplets", pos=2, neg=4, seed=99)
    t.load_state_dict(state)
    for want, got in zip(expected, (next(t) for _ in range(4))):
        assert all(torch.equal(w, g) for w, g in zip(want[:3], got[:3]))
        assert torch.equal(want[3]["temporal_label"], got[3]["temporal_label"])
