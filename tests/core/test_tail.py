"""The network's tail from cached activations: run_tail and the exact linear map of LinearTail."""
from __future__ import annotations

import pytest
import torch

from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.core.tail import LinearTail, run_tail, tail_start
from rulewriter.core.trace import Trace

LAYER = "_blocks.15._project_conv"


@pytest.fixture(scope="module")
def inputs(lite0):
    """Two real photos' activations at block 15: its input (the tail's) and the project conv's (its keys)."""
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee()]
    from PIL import Image

    x = lite0.preprocess.batch([Image.fromarray(a) for a in imgs])
    with torch.no_grad(), Trace(lite0.model, LAYER, clone=True) as t, \
            Trace(lite0.model, "_blocks.15", clone=True) as tb:
        logits = lite0.model(x)
    return tb.input, t.input, logits


def _edit(lite0, rank: int, scale: float, seed: int = 0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    conv = lite0.model._blocks[15]._project_conv
    lam = torch.randn(conv.out_channels, rank, generator=g, dtype=torch.float64)
    d = torch.randn(conv.in_channels, rank, generator=g, dtype=torch.float64)
    lam *= scale * float(conv.weight.detach().norm()) / float(lam.norm() * d.norm())
    return Edit([LayerUpdate(LAYER, 2, lam, d)])


def test_run_tail_reproduces_the_model(lite0, inputs):
    tail_in, _, logits = inputs
    start = tail_start(lite0.model, LAYER)
    assert start == "_blocks.15"
    with torch.no_grad():
        assert torch.allclose(run_tail(lite0.model, start, tail_in), logits, atol=1e-4)


def test_a_stages_first_project_conv_is_its_own_tail_start(lite0):
    """Block 11 adds no skip connection: its tail runs from the project conv's input, edited or not."""
    from skimage import data
    from PIL import Image

    layer = "_blocks.11._project_conv"
    assert tail_start(lite0.model, layer) == layer
    assert tail_start(lite0.model, "_blocks.12._project_conv") == "_blocks.12"  # a skip: the block's input
    assert tail_start(lite0.model, "_blocks.11._expand_conv") == "_blocks.11"
    assert tail_start(lite0.model, LAYER) == "_blocks.15"  # LinearTail's layer keeps the smaller cache
    x = lite0.preprocess.batch([Image.fromarray(a) for a in (data.astronaut(), data.chelsea())])
    conv = lite0.model._blocks[11]._project_conv
    g = torch.Generator().manual_seed(2)
    lam = torch.randn(conv.out_channels, 1, generator=g, dtype=torch.float64)
    d = torch.randn(conv.in_channels, 1, generator=g, dtype=torch.float64)
    lam *= 0.3 * float(conv.weight.detach().norm()) / float(lam.norm() * d.norm())
    edit = Edit([LayerUpdate(layer, 2, lam, d)])
    with torch.no_grad(), Trace(lite0.model, layer, clone=True) as t:
        logits = lite0.model(x)
    with torch.no_grad(), edit.applied(lite0.model):
        edited = lite0.model(x)
        got_edited = run_tail(lite0.model, layer, t.input)  # the unedited keys: the edit acts after them
    with torch.no_grad():
        got = run_tail(lite0.model, layer, t.input)
    tol = 1e-4 * max(1.0, float(edited.abs().max()), float(logits.abs().max()))
    assert torch.allclose(got, logits, atol=tol) and torch.allclose(got_edited, edited, atol=tol)
    assert (edited - logits).abs().max() > 1e-2  # the edit does change the logits: the check can fail


@pytest.mark.parametrize("rank,scale", [(1, 0.05), (3, 0.5)])
def test_linear_tail_gives_the_edited_models_logits(lite0, inputs, rank, scale):
    """The rank-r update of the cached pre-activations is exactly the edited network's tail."""
    tail_in, keys, logits = inputs
    lt = LinearTail.build(lite0.model, LAYER, keys)
    assert lt is not None and len(lt) == 3
    assert torch.allclose(lt.logits(lite0.model), logits, atol=1e-4)
    edit = _edit(lite0, rank, scale)
    with torch.no_grad(), edit.applied(lite0.model):
        want = run_tail(lite0.model, "_blocks.15", tail_in)
    assert lt.covers(lite0.model, edit)
    got = lt.logits(lite0.model, edit)
    assert (got - logits).abs().max() > 1e-2  # the edit does change the logits: the check can fail
    assert torch.allclose(got, want, atol=1e-4 * max(1.0, float(want.abs().max())))


def test_linear_tail_covers_only_what_it_computes_exactly(lite0, inputs):
    _, keys, _ = inputs
    lt = LinearTail.build(lite0.model, LAYER, keys)
    edit = _edit(lite0, 1, 0.05)
    other = Edit([LayerUpdate("_blocks.14._project_conv", 2, torch.zeros(192, 1, dtype=torch.float64),
                              torch.ones(1152, 1, dtype=torch.float64))])
    assert lt.covers(lite0.model, edit + _edit(lite0, 1, 0.05, seed=1))  # one layer: a rank-2 update
    assert not lt.covers(lite0.model, edit + other)  # two layers
    assert not lt.covers(lite0.model, other)  # another layer
    with edit.applied(lite0.model):  # the weights it was read with have changed: the tail must decide
        assert not lt.covers(lite0.model, edit)
    assert lt.covers(lite0.model, edit)  # restored bit for bit
    lite0.model.train()
    try:
        assert not lt.covers(lite0.model, edit)
    finally:
        lite0.model.eval()
    # Layers it does not cover: no map at all (the tail is used).
    assert LinearTail.build(lite0.model, "_blocks.14._project_conv", torch.zeros(1, 1152, 7, 7)) is None
    assert LinearTail.build(lite0.model, "_conv_head", torch.zeros(1, 1152, 7, 7)) is None  # not its input


def test_a_trusting_scope_compares_the_weights_once_and_still_sees_every_in_place_write(lite0, inputs, monkeypatch):
    """Inside trusting_checked_weights, covers() compares the weights once, again only after a write."""
    from rulewriter.core import tail as tail_mod

    _, keys, _ = inputs
    lt = LinearTail.build(lite0.model, LAYER, keys)
    edit = _edit(lite0, 1, 0.05)
    calls = []
    real = torch.equal
    monkeypatch.setattr(tail_mod.torch, "equal", lambda a, b: calls.append(1) or real(a, b))
    assert lt.covers(lite0.model, edit) and lt.covers(lite0.model, edit)
    per_check = len(calls) // 2
    assert per_check > 0  # outside the scope every call compares
    calls.clear()
    with tail_mod.trusting_checked_weights():
        assert all(lt.covers(lite0.model, edit) for _ in range(5))
        assert len(calls) == per_check  # once
        with edit.applied(lite0.model):  # an in-place write: compared again, and found changed
            assert not lt.covers(lite0.model, edit)
        before = len(calls)
        assert lt.covers(lite0.model, edit) and lt.covers(lite0.model, edit)  # restored: compared once more
        assert len(calls) == before + per_check
        fc = lite0.model._fc.weight
        kept = fc.detach().clone()
        with torch.no_grad():
            fc[0, 0] += 1.0  # a write the edit does not make is seen too
        try:
            assert not lt.covers(lite0.model, edit)
        finally:
            with torch.no_grad():
                fc.copy_(kept)
        assert lt.covers(lite0.model, edit)
        import threading

        calls.clear()
        other = threading.Thread(target=lambda: lt.covers(lite0.model, edit))
        other.start()
        other.join()
        assert len(calls) == per_check  # another thread is not inside this scope: it compares
    calls.clear()
    assert lt.covers(lite0.model, edit) and len(calls) == per_check  # the scope is closed: no memory left


@pytest.mark.parametrize("rank,scale", [(1, 0.05), (3, 0.5)])
def test_linear_tail_of_the_head_conv_gives_the_edited_models_logits(lite0, rank, scale):
    """At the head conv the map is the conv's rank-r update through its BatchNorm: the edited tail exactly."""
    from skimage import data
    from PIL import Image

    x = lite0.preprocess.batch([Image.fromarray(a) for a in (data.astronaut(), data.chelsea(), data.coffee())])
    with torch.no_grad(), Trace(lite0.model, "_conv_head", clone=True) as t:
        logits = lite0.model(x)
    lt = LinearTail.build(lite0.model, "_conv_head", t.input)
    assert lt is not None and torch.allclose(lt.logits(lite0.model), logits, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    conv = lite0.model._conv_head
    lam = torch.randn(conv.out_channels, rank, generator=g, dtype=torch.float64)
    d = torch.randn(conv.in_channels, rank, generator=g, dtype=torch.float64)
    lam *= scale * float(conv.weight.detach().norm()) / float(lam.norm() * d.norm())
    edit = Edit([LayerUpdate("_conv_head", 2, lam, d)])
    with torch.no_grad(), edit.applied(lite0.model):
        want = run_tail(lite0.model, "_conv_head", t.input)
    assert lt.covers(lite0.model, edit)
    got = lt.logits(lite0.model, edit)
    assert (got - logits).abs().max() > 1e-2  # the edit does change the logits: the check can fail
    assert torch.allclose(got, want, atol=1e-4 * max(1.0, float(want.abs().max())))


def test_calibration_counts_the_same_changes_with_and_without_the_map(lite0):
    """Calibration.changed through LinearTail equals the tail pass, image by image."""
    from skimage import data
    from PIL import Image

    from rulewriter.core.generalise import calibration_set

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    batch = lite0.preprocess.batch([Image.fromarray(a) for a in photos])
    cal = calibration_set(lite0, LAYER, batch)
    assert cal.linear is not None
    for scale in (0.05, 0.5, 2.0):
        edit = _edit(lite0, 2, scale)
        fast = cal.changed(lite0.model, edit)
        linear, cal.linear = cal.linear, None
        try:
            slow = cal.changed(lite0.model, edit)
        finally:
            cal.linear = linear
        assert fast == slow
