"""Inverse-direction edits (thesis Chapter 3): exact maths on fixtures, reconstructions that converge."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.core.edit import Edit
from rulewriter.errors import EditError, LayerError, StatsError
from rulewriter.extensions.fourier import KeySpectrum, conv_lstsq_fourier, correlate, fourier_layer_update
from rulewriter.extensions.inverse import factorize, inverse_rewrite, inverse_rule_from_images, pinv_update
from rulewriter.extensions.reconstruct import (
    Reconstruction,
    dot_similarity,
    plot_reconstructions,
    reconstruct_features,
    reconstruct_image,
    reconstruct_key,
)
from rulewriter.core.memory import LayerMemory
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.core.rules import Rule, layer_io
from rulewriter.core.stats import SecondMoment

G = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one thread avoids waiting on a second one when the CPUs are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=G)


# ------------------------------------------------------------------------------------------ Fourier maths
def _shifted(a, offsets):
    """(N, p, T, H, W): a_p(x + δ_t) for each tap, by explicit circular rolls (the direct reference)."""
    return torch.stack([torch.roll(a, (-dh, -dw), (2, 3)) for dh, dw in offsets], 2)


def _design(a, offsets):
    """Rows (n, x), columns (p, t): the design matrix of ``V ≈ K ⋆ A`` built without any FFT."""
    z = _shifted(a, offsets)  # (N, p, T, H, W)
    return z.permute(0, 3, 4, 1, 2).reshape(-1, a.shape[1] * len(offsets))


def _direct(a, v, offsets, key=None, value=None):
    """Least squares (optionally with ``Σ K[o,p,t] k_p = v_o``) by lstsq / a KKT solve, per output channel."""
    z = _design(a, offsets)
    y = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])
    if key is None:
        return torch.linalg.lstsq(z, y).solution.T.reshape(v.shape[1], a.shape[1], len(offsets))
    kappa = key.repeat_interleave(len(offsets))
    n = z.shape[1]
    kkt = torch.zeros(n + 1, n + 1, dtype=G)
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = z.T @ z, kappa, kappa
    rows = [torch.linalg.solve(kkt, torch.cat([z.T @ y[:, o], value[o : o + 1]]))[:n] for o in range(v.shape[1])]
    return torch.stack(rows).reshape(v.shape[1], a.shape[1], len(offsets))


def test_correlate_is_the_circular_correlation():
    a, b = _rand(3, 2, 4, 5), _rand(3, 3, 4, 5, seed=1)
    r = correlate(a, b)
    for dh, dw in [(0, 0), (1, 2), (3, 4)]:
        want = torch.einsum("nphw,nqhw->pq", a, torch.roll(b, (-dh, -dw), (2, 3)))
        torch.testing.assert_close(r[:, :, dh, dw], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_fourier_full_support_equals_direct_least_squares(seed):
    """Eqs. 3.39–3.42 (per-frequency solve) == lstsq over a filter as large as the grid."""
    a, v = _rand(24, 2, 4, 4, seed=seed), _rand(24, 3, 4, 4, seed=seed + 10)
    grid = [(i, j) for i in range(4) for j in range(4)]
    k = conv_lstsq_fourier(a, v)
    assert k.shape == (3, 2, 4, 4)
    torch.testing.assert_close(k.reshape(3, 2, 16), _direct(a, v, grid), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_fourier_kernel_support_equals_direct_least_squares(seed):
    """Eq. 3.37 on a 3×3 support: Toeplitz-block normal equations from FFT correlations == lstsq."""
    taps = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
    a, v = _rand(10, 3, 5, 6, seed=seed), _rand(10, 2, 5, 6, seed=seed + 10)
    k = conv_lstsq_fourier(a, v, offsets=taps)
    torch.testing.assert_close(k, _direct(a, v, taps), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("support", ["full", "kernel"])
def test_fourier_constrained_equals_kkt(support):
    """Eqs. 3.43–3.57 == the brute-force constrained least squares; the constraint holds exactly."""
    a, v = _rand(20, 2, 4, 4), _rand(20, 3, 4, 4, seed=3)
    key, value = _rand(2, seed=4), _rand(3, seed=5)
    taps = [(i, j) for i in range(4) for j in range(4)] if support == "full" else [(0, 0), (0, 1), (1, 0)]
    k1 = conv_lstsq_fourier(a, v, offsets=None if support == "full" else taps, key=key, value=value)
    k1 = k1.reshape(3, 2, len(taps))
    torch.testing.assert_close(k1, _direct(a, v, taps, key, value), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(k1.sum(2) @ key, value, rtol=1e-10, atol=1e-10)  # response to constant k*
    if support == "full":  # the update lives at ω = 0 only: a constant over the whole grid (eq. 3.55)
        delta = k1 - conv_lstsq_fourier(a, v).reshape(3, 2, 16)
        torch.testing.assert_close(delta, delta[:, :, :1].expand_as(delta), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ fixture model
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),      # 0: 3×3 stride 2 (like a stem)
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),      # 2: depthwise
            nn.Conv2d(8, 12, 1), nn.ReLU(),                          # 4: 1×1, keys shorter than values in view 3? no
            nn.Conv2d(12, 5, 1),                                     # 6: 1×1 projection, f=5 < c=12
        )
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return load_classifier(Tiny(), preprocess=Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _masks(n):
    out = []
    for i in range(n):
        m = np.zeros((40, 48), np.float32)
        m[8 + i : 26 + i, 10:32] = 1
        out.append(m)
    return out


def _stats(clf, layer, view, n=40):
    mem = LayerMemory(dict(clf.model.named_modules())[layer], view)
    x, y = layer_io(clf, layer, clf.preprocess.batch(_images(n, seed=9)))
    s, spec = SecondMoment(), KeySpectrum()
    with torch.no_grad():
        s.add(mem.flat_keys(x, y))
        spec.add(LayerMemory(mem.module, 3).keys(x, y))
    return s, spec


def _rule(clf, layer, view):
    return inverse_rule_from_images(clf, layer, _images(2), _images(2, seed=1), _masks(2), view=view)


@pytest.mark.parametrize("layer", ["features.0", "features.6", "head"])
@pytest.mark.parametrize("view", [3, 4])
@pytest.mark.parametrize("solver", ["transpose", "pinv", "fourier"])
def test_each_solver_saves_loads_applies_and_undoes_exactly(tiny, tmp_path, layer, view, solver):
    rule = _rule(tiny, layer, view)
    s, spec = _stats(tiny, layer, view)
    edit = inverse_rewrite(tiny, rule, spec if solver == "fourier" else s, solver=solver)
    u = edit.updates[0]
    assert (u.layer, u.view, edit.meta["solver"], edit.meta["direction"]) == (layer, view, solver, "inverse")
    mem = LayerMemory(dict(tiny.model.named_modules())[layer], view)
    w0 = mem.weight.detach().clone()
    m0 = mem.matrix().double()
    path = edit.save(tmp_path / f"{solver}.safetensors")
    loaded = Edit.load(path)
    assert json.loads(path.with_name(path.name + ".json").read_text())["meta"]["solver"] == solver
    torch.testing.assert_close(loaded.updates[0].lam, u.lam, rtol=0, atol=0)
    torch.testing.assert_close(loaded.updates[0].direction, u.direction, rtol=0, atol=0)
    handle = loaded.apply(tiny.model)
    want = (m0 + u.delta()).to(w0.dtype)
    torch.testing.assert_close(mem.matrix(), want, rtol=0, atol=0)  # M1 = M0 + Λ Dᵀ, written back transposed
    handle.undo()
    assert torch.equal(mem.weight, w0)  # bit for bit
    both = loaded + loaded  # compose: same layer and view merge into one update of twice the rank
    assert both.updates[0].rank == 2 * u.rank
    torch.testing.assert_close(both.updates[0].delta(), 2 * u.delta(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["features.0", "features.6"])
def test_transpose_edit_in_view_3_satisfies_its_own_constraint(tiny, layer):
    """Algorithm 1: the transposed memory maps k* → v* exactly (the new layer weight is M1ᵀ)."""
    rule = _rule(tiny, layer, 3)
    s, _ = _stats(tiny, layer, 3)
    edit = inverse_rewrite(tiny, rule, s, solver="transpose")
    mem = LayerMemory(dict(tiny.model.named_modules())[layer], 3)
    m1 = mem.matrix().double() + edit.updates[0].delta()
    torch.testing.assert_close(m1 @ rule.key(), rule.value(), rtol=1e-9, atol=1e-9)
    assert edit.updates[0].rank == 1


def test_pinv_update_maps_back_exactly():
    """Section 3.2: P1 k* = v*, and with P1 of full column rank W1 = P1† maps v* back to k* (forward rule)."""
    m0, c = _rand(12, 5), _rand(5, 40, seed=1)
    c = c @ c.T / 40
    k, v = _rand(5, 1, seed=2), _rand(12, 1, seed=3)
    dm = pinv_update(m0, k, v, c, ridge=0)
    w1 = (m0 + dm).T
    torch.testing.assert_close(torch.linalg.pinv(w1) @ k, v, rtol=1e-9, atol=1e-9)  # P1 k* = v*
    torch.testing.assert_close(w1 @ v, k, rtol=1e-9, atol=1e-9)  # W1 v* = k*
    assert torch.linalg.matrix_rank(dm) <= 3  # rank-one change of P → rank ≤ 3 change of P†
    lam, d = factorize(dm, atol=1e-12)
    torch.testing.assert_close(lam @ d.T, dm, rtol=1e-12, atol=1e-12)


def test_fourier_on_a_1x1_layer_is_the_transpose_solver(tiny):
    layer = "features.6"
    rule = _rule(tiny, layer, 3)
    s, spec = _stats(tiny, layer, 3)
    e_t = inverse_rewrite(tiny, rule, s, solver="transpose")
    e_f = inverse_rewrite(tiny, rule, spec, solver="fourier")
    torch.testing.assert_close(e_f.updates[0].delta(), e_t.updates[0].delta(), rtol=1e-8, atol=1e-10)


def test_fourier_layer_update_equals_the_constrained_conv_least_squares(tiny):
    """Stride 1, 3×3, padding 1: the layer solver == conv_lstsq_fourier on data V = M0 ⊛ Y (circular)."""
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    mem = LayerMemory(conv, 3)
    y = _rand(30, 6, 5, 5, seed=7)
    spec = KeySpectrum()
    spec.add(y)
    taps = [(a, b) for a in range(3) for b in range(3)]
    offsets = [(1 - a, 1 - b) for a, b in taps]  # x(j) reads y(j − e) with e = a − 1
    k0 = conv.weight.detach().permute(1, 0, 2, 3).reshape(4, 6, 9)  # M[c, f, t] = W[f, c, a_t]
    v = torch.einsum("cft,nfthw->nchw", k0, _shifted(y, offsets))
    key, value = _rand(6, seed=8), _rand(4, seed=9)
    k1 = conv_lstsq_fourier(y, v, offsets=offsets, key=key, value=value)
    dw = fourier_layer_update(mem, spec, key, value, ridge=0)
    torch.testing.assert_close(dw.permute(1, 0, 2, 3).reshape(4, 6, 9), k1 - k0, rtol=1e-8, atol=1e-8)


def test_fourier_edit_makes_the_adjoint_map_a_constant_key_to_its_value(tiny):
    """Strided 3×3 conv: after the edit, Wᵀ applied to the constant map k* gives v* at interior pixels."""
    layer = "features.0"
    rule = _rule(tiny, layer, 4)
    _, spec = _stats(tiny, layer, 4)
    edit = inverse_rewrite(tiny, rule, spec, solver="fourier", ridge=1e-6)
    conv = tiny.model.features[0]
    mem = LayerMemory(conv, 4)
    from rulewriter.extensions.inverse import _pixel_key, _pixel_value

    k, v = _pixel_key(mem, rule), _pixel_value(mem, rule)
    with edit.applied(tiny.model):
        x = torch.zeros(1, 3, 16, 16, requires_grad=True)
        out = nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)
        (adj,) = torch.autograd.grad(out, x, grad_outputs=k.float()[None, :, None, None].expand_as(out).contiguous())
    interior = adj[0, :, 2:-2, 2:-2].double()
    torch.testing.assert_close(interior, v[:, None, None].expand_as(interior), rtol=1e-4, atol=1e-4)


def test_key_spectrum_save_load_merge(tmp_path):
    a, b = _rand(3, 4, 5, 6), _rand(2, 4, 5, 6, seed=1)
    s1, s2, both = KeySpectrum(), KeySpectrum(), KeySpectrum()
    s1.add(a), s2.add(b), both.add(torch.cat([a, b]))
    s1.merge(s2)
    torch.testing.assert_close(s1.autocorrelation(), both.autocorrelation(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.autocorrelation(), correlate(torch.cat([a, b])) / 5, rtol=1e-10, atol=1e-10)
    loaded = KeySpectrum.load(s1.save(tmp_path / "s.safetensors", {"layer": "x"}))
    meta = loaded.meta
    assert meta == {"layer": "x"} and loaded.count == 5
    assert torch.equal(loaded.spec, s1.spec) and loaded.grid == s1.grid
    with pytest.raises(StatsError):
        s1.add(torch.zeros(1, 4, 3, 3))


# ------------------------------------------------------------------------------------------ reconstructions
@pytest.mark.parametrize("method", ["gd", "cg"])
def test_key_reconstruction_converges_on_a_well_posed_layer(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1)  # f > c: one pre-image
    k = torch.randn(6)
    y = conv(k[None, :, None, None])[0, :, 0, 0].detach()
    other = torch.randn(6)
    rec = reconstruct_key(conv, y, {"truth": k, "other": other}, steps=400, seed=1, method=method, rcond=0)
    assert rec.final()["truth"] > 0.999 and rec.closest() == "truth"
    assert rec.losses[-1] < 1e-6 * rec.losses[0]
    assert all(b <= a + 1e-12 * rec.losses[0] for a, b in zip(rec.losses, rec.losses[1:]))  # monotone
    assert len(rec.losses) == len(rec.distances["truth"]) == 401


def test_underdetermined_key_reconstruction_is_the_preimage_nearest_the_start():
    """GD and CG from the same start reach x0 + W⁺(y − W x0): the start's null-space part stays."""
    torch.manual_seed(0)
    conv = nn.Conv2d(9, 4, 1, bias=False)
    w = conv.weight.detach().double()[:, :, 0, 0]
    y = torch.randn(4, dtype=G)
    x0 = torch.randn(9, generator=torch.Generator().manual_seed(3), dtype=G) * 2.0
    want = x0 + torch.linalg.pinv(w) @ (y - w @ x0)
    for method, steps in (("cg", 20), ("gd", 3000)):
        rec = reconstruct_key(conv, y, steps=steps, seed=3, init_scale=2.0, method=method, rcond=0)
        torch.testing.assert_close(rec.result, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["cg", "gd"])
