import pytest
import torch

from model import MYOW, MLPEncoder, exclusion_mask, mine_views


def _model(arch="cascaded", proj=(16, 8), mproj=(16, 6)):
    torch.manual_seed(0)
    return MYOW(MLPEncoder(in_dim=10, hidden_dim=16, num_blocks=2, out_dim=12),
                projector_dims=proj, predictor_hidden=16,
                mined_projector_dims=mproj, mined_predictor_hidden=20, architecture=arch)


def _step_losses(model, B=6, L=9, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x2, xm = (torch.randn(B, 10, generator=g) for _ in range(3))
    xp = torch.randn(L, 10, generator=g)
    aug = model.augmented_loss(x1, x2)
    y_m = model.online_mining_representation(xm)
    pool_y = model.target_representation(xp)
    idx = mine_views(y_m.detach(), pool_y, k, g)
    mined = model.mined_loss(y_m, pool_y, idx)
    return aug, mined, y_m, pool_y, idx


def test_shapes_and_neural_setting_identity_projectors():
    m = MYOW(MLPEncoder(in_dim=10), None, 128, None, 128)
    assert isinstance(m.projector, torch.nn.Identity) and isinstance(m.mined_projector, torch.nn.Identity)
    assert m.predictor[0].in_features == 32 and m.predictor[0].out_features == 128
    assert m.mined_predictor[-1].out_features == 32
    x = torch.randn(4, 10)
    assert m(x).shape == (4, 32)
    assert m.target_representation(x).shape == (4, 32)
    aug, mined, y_m, pool_y, idx = _step_losses(m)
    assert aug.shape == () and mined.shape == () and y_m.shape == (6, 32) and pool_y.shape == (9, 32)
    assert -2.0 <= aug.item() <= 2.0 and -1.0 <= mined.item() <= 1.0


def test_target_not_in_online_parameters_and_frozen():
    m = _model()
    online = {id(p) for p in m.online_parameters()}
    target = {id(p) for p in m.target.parameters()}
    assert target and not (online & target)
    assert all(not p.requires_grad for p in m.target.parameters())
    assert all(p.requires_grad for p in m.online_parameters())
    # online + target = all parameters
    assert online | target == {id(p) for p in m.parameters()}
    assert set(m.online_modules()) == {"encoder", "projector", "predictor", "mined_projector", "mined_predictor"}
    assert set(m.target) == {"encoder", "projector", "mined_projector"}


@pytest.mark.parametrize("arch", ["cascaded", "parallel", "single"])
def test_backward_reaches_all_online_params_not_target(arch):
    m = _model(arch)
    aug, mined, *_ = _step_losses(m)
    (aug + 0.5 * mined).backward()
    for name, p in m.named_parameters():
        if name.startswith("target."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in m.mined_predictor.parameters())
    assert any(p.grad.abs().sum() > 0 for p in m.predictor.parameters())
    assert any(p.grad.abs().sum() > 0 for p in m.encoder.parameters())


def test_architectures_route_mined_views():
    c, p, s = _model("cascaded"), _model("parallel"), _model("single")
    assert c.mined_projector[0].in_features == 8      # h on z
    assert p.mined_projector[0].in_features == 12     # h on y
    assert isinstance(s.mined_projector, torch.nn.Identity)
    assert s.mined_predictor[0].in_features == 8      # r in g-space
    assert c.mined_predictor[0].out_features == 20
    with pytest.raises(ValueError, match="architecture"):
        _model("none")


def test_mined_loss_drops_minus_one_and_all_dropped_is_connected_zero():
    m = _model()
    aug, mined, y_m, pool_y, idx = _step_losses(m)
    keep = torch.tensor([0, 2, 3])
    partial = idx.clone()
    partial[[1, 4, 5]] = -1
    # reference: same per-row distances, averaged over kept rows only
    pred = m.mined_predictor(m._online_v(y_m))
    with torch.no_grad():
        tv = m._target_v(pool_y)
    ref = -torch.nn.functional.cosine_similarity(pred[keep], tv[partial[keep]]).mean()
    torch.testing.assert_close(m.mined_loss(y_m, pool_y, partial), ref)

    m.zero_grad()
    none = m.mined_loss(y_m, pool_y, torch.full_like(idx, -1))
    assert none.item() == 0.0
    none.backward()
    assert all(p.grad is not None for p in m.mined_predictor.parameters())
    assert all(p.grad is not None for p in m.mined_projector.parameters())


def test_mined_loss_with_top_k_indices_predicts_their_mean():
    """(B, k) indices: the target is the mean of the k unit-norm target projections, -1
    entries left out; an anchor with no index at all is dropped."""
    m = _model()
    _, _, y_m, pool_y, _ = _step_losses(m)
    top = torch.tensor([[0, 1, 2], [3, -1, -1], [4, 5, 6], [-1, -1, -1], [7, 8, 0], [1, 2, 3]])
    pred = m.mined_predictor(m._online_v(y_m))
    with torch.no_grad():
        tv = torch.nn.functional.normalize(m._target_v(pool_y), dim=1)
    means = [tv[[j for j in row if j >= 0]].mean(0) for row in top.tolist() if max(row) >= 0]
    kept = [i for i, row in enumerate(top.tolist()) if max(row) >= 0]
    ref = -torch.nn.functional.cosine_similarity(pred[kept], torch.stack(means)).mean()
    torch.testing.assert_close(m.mined_loss(y_m, pool_y, top), ref)
    with pytest.raises(ValueError, match="indices"):
        m.mined_loss(y_m, pool_y, top[:2])


def test_mined_loss_survives_single_valid_anchor_in_train_mode():
    m = _model()
    _, _, y_m, pool_y, idx = _step_losses(m)
    one = torch.full_like(idx, -1)
    one[2] = idx[2]
    assert torch.isfinite(m.mined_loss(y_m, pool_y, one))


def test_zero_mined_loss_connects_mining_heads():
    m = _model()
    z = m.zero_mined_loss()
    assert z.item() == 0.0
    z.backward()
    assert all(p.grad is not None for p in m.mined_predictor.parameters())
    assert all(p.grad is not None for p in m.mined_projector.parameters())


def test_update_target_moves_toward_online():
    m = _model()
    for t, o in zip(m.target["encoder"].parameters(), m.encoder.parameters()):
        assert torch.equal(t, o)  # xi = theta at init
    opt = torch.optim.SGD(m.online_parameters(), lr=0.5)
    aug, mined, *_ = _step_losses(m)
    (aug + mined).backward()
    opt.step()
    online = [p.detach().clone() for p in m.encoder.parameters()]
    before = [p.clone() for p in m.target["encoder"].parameters()]
    dist_before = sum((b - o).norm() for b, o in zip(before, online))
    assert dist_before > 0
    m.update_target(0.9)
    after = list(m.target["encoder"].parameters())
    for b, a, o in zip(before, after, online):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)
    dist_after = sum((a - o).norm() for a, o in zip(after, online))
    assert dist_after < dist_before
    for t, o in zip(m.target["encoder"].buffers(), m.encoder.buffers()):
        assert torch.equal(t, o)


