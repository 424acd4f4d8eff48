import pytest
import torch
import torch.nn.functional as F

from model.miner import exclusion_mask, mine_views


def _data(B=37, L=53, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(L, D, generator=g)


def _gen(seed=123):
    return torch.Generator().manual_seed(seed)


def _cos(a, p):
    return F.normalize(a, dim=1) @ F.normalize(p, dim=1).T


def test_k1_picks_nearest_by_cosine():
    a, p = _data()
    # scale rows: cosine must ignore norms
    p = p * torch.linspace(0.1, 10, p.shape[0])[:, None]
    idx = mine_views(a, p, 1, _gen())
    assert idx.dtype == torch.long and idx.shape == (a.shape[0],)
    assert torch.equal(idx, _cos(a, p).argmax(dim=1))


def test_k1_with_exclusion_picks_nearest_allowed():
    a, p = _data(seed=1)
    excl = torch.rand(a.shape[0], p.shape[0], generator=_gen(5)) < 0.5
    idx = mine_views(a, p, 1, _gen(), exclude=excl)
    ref = _cos(a, p).masked_fill(excl, float("-inf")).argmax(dim=1)
    assert torch.equal(idx, ref)


def test_pick_is_within_topk():
    a, p = _data(seed=2)
    k = 5
    idx = mine_views(a, p, k, _gen())
    topk = _cos(a, p).topk(k, dim=1).indices
    assert (topk == idx[:, None]).any(dim=1).all()


def test_random_pick_covers_topk_uniformly_enough():
    a, p = _data(B=1, L=20, seed=3)
    k = 4
    topk = set(_cos(a, p).topk(k, dim=1).indices[0].tolist())
    g = _gen(0)
    picks = [mine_views(a, p, k, g).item() for _ in range(200)]
    assert set(picks) == topk
    counts = [picks.count(i) for i in topk]
    assert min(counts) > 20


@pytest.mark.parametrize("chunk", [1, 3, 10, 36, 37, 1000])
def test_chunked_equals_unchunked(chunk):
    a, p = _data(seed=4)
    excl = torch.rand(a.shape[0], p.shape[0], generator=_gen(9)) < 0.3
    ref = mine_views(a, p, 5, _gen(7), exclude=excl, chunk_size=a.shape[0])
    got = mine_views(a, p, 5, _gen(7), exclude=excl, chunk_size=chunk)
    assert torch.equal(ref, got)


def test_same_seed_same_picks_different_seed_differs():
    a, p = _data(seed=5)
    x = mine_views(a, p, 8, _gen(1))
    assert torch.equal(x, mine_views(a, p, 8, _gen(1)))
    assert not torch.equal(x, mine_views(a, p, 8, _gen(2)))


@pytest.mark.parametrize("seed", range(5))
def test_exclusion_never_violated_and_empty_rows_get_minus_one(seed):
    a, p = _data(B=40, L=30, seed=seed)
    g = _gen(100 + seed)
    excl = torch.rand(40, 30, generator=g) < torch.rand(40, 1, generator=g)  # varied density
    excl[:5] = True                      # fully excluded rows
    excl[5:10] = True
    excl[5:10, 7] = False                # exactly one allowed candidate
    idx = mine_views(a, p, 4, g, exclude=excl, chunk_size=7)
    assert (idx[:5] == -1).all()
    assert (idx[5:10] == 7).all()
    has_any = ~excl.all(dim=1)
    assert torch.equal(idx >= 0, has_any)
    rows = torch.nonzero(has_any).squeeze(1)
    assert not excl[rows, idx[rows]].any()


def test_fewer_than_k_valid_candidates():
    a, p = _data(B=6, L=10, seed=6)
    excl = torch.ones(6, 10, dtype=torch.bool)
    allowed = [2, 5]
    excl[:, allowed] = False
    g = _gen(3)
    seen = set()
    for _ in range(30):
        idx = mine_views(a, p, 5, g, exclude=excl)
        assert set(idx.tolist()) <= set(allowed)
        seen |= set(idx.tolist())
    assert seen == set(allowed)


def test_k_larger_than_pool_and_empty_inputs():
    a, p = _data(B=4, L=3, seed=7)
    idx = mine_views(a, p, 10, _gen())
    assert ((idx >= 0) & (idx < 3)).all()
    assert torch.equal(mine_views(a, p[:0], 3, _gen()), torch.full((4,), -1))
    assert mine_views(a[:0], p, 3, _gen()).shape == (0,)
    with pytest.raises(ValueError):
        mine_views(a, p, 0, _gen())
    with pytest.raises(ValueError):
        mine_views(a, p, 1, _gen(), exclude=torch.zeros(3, 3, dtype=torch.bool))


def test_nan_candidates_never_picked():
    a, p = _data(B=5, L=6, seed=8)
    p[2] = float("nan")
    idx = mine_views(a, p, 6, _gen())
    assert (idx != 2).all() and (idx >= 0).all()


def test_no_grad_and_detached_output():
    a, p = _data(seed=9)
    a.requires_grad_(True)
    idx = mine_views(a, p, 2, _gen())
    assert not idx.requires_grad


# ------------------------------------------------------------------ exclusion_mask
def test_exclusion_mask_trials_and_no_trial():
    at = torch.tensor([0, 1, -1])
    pt = torch.tensor([0, 1, 1, -1, 2])
    m = exclusion_mask(at, pt)
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],  # -1 never matches, not even -1
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_exclusion_mask_trial_gap_counts_ranks():
    at = torch.tensor([5, 0, -1])
    pt = torch.tensor([5, 4, 3, 7, 8, -1, 0])
    m = exclusion_mask(at, pt, min_trial_gap=3)
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0],  # |5 - p| < 3: 5, 4, 3, 7; 8 is 3 away; -1 is outside trials
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],  # an anchor outside trials is never excluded by the trial rule
    ], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(exclusion_mask(at, pt, min_trial_gap=1), exclusion_mask(at, pt))  # 1 = same trial


