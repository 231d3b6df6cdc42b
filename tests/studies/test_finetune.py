"""Baselines: fine-tuning one layer and retraining the last layer, returned as exact, undoable weight deltas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rulewriter.errors import EditError
from rulewriter.studies.finetune import WeightDelta, finetune_layer, last_linear, retrain_last_layer
from rulewriter.models.registry import Preprocess, load_classifier


class Tiny(nn.Module):
    """conv → BN → ReLU → conv → pool → fc: a BatchNorm whose running statistics must not move."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():  # non-trivial running statistics, so a training-mode BN would visibly change them
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    clf = load_classifier(net, labels=["a", "b", "c", "d"], preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = [0, 1, 2, 3, 0, 1]
    return clf, x, y


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ce(clf, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(clf.model(x), torch.tensor(y)))


def test_finetune_lowers_the_loss_and_touches_only_its_layer(tiny):
    clf, x, y = tiny
    before = _state(clf.model)
    delta = finetune_layer(clf, "conv2", x, y, steps=30, lr=0.1)
    after_call = _state(clf.model)
    assert all(torch.equal(before[k], after_call[k]) for k in before)  # the model itself is restored
    assert set(delta.deltas) == {"conv2.weight", "conv2.bias"} and delta.layers == ["conv2"]
    ce0 = _ce(clf, x, y)
    with delta.applied(clf.model):
        ce1 = _ce(clf, x, y)
        inside = _state(clf.model)
    assert ce1 < ce0 - 1e-3
    assert delta.meta["loss_last"] == pytest.approx(ce1, rel=1e-5) and delta.meta["loss_first"] == pytest.approx(ce0)
    changed = {k for k in before if not torch.equal(before[k], inside[k])}
    assert changed == {"conv2.weight", "conv2.bias"}  # BatchNorm statistics and every other layer untouched
    assert all(p.requires_grad for p in clf.model.parameters()) and not clf.model.training


def test_retrain_last_layer_changes_only_the_last_layer(tiny):
    clf, x, y = tiny
    assert last_linear(clf.model) == "fc"
    before = _state(clf.model)
    delta = retrain_last_layer(clf, x, y, steps=50, lr=0.5)
    assert delta.meta["trained_on"] == "cached layer inputs"
    with delta.applied(clf.model):
        ce1 = _ce(clf, x, y)
        inside = _state(clf.model)
    assert ce1 < _ce(clf, x, y) - 1e-3
    assert {k for k in before if not torch.equal(before[k], inside[k])} == {"fc.weight", "fc.bias"}


def test_finetune_from_cached_activations_equals_the_full_model(tiny):
    """forward= runs the tail only; with the same data and seed it must find the same delta."""
    clf, x, y = tiny
    m = clf.model
    h = torch.relu(m.bn(m.conv1(x))).detach()  # the cached input of conv2
    tail = lambda t: m.fc(torch.relu(m.conv2(t)).mean((2, 3)))  # noqa: E731
    full = finetune_layer(clf, "conv2", x, y, steps=5, lr=0.1)
    cached = finetune_layer(clf, "conv2", h, y, steps=5, lr=0.1, forward=tail)
    for k in full.deltas:
        torch.testing.assert_close(full.deltas[k], cached.deltas[k], rtol=1e-5, atol=1e-7)


def test_apply_reproduces_target_weights_and_undo_is_exact(tiny):
    clf, _, _ = tiny
    before = _state(clf.model)
    new = before["fc.weight"] + torch.randn(4, 8) * 1e-3  # a float32 weight that training could have found
    delta = WeightDelta({"fc.weight": new.double() - before["fc.weight"].double()})
    handle = delta.apply(clf.model)
    assert torch.equal(clf.model.fc.weight.detach(), new)  # float64 delta: bit for bit
    handle.undo()
    handle.undo()  # twice is harmless
    assert all(torch.equal(before[k], v) for k, v in _state(clf.model).items())
    copy = delta.applied_copy(clf.model)
    assert torch.equal(copy.fc.weight.detach(), new) and torch.equal(clf.model.fc.weight.detach(), before["fc.weight"])


def test_save_load_roundtrip_and_bad_files(tiny, tmp_path):
    clf, x, y = tiny
    delta = finetune_layer(clf, "conv2", x, y, steps=3, lr=0.1)
    path = delta.save(tmp_path / "ft.safetensors")
    assert (tmp_path / "ft.safetensors.json").is_file()
    back = WeightDelta.load(path)
    assert back.meta == delta.meta and all(torch.equal(back.deltas[k], delta.deltas[k]) for k in delta.deltas)
    from rulewriter.studies.evaluate import load_change

    assert isinstance(load_change(path), WeightDelta)
    torch.save({"fc.weight": torch.zeros(4, 8)}, tmp_path / "pickle.safetensors")
    with pytest.raises(EditError, match="pickle"):
        WeightDelta.load(tmp_path / "pickle.safetensors")


def test_mismatched_delta_leaves_the_model_untouched(tiny):
    clf, _, _ = tiny
    before = _state(clf.model)
    bad = WeightDelta({"fc.weight": torch.ones(4, 8, dtype=torch.float64), "conv2.weight": torch.ones(3, 3)})
    with pytest.raises(EditError, match="another model"):
        bad.apply(clf.model)
    with pytest.raises(EditError, match="no parameter"):
        WeightDelta({"nope.weight": torch.ones(1)}).apply(clf.model)
    assert all(torch.equal(before[k], v) for k, v in _state(clf.model).items())
    with pytest.raises(EditError):
        WeightDelta({"fc.weight": torch.full((4, 8), float("nan"))})
    with pytest.raises(EditError):
        WeightDelta({})


def test_stop_when_fitted_stops_early(tiny):
    clf, x, _ = tiny
    y = [2] * len(x)  # reachable: every exemplar one class
    full = finetune_layer(clf, "conv2", x, y, steps=50, lr=0.1)
    early = finetune_layer(clf, "conv2", x, y, steps=50, lr=0.1, stop_when_fitted=True)
    assert early.meta["fitted"] and early.meta["steps_run"] < full.meta["steps_run"] == 50
    with early.applied(clf.model), torch.no_grad():
        assert clf.model(x).argmax(1).tolist() == y  # every exemplar gets its label, with the least training
    assert early.norm() < full.norm()


def test_smallest_fitting_lr_picks_the_first_rate_that_fits(tiny):
    clf, x, _ = tiny
    from rulewriter.studies.finetune import LEARNING_RATES, smallest_fitting_lr

    y = [2] * len(x)  # reachable: every exemplar one class
    seen = []

    def train(lr):
        seen.append(lr)
        return finetune_layer(clf, "conv2", x, y, steps=50, lr=lr, stop_when_fitted=True)

    delta, tried = smallest_fitting_lr(train, (10.0, 1e-6, 1.0))
    assert seen == sorted(seen) and seen[0] == 1e-6           # smallest first, whatever the order given
    fits = [lr for lr, d in tried.items() if d.meta["fitted"]]
    assert fits and delta.meta["lr"] == fits[0] == seen[-1]   # stops at the first that fits
    assert not tried[1e-6].meta["fitted"]                     # 50 steps at 1e-6 do not fit the exemplars
    assert "smallest of" in delta.meta["lr_rule"] and set(delta.meta["lr_tried"]) == {f"{lr:g}" for lr in seen}
    _, every = smallest_fitting_lr(train, (1e-6, 1.0, 10.0), try_all=True)
    assert set(every) == {1e-6, 1.0, 10.0}
    # None fits: the largest rate's delta is kept (it came closest), and the rule says so.
    none, _ = smallest_fitting_lr(lambda lr: finetune_layer(clf, "conv2", x, y, steps=1, lr=lr), (1e-7, 1e-6))
    assert none.meta["lr"] == 1e-6 and not none.meta["fitted"]
    assert LEARNING_RATES == tuple(sorted(LEARNING_RATES))
    with pytest.raises(Exception, match="positive"):
        smallest_fitting_lr(train, (0.0, 1e-3))