def test_forward_modes_dispatch():
    m = _model()
    x = torch.randn(4, 10)
    m.eval()
    assert torch.equal(m(x), m.encoder(x))
    m.train()
    assert m(x, x, mode="augmented_loss").shape == ()
    assert m(x, mode="online_mining_representation").shape == (4, 12)
    assert m(x, mode="target_representation").shape == (4, 12)
    assert m(mode="zero_mined_loss").item() == 0.0
    with pytest.raises(ValueError):
        m(x, mode="bogus")


def test_eval_mode_representation_deterministic():
    m = _model().eval()
    x = torch.randn(3, 10)
    assert torch.equal(m(x), m(x))
    torch.testing.assert_close(m(x[:1]), m(x)[:1])  # eval BN: rows independent of the batch


def test_with_exclusion_mask_end_to_end():
    m = _model()
    g = torch.Generator().manual_seed(0)
    xm, xp = torch.randn(6, 10, generator=g), torch.randn(8, 10, generator=g)
    y_m = m.online_mining_representation(xm)
    pool_y = m.target_representation(xp)
    excl = exclusion_mask(torch.tensor([0, 0, 1, 1, 2, -1]), torch.tensor([0, 1, 2, 0, 1, 2, -1, 0]))
    excl[5] = True
    idx = mine_views(y_m.detach(), pool_y, 2, g, exclude=excl)
    assert idx[5] == -1
    ok = idx >= 0
    assert not excl[ok.nonzero().squeeze(1), idx[ok]].any()
    assert torch.isfinite(m.mined_loss(y_m, pool_y, idx))
