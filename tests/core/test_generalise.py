"""generalise: joint exemplar views, the collateral measure and the validation-chosen strength."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.core.generalise import (
    DEFAULT_VIEWS,
    MIN_VIEWS,
    STRENGTHS,
    augment_exemplar,
    exemplar_views,
    relative_collateral,
    view_groups,
)
from rulewriter.core.memory import LayerMemory
from rulewriter.core.rules import Rule, layer_io, rewrite, rule_from_images
from rulewriter.core.stats import SecondMoment


# The fixture model and images of the rule tests (one copy for both files).
from test_rules import Tiny, _images, _masks, tiny  # noqa: E402,F401
from test_locality import _mlp  # noqa: E402


def _pasted(images, masks, seed=5):
    tex = _images(len(images), seed=seed)
    return [Image.fromarray(np.where(m[..., None] > 0, np.asarray(t), np.asarray(o)).astype(np.uint8))
            for o, t, m in zip(images, tex, masks)]


def _own(rule):
    keep = rule.views.own[rule.pair_view]
    return Rule(rule.layer, rule.view, rule.keys[keep], rule.values[keep], rule.weights[keep])


def _keys(clf, layer, n=60):
    mem = LayerMemory(dict(clf.model.named_modules())[layer], 2)
    x, _ = layer_io(clf, layer, clf.preprocess.batch(_images(n, seed=9)))
    return mem.flat_keys(x).double()


# ------------------------------------------------------------------------------------------ augmentation
def test_augmentation_keeps_mask_and_images_aligned():
    """Outside the moved mask the two views are the same pixels; inside they differ where the paste did."""
    rng = np.random.default_rng(0)
    orig = Image.fromarray(np.full((60, 80, 3), 40, np.uint8))
    mask = np.zeros((60, 80), np.float32)
    mask[20:40, 30:60] = 1
    man = Image.fromarray(np.repeat(np.where(mask[..., None] > 0, 250, 40), 3, 2).astype(np.uint8))
    for _ in range(20):
        o, s, m = augment_exemplar(orig, man, mask, rng, size=64)
        a, b = np.asarray(o, np.int16), np.asarray(s, np.int16)
        assert o.size == s.size == (64, 64) and m.shape == (64, 64)
        assert m.max() > 0  # the crop keeps part of the concept
        diff = np.abs(a - b).max(2)
        assert (diff[m == 0] == 0).all()  # identical outside the mask
        assert (diff[m > 0.99] > 50).all()  # the pasted region moved with the mask


def test_augmentation_follows_a_flip_exactly():
    """A mask on the left half ends up where the manipulated pixels are, flipped or not."""
    rng = np.random.default_rng(3)
    orig = Image.fromarray(np.zeros((50, 50, 3), np.uint8))
    mask = np.zeros((50, 50), np.float32)
    mask[:, :10] = 1
    man = Image.fromarray(np.repeat(np.where(mask[..., None] > 0, 255, 0), 3, 2).astype(np.uint8))
    for _ in range(10):
        o, s, m = augment_exemplar(orig, man, mask, rng, size=50)
        bright = np.asarray(s).max(2) > 20
        assert (bright == (m > 0.1)).mean() > 0.97


def test_views_and_folds():
    imgs, masks = _images(3), _masks(3)
    o, s, m, g = exemplar_views(imgs, _pasted(imgs, masks), masks, 4)
    assert len(o) == len(s) == len(m) == len(g) == 3 * 5
    assert g == [0] * 5 + [1] * 5 + [2] * 5  # leave one exemplar out: a fold is all of an exemplar's views
    assert o[0] is imgs[0] and o[5] is imgs[1]  # each exemplar leads its own views
    o, s, m, g = exemplar_views(imgs[:1], _pasted(imgs[:1], masks[:1]), masks[:1], 4)
    assert len(o) == 1 + MIN_VIEWS and g == view_groups(1, MIN_VIEWS)
    assert g[0] == -1 and sorted(set(g[1:])) == [0, 1]  # the exemplar itself is never left out
    a = exemplar_views(imgs, _pasted(imgs, masks), masks, 2, seed=1)
    b = exemplar_views(imgs, _pasted(imgs, masks), masks, 2, seed=1)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[1], b[1]))  # deterministic


# ------------------------------------------------------------------------------------------ collateral
def test_relative_collateral_is_the_mean_square_output_change_on_the_statistics_keys(tiny):
    layer = "features.2"
    k = _keys(tiny, layer)
    s = SecondMoment()
    s.add(k)
    w0 = LayerMemory(dict(tiny.model.named_modules())[layer], 2).matrix().double()
    torch.manual_seed(1)
    delta = torch.randn(w0.shape[0], 1).double() @ torch.randn(1, w0.shape[1]).double() * 0.01
    brute = float(((k @ delta.T) ** 2).sum() / ((k @ w0.T) ** 2).sum())
    assert relative_collateral(w0, delta, s.moment()) == pytest.approx(brute, rel=1e-9)
    assert relative_collateral(w0, 3 * delta, s.moment()) == pytest.approx(9 * brute, rel=1e-9)


def test_edit_scaled_scales_the_update_only():
    e = Edit([LayerUpdate("x", 2, torch.randn(3, 2).double(), torch.randn(5, 2).double())], {"a": 1})
    s = e.scaled(2.5)
    torch.testing.assert_close(s.updates[0].delta(), 2.5 * e.updates[0].delta())
    torch.testing.assert_close(s.updates[0].direction, e.updates[0].direction)
    assert s.meta == e.meta


# ------------------------------------------------------------------------------------------ the strength
def _stats(clf, layer):
    s = SecondMoment()
    s.add(_keys(clf, layer))
    return s


@pytest.mark.parametrize("budget", [1e-6, 1e-3, 0.05, 10.0])
def test_chosen_strength_never_exceeds_the_collateral_budget(tiny, budget):
    layer = "features.2"
    imgs, masks = _images(3), _masks(3)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    stats = _stats(tiny, layer)
    edit = rewrite(tiny, rule, stats, budget=budget)
    ch = edit.meta["strength"]
    assert ch["chosen"] in STRENGTHS and ch["folds"] == 3 and ch["n_validation"] == len(rule.views)
    w0 = LayerMemory(dict(tiny.model.named_modules())[layer], 2).matrix().double()
    col = relative_collateral(w0, edit.updates[0].delta(), stats.moment())  # on the calibration keys
    assert col == pytest.approx(ch["collateral"], rel=1e-9)
    closed = ch["candidates"][0]  # strength 1 of the first candidate: the fallback, always admissible
    assert (closed["strength"], closed["within_budget"]) == (1.0, True)
    # Within the budget, or (where the closed form is over it) no worse than the closed form.
    assert col <= max(budget, closed["collateral"]) * (1 + 1e-9)
    # The choice is the best admissible row of the table it prints (rows the search left unmeasured, or
    # measured and not validated, could not rank higher).
    ok = [r for r in ch["candidates"] if r["within_budget"] and r["right"] is not None]
    order = {id(r): k for k, r in enumerate(ch["candidates"])}
    best = max(ok, key=lambda r: (r["exemplars_restored"], r["admitted"] != "no new change", r["right"],
                                  round(r["mean_prob"], 6), -order[id(r)]))
    assert (ch["chosen"], ch["candidate"]) == (best["strength"], best["candidate"])
    # A setting is over the budget when measured so, or when a smaller strength of its candidate already was.
    for r in ch["candidates"]:
        limit = max(budget, closed["collateral"])
        if r["within_budget"] is None:  # not measured
            assert r["collateral"] is None and r["admitted"] is None
        elif not r["within_budget"]:
            assert r["collateral"] is None or r["collateral"] > limit
            if r["collateral"] is None:
                assert any(q["candidate"] == r["candidate"] and q["strength"] < r["strength"]
                           and q["collateral"] is not None and q["collateral"] > limit for q in ch["candidates"])
        else:
            assert r["collateral"] <= limit * (1 + 1e-9) or r is closed


def test_auto_strength_is_the_closed_form_scaled(tiny):
    layer = "features.2"
    imgs, masks = _images(2), _masks(2)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    stats = _stats(tiny, layer)
    auto = rewrite(tiny, rule, stats)
    ctx, rank, aug = auto.meta["strength"]["candidate"]
    assert (auto.meta["context"], auto.meta["rank"]) == (ctx, rank)
    fitted = rule if aug else _own(rule)  # without augmentation: the exemplars' own pairs
    one = rewrite(tiny, fitted, stats, strength=1, context=ctx, rank=rank)
    s = auto.meta["strength"]["chosen"]
    torch.testing.assert_close(auto.updates[0].delta(), s * one.updates[0].delta())
    assert one.meta["strength"]["reason"] == "given"
    # Without views (the thesis's rule) there is nothing to validate on: the closed form.
    plain = rewrite(tiny, rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=0), stats)
    assert plain.meta["strength"]["chosen"] == 1.0 and "no exemplar views" in plain.meta["strength"]["reason"]


def test_validation_folds_never_fit_on_the_views_they_score(tiny, monkeypatch):
    """Each fold's edit is solved without the left-out exemplar's pairs."""
    import rulewriter.core.generalise as G

    layer = "features.2"
    imgs, masks = _images(3), _masks(3)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    seen = []
    real = G.choose_strength

    def spy(model, views, solve, collateral, **kw):
        def wrapped(f, *cand):
            e = solve(f, *cand)
            if f is not None:
                seen.append((f, cand[0], e))
            return e
        return real(model, views, wrapped, collateral, **kw)

    monkeypatch.setattr(G, "choose_strength", spy)
    rewrite(tiny, rule, _stats(tiny, layer), budget=10.0)  # every setting admissible, so every one is validated
    assert sorted({f for f, _, _ in seen}) == [0, 1, 2]
    stats = _stats(tiny, layer)
    assert {c for _, c, _ in seen} == {(ctx, r, aug) for ctx, r in (("mean", 1), ("uniform", 1), ("svd", 4))
                                       for aug in (False, True)}
    for f, (ctx, rank, aug), e in seen:
        # The fold's edit is the closed form of a rule made of the other exemplars' pairs only.
        keep = rule.views.group[rule.pair_view] != f
        if not aug:
            keep &= rule.views.own[rule.pair_view]
        other = Rule(layer, 2, rule.keys[keep], rule.values[keep], rule.weights[keep])
        ref = rewrite(tiny, other, stats, strength=1, context=ctx, rank=rank)
        torch.testing.assert_close(e.updates[0].delta(), ref.updates[0].delta())
    groups = rule.views.group[rule.pair_view]
    assert set(groups.tolist()) == {0, 1, 2}  # every exemplar contributes pairs, so leaving one out matters


def test_bad_strength_is_a_clear_error(tiny):
    from rulewriter.errors import EditError

    layer = "features.2"
    imgs, masks = _images(1), _masks(1)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=0)
    for bad in ("strong", -1, 0, float("nan")):
        with pytest.raises(EditError, match="strength"):
            rewrite(tiny, rule, _stats(tiny, layer), strength=bad)


# ------------------------------------------------------------------------------------------ real model
def car_parts_data():
    """The benchmarks' helpers (``_common``) and the shared data folder, or a skip when car-parts or
    imagenet-samples is absent."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _common as C

    shared = C.shared_dir()
    if not (shared / "data" / "car-parts").is_dir() or not (shared / "data" / "imagenet-samples").is_dir():
        pytest.skip(f"shared data not found at {shared}")
    return C, shared


