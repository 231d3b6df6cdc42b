"""stage: one rule spread over the convs of a residual stream (MEMIT's split)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.core.edit import Edit
from rulewriter.core.generalise import DEFAULT_VIEWS, LocalityBudget
from rulewriter.core.rules import rule_from_images
from rulewriter.core.stage import Stage, fit_stage, rewrite_stage
from rulewriter.errors import EditError
from rulewriter.models.registry import Preprocess, load_classifier

# The rule tests' images, masks and statistics (one copy for every file).
from test_rules import _images, _masks, _stats  # noqa: E402


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand, self.project, self.bn = nn.Conv2d(c, 7, 1), nn.Conv2d(7, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, s):
        return s + self.bn(self.project(torch.relu(self.expand(s))))


class Streamy(nn.Module):
    """A conv that writes a stream through a BatchNorm, a residual block that adds to it, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.write, self.write_bn = nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.block = _Res(5)
        self.after = nn.Conv2d(5, 5, 1)  # reads the stream
        self.head = nn.Linear(5, 4)
        g = torch.Generator().manual_seed(3)
        for bn in (self.write_bn, self.block.bn):  # gains far from 1, so the share's conversion matters
            bn.weight.data = torch.rand(5, generator=g) * 2 + 0.3
            bn.bias.data = torch.randn(5, generator=g)
            bn.running_mean = torch.randn(5, generator=g)
            bn.running_var = torch.rand(5, generator=g) * 3 + 0.2

    def forward(self, x):
        s = self.block(self.write_bn(self.write(torch.relu(self.stem(x)))))
        return self.head(self.after(s).mean((2, 3)))


STAGE = Stage(("write", "block.project"), "block", ("write_bn", "block.bn"))


@pytest.fixture()
def streamy():
    torch.manual_seed(0)
    pre = Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    clf = load_classifier(Streamy().double(), preprocess=pre)
    return clf


def _stream(clf, x, module="block"):
    got = {}
    h = dict(clf.model.named_modules())[module].register_forward_hook(lambda m, a, o: got.setdefault("o", o))
    try:
        with torch.no_grad():
            clf.model(x)
    finally:
        h.remove()
    return got["o"].double()