def test_exclusion_mask_time_gap():
    t_a = torch.tensor([0.0, 10.0])
    t_p = torch.tensor([0.0, 0.5, 1.0, 9.2, 12.0])
    m = exclusion_mask(anchor_time=t_a, pool_time=t_p, min_time_gap=1.0)
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert not exclusion_mask(anchor_time=t_a, pool_time=t_p, min_time_gap=0.0).any()


def test_exclusion_mask_trial_or_time():
    m = exclusion_mask(torch.tensor([3]), torch.tensor([3, 4, 4]),
                       torch.tensor([5.0]), torch.tensor([100.0, 5.5, 50.0]), min_time_gap=2.0)
    assert torch.equal(m, torch.tensor([[True, True, False]]))


def test_exclusion_mask_stores():
    # same trial id / same time but another recording: never excluded
    m = exclusion_mask(torch.tensor([0, 0]), torch.tensor([0, 0, 1]),
                       torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]), min_time_gap=0.5,
                       anchor_store=torch.tensor([0, 1]), pool_store=torch.tensor([0, 1, 1]))
    expected = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    only_store = exclusion_mask(anchor_store=torch.tensor([0, 1]), pool_store=torch.tensor([0, 1, 1]))
    assert only_store.shape == (2, 3) and not only_store.any()


def test_exclusion_mask_argument_errors():
    with pytest.raises(ValueError):
        exclusion_mask(torch.tensor([0]), None)
    with pytest.raises(ValueError):
        exclusion_mask()
    with pytest.raises(ValueError):
        exclusion_mask(torch.tensor([0, 1]), torch.tensor([0]),
                       torch.tensor([0.0]), torch.tensor([0.0]), 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_mutual_neighbours_only(seed):
    """With mutual_k, every pick is a mutual pair (the anchor ranks among the candidate's
    mutual_k most similar allowed anchors) and one of the anchor's top-k allowed; with
    mutual_k >= B the filter changes nothing."""
    g = torch.Generator().manual_seed(seed)
    a, p = torch.randn(60, 6, generator=g), torch.randn(30, 6, generator=g)
    exclude = torch.rand(60, 30, generator=g) < 0.2
    k, m = 4, 2  # 30 candidates x 2 anchors each: some of the 60 anchors are left without a pair
    idx = mine_views(a, p, k, torch.Generator().manual_seed(1), exclude, mutual_k=m)
    sim = F.normalize(a, dim=1) @ F.normalize(p, dim=1).T
    sim = sim.masked_fill(exclude, float("-inf"))
    top_anchors = sim.topk(m, dim=0).indices  # (m, L)
    assert (idx >= 0).any() and (idx == -1).any()  # a filter that keeps some and drops some
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            assert not exclude[i, j] and i in top_anchors[:, j].tolist()
            assert j in sim[i].topk(k).indices.tolist()
    same = mine_views(a, p, k, torch.Generator().manual_seed(1), exclude)
    assert torch.equal(mine_views(a, p, k, torch.Generator().manual_seed(1), exclude, mutual_k=60), same)


@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_keep_fraction_keeps_the_most_confident_anchors(frac):
    """keep_fraction drops the anchors whose nearest allowed candidate is least similar;
    the kept ones keep exactly the pick they get without the filter."""
    g = torch.Generator().manual_seed(3)
    a, p = torch.randn(40, 6, generator=g), torch.randn(50, 6, generator=g)
    exclude = torch.rand(40, 50, generator=g) < 0.3
    exclude[7] = True  # an anchor without any allowed candidate stays -1 and is not counted
    full = mine_views(a, p, 3, torch.Generator().manual_seed(1), exclude)
    kept = mine_views(a, p, 3, torch.Generator().manual_seed(1), exclude, keep_fraction=frac, chunk_size=7)
    nearest = _cos(a, p).masked_fill(exclude, float("-inf")).max(dim=1).values
    n_keep = int(torch.tensor(frac * 39).ceil())
    assert int((kept >= 0).sum()) == n_keep and kept[7] == -1
    survivors = (kept >= 0)
    assert torch.equal(kept[survivors], full[survivors])
    assert nearest[survivors].min() >= nearest[(full >= 0) & ~survivors].max()
    with pytest.raises(ValueError, match="keep_fraction"):
        mine_views(a, p, 3, _gen(), keep_fraction=0.0)


def test_all_k_returns_the_sorted_top_k_allowed():
    """all_k gives every anchor's k most similar allowed candidates in order, -1 past the
    allowed ones; the single pick is always one of them."""
    g = torch.Generator().manual_seed(4)
    a, p = torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g)
    exclude = torch.rand(30, 20, generator=g) < 0.5
    exclude[3, 2:] = True  # anchor 3: only candidates 0 and 1 allowed
    exclude[3, :2] = False
    top = mine_views(a, p, 4, _gen(), exclude, all_k=True, chunk_size=8)
    sim = _cos(a, p).masked_fill(exclude, float("-inf"))
    ref = sim.topk(4, dim=1)
    assert top.shape == (30, 4)
    assert torch.equal(torch.where(ref.values > float("-inf"), ref.indices, -1), top)
    assert sorted(top[3, :2].tolist()) == [0, 1] and top[3, 2:].tolist() == [-1, -1]
    pick = mine_views(a, p, 4, _gen(), exclude)
    assert all(j in top[i].tolist() for i, j in enumerate(pick.tolist()) if j >= 0)