def car_errors(clf, shared, split: str, want: int, limit: int, texture: str = "skimage:gravel") -> list:
    """Up to ``want`` of the first ``limit`` car-parts ``split`` photos whose top-1 the texture pasted on the
    whole car changes: (photo, pasted, mask, clean top-1). Needs ``benchmarks/`` on sys.path."""
    import _common as C

    from rulewriter.concepts.manipulate import paste_texture, texture_from
    from rulewriter.models.data import load_image

    tex = texture_from(texture)
    paths, index = C.car_photos(shared, split)
    out = []
    for p in paths[:limit]:
        m = C.whole_car_mask(index, p)
        img = load_image(p)
        man = paste_texture(img, m, tex)
        a, b = C.top1(clf, clf.preprocess.batch([img, man])).tolist()
        if a != b:
            out.append((img, man, m, a))
        if len(out) >= want:
            break
    return out


@pytest.mark.slow
def test_real_model_edit_fixes_held_out_photos_it_never_saw(lite0):
    """Gravel on whole cars: an edit from car-parts *training* exemplars fixes car-parts *test* photos.

    The validated edit (views, strength under the locality budget on calibration images disjoint from C's)
    must fix at least one held-out error and no fewer than the closed form from the same exemplars, restore
    its exemplars, and keep the calibration images within the budget.
    """
    C, shared = car_parts_data()
    from rulewriter.core.stats import collect_second_moment

    clf = lite0
    layer = clf.default_layer
    ex = car_errors(clf, shared, "trainingset", 3, 40)
    held = car_errors(clf, shared, "testset", 12, 60)
    assert len(ex) == 3 and held
    photos = sorted((shared / "data" / "imagenet-samples").glob("*.JPEG"))[:200:2] or \
        sorted((shared / "data" / "imagenet-samples").glob("*.jpg"))[:200:2]
    stats = collect_second_moment(clf, layer, photos, progress=False)
    cal = [p for p in sorted((shared / "data" / "imagenet-samples").iterdir())[1:400:2]]  # none of C's
    o, s, m = [e[0] for e in ex], [e[1] for e in ex], [e[2] for e in ex]
    x_held = clf.preprocess.batch([h[1] for h in held])
    y_held = torch.tensor([h[3] for h in held])

    def fixed(edit):
        with edit.applied(clf.model):
            return int((C.top1(clf, x_held) == y_held).sum()), C.top1(clf, clf.preprocess.batch(s)).tolist()

    old, _ = fixed(rewrite(clf, rule_from_images(clf, layer, o, s, m, views=0), stats, strength=1))
    new_edit = rewrite(clf, rule_from_images(clf, layer, o, s, m, views=DEFAULT_VIEWS), stats, calibration=cal)
    new, ex_top = fixed(new_edit)
    why = new_edit.meta["strength"]["reason"]
    assert new >= 1 and new >= old, (new, old, why)
    assert sum(a == e[3] for a, e in zip(ex_top, ex)) >= 2, why
    assert "of 200 calibration images" in why
    if "fallback" not in why:  # recount the calibration images' top-1 changes independently
        from rulewriter.core.generalise import LocalityBudget, calibration_set

        assert LocalityBudget().admits(calibration_set(clf, layer, cal).changed(clf.model, new_edit))


