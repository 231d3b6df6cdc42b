"""Rules from images and features, and rewrite(): exact on a fixture model, effective on the real one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.core.edit import Edit
from rulewriter.errors import EditError, LayerError, MaskError
from rulewriter.core.memory import LayerMemory
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.core.rules import Rule, layer_io, rewrite, rule_from_features, rule_from_images
from rulewriter.core.stats import SecondMoment, collect_second_moment


from fixture_models import Tiny  # noqa: E402


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    pre = Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    return load_classifier(Tiny(), preprocess=pre)


def _images(n, seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _masks(n, size=(48, 40)):
    out = []
    for i in range(n):
        m = np.zeros((size[1], size[0]), np.float32)
        m[8 + i : 24 + i, 10:30] = 1
        out.append(m)
    return out


def _stats(clf, layer, n=40):
    s = SecondMoment()
    mem = LayerMemory(dict(clf.model.named_modules())[layer], 2)
    x, _ = layer_io(clf, layer, clf.preprocess.batch(_images(n, seed=9)))
    s.add(mem.flat_keys(x))
    return s


@pytest.mark.parametrize("layer", ["features.2", "features.4"])
def test_rule_from_images_and_exact_single_rule(tiny, layer):
    orig, man, masks = _images(3), _images(3, seed=1), _masks(3)
    rule = rule_from_images(tiny, layer, orig, man, masks)
    mem = LayerMemory(dict(tiny.model.named_modules())[layer], 2)
    assert rule.keys.shape[1] == mem.key_dim and rule.values.shape[1] == mem.value_dim
    assert rule.keys.shape[0] == rule.weights.shape[0] > 3
    stats = _stats(tiny, layer)
    edit = rewrite(tiny, rule, stats, fit="mean", ridge=0, strength=1)  # the exact closed form
    with edit.applied(tiny.model):
        w1 = mem.matrix().double()
    torch.testing.assert_close(w1 @ rule.key(), rule.value(), rtol=1e-6, atol=1e-6)  # W1 k* = v*
    assert edit.updates[0].rank == 1 and edit.meta["rules"][0]["method"] == "images"


@pytest.mark.parametrize("views", [0, 4])
def test_rules_at_several_layers_are_each_layers_own_rule(tiny, views):
    """One pass over the exemplars (and their views) for every layer gives exactly the rules read one layer
    at a time: pairs, the views' cached tail inputs, targets and folds."""
    from rulewriter.core.rules import rules_from_images

    orig, man, masks = _images(3), _images(3, seed=1), _masks(3)
    layers = ["features.4", "features.2"]
    both = rules_from_images(tiny, layers, orig, man, masks, views=views)
    assert list(both) == layers
    for layer in layers:
        one = rule_from_images(tiny, layer, orig, man, masks, views=views)
        r = both[layer]
        assert r.layer == layer and r.description == one.description
        for a, b in [(r.keys, one.keys), (r.values, one.values), (r.weights, one.weights)]:
            assert torch.equal(a, b)
        if views:
            assert torch.equal(r.pair_view, one.pair_view) and r.views.start == one.views.start
            for f in ("x_orig", "x_man", "target", "group", "own"):
                assert torch.equal(getattr(r.views, f), getattr(one.views, f)), f
        else:
            assert r.views is None and one.views is None


def test_pairs_fit_reduces_the_rule_error_and_rank_r(tiny):
    layer = "features.2"
    rule = rule_from_images(tiny, layer, _images(2), _images(2, seed=1), _masks(2))
    stats = _stats(tiny, layer)
    mem = LayerMemory(tiny.model.features[2], 2)
    w0 = mem.matrix().double()
    err = lambda w: (((rule.values.T - w @ rule.keys.T) ** 2).sum(0) * rule.weights).sum()
    for ctx, rank in (("mean", None), ("svd", 3), ("zca", 2)):
        edit = rewrite(tiny, rule, stats, context=ctx, rank=rank)
        with edit.applied(tiny.model):
            w1 = mem.matrix().double()
        assert err(w1) < err(w0)
        assert edit.updates[0].rank == (rank or 1)
    # Two rules give one direction each (eq. 2.23) and are met exactly with fit="mean".
    r2 = rule_from_images(tiny, layer, _images(2, seed=3), _images(2, seed=4), _masks(2))
    edit = rewrite(tiny, [rule, r2], stats, fit="mean", ridge=0)
    with edit.applied(tiny.model):
        w1 = mem.matrix().double()
    torch.testing.assert_close(w1 @ torch.stack([rule.key(), r2.key()], 1),
                               torch.stack([rule.value(), r2.value()], 1), rtol=1e-6, atol=1e-6)


