"""locality: the budget, and what a candidate edit changes on the calibration images (counted and expected)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.core.locality import EXPECTED_CHANGED, NEAR_TIE, Calibration, LocalityBudget, calibration_set
from rulewriter.core.memory import LayerMemory

# The fixture model and images of the rule tests (one copy for all the files).
from test_rules import _images, tiny  # noqa: E402,F401


def test_calibration_counts_top1_changes_exactly(tiny):
    layer = "features.2"
    imgs = _images(40, seed=11)
    cal = calibration_set(tiny, layer, tiny.preprocess.batch(imgs))
    x = tiny.preprocess.batch(imgs)
    with torch.no_grad():
        logits = tiny.model(x)
    p = logits.softmax(1).topk(2, 1).values
    assert torch.equal(cal.base, logits.argmax(1))
    assert torch.equal(cal.near_tie, (p[:, 0] - p[:, 1]) <= NEAR_TIE)
    torch.manual_seed(2)
    w0 = LayerMemory(dict(tiny.model.named_modules())[layer], 2).matrix()
    edit = Edit([LayerUpdate(layer, 2, 30 * torch.randn(w0.shape[0], 1).double(),
                             torch.randn(w0.shape[1], 1).double())])
    got = cal.changed(tiny.model, edit)
    with edit.applied(tiny.model), torch.no_grad():
        top = tiny.model(x).argmax(1)
    diff = top != logits.argmax(1)
    assert got["changed"] == pytest.approx(float(diff.double().mean())) and got["n"] == 40
    assert got["which"] == torch.nonzero(diff).flatten().tolist()  # which images, for the closed-form floor
    assert 0 < got["changed"]  # the random edit does change something, so the count is not vacuous
    if int(cal.near_tie.sum()):
        assert got["changed_near_tie"] == pytest.approx(float(diff[cal.near_tie].double().mean()))
    assert torch.equal(tiny.model(x).argmax(1), logits.argmax(1))  # the edit was undone
    assert len(calibration_set(tiny, layer, tiny.preprocess.batch(imgs), limit=10)) == 10


def test_a_calibration_measurement_that_may_stop_decides_as_the_full_one(tiny):
    """``changed(stop=budget.rules_out(·, ref))`` measures the most fragile images first and stops once a
    setting is ruled out; whatever it measured, its admission is the full measurement's, and a measurement
    it did not stop is the full one."""
    layer = "features.2"
    cal = calibration_set(tiny, layer, tiny.preprocess.batch(_images(60, seed=11)))
    cal.batch_size = 10  # chunks of 5 images
    torch.manual_seed(3)
    w0 = LayerMemory(dict(tiny.model.named_modules())[layer], 2).matrix()
    lam, d = torch.randn(w0.shape[0], 1).double(), torch.randn(w0.shape[1], 1).double()
    edit = lambda s: Edit([LayerUpdate(layer, 2, s * lam, d)])  # noqa: E731
    budget = LocalityBudget(changed=0.05, near_tie=1.0)
    ref = cal.changed(tiny.model, edit(1.0))
    stopped = 0
    for s in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
        full = cal.changed(tiny.model, edit(s))
        part = cal.changed(tiny.model, edit(s), stop=lambda m: budget.rules_out(m, ref))
        assert budget.admits(part) == budget.admits(full)
        assert budget.rules_out(part, ref) == budget.rules_out(full, ref)
        assert set(part["which"]) <= set(full["which"]) and part["changed"] <= full["changed"]
        if part.get("complete", True):
            assert part == full
        else:
            stopped += 1
            assert part["measured"] < len(cal) and budget.rules_out(full, ref)
    assert stopped  # some strength was ruled out early, so the stop is exercised, not vacuous
    assert cal.margin is not None and torch.equal(cal.near_tie, cal.margin <= 0.05)


def test_locality_budget_admits():
    b = LocalityBudget(changed=0.01, near_tie=0.1)
    assert b.admits({"changed": 0.01, "changed_near_tie": 0.1})
    assert not b.admits({"changed": 0.011, "changed_near_tie": 0.0})
    assert not b.admits({"changed": 0.0, "changed_near_tie": 0.2})
    assert b.admits({"changed": 0.0, "changed_near_tie": None})  # no near ties: only the overall share counts


def _mlp() -> tuple[nn.Module, torch.Tensor, Calibration]:
    """A small MLP with spread-out margins (confident images and a dozen near ties among 200 inputs), and
    its calibration set."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.fc1, model.act, model.fc2 = nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10)
    model.fc2.weight.data *= 10
    x = 2 * torch.randn(200, 8)
    with torch.no_grad():
        logits = model(x)
    return model, x, Calibration.of(None, x, logits, batch_size=20)