class _InputViews:
    """Exemplar views of a model on vectors: the manipulated views are noisy copies of the clean ones."""

    def __init__(self, x: torch.Tensor, model: nn.Module) -> None:
        g = torch.Generator().manual_seed(5)
        self.orig, self.man = x, x + 0.8 * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            self.target = model(x).argmax(1)
        self.group = torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2])
        self.own = self.group < 0

    def __len__(self) -> int:
        return len(self.orig)

    @torch.no_grad()
    def logits(self, model, which, idx):
        return model((self.man if which == "man" else self.orig)[idx])


def _mlp_and_calibration() -> tuple[nn.Module, Any]:
    """A small MLP with confident outputs (a dozen near ties among 200 inputs) and its Calibration."""
    model, _, cal = _mlp()
    return model, cal


def _directions(model: nn.Module, cal: Any, cands: list[float]):
    """Views, and one random rank-1 direction of ``fc1`` per candidate size: ``(views, solve, collateral,
    seen)``, where ``collateral`` passes its stop on to ``cal`` and appends to ``seen`` how many images ran."""
    views = _InputViews(2 * torch.randn(8, 8), model)
    dirs = {c: (c * torch.randn(32, 1), torch.randn(8, 1)) for c in cands}
    solve = lambda left_out, c: Edit([LayerUpdate("fc1", 2, *dirs[c])])  # noqa: E731
    seen: list[int] = []

    def collateral(s, c, stop=None):
        out = cal.changed(model, solve(None, c).scaled(s), stop=stop)
        seen.append(out.get("measured", out["n"]))
        return out

    return views, solve, collateral, seen


