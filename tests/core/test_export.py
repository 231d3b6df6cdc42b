"""export_edited: the edited state dict round-trips bit for bit; inputs are never overwritten; other models refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.core.export import export_edited, same_file
from rulewriter.errors import EditError
from rulewriter.models.registry import load_classifier, read_state_dict


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return load_classifier(net, labels=["a", "b", "c"])


def _edit(clf, seed):
    g = torch.Generator().manual_seed(seed)
    return Edit([LayerUpdate("0", 2, torch.randn(4, 1, generator=g, dtype=torch.float64),
                             torch.randn(27, 1, generator=g, dtype=torch.float64))],
                {"model": clf.name, "weights": clf.weights_id})


def test_export_round_trips_bit_for_bit_and_leaves_the_model(tmp_path):
    clf = _tiny()
    e1, e2 = _edit(clf, 1), _edit(clf, 2)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with e1.applied(clf.model), e2.applied(clf.model):
        edited = clf.model(x).detach()
        want = {k: v.clone() for k, v in clf.model.state_dict().items()}
    out = export_edited(clf, [e1, e2], tmp_path / "edited.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in clf.model.state_dict().items())  # model untouched
    got = read_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    loaded = load_classifier(fresh, weights=out, labels=["a", "b", "c"])
    assert torch.equal(loaded.model(x).detach(), edited)
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_refuses_inputs_other_models_and_bad_names(tmp_path):
    clf = _tiny()
    e = _edit(clf, 1)
    src = e.save(tmp_path / "a.safetensors")
    for out in (src, tmp_path / "a.safetensors.json", tmp_path / "sub" / ".." / "a.safetensors"):
        with pytest.raises(EditError, match="is an input"):
            export_edited(clf, [e], out, inputs=[src])
    with pytest.raises(EditError, match="safetensors"):
        export_edited(clf, [e], tmp_path / "x.pt")
    other = Edit(e.updates, {"model": clf.name, "weights": "0123456789abcdef"})
    with pytest.raises(EditError, match="b.safetensors was made for model Sequential with weights 0123456789abcdef"):
        export_edited(clf, [e, other], tmp_path / "y.safetensors", sources=["a.safetensors", "b.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.json"]
    assert same_file(tmp_path / "q" / ".." / "z", tmp_path / "z")