def test_near_null_directions_count_as_null_space(method):
    """A target slightly off the range would pull ~1/σ along a near-null direction; rcond keeps it out."""
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(6, 4, dtype=G))
    w = u[:, :4] @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 1e-9], dtype=G)) @ vh
    conv = nn.Conv2d(4, 6, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])
    k = torch.randn(4, dtype=G)
    y = w @ k + 1e-3 * u[:, 3]  # off the range along the near-null direction's output
    free = reconstruct_key(conv, y, steps=200, init_scale=0.0, method="cg", rcond=0)
    assert free.result.norm() > 1e4  # the plain least-squares answer runs off along v_min
    seen = k - (vh[3] @ k) * vh[3]  # what the layer can see of k: the start (0) stays along v_min
    rec = reconstruct_key(conv, y, {"seen": seen}, steps=200 if method == "cg" else 3000, init_scale=0.0,
                          method=method)
    assert rec.result.norm() < 2 * k.norm() and rec.final()["seen"] > 0.99


def test_feature_map_reconstruction_converges_and_heatmaps(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 12, 3, padding=1)
    a = torch.randn(1, 3, 6, 6)
    y = conv(a).detach()
    mask = torch.zeros(6, 6)
    mask[2:4, 2:4] = 1
    rec = reconstruct_features(conv, y, {"truth": a}, input_shape=a.shape, mask=mask, steps=80, seed=2, rcond=0)
    assert rec.final()["truth"] > 0.999 and rec.losses[-1] < 1e-8 * rec.losses[0]
    gd = reconstruct_features(conv, y, {"truth": a}, input_shape=a.shape, steps=300, seed=2, method="gd")
    assert gd.final()["truth"] > 0.99
    heat = dot_similarity(rec.result, a)
    assert heat.shape == (6, 6) and float(heat.min()) > 0
    assert dot_similarity(rec.result, a[0, :, 0, 0]).shape == (6, 6)
    png = plot_reconstructions(tmp_path / "curves.png", {"run": rec}, title="features")
    assert Image.open(png).size[0] > 100
    json.dumps(rec.to_dict(every=10))