def test_a_stopping_measurement_chooses_exactly_what_the_full_one_does():
    """``choose_strength`` hands its collateral the stop; the choice, every setting's admission and
    scores are those of full measurements, with fewer calibration images run."""
    from rulewriter.core.generalise import LocalityBudget, choose_strength

    model, cal = _mlp_and_calibration()
    cands = [0.003, 0.01, 0.03]  # three directions, each of its own size: top-1 changes start at 1, 8, 30
    views, solve, stopping, seen = _directions(model, cal, cands)
    budget = LocalityBudget(changed=0.01, near_tie=0.1, expected=0.05)
    fast = choose_strength(model, views, solve, stopping, budget=budget, candidates=cands, exhaustive=True)
    n_fast = sum(seen)
    seen.clear()
    slow = choose_strength(model, views, solve, lambda s, c: stopping(s, c), budget=budget, candidates=cands,
                           exhaustive=True)
    assert (fast.chosen, fast.candidate, fast.reason) == (slow.chosen, slow.candidate, slow.reason)
    keys = ("strength", "candidate", "within_budget", "admitted", "exemplars_restored", "right", "mean_prob")
    assert [[r[k] for k in keys] for r in fast.rows] == [[r[k] for k in keys] for r in slow.rows]
    assert sum(r["within_budget"] for r in slow.rows) > 1  # more than the fallback competed
    assert n_fast < sum(seen) == 200 * len(seen), (n_fast, sum(seen))  # some setting stopped early


def test_a_choice_that_cannot_beat_another_layers_score_stops_early_and_only_then():
    """``to_beat`` prunes exactly the choices whose admissible settings all score below it (or tie where
    ties lose): at the choice's own score the choice is unchanged where ties win, above it the closed
    form is returned, marked pruned, after fewer calibration images."""
    from rulewriter.core.generalise import LocalityBudget, choose_layer, choose_strength, chosen_row, layer_score

    model, cal = _mlp_and_calibration()
    budget = LocalityBudget(changed=0.05, near_tie=0.3)
    pruned_any = False
    for seed in range(6):
        torch.manual_seed(seed)
        cands = [0.01, 0.03, 0.1]
        views, solve, coll, seen = _directions(model, cal, cands)
        full = choose_strength(model, views, solve, coll, budget=budget, candidates=cands)
        n_full = sum(seen)
        score = layer_score(chosen_row(full.to_dict()))
        seen.clear()
        same = choose_strength(model, views, solve, coll, budget=budget, candidates=cands, to_beat=score,
                               ties_win=True)
        assert (same.chosen, same.candidate, same.reason, same.rows) == (full.chosen, full.candidate, full.reason,
                                                                         full.rows)
        for above in ([score[0] + 0.5, False, 0.0, 0.0], [*score[:2], score[2] + 1e-3, 0.0], score):
            seen.clear()
            cut = choose_strength(model, views, solve, coll, budget=budget, candidates=cands, to_beat=above)
            assert cut.pruned and cut.chosen == 1.0 and not cut.rows and sum(seen) <= n_full
            assert cut.to_dict()["pruned"] and "not validated in full" in cut.reason
            # a pruned record scores nothing in the layer choice
            assert choose_layer(["a", "b"], [full.to_dict(), cut.to_dict()])["chosen"] == "a"
            pruned_any = pruned_any or sum(seen) < n_full
    assert pruned_any


def test_a_validation_stops_part_way_once_its_setting_cannot_beat_another_layer():
    """Views are scored a fold's manipulated or clean half at a time: a setting whose views still to score
    could not lift it above ``to_beat`` is left part way through, and the choice is still pruned."""
    from rulewriter.core.generalise import LocalityBudget, choose_strength, chosen_row, layer_score

    model, cal = _mlp_and_calibration()
    budget = LocalityBudget(changed=0.05, near_tie=0.3)
    per_setting = 3 * 2  # three folds, manipulated and clean views each
    stopped_part_way = 0
    for seed in range(6):
        torch.manual_seed(seed)
        cands = [0.01, 0.03, 0.1]
        views, solve, coll, _ = _directions(model, cal, cands)
        score = layer_score(chosen_row(choose_strength(model, views, solve, coll, budget=budget,
                                                       candidates=cands).to_dict()))
        parts = []
        real = views.logits
        views.logits = lambda m, which, idx: (parts.append(1) if not bool(views.own[idx].any()) else None) or \
            real(m, which, idx)  # noqa: E731 (scored views, not the exemplars' own)
        cut = choose_strength(model, views, solve, coll, budget=budget, candidates=cands,
                              to_beat=[*score[:2], score[2] + 1e-3, 0.0])
        assert cut.pruned
        stopped_part_way += len(parts) % per_setting != 0
    assert stopped_part_way > 0