def test_projected_gd_solver_matches_closed_form(tiny):
    rule = rule_from_images(tiny, "features.4", _images(2), _images(2, seed=1), _masks(2))
    stats = _stats(tiny, "features.4")
    a = rewrite(tiny, rule, stats, strength=1, context="mean")  # the closed form itself, not a validated strength
    b = rewrite(tiny, rule, stats, solver="projected-gd", steps=3000)
    torch.testing.assert_close(b.updates[0].lam, a.updates[0].lam, rtol=1e-3, atol=1e-6)


def test_rule_from_features_pastes_texture_features(tiny):
    layer = "features.4"  # 1×1 conv: key grid = input grid
    orig, masks = _images(2), _masks(2)
    tex = _images(1, seed=5)[0]
    rule = rule_from_features(tiny, layer, orig, masks, tex)
    x_t, _ = layer_io(tiny, layer, tiny.preprocess.batch([tex]))
    # Fully covered locations hold exactly the texture's features as keys.
    full = rule.weights == 1
    assert full.any()
    tex_keys = x_t[0].permute(1, 2, 0).reshape(-1, x_t.shape[1]).double()
    dists = torch.cdist(rule.keys[full], tex_keys).min(1).values
    assert dists.max() < 1e-5
    assert rule.description["method"] == "features"


def test_float64_models_read_rules_and_rewrite(tiny):
    """Inputs follow the model's dtype (they came through Preprocess as float32)."""
    clf = load_classifier(tiny.model.double(), preprocess=tiny.preprocess)
    layer = "features.4"
    orig, man, masks = _images(2), _images(2, seed=1), _masks(2)
    rule = rule_from_images(clf, layer, orig, man, masks)
    assert rule.keys.dtype == torch.float64
    feat = rule_from_features(clf, layer, orig, masks, _images(1, seed=5)[0])
    edit = rewrite(clf, [rule, feat], _stats(clf, layer))
    with edit.applied(clf.model):
        x, y = layer_io(clf, layer, clf.preprocess.batch(man))
    assert y.dtype == torch.float64


def test_uniform_direction_is_the_constrained_minimum_and_still_maps_k_star(tiny):
    """context="uniform": d ∝ A⁻¹k* with A = C + λΣ + εI (Σ the concept keys' spread about k*, λ = trC/trΣ),
    the minimiser of dᵀCd + λdᵀΣd + ε|d|² at dᵀk* = 1; with fit="mean" the edit still maps k* → v* exactly."""
    from rulewriter.core.edit import DEFAULT_RIDGE, regularize
    from rulewriter.core.rules import concept_spread

    layer = "features.4"
    rule = rule_from_images(tiny, layer, _images(3), _images(3, seed=1), _masks(3))
    stats = _stats(tiny, layer)
    c = stats.moment().double()
    k, w = rule.keys.double(), rule.weights.double()
    kstar = (k * w[:, None]).sum(0) / w.sum()
    dev = k - kstar
    sig = (dev * w[:, None]).T @ dev / w.sum()
    spread = concept_spread([(k, rule.values, w)], c)
    torch.testing.assert_close(spread, sig * (c.trace() / sig.trace()))
    a = regularize(c + spread, DEFAULT_RIDGE)
    want = torch.linalg.solve(a, kstar)
    edit = rewrite(tiny, rule, stats, context="uniform", fit="mean", strength=1)
    d = edit.updates[0].direction.double().flatten()
    cos = float(d @ want / (d.norm() * want.norm()))
    assert cos > 1 - 1e-10
    # The constrained minimum: every other d with dᵀk* = 1 has a larger objective.
    best = want / (want @ kstar)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = torch.randn(best.shape[0], generator=g, dtype=torch.float64)
        z -= (z @ kstar) / (kstar @ kstar) * kstar  # stays on dᵀk* = 1
        alt = best + 1e-2 * z
        assert float(alt @ a @ alt) > float(best @ a @ best)
    mem = LayerMemory(dict(tiny.model.named_modules())[layer], 2)
    with edit.applied(tiny.model):
        w1 = mem.matrix().double()
    torch.testing.assert_close(w1 @ rule.key().double(), rule.value().double(), rtol=1e-6, atol=1e-6)


