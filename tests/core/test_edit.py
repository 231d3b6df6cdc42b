"""The closed form is exact: brute-force least squares, k* → v*, C-orthogonal keys, projected GD."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rulewriter.core.edit import Edit, LayerUpdate, projected_gd, solve_lambda, update_direction
from rulewriter.errors import EditError, LayerError, StatsError
from rulewriter.core.memory import LayerMemory



pytestmark = pytest.mark.usefixtures("float64_default")  # the maths in float64 (tests/conftest.py)


def _problem(f=4, d=6, n_data=200, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, n_data, generator=g) * torch.linspace(0.2, 3, d)[:, None]  # data keys, anisotropic
    c = a @ a.T / n_data
    w0 = torch.randn(f, d, generator=g)
    k = torch.randn(d, r, generator=g)
    v = torch.randn(f, r, generator=g)
    return a, c, w0, k, v


def _brute_force(a, w0, k, v):
    """min ||W A - W0 A||² s.t. W K = V, by solving the KKT system over vec(W)."""
    f, d = w0.shape
    eye = torch.eye(f)
    h = torch.kron(a @ a.T, eye)  # Hessian of ||(W-W0)A||² in vec (column-major) form, up to factor 2
    g = torch.kron(a @ a.T, eye) @ w0.T.reshape(-1)
    b = torch.kron(k.T.contiguous(), eye)  # vec(W K) = (Kᵀ ⊗ I) vec(W)
    n, m = h.shape[0], b.shape[0]
    kkt = torch.zeros(n + m, n + m)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = h, b.T, b
    rhs = torch.cat([g, v.T.reshape(-1)])
    sol = torch.linalg.solve(kkt, rhs)
    return sol[:n].reshape(d, f).T


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_matches_brute_force(r, seed):
    a, c, w0, k, v = _problem(r=r, seed=seed)
    d = update_direction(c, k, ridge=0)
    lam = solve_lambda(w0, k, v, d)
    w1 = w0 + lam @ d.T
    torch.testing.assert_close(w1, _brute_force(a, w0, k, v), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(w1 @ k, v, rtol=1e-10, atol=1e-10)  # W1 k* = v*
    assert torch.linalg.matrix_rank(w1 - w0) == r


def test_single_rule_is_rank_one_and_exact():
    a, c, w0, k, v = _problem(r=1)
    d = update_direction(c, k[:, 0], ridge=0)
    lam = solve_lambda(w0, k, v, d)
    # Eq. 2.19 with Λ = (v* − W0 k*) / (k*ᵀ C⁻¹ k*)
    expected = (v[:, 0] - w0 @ k[:, 0]) / (k[:, 0] @ torch.linalg.solve(c, k[:, 0]))
    torch.testing.assert_close(lam[:, 0], expected)


def test_c_orthogonal_keys_keep_their_outputs():
    a, c, w0, k, v = _problem(r=2)
    d = update_direction(c, k, ridge=0)
    w1 = w0 + solve_lambda(w0, k, v, d) @ d.T
    # Keys with kᵀ C⁻¹ K = 0: project random keys onto the C⁻¹-orthogonal complement of K.
    z = torch.randn(6, 10)
    ck = torch.linalg.solve(c, k)
    z = z - k @ torch.linalg.solve(k.T @ ck, ck.T @ z)  # now ckᵀ z = 0
    torch.testing.assert_close(ck.T @ z, torch.zeros(2, 10), atol=1e-10, rtol=0)
    torch.testing.assert_close(w1 @ z, w0 @ z, rtol=1e-10, atol=1e-10)
    # And other keys do change: the test can fail.
    other = torch.randn(6, 3)
    assert not torch.allclose(w1 @ other, w0 @ other)


def test_with_the_default_ridge_keys_orthogonal_to_the_regularised_moment_keep_their_outputs():
    """The ridge moves the invariance: keys with kᵀ(C + εI)⁻¹K = 0 keep their outputs, C⁻¹-orthogonal ones not."""
    from rulewriter.core.edit import DEFAULT_RIDGE, regularize

    a, c, w0, k, v = _problem(r=2)
    d = update_direction(c, k)  # the default ridge
    w1 = w0 + solve_lambda(w0, k, v, d) @ d.T
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    for moment, keeps in ((regularize(c, DEFAULT_RIDGE), True), (c, False)):
        ck = torch.linalg.solve(moment, k)
        zo = z - k @ torch.linalg.solve(k.T @ ck, ck.T @ z)
        change = (w1 @ zo - w0 @ zo).norm() / (w0 @ zo).norm()
        assert (change < 1e-10) == keeps, (keeps, float(change))


def test_nearly_collinear_rules_still_meet_their_constraints():
    """cond(A) 8e5–8e9: the QR solve keeps W1 K = V where the normal equations (A Aᵀ) lose half the digits.

    Measured with the normal equations: relative violation 4.7e-6 at cond 8e5, and at cond 8e7 and 8e9 they
    called the problem degenerate. With QR: 4e-11, 6e-9, 5e-7 (about cond(A) · 1e-16).
    """
    a, c, w0, k, v = _problem(r=2, seed=3)
    for eps, bound in ((1e-3, 1e-9), (1e-4, 1e-7), (1e-5, 1e-5)):
        k2 = torch.stack([k[:, 0], k[:, 0] + eps * k[:, 1]], 1)
        d = update_direction(c, k2, ridge=0)
        lam = solve_lambda(w0, k2, v, d)
        w1 = w0 + lam @ d.T
        err = (w1 @ k2 - v).abs().max() / v.abs().max()
        assert err < bound, (eps, float(err))
    # Truly dependent rules are still refused.
    with pytest.raises(EditError, match="degenerate"):
        kk = torch.stack([k[:, 0], 2 * k[:, 0]], 1)
        solve_lambda(w0, kk, v, update_direction(c, kk, ridge=0))


def test_update_minimises_collateral_among_rank_one_updates():
    a, c, w0, k, v = _problem(r=1)
    d = update_direction(c, k, ridge=0)
    w1 = w0 + solve_lambda(w0, k, v, d) @ d.T
    cost = lambda w: ((w - w0) @ a).pow(2).sum()
    for seed in range(5):  # any other direction that also satisfies W k* = v* costs more
        other = torch.randn(6, 1, generator=torch.Generator().manual_seed(seed))
        w_other = w0 + solve_lambda(w0, k, v, other) @ other.T
        torch.testing.assert_close(w_other @ k, v)
        assert cost(w_other) > cost(w1)


def test_weighted_pairs_least_squares():
    _, c, w0, _, _ = _problem()
    g = torch.Generator().manual_seed(3)
    kk, vv, wts = torch.randn(6, 30, generator=g), torch.randn(4, 30, generator=g), torch.rand(30, generator=g)
    d = update_direction(c, kk.mean(1), ridge=1e-3)
    lam = solve_lambda(w0, kk, vv, d, wts)
    # Brute force over Λ with lstsq on the weighted residual.
    a = (d[:, None].T @ kk) * wts.sqrt()
    r = (vv - w0 @ kk) * wts.sqrt()
    lam_ls = torch.linalg.lstsq(a.T, r.T).solution.T
    torch.testing.assert_close(lam, lam_ls)


@pytest.mark.parametrize("r", [1, 2])
def test_projected_gd_converges_to_closed_form(r):
    a, c, w0, k, v = _problem(r=r, seed=4)
    d = update_direction(c, k, ridge=1e-3)
    lam_cf = solve_lambda(w0, k, v, d)
    lam_gd, losses = projected_gd(w0, k, v, d, steps=2000)
    torch.testing.assert_close(lam_gd, lam_cf, rtol=1e-4, atol=1e-5)
    assert losses[-1] < 1e-8 * max(losses[0], 1)


def test_projected_gd_stops_once_converged_and_reports_the_returned_loss():
    a, c, w0, k, v = _problem(r=1, seed=4)
    d = update_direction(c, k, ridge=1e-3)
    lam, losses = projected_gd(w0, k, v, d, steps=2000)
    assert len(losses) < 200, len(losses)  # a linear single-rule problem converges in tens of steps
    w1 = w0 + lam @ d.T
    assert losses[-1] == pytest.approx(float((w1 @ k - v).pow(2).sum()), rel=1e-6, abs=1e-12 * losses[0])
    # With a step budget too small to converge, the last loss is still the loss of the Λ returned.
    lam3, losses3 = projected_gd(w0, k, v, d, steps=3)
    assert len(losses3) == 4
    w3 = w0 + lam3 @ d.T
    assert losses3[-1] == pytest.approx(float((w3 @ k - v).pow(2).sum()), rel=1e-9)
    assert losses3[-1] < losses3[-2]


def test_projected_gd_through_nonlinearity_reaches_target():
    a, c, w0, k, v = _problem(r=1, seed=5)
    v = 0.9 * torch.tanh(v)  # reachable through tanh
    d = update_direction(c, k, ridge=1e-3)
    lam, losses = projected_gd(w0, k, v, d, post=torch.tanh, steps=2000)
    w1 = w0 + lam @ d.T
    torch.testing.assert_close(torch.tanh(w1 @ k), v, atol=1e-4, rtol=1e-4)
    assert torch.linalg.matrix_rank(w1 - w0) == 1


def test_singular_covariance_and_nans_are_clear_errors():
    c = torch.zeros(3, 3)
    c[0, 0] = 1
    with pytest.raises(StatsError, match="singular"):
        update_direction(c, torch.ones(3), ridge=0)
    update_direction(c, torch.ones(3))  # the ridge rescues it
    with pytest.raises(StatsError, match="NaN"):
        update_direction(torch.full((3, 3), float("nan")), torch.ones(3))
    with pytest.raises(EditError, match="NaN"):
        update_direction(torch.eye(3), torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(StatsError, match="dimension"):
        update_direction(torch.eye(3), torch.ones(4))


# ------------------------------------------------------------------ Edit data
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.Flatten(), nn.Linear(5 * 36, 2))


def _edit(layer="0", view=2, rank=1, dims=(4, 27)):
    g = torch.Generator().manual_seed(rank)
    return Edit([LayerUpdate(layer, view, torch.randn(dims[0], rank, generator=g),
                             torch.randn(dims[1], rank, generator=g))], {"rules": [{"name": "test"}]})


def test_apply_undo_is_exact_and_save_load_roundtrip(tmp_path):
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    y0 = net(x).detach()
    w0 = net[0].weight.detach().clone()
    edit = _edit()
    handle = edit.apply(net)
    y1 = net(x).detach()
    assert not torch.allclose(y0, y1)
    mem = LayerMemory(net[0], 2)
    torch.testing.assert_close(mem.matrix() - mem.matrix(w0), edit.updates[0].delta())
    handle.undo()
    assert torch.equal(net[0].weight, w0)
    path = edit.save(tmp_path / "e.safetensors")
    assert json.loads((tmp_path / "e.safetensors.json").read_text())["updates"][0]["layer"] == "0"
    loaded = Edit.load(path)
    with loaded.applied(net):
        torch.testing.assert_close(net(x), y1)
    assert torch.equal(net[0].weight, w0)
    assert loaded.meta == edit.meta
    assert not list(tmp_path.glob("*.tmp"))


def test_compose_equals_sequential_application():
    net = _net()
    x = torch.randn(2, 3, 6, 6)
    e1, e2, e3 = _edit(rank=1), _edit(rank=2), _edit(layer="2", dims=(5, 4))
    with e1.applied(net), e2.applied(net), e3.applied(net):
        seq = net(x).detach()
    both = e1 + e2 + e3
    assert [u.rank for u in both.updates] == [3, 1]
    with both.applied(net):
        torch.testing.assert_close(net(x), seq)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_undo_in_any_order_restores_the_original_weights(order):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    w_orig = net[0].weight.detach().clone()
    e = [_edit(rank=r, dims=(5, 27)) for r in (1, 2)]
    h = [e[0].apply(net), e[1].apply(net)]
    w_both = net[0].weight.detach().clone()
    h[order[0]].undo()
    # Only the other edit is left: exactly as if the undone one had never been applied.
    ref = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    with torch.no_grad():
        ref[0].weight.copy_(w_orig)
    e[order[1]].apply(ref)
    assert torch.equal(net[0].weight, ref[0].weight)
    assert not torch.equal(net[0].weight, w_both)
    h[order[1]].undo()
    assert torch.equal(net[0].weight, w_orig)


def test_mismatched_edit_changes_nothing():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    good, bad = _edit(), _edit(layer="2", dims=(5, 9))
    with pytest.raises(EditError, match="another model"):
        (good + bad).apply(net)
    with pytest.raises(LayerError, match="no_such"):
        _edit(layer="no_such").apply(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("scale", [1e150, 1e25])
def test_an_edit_that_overflows_the_weights_is_refused_and_changes_nothing(scale):
    """Finite factors whose product overflows float32 (issue 12.5): apply refuses, every layer restored."""
    net = _net().float()  # the tests' default dtype is float64; models run in float32
    before = {k: v.clone() for k, v in net.state_dict().items()}
    u = _edit().updates[0]
    huge = Edit([LayerUpdate("2", 2, torch.ones(5, 1), torch.ones(4, 1)),
                 LayerUpdate(u.layer, u.view, u.lam.double() * scale, u.direction.double() * scale)])
    with pytest.raises(EditError, match="NaN or inf in torch.float32"):
        huge.apply(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with _edit().applied(net):  # an ordinary edit still applies
        assert torch.isfinite(net[0].weight).all()


def test_load_refuses_pickles_and_garbage(tmp_path):
    p = tmp_path / "evil.safetensors"
    torch.save({"lam": torch.ones(2)}, p)
    with pytest.raises(EditError, match="pickle"):
        Edit.load(p)
    import pickle

    p.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(EditError, match="pickle"):
        Edit.load(p)
    p.write_bytes(b"not a safetensors file at all")
    with pytest.raises(EditError, match="not a valid safetensors"):
        Edit.load(p)
    with pytest.raises(EditError, match="no such file"):
        Edit.load(tmp_path / "missing.safetensors")


def test_valid_file_whose_first_byte_looks_like_a_pickle_loads(tmp_path):
    """The first byte of a safetensors file is its header length's low byte; it may well be 0x80."""
    edit = _edit()
    for pad in range(300):
        edit.meta = {"pad": "x" * pad}
        path = edit.save(tmp_path / "e.safetensors", sidecar=False)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.skip("no padding gave a 0x80 first byte")
    assert Edit.load(path).meta == edit.meta


def test_repr_is_one_short_line_whatever_the_tensors(tmp_path):
    lam, d = torch.randn(1280, 1, dtype=torch.float64), torch.randn(320, 1, dtype=torch.float64)
    edit = Edit([LayerUpdate("_blocks.15._project_conv", 2, lam, d)], {"rules": [{"method": "images"}], "n_pairs": 37})
    assert repr(edit) == "Edit(layer=_blocks.15._project_conv, view=2, rank=1, rules=1, pairs=37)"
    assert repr(Edit.load(edit.save(tmp_path / "e.safetensors"))) == repr(edit)
    other = Edit([LayerUpdate("fc", 1, torch.randn(10, 2), torch.randn(5, 2))], {"rules": [{}, {}], "n_pairs": 4})
    both = repr(edit + other)
    assert both == ("Edit(layers=[_blocks.15._project_conv (view 2, rank 1), fc (view 1, rank 2)], "
                    "rules=3, pairs=41)")
    assert repr(Edit([LayerUpdate("fc", 1, torch.randn(10, 2), torch.randn(5, 2))])) == "Edit(layer=fc, view=1, rank=2)"
    assert "\n" not in repr(edit.updates[0]) and "tensor" not in repr(edit.updates[0])