def test_the_best_first_search_chooses_exactly_what_the_exhaustive_one_does():
    """Refining only the setting whose rank bound is highest gives the exhaustive search's choice and the
    same figures on every row it settled, with fewer calibration measurements."""
    from rulewriter.core.generalise import LocalityBudget, choose_strength

    model, cal = _mlp_and_calibration()
    fewer = 0
    for seed in range(8):
        for budget in (LocalityBudget(changed=0.02, near_tie=0.2), LocalityBudget(changed=0.1, near_tie=0.5),
                       LocalityBudget(changed=0.0, near_tie=0.0)):
            torch.manual_seed(seed)
            cands = [0.003, 0.01, 0.03, 0.1]
            views, solve, coll, seen = _directions(model, cal, cands)
            full = choose_strength(model, views, solve, coll, budget=budget, candidates=cands, exhaustive=True)
            n_full = len(seen)
            seen.clear()
            lazy = choose_strength(model, views, solve, coll, budget=budget, candidates=cands)
            assert (lazy.chosen, lazy.candidate) == (full.chosen, full.candidate), (seed, budget)
            assert len(seen) <= n_full
            fewer += len(seen) < n_full
            for a, b in zip(lazy.rows, full.rows):
                if a["within_budget"] is not None:  # settled; a setting over the budget may be measured in one only
                    assert (a["within_budget"], a["admitted"]) == (b["within_budget"], b["admitted"])
                    assert a["collateral"] == b["collateral"] or None in (a["collateral"], b["collateral"])
                if a["right"] is not None and b["right"] is not None:  # the exhaustive one validates admissible ones
                    assert (a["right"], a["mean_prob"]) == (b["right"], b["mean_prob"])
    assert fewer > 0


@pytest.mark.parametrize("changed", [0.0, 0.05, 1.0])
def test_chosen_strength_keeps_the_calibration_images_within_the_locality_budget(tiny, changed):
    """Recounted independently: the chosen edit changes at most the budget's share of calibration top-1s."""
    from rulewriter.core.generalise import LocalityBudget

    layer = "features.2"
    imgs, masks = _images(3), _masks(3)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    cal_imgs = tiny.preprocess.batch(_images(60, seed=21))
    budget = LocalityBudget(changed=changed, near_tie=1.0, expected=1.0)  # the counted share alone binds
    edit = rewrite(tiny, rule, _stats(tiny, layer), calibration=cal_imgs, budget=budget)
    ch = edit.meta["strength"]
    with torch.no_grad():
        base = tiny.model(cal_imgs).argmax(1)
        with edit.applied(tiny.model):
            share = float((tiny.model(cal_imgs).argmax(1) != base).double().mean())
    first = ch["candidates"][0]  # the closed form, measured as the fallback
    assert share <= max(changed, first["collateral"]["changed"]) + 1e-12
    assert ch["budget"] == {"changed": changed, "near_tie": 1.0, "expected": 1.0}
    json.dumps(ch)  # the record is JSON
    if changed == 1.0:  # everything admissible: the budget is spent up to the strongest strength
        assert ch["chosen"] == max(STRENGTHS) and all(r["within_budget"] is not False for r in ch["candidates"])


class _PeakedViews:
    """Views whose left-out views are right only near strength 2 (of a unit update on ``fc``), while the
    exemplars themselves are right at every strength: the validation prefers 2, the budget allows more."""

    def __init__(self) -> None:
        self.group = torch.tensor([-1, 0, 0, 1, 1])
        self.own = torch.tensor([True, False, False, False, False])
        self.target = torch.zeros(5, dtype=torch.long)

    def __len__(self) -> int:
        return 5

    def logits(self, model, which, idx):
        s = float(model.fc.weight.detach()[0, 0])  # the strength: the weight starts at 0 and the update adds s
        own = self.own[idx]
        right = torch.where(own, torch.tensor(4.0), torch.tensor(3.0 - 2.0 * abs(s - 2.0)))
        return torch.stack([right, torch.zeros_like(right)], 1)


def test_a_locality_budget_is_spent_on_the_validated_candidate():
    """With a locality budget the validated strength (2) goes up to the strongest within the budget that
    restores as many exemplars (4); an energy budget, a proxy for top-1 changes, keeps the validated one."""
    from rulewriter.core.edit import Edit, LayerUpdate
    from rulewriter.core.generalise import LocalityBudget, choose_strength

    model = torch.nn.Sequential()
    model.fc = torch.nn.Linear(1, 2, bias=False)
    torch.nn.init.zeros_(model.fc.weight)
    unit = Edit([LayerUpdate("fc", 2, torch.tensor([[1.0], [0.0]]), torch.ones(1, 1))])

    def cal(s):  # top-1 changes start past strength 4
        which = [] if s <= 4 else [1]
        return {"changed": len(which) / 300, "n": 300, "changed_near_tie": 0.0, "n_near_tie": 10, "which": which}

    views = _PeakedViews()
    spent = choose_strength(model, views, lambda f: unit, cal, budget=LocalityBudget(changed=0.0))
    assert spent.chosen == 4.0 and "strongest within the budget" in spent.reason
    row = {r["strength"]: r for r in spent.rows}
    assert row[2.0]["right"] > row[4.0]["right"] and row[4.0]["exemplars_restored"] == 1
    assert not row[6.0]["within_budget"]
    proxy = choose_strength(model, views, lambda f: unit, lambda s: 0.01 * s * s, budget=0.1)
    assert proxy.chosen == 2.0 and "strongest" not in proxy.reason
    assert float(model.fc.weight.detach()[0, 0]) == 0.0  # every edit was undone