def test_zca_directions_are_whitened_with_the_ridge_the_solve_uses(tiny):
    """rewrite(context="zca") updates along (C + εI)^{-1/2} Q for the same ε as its C⁻¹ (one ridge, not two)."""
    from rulewriter.concepts.keys import context
    from rulewriter.core.edit import DEFAULT_RIDGE, regularize

    layer = "features.4"
    rule = rule_from_images(tiny, layer, _images(3), _images(3, seed=1), _masks(3))
    stats = _stats(tiny, layer)
    edit = rewrite(tiny, rule, stats, context="zca", rank=2)
    d = edit.updates[0].direction
    creg = regularize(stats.moment(), DEFAULT_RIDGE)
    evals, evecs = torch.linalg.eigh(creg)
    z = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    kw = rule.keys.double() * rule.weights.double().sqrt()[:, None]
    q = torch.linalg.svd(kw @ z, full_matrices=False)[2][:2].T
    want = torch.linalg.qr(z @ q)[0]
    got = torch.linalg.qr(d)[0]
    cosines = torch.linalg.svdvals(want.T @ got)  # cosines of the principal angles between the spans
    assert float(cosines.min()) > 1 - 1e-8
    # The same directions from context(space="update") with that ridge.
    upd = context(rule.keys, 2, method="zca", C=stats.moment(), weights=rule.weights, ridge=DEFAULT_RIDGE,
                  space="update")
    assert float(torch.linalg.svdvals(upd.T @ got).min()) > 1 - 1e-8


def test_bad_inputs_are_clear_and_change_nothing(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    orig, man = _images(1), _images(1, seed=1)
    with pytest.raises(MaskError, match="empty|no"):
        rule_from_images(tiny, "features.2", orig, man, [np.zeros((40, 48))])
    with pytest.raises(MaskError, match="aspect"):
        rule_from_images(tiny, "features.2", orig, man, [np.ones((40, 40))])
    with pytest.raises(MaskError, match="NaN"):
        rule_from_images(tiny, "features.2", orig, man, [np.full((40, 48), np.nan)])
    with pytest.raises(LayerError, match="features.2"):
        rule_from_images(tiny, "features.22", orig, man, _masks(1))
    with pytest.raises(EditError, match="one manipulated"):
        rule_from_images(tiny, "features.2", orig, man * 2, _masks(1))
    rule = rule_from_images(tiny, "features.2", orig, man, _masks(1))
    with pytest.raises(EditError, match="statistics are for"):
        rewrite(tiny, rule, torch.eye(5))
    with pytest.raises(EditError, match="NaN"):
        k = rule.keys.clone()
        k[0, 0] = float("nan")
        Rule(rule.layer, rule.view, k, rule.values, rule.weights)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_real_model_edit_restores_a_texture_pasted_photo(lite0, coffee_case, photo_dir, tmp_path):
    """The whole path on EfficientNet-Lite0: gravel on an espresso cup → rewrite → espresso again."""
    original, manipulated, mask = coffee_case
    layer = lite0.default_layer
    top1 = lambda im: lite0.predict(lite0.preprocess.batch([im]), topk=1)[0][0][1]
    assert top1(original) == "espresso"
    assert top1(manipulated) != "espresso"  # the texture breaks the prediction
    stats = collect_second_moment(lite0, layer, photo_dir, progress=False)
    rule = rule_from_images(lite0, layer, [original], [manipulated], [mask])
    edit = rewrite(lite0, rule, stats)
    w0 = lite0.model.get_submodule(layer).weight.detach().clone()
    with edit.applied(lite0.model):
        assert top1(manipulated) == "espresso"
        assert top1(original) == "espresso"
    assert torch.equal(lite0.model.get_submodule(layer).weight, w0)
    loaded = Edit.load(edit.save(tmp_path / "coffee.safetensors"))
    with loaded.applied(lite0.model):
        assert top1(manipulated) == "espresso"