class L2:
    """A pixel distance for reconstructions (what a FeatureDistance would measure, without a network)."""

    label = "pixel L2 (test)"

    def features(self, t):
        return [t]

    def compare(self, a, b):
        return float((a[0] - b[0]).pow(2).mean())


def test_image_reconstruction_lowers_the_loss(tiny):
    from rulewriter.extensions.reconstruct import FeatureDistance

    x = tiny.preprocess.batch(_images(1))
    _, y = layer_io(tiny, "features.4", x)

    rec = reconstruct_image(tiny, "features.4", y, {"truth": x}, steps=30, lr=0.1, distance=L2())
    assert isinstance(rec, Reconstruction) and rec.metric == "pixel L2 (test)"
    assert rec.losses[-1] < 0.5 * rec.losses[0]
    assert rec.result.shape == x.shape and not rec.higher_is_closer
    # A FeatureDistance on the same network is read off the loss pass; it must equal a separate pass.
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    dist = FeatureDistance(tiny, layers=["features.1", "features.3"], mask=mask)
    assert "not LPIPS" in dist.label
    rec = reconstruct_image(tiny, "features.4", y, {"truth": x}, steps=5, distance=dist)
    assert rec.distances["truth"][-1] == pytest.approx(dist(rec.result, dist.features(x)), rel=1e-9)