def test_where_the_closed_form_is_over_the_budget_settings_adding_nothing_to_it_are_admitted(tiny, monkeypatch):
    """The closed form is the fallback; a setting that changes only calibration images the closed form
    changes too adds nothing the fallback would not, so it is admitted. One that changes another image is
    not, even at the same count, and neither are the larger strengths of its candidate."""
    import rulewriter.core.generalise as G

    layer = "features.2"
    imgs, masks = _images(3), _masks(3)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    real = G.choose_strength
    other = ("svd", 4, False)

    def fake(s, cand):  # the closed form flips image 3 (a near tie); so do the others, up to strength 2
        which = [5] if (cand == other and s == 1.5) else [3] if s <= 2 else [3, 7]
        return {"changed": len(which) / 60, "n": 60, "changed_near_tie": 0.1, "n_near_tie": 10, "which": which}

    monkeypatch.setattr(G, "choose_strength", lambda model, views, solve, collateral, **kw:
                        real(model, views, solve, fake, **kw))
    cal = tiny.preprocess.batch(_images(60, seed=21))
    ch = rewrite(tiny, rule, _stats(tiny, layer), calibration=cal).meta["strength"]
    assert ch["budget"] == {"changed": 0.005, "near_tie": 0.05, "expected": 0.01}  # 1/60 and 1/10 are over it
    for r in ch["candidates"]:
        cand = tuple(r["candidate"])
        limit = 1.0 if cand == other else 2.0
        if r["within_budget"] is None:  # left unmeasured by the search
            assert r["collateral"] is None and r["admitted"] is None, r
            continue
        assert r["within_budget"] == (r["strength"] <= limit), r
        assert (r["collateral"] is None) == (r["strength"] > (1.5 if cand == other else 3)), r
    assert ch["chosen"] <= 2 and "even the closed form is over the budget (it is the fallback)" in ch["reason"]
    assert {r["admitted"] for r in ch["candidates"]} <= {"fallback", "no new change", None}
    # Strength beyond the budget is spent on the user's exemplars only: a "no new change" setting is chosen
    # only where it restores more of them than the fallback does.
    best = next(r for r in ch["candidates"] if (r["strength"], tuple(r["candidate"])) ==
                (ch["chosen"], tuple(ch["candidate"])))
    fallback = ch["candidates"][0]
    assert fallback["admitted"] == "fallback"
    if best["admitted"] == "no new change":
        assert best["exemplars_restored"] > fallback["exemplars_restored"]
        assert "restores more exemplars than any within the budget" in ch["reason"]
    else:
        assert best is fallback or best["exemplars_restored"] >= max(
            r["exemplars_restored"] for r in ch["candidates"] if r["admitted"] == "no new change")


def test_a_locality_budget_needs_calibration_images(tiny):
    from rulewriter.core.generalise import LocalityBudget
    from rulewriter.errors import EditError

    layer = "features.2"
    imgs, masks = _images(2), _masks(2)
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    with pytest.raises(EditError, match="calibration"):
        rewrite(tiny, rule, _stats(tiny, layer), budget=LocalityBudget())


def test_calibration_split_keeps_calibration_and_statistics_images_apart(tmp_path):
    from rulewriter.core.generalise import MIN_CALIBRATION_IMAGES, calibration_split
    from rulewriter.models.data import subsample

    paths = [tmp_path / f"{i:04d}.png" for i in range(1000)]
    for p in paths:
        p.write_bytes(b"")
    stats, cal = calibration_split(paths)
    assert len(cal) == 100 and len(stats) == 900 and not set(stats) & set(cal)  # a tenth set aside
    assert set(stats) | set(cal) == set(paths)
    stats, cal = calibration_split(paths, 300, limit=200)
    assert stats == subsample(paths, 300, seed=0)  # the statistics are the subsample they would be anyway
    assert len(cal) == 200 and not set(stats) & set(cal)
    assert calibration_split(paths[:400]) == (paths[:400], [])  # a tenth would be too few to measure 0.5 %
    assert calibration_split(paths[:100], 100 - MIN_CALIBRATION_IMAGES + 1)[1] == []
    assert calibration_split(paths) == calibration_split(paths)  # deterministic


def test_a_mask_too_small_for_the_svd_context_leaves_that_candidate_out(tiny, monkeypatch):
    """When the exemplar's own pairs have fewer masked keys than an SVD candidate's rank, the search drops
    that candidate (and scores a fold that cannot be fitted as no edit) instead of failing."""
    import rulewriter.core.rules as R

    monkeypatch.setattr(R, "SEARCH_RANKS", (8,))
    layer = "features.2"
    imgs = _images(1)
    mask = np.zeros((40, 48), np.float32)
    mask[20, 24] = 1
    rule = rule_from_images(tiny, layer, imgs, _pasted(imgs, [mask]), [mask], views=DEFAULT_VIEWS)
    assert int((rule.weights[rule.views.own[rule.pair_view]] > 0).sum()) < 8  # fewer keys than the rank
    cal = tiny.preprocess.batch(_images(60, seed=21))
    ch = rewrite(tiny, rule, _stats(tiny, layer), calibration=cal).meta["strength"]
    tried = {tuple(r["candidate"]) for r in ch["candidates"]}
    assert ("svd", 8, False) not in tried and ("mean", 1, False) in tried