def _fc1_edit(scale: float, seed: int = 2) -> Edit:
    g = torch.Generator().manual_seed(seed)
    return Edit([LayerUpdate("fc1", 2, scale * torch.randn(32, 1, generator=g), torch.randn(8, 1, generator=g))])


def _margin(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    own = logits.gather(1, top[:, None]).squeeze(1)
    return own - logits.scatter(1, top[:, None], -math.inf).max(1).values


def test_expected_share_is_the_mean_flip_share_of_every_images_margin_loss():
    """``expected`` recomputed by brute force: each image's margin loss δᵢ (unedited top-1 logit minus
    the largest other, before and after the edit) against every image's unedited margin mⱼ, the share
    ``mⱼ < δᵢ``, averaged over i."""
    model, x, cal = _mlp()
    with torch.no_grad():
        before = model(x).double()
    top = before.argmax(1)
    m0 = _margin(before, top)
    assert torch.allclose(cal.logit_margin, m0) and 5 <= int(cal.near_tie.sum()) <= 30
    seen = []
    for scale in (0.0, 0.001, 0.003, 0.02, 0.5):
        edit = _fc1_edit(scale)
        with edit.applied(model), torch.no_grad():
            after = model(x).double()
        loss = m0 - _margin(after, top)
        want = float((m0[None, :] < loss[:, None]).double().mean())
        got = cal.changed(model, edit)
        assert got["expected"] == pytest.approx(want, abs=1e-12)
        assert got["changed"] == pytest.approx(float((after.argmax(1) != top).double().mean()))
        flipped = after.argmax(1) != top  # an image that flips lost more than its own margin
        assert bool((loss[flipped] > m0[flipped]).all())
        seen.append(got)
    assert seen[0]["expected"] == 0.0 and seen[0]["changed"] == 0.0  # nothing moved: nothing expected
    assert seen[-1]["changed"] > 0 and seen[-1]["expected"] > 0  # the larger edits do change something
    # The estimate sees a change too small to flip any of the images (the count is blind below 1/200).
    quiet = [m for m in seen[1:] if m["changed"] == 0.0]
    assert quiet and all(m["expected"] > 0 for m in quiet)


def test_budget_checks_the_expected_share_where_a_measurement_has_one():
    b = LocalityBudget(changed=0.01, near_tie=0.1, expected=0.02)
    assert LocalityBudget().expected == EXPECTED_CHANGED == 0.01
    assert b.admits({"changed": 0.0, "changed_near_tie": 0.0, "expected": 0.02})
    assert not b.admits({"changed": 0.0, "changed_near_tie": 0.0, "expected": 0.021})
    assert b.admits({"changed": 0.0, "changed_near_tie": 0.0})  # no estimate (an older record): counts alone
    ref = {"changed": 0.02, "changed_near_tie": 0.2, "which": [3], "expected": 0.05}
    # Adding nothing to the closed form: no image it leaves alone, and expected within the budget or its own.
    assert b.adds_nothing({"changed": 0.02, "which": [3], "expected": 0.05}, ref)
    assert b.adds_nothing({"changed": 0.02, "which": [3], "expected": 0.01}, {**ref, "expected": 0.0})
    assert not b.adds_nothing({"changed": 0.02, "which": [3], "expected": 0.06}, ref)
    assert not b.adds_nothing({"changed": 0.02, "which": [4], "expected": 0.0}, ref)
    assert b.rules_out({"changed": 0.02, "which": [3], "expected": 0.06}, ref)
    assert not b.rules_out({"changed": 0.02, "which": [3], "expected": 0.04}, ref)


def test_a_measurement_stopped_by_the_expected_share_decides_as_the_full_one():
    """Where the expected share binds (the counts may not), a measurement that stops once a setting is
    ruled out admits and rules out exactly what the full one does; its expected share is a lower bound."""
    model, x, cal = _mlp()
    budget = LocalityBudget(changed=1.0, near_tie=1.0, expected=0.02)
    ref = cal.changed(model, _fc1_edit(0.003, seed=3))
    stopped = 0
    for s in (0.001, 0.003, 0.01, 0.03, 0.1, 1.0):
        full = cal.changed(model, _fc1_edit(s, seed=3))
        part = cal.changed(model, _fc1_edit(s, seed=3), stop=lambda m: budget.rules_out(m, ref))
        assert budget.admits(part) == budget.admits(full)
        assert budget.rules_out(part, ref) == budget.rules_out(full, ref)
        assert part["expected"] <= full["expected"] + 1e-12
        if part.get("complete", True):
            assert part == full
        else:
            stopped += 1
    assert stopped  # the expected share did stop a measurement