def test_float64_models_in_the_inverse_direction(tiny):
    """Rules, spectra and image reconstructions follow the model's dtype."""
    from rulewriter.extensions.fourier import collect_key_spectrum

    clf = load_classifier(tiny.model.double(), preprocess=tiny.preprocess)
    rule = _rule(clf, "features.6", 3)
    assert rule.keys.dtype == torch.float64
    data = torch.utils.data.TensorDataset(clf.preprocess.batch(_images(4, seed=3)))  # float32 images
    spec = collect_key_spectrum(clf, "features.6", data, progress=False)
    assert spec.count > 0
    assert next(clf.model.parameters()).dtype == torch.float64  # the model stays as it came
    edit = inverse_rewrite(clf, rule, spec, solver="fourier")
    with edit.applied(clf.model):
        pass
    x = clf.preprocess.batch(_images(1))
    _, y = layer_io(clf, "features.4", x)

    rec = reconstruct_image(clf, "features.4", y, {"truth": x.double()}, steps=3, distance=L2())
    assert rec.result.dtype == torch.float64 and rec.losses[-1] < rec.losses[0]


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(tiny):
    s, spec = _stats(tiny, "features.6", 3)
    with pytest.raises(EditError, match="view 3 or 4"):
        inverse_rule_from_images(tiny, "features.6", _images(1), _images(1, seed=1), _masks(1), view=2)
    fwd = Rule("features.6", 1, torch.ones(2, 12), torch.ones(2, 5), torch.ones(2))
    with pytest.raises(EditError, match="view 3 or 4"):
        inverse_rewrite(tiny, fwd, s)
    with pytest.raises(LayerError, match="depthwise"):
        inverse_rule_from_images(tiny, "features.2", _images(1), _images(1, seed=1), _masks(1))
    rule = _rule(tiny, "features.6", 3)
    with pytest.raises(EditError, match="unknown inverse solver"):
        inverse_rewrite(tiny, rule, s, solver="inverse")
    with pytest.raises(StatsError, match="KeySpectrum"):
        inverse_rewrite(tiny, rule, s, solver="fourier")
    for solver in ("pinv", "transpose"):
        with pytest.raises(StatsError, match="SecondMoment"):
            inverse_rewrite(tiny, rule, spec, solver=solver)
    with pytest.raises(EditError, match="fit"):
        inverse_rewrite(tiny, rule, spec, solver="fourier", fit="pairs")
    with pytest.raises(EditError):
        reconstruct_key(tiny.model.features[6], torch.ones(7))