# ------------------------------------------------------------------------------------------ the layer
def _record(restored, right, admitted="budget", prob=0.5, of=10, exemplars=2, expected=None):
    return {"chosen": 2.0, "candidate": ["mean", 1, False], "candidates": [
        {"candidate": ["mean", 1, False], "strength": 1.0, "exemplars_restored": 0, "exemplars": exemplars,
         "admitted": "budget", "right": of, "of": of, "mean_prob": 0.9},  # not the winner: never counted
        {"candidate": ["mean", 1, False], "strength": 2.0, "exemplars_restored": restored, "exemplars": exemplars,
         "admitted": admitted, "right": right, "of": of, "mean_prob": prob,
         "collateral": None if expected is None else {"changed": 0.02, "expected": expected}}]}


def test_choose_layer_ranks_the_winning_settings_as_choose_strength_does():
    from rulewriter.core.generalise import choose_layer

    layers = ["default", "other"]
    # 1. exemplars restored first, whatever the views say
    assert choose_layer(layers, [_record(1, 9), _record(2, 1)])["chosen"] == "other"
    # 2. then within the budget rather than the fallback
    assert choose_layer(layers, [_record(2, 9, admitted="fallback"), _record(2, 1)])["chosen"] == "other"
    # 2b. every layer over the budget: the smaller expected share of top-1 changes, before the views
    over = [_record(2, 9, admitted="fallback", expected=0.02), _record(2, 1, admitted="fallback", expected=0.011)]
    got = choose_layer(layers, over)
    assert got["chosen"] == "other" and "1.10% expected top-1 changes" in got["reason"]
    assert choose_layer(layers, [_record(2, 1, expected=0.009), over[1]])["chosen"] == "default"  # within wins
    # 3. then the share of left-out views right, then the mean probability
    assert choose_layer(layers, [_record(2, 5), _record(2, 6)])["chosen"] == "other"
    assert choose_layer(layers, [_record(2, 5, prob=0.4), _record(2, 5, prob=0.6)])["chosen"] == "other"
    # shares, not counts: 6/10 beats 10/20
    assert choose_layer(layers, [_record(2, 10, of=20), _record(2, 6)])["chosen"] == "other"
    # 4. a tie keeps the earlier (default) layer
    got = choose_layer(layers, [_record(2, 5), _record(2, 5)])
    assert got["chosen"] == "default" and got["index"] == 0
    assert got["reason"].startswith("layer default: restores 2/2 exemplars, 5/10 left-out views right")
    # An unvalidated record scores nothing; with none validated the default layer stays.
    unvalidated = {"chosen": 1.0, "reason": "no views", "candidates": []}
    assert choose_layer(layers, [unvalidated, _record(0, 1)])["chosen"] == "other"
    assert choose_layer(layers, [unvalidated, unvalidated])["chosen"] == "default"
    with pytest.raises(ValueError):
        choose_layer(layers, [_record(1, 1)])


def _count_calibration_passes(monkeypatch) -> list[list[str]]:
    """Record the layers of every forward pass that calibration sets read (rulewriter.core.locality)."""
    import rulewriter.core.locality as L

    passes: list[list[str]] = []
    real = L.read_views_at
    monkeypatch.setattr(L, "read_views_at", lambda clf, at, images, **kw: passes.append(list(at)) or
                        real(clf, at, images, **kw))
    return passes


def test_calibration_sets_read_every_layers_calibration_set_in_one_pass(tiny, monkeypatch):
    """calibration_sets gives each layer exactly calibration_set's Calibration, from one forward pass."""
    import rulewriter.core.locality as L

    layers = ["features.2", "features.4"]
    cal = tiny.preprocess.batch(_images(20, seed=3))
    passes = _count_calibration_passes(monkeypatch)
    both = L.calibration_sets(tiny, layers, cal)
    assert passes == [layers]
    for layer in layers:
        one = L.calibration_set(tiny, layer, cal)
        got = both[layer]
        assert (got.start, got.batch_size, got.linear) == (one.start, one.batch_size, one.linear)
        for f in ("x", "base", "near_tie", "margin"):
            assert torch.equal(getattr(got, f), getattr(one, f)), f