def test_the_stage_closes_the_streams_gap_at_the_masked_place_a_share_per_conv(streamy):
    clf = streamy
    x_o, x_m = (torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                for s in (1, 2))
    masks = torch.zeros(1, 32, 32, dtype=torch.float64)
    masks[0, 10:12, 6:8] = 1  # exactly the key-grid cell (5, 3) of the 16×16 grid
    stats = [_stats(clf, layer) for layer in STAGE.layers]
    z, h0 = _stream(clf, x_o)[0, :, 5, 3], _stream(clf, x_m)[0, :, 5, 3]
    assert (z - h0).abs().max() > 0.1
    edit = fit_stage(clf, STAGE, stats, x_o, x_m, masks)
    assert [u.layer for u in edit.updates] == list(STAGE.layers) and all(u.rank == 1 for u in edit.updates)
    # The first conv alone moves its norm's output (what it writes to the stream) by exactly half the gap.
    before = _stream(clf, x_m, "write_bn")[0, :, 5, 3]
    with Edit(edit.updates[:1]).applied(clf.model):
        after = _stream(clf, x_m, "write_bn")[0, :, 5, 3]
    assert torch.allclose(after - before, (z - h0) / 2, atol=1e-9)
    # The last conv closes what is still missing: one pair, so exactly.
    with edit.applied(clf.model):
        assert torch.allclose(_stream(clf, x_m)[0, :, 5, 3], z, atol=1e-9)
    # Keys C-orthogonal to a conv's mean key (kᵀ(C + εI)⁻¹k̄ = 0) keep their outputs; that key does not.
    for u in edit.updates:
        d = u.direction[:, 0]
        k = torch.randn(d.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        k -= (k @ d) / (d @ d) * d
        assert float((u.delta() @ k).abs().max()) < 1e-9 < float((u.delta() @ u.keys[:, 0]).abs().max())


def test_a_final_conv_takes_one_more_share_and_then_recalls_its_own_clean_values(streamy):
    clf = streamy
    stage = Stage(STAGE.layers, STAGE.stream, STAGE.norms, final="after")
    assert stage.convs == ("write", "block.project", "after") and stage.name == "stage write … after"
    x_o, x_m = (torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                for s in (1, 2))
    masks = torch.zeros(1, 32, 32, dtype=torch.float64)
    masks[0, 10:12, 6:8] = 1  # one key-grid cell
    stats = [_stats(clf, layer) for layer in stage.convs]
    with pytest.raises(EditError, match="3 convs but 2 statistics"):
        fit_stage(clf, stage, stats[:2], x_o, x_m, masks)
    edit = fit_stage(clf, stage, stats, x_o, x_m, masks)
    z, h0 = _stream(clf, x_o)[0, :, 5, 3], _stream(clf, x_m)[0, :, 5, 3]
    before = _stream(clf, x_m, "write_bn")[0, :, 5, 3]
    with Edit(edit.updates[:1]).applied(clf.model):  # three parts now: the first closes a third of the gap
        assert torch.allclose(_stream(clf, x_m, "write_bn")[0, :, 5, 3] - before, (z - h0) / 3, atol=1e-9)
    clean = _stream(clf, x_o, "after")[0, :, 5, 3]
    with edit.applied(clf.model):
        assert torch.allclose(_stream(clf, x_m, "after")[0, :, 5, 3], clean, atol=1e-9)
    # The final conv along another context, the stream's updates reused: they are the same, and it still
    # recalls its clean values (one pair: the uniform direction is the mean key's).
    other = fit_stage(clf, stage, stats, x_o, x_m, masks, final_context=("uniform", 1), stream=edit)
    assert all(a is b for a, b in zip(other.updates[:2], edit.updates[:2]))
    with other.applied(clf.model):
        assert torch.allclose(_stream(clf, x_m, "after")[0, :, 5, 3], clean, atol=1e-9)
    with pytest.raises(EditError, match="unknown context"):
        fit_stage(clf, stage, stats, x_o, x_m, masks, final_context=("zca", 1), stream=edit)


def _pasted(images, masks, seed=5):
    tex = _images(len(images), seed=seed)
    return [Image.fromarray(np.where(m[..., None] > 0, np.asarray(t), np.asarray(o)).astype(np.uint8))
            for o, t, m in zip(images, tex, masks)]


@pytest.mark.parametrize("changed", [0.0, 1.0])
def test_rewrite_stage_keeps_the_calibration_images_within_the_budget_and_records_its_choice(streamy, changed):
    clf = streamy
    imgs, masks = _images(3), _masks(3)
    rule = rule_from_images(clf, STAGE.layers[0], imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    cal = clf.preprocess.batch(_images(60, seed=21)).double()
    edit = rewrite_stage(clf, STAGE, rule, [_stats(clf, layer) for layer in STAGE.layers], calibration=cal,
                         budget=LocalityBudget(changed=changed, near_tie=1.0))
    ch = edit.meta["strength"]
    json.dumps(edit.meta)
    assert edit.meta["layer"] == STAGE.name and [u.layer for u in edit.updates] == list(STAGE.layers)
    assert tuple(ch["candidate"])[:2] == ("mean", 1)  # no final conv: the stream convs follow their mean keys
    with torch.no_grad():
        base = clf.model(cal).argmax(1)
        with edit.applied(clf.model):
            share = float((clf.model(cal).argmax(1) != base).double().mean())
    assert share <= max(changed, ch["candidates"][0]["collateral"]["changed"]) + 1e-12
    # The chosen edit is the chosen candidate's full fit, scaled: its first conv's Λ is the strength times
    # the closed form's of those pairs.
    aug = bool(ch["augmented"])
    views = rule.views
    keep = views.masks.flatten(1).amax(1) > 0
    if not aug:
        keep &= views.own
    unit = fit_stage(clf, STAGE, [_stats(clf, layer) for layer in STAGE.layers], views.x_orig[keep],
                     views.x_man[keep], views.masks[keep], start=views.start)
    assert torch.allclose(edit.updates[0].lam, unit.updates[0].lam * ch["chosen"])


def test_a_stage_needs_its_first_convs_rule_with_views_and_one_statistics_per_conv(streamy):
    clf = streamy
    imgs, masks = _images(2), _masks(2)
    stats = [_stats(clf, layer) for layer in STAGE.layers]
    cal = clf.preprocess.batch(_images(20, seed=21)).double()
    plain = rule_from_images(clf, STAGE.layers[0], imgs, _pasted(imgs, masks), masks)
    with pytest.raises(EditError, match="exemplar views"):
        rewrite_stage(clf, STAGE, plain, stats, calibration=cal)
    rule = rule_from_images(clf, STAGE.layers[0], imgs, _pasted(imgs, masks), masks, views=DEFAULT_VIEWS)
    with pytest.raises(EditError, match="2 convs but 1 statistics"):
        rewrite_stage(clf, STAGE, rule, stats[:1], calibration=cal)
    with pytest.raises(EditError, match="calibration"):
        rewrite_stage(clf, STAGE, rule, stats, calibration=None)
    with pytest.raises(EditError, match="one norm"):
        Stage(("write",), "block", ())


def test_stage_before_finds_the_residual_stage_an_efficientnet_layer_reads(lite0):
    from rulewriter.core.stage import stage_before

    s = stage_before(lite0.model, "_blocks.15._project_conv")
    assert s.layers == tuple(f"_blocks.{i}._project_conv" for i in (11, 12, 13, 14))
    assert s.norms == tuple(f"_blocks.{i}._bn2" for i in (11, 12, 13, 14))
    assert (s.stream, s.final) == ("_blocks.14", "_blocks.15._project_conv")
    # Block 11 adds no skip (it widens the stream), so a stage read by block 12 is block 11 alone.
    assert stage_before(lite0.model, "_blocks.12._project_conv").layers == ("_blocks.11._project_conv",)
    assert stage_before(lite0.model, "_conv_head") is None
    assert stage_before(Streamy(), "block.project") is None


@pytest.mark.slow
def test_real_model_stage_edit_fixes_held_out_photos_it_never_saw(lite0):
    """Gravel on whole cars, the stage of Lite0's default layer: an edit from car-parts *training* exemplars
    fixes car-parts *test* photos and keeps the calibration images within the budget (recounted)."""
    from test_generalise import car_errors, car_parts_data

    C, shared = car_parts_data()
    from rulewriter.core.generalise import calibration_set
    from rulewriter.core.stage import stage_before
    from rulewriter.core.stats import collect_second_moments

    clf = lite0
    ex, held = car_errors(clf, shared, "trainingset", 3, 40), car_errors(clf, shared, "testset", 12, 60)
    assert len(ex) == 3 and held
    samples = sorted(p for p in (shared / "data" / "imagenet-samples").iterdir() if p.is_file())
    stage = stage_before(clf.model, clf.default_layer)
    cs = collect_second_moments(clf, list(stage.convs), samples[:200:2], progress=False)
    cal = samples[1:400:2]  # none of C's
    rule = rule_from_images(clf, stage.layers[0], [e[0] for e in ex], [e[1] for e in ex], [e[2] for e in ex],
                            views=DEFAULT_VIEWS)
    edit = rewrite_stage(clf, stage, rule, [cs[c] for c in stage.convs], calibration=cal)
    why = edit.meta["strength"]["reason"]
    assert [u.layer for u in edit.updates] == list(stage.convs) and "of 200 calibration images" in why
    x_held, y_held = clf.preprocess.batch([h[1] for h in held]), torch.tensor([h[3] for h in held])
    with edit.applied(clf.model):
        fixed = int((C.top1(clf, x_held) == y_held).sum())
    assert fixed >= 1, why
    if "fallback" not in why:
        assert LocalityBudget().admits(calibration_set(clf, stage.layers[0], cal).changed(clf.model, edit))