def test_cli_inverse_edit_and_reconstruct(capsys, tmp_path, photo_dir, coffee_case):
    from rulewriter.cli import main

    original, manipulated, mask = coffee_case
    original.save(tmp_path / "c.png")
    manipulated.save(tmp_path / "g.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "m.png")
    out = tmp_path / "inv.safetensors"
    # The stem keeps the forward passes short; the default layer's path is the same code.
    code = main(["inverse-edit", "--solver", "fourier", "--view", "4", "--layer", "_conv_stem", "--original",
                 str(tmp_path / "c.png"), "--manipulated", str(tmp_path / "g.png"), "--mask", str(tmp_path / "m.png"),
                 "--stats-data", str(photo_dir), "--stats-samples", "4", "--no-cache", "--quiet", "--out", str(out),
                 "--json"])
    text, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(text)
    assert info["solver"] == "fourier" and info["stats"] == 4 and Edit.load(out).updates[0].view == 4
    code = main(["reconstruct", "--stage", "features", "--layer", "_conv_stem", "--image", str(tmp_path / "c.png"),
                 "--mask", str(tmp_path / "m.png"), "--compare", f"gravel={tmp_path / 'g.png'}", "--edit", str(out),
                 "--steps", "20", "--out-dir", str(tmp_path / "rec"), "--json"])
    text, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(text)
    assert set(summary["final"]) == {"image", "gravel"} and (tmp_path / "rec" / "features.curves.png").is_file()
    assert Image.open(summary["images"]["gravel"]).size == (224, 224)
    assert main(["inverse-edit", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "rulewriter: error:" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit):  # argparse: view 2 is not an inverse view
        main(["inverse-edit", "--view", "2", "--out", str(tmp_path / "y.safetensors")])