def test_rewrite_choosing_layer_keeps_the_validated_layers_own_edit(tiny, monkeypatch):
    from rulewriter.core.generalise import calibration_set, choose_layer
    from rulewriter.core.rules import rewrite_choosing_layer
    from rulewriter.errors import EditError

    layers = ["features.2", "features.4"]
    imgs, masks = _images(3), _masks(3)
    pasted = _pasted(imgs, masks)
    rule_at = lambda layer: rule_from_images(tiny, layer, imgs, pasted, masks, views=DEFAULT_VIEWS)  # noqa: E731
    cal = tiny.preprocess.batch(_images(60, seed=21))
    passes = _count_calibration_passes(monkeypatch)
    edit = rewrite_choosing_layer(tiny, layers, rule_at, lambda layer: _stats(tiny, layer), calibration=cal)
    assert passes == [layers]  # the calibration images ran through the network once for both layers
    monkeypatch.undo()
    alone = [rewrite(tiny, rule_at(layer), _stats(tiny, layer), calibration=cal) for layer in layers]
    want = choose_layer(layers, [e.meta["strength"] for e in alone])
    got = edit.meta["layer_choice"]
    assert (got["chosen"], got["index"]) == (want["chosen"], want["index"])
    assert edit.updates[0].layer == want["chosen"] == edit.meta["layer"]
    top = max(tuple(r["score"]) for r in want["layers"] if r["score"] is not None)
    for row, full in zip(got["layers"], want["layers"]):  # a pruned layer could not have won
        assert row == full or ("pruned" in row and (full["score"] is None or tuple(full["score"]) <= top)
                               and full["layer"] != want["chosen"])
    torch.testing.assert_close(edit.updates[0].delta(), alone[want["index"]].updates[0].delta())
    json.dumps(edit.meta)
    with pytest.raises(EditError, match="belongs to one layer"):
        rewrite_choosing_layer(tiny, layers, rule_at, lambda layer: _stats(tiny, layer),
                               calibration=calibration_set(tiny, layers[0], cal))


def test_rewrite_choosing_layer_writes_the_default_then_deeper_layers_and_passes_the_share_to_beat(tiny, monkeypatch):
    """Order and threshold of the pruning: the default layer first, then the deeper layers; each later
    layer is asked to restore at least the best share written so far, and a pruned record cannot win."""
    import rulewriter.core.rules as R

    calls = []
    shares = {"features.2": (1, 3), "features.4": (2, 3), "features.0": (3, 3)}

    def score(layer):
        got, of = shares[layer]
        return (got / of, True, 0.0, 0.5, 0.5)

    def fake(classifier, rule, stats, *, to_beat=None, ties_win=False, **kw):
        calls.append((rule, to_beat, ties_win))
        got, of = shares[rule]
        rec = {"chosen": 1.0, "candidates": [{"strength": 1.0, "exemplars": of, "exemplars_restored": got,
                                               "admitted": "budget", "right": 5, "of": 10, "mean_prob": 0.5}]}
        if to_beat is not None and (score(rule) < tuple(to_beat) or (score(rule) == tuple(to_beat) and not ties_win)):
            rec = {"chosen": 1.0, "reason": "not validated in full", "pruned": True, "candidates": []}
        return Edit([], {"strength": rec, "layer": rule})

    monkeypatch.setattr(R, "rewrite", fake)
    layers = ["features.2", "features.0", "features.4"]
    edit = R.rewrite_choosing_layer(tiny, layers, lambda layer: layer, lambda layer: None)
    # features.0 comes before features.4 in the list, so it would win a tie with it
    assert calls == [("features.2", None, False), ("features.4", score("features.2"), False),
                     ("features.0", score("features.4"), True)]
    assert edit.meta["layer_choice"]["chosen"] == "features.0"
    shares["features.0"] = (0, 3)  # now the shallow layer cannot beat block 4's 2/3: pruned, and it loses
    calls.clear()
    got = R.rewrite_choosing_layer(tiny, layers, lambda layer: layer, lambda layer: None).meta["layer_choice"]
    assert got["chosen"] == "features.4" and "pruned" in got["layers"][1] and "not validated" in got["reason"]
    shares["features.0"] = (2, 3)  # a tie with block 4 goes to the earlier layer in the list: features.0
    got = R.rewrite_choosing_layer(tiny, layers, lambda layer: layer, lambda layer: None).meta["layer_choice"]
    assert got["chosen"] == "features.0"


@pytest.mark.parametrize("layer", ["_blocks.15._project_conv", "_conv_head"])
def test_views_are_scored_through_the_exact_linear_map_where_the_layer_has_one(lite0, coffee_case, layer):
    """A rule's views at the layers LinearTail covers score an edit without a tail pass, with the logits the
    edited network gives them."""
    orig, man, mask = coffee_case
    rule = rule_from_images(lite0, layer, [orig], [man], [mask], views=DEFAULT_VIEWS)
    vs = rule.views
    assert vs.linear_orig is not None and vs.linear_man is not None
    g = torch.Generator().manual_seed(0)
    w = LayerMemory(dict(lite0.model.named_modules())[layer], 2).matrix()
    lam = torch.randn(w.shape[0], 2, generator=g, dtype=torch.float64)
    d = torch.randn(w.shape[1], 2, generator=g, dtype=torch.float64)
    lam *= 0.5 * float(w.norm()) / float(lam.norm() * d.norm())
    edit = Edit([LayerUpdate(layer, 2, lam, d)])
    idx = torch.tensor([0, 2, 3])
    for which in ("orig", "man"):
        got = vs.logits_under(lite0.model, edit, which, idx)
        with edit.applied(lite0.model):
            want = vs.logits(lite0.model, which, idx)
        assert (got - vs.logits(lite0.model, which, idx)).abs().max() > 1e-2  # the edit changes them
        assert torch.allclose(got, want, atol=1e-4 * max(1.0, float(want.abs().max())))
