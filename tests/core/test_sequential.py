"""Sequential edits keep earlier rules exactly; the batch solve is the constrained least-squares optimum."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rulewriter.core.edit import Edit
from rulewriter.core.memory import LayerMemory
from rulewriter.core.rules import Rule, rewrite
from rulewriter.core.sequential import (missing_predecessors, preserved_keys, preserving_direction, restored_fraction,
                                        rules_holding)
from rulewriter.errors import EditError

D, F = 12, 5


pytestmark = pytest.mark.usefixtures("float64_default")  # the maths in float64 (tests/conftest.py)


def _clf(seed=0, weights="w-abc"):
    torch.manual_seed(seed)
    return SimpleNamespace(model=nn.Sequential(nn.Linear(D, F)).double(), name="tiny", weights_id=weights)


def _moment(seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, n, generator=g) * torch.linspace(0.3, 3, D)[:, None]
    return a, a @ a.T / n


def _rule(seed, n=6, keys=None):
    g = torch.Generator().manual_seed(100 + seed)
    k = keys if keys is not None else torch.randn(n, D, generator=g) + 2 * torch.randn(1, D, generator=g)
    return Rule("0", 2, k, torch.randn(k.shape[0], F, generator=g), torch.rand(k.shape[0], generator=g) + 0.5,
                {"name": f"rule {seed}"})


def _w(clf):
    return LayerMemory(clf.model[0], 2).matrix().double().clone()


def _sequential(clf, rules, c, **kw):
    edits: list[Edit] = []
    for r in rules:
        edits.append(rewrite(clf, r, c, ridge=0, on=edits, **kw))
    return edits


@pytest.mark.parametrize("fit", ["pairs", "mean"])
def test_sequential_edit_keeps_every_earlier_rule_and_c_orthogonal_keys(fit):
    clf, (_, c) = _clf(), _moment()
    rules = [_rule(i) for i in range(4)]
    edits, written = [], []
    for r in rules:
        edits.append(rewrite(clf, r, c, ridge=0, on=edits, fit=fit))
        with edits[0].compose(*edits[1:]).applied(clf.model):
            written.append(_w(clf) @ r.key())  # the value each rule's key had right after it was written
    ks = torch.stack([r.key() for r in rules], 1)
    probe = torch.randn(D, 3)
    # C-orthogonal to every rule's key: kᵀ C⁻¹ K = 0.
    cinv_k = torch.linalg.solve(c, ks)
    ortho = probe - ks @ torch.linalg.solve(ks.T @ cinv_k, cinv_k.T @ probe)
    w0 = _w(clf)
    with edits[0].compose(*edits[1:]).applied(clf.model):
        w = _w(clf)
    for r, v in zip(rules, written):
        torch.testing.assert_close(w @ r.key(), v, rtol=1e-9, atol=1e-9)
        if fit == "mean":
            torch.testing.assert_close(w @ r.key(), r.value(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w @ ortho, w0 @ ortho, rtol=1e-9, atol=1e-9)


def test_summed_independent_edits_move_earlier_rules():
    """The baseline the sequential solve fixes: edits solved alone and summed do move earlier keys."""
    clf, (_, c) = _clf(), _moment()
    rules = [_rule(i) for i in range(4)]
    alone = [rewrite(clf, r, c, ridge=0, fit="mean") for r in rules]
    with alone[0].compose(*alone[1:]).applied(clf.model):
        w = _w(clf)
    err = max(float((w @ r.key() - r.value()).norm() / r.value().norm()) for r in rules)
    assert err > 1e-3


def test_batch_solve_equals_brute_force_constrained_least_squares():
    """min tr((W−W0) C (W−W0)ᵀ) s.t. W K = V by the KKT system over vec(W), for many rules at once."""
    clf, (a, c) = _clf(), _moment()
    rules = [_rule(i) for i in range(7)]
    edit = rewrite(clf, rules, c, ridge=0, fit="mean")
    w0 = _w(clf)
    with edit.applied(clf.model):
        w1 = _w(clf)
    k = torch.stack([r.key() for r in rules], 1)
    v = torch.stack([r.value() for r in rules], 1)
    eye = torch.eye(F)
    h = torch.kron(c, eye)  # Hessian of tr(ΔW C ΔWᵀ) in column-major vec form (up to 2)
    b = torch.kron(k.T.contiguous(), eye)  # vec(W K) = (Kᵀ ⊗ I) vec(W)
    n, m = h.shape[0], b.shape[0]
    kkt = torch.zeros(n + m, n + m)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = h, b.T, b
    sol = torch.linalg.solve(kkt, torch.cat([h @ w0.T.reshape(-1), v.T.reshape(-1)]))
    torch.testing.assert_close(w1, sol[:n].reshape(D, F).T, rtol=1e-8, atol=1e-8)
    assert edit.updates[0].rank == 7


def test_sequential_equals_batch_with_mean_constraints():
    """With each k* constrained, sequential-with-preservation and one batch are the same unique minimiser."""
    clf, (_, c) = _clf(), _moment()
    rules = [_rule(i) for i in range(5)]
    seq = _sequential(clf, rules, c, fit="mean")
    batch = rewrite(clf, rules, c, ridge=0, fit="mean")
    torch.testing.assert_close(seq[0].compose(*seq[1:]).updates[0].delta(), batch.updates[0].delta(),
                               rtol=1e-8, atol=1e-9)


def test_sequential_equals_batch_for_independent_rules_fitted_on_pairs():
    """Rules whose keys are C⁻¹-orthogonal do not interact: the pairs' fits agree too (C = I, disjoint blocks)."""
    clf = _clf()
    g = torch.Generator().manual_seed(3)
    rules = []
    for i in range(3):
        k = torch.zeros(5, D)
        k[:, 4 * i: 4 * i + 4] = torch.randn(5, 4, generator=g) + 1
        rules.append(_rule(i, keys=k))
    c = torch.eye(D)
    seq = _sequential(clf, rules, c)
    batch = rewrite(clf, rules, c, ridge=0)
    torch.testing.assert_close(seq[0].compose(*seq[1:]).updates[0].delta(), batch.updates[0].delta(),
                               rtol=1e-9, atol=1e-10)


def test_edits_already_applied_are_not_counted_twice():
    clf, (_, c) = _clf(), _moment()
    e1 = rewrite(clf, _rule(0), c, ridge=0)
    outside = rewrite(clf, _rule(1), c, ridge=0, on=[e1])
    with e1.applied(clf.model):
        inside = rewrite(clf, _rule(1), c, ridge=0, on=[e1])
    torch.testing.assert_close(inside.updates[0].delta(), outside.updates[0].delta())
    assert outside.meta["after"] == [e1.fingerprint()] and outside.meta["preserved_keys"] == 1


def test_keys_are_kept_saved_and_composed(tmp_path):
    clf, (_, c) = _clf(), _moment()
    e1 = rewrite(clf, [_rule(0), _rule(1)], c)
    e2 = rewrite(clf, _rule(2), c, on=[e1])
    loaded = Edit.load(e2.save(tmp_path / "e2.safetensors"))
    assert torch.equal(loaded.updates[0].keys, e2.updates[0].keys)
    assert loaded.fingerprint() == e2.fingerprint()
    assert preserved_keys([e1, loaded], "0", 2).shape == (D, 3)
    assert (e1 + loaded).updates[0].keys.shape == (D, 3)
    assert missing_predecessors([loaded]) == [(0, e1.fingerprint())]
    assert missing_predecessors([e1, loaded]) == []


def test_rules_holding_reports_each_rule_and_leaves_the_model():
    clf, (_, c) = _clf(), _moment()
    rules = [_rule(i) for i in range(3)]
    seq = _sequential(clf, rules, c, fit="mean")
    w0 = _w(clf)
    rows = rules_holding(clf.model, seq)
    assert torch.equal(_w(clf), w0)
    assert [len(r) for r in rows] == [1, 1, 1]
    assert all(r[0]["holds"] and r[0]["restored"] == pytest.approx(1, abs=1e-9) for r in rows)
    # An edit that pulls rule 0's key elsewhere is detected.
    bad = rewrite(clf, Rule("0", 2, rules[0].key()[None], torch.zeros(1, F), torch.ones(1)), c, ridge=0, fit="mean")
    assert not rules_holding(clf.model, [seq[0], bad])[0][0]["holds"]


def test_restored_fraction():
    w0, k, v = torch.zeros(2, 2), torch.eye(2), torch.eye(2)
    torch.testing.assert_close(restored_fraction(0.5 * torch.eye(2), w0, k, v), torch.tensor([0.5, 0.5]))


def test_a_key_in_the_span_of_preserved_keys_is_refused():
    kp = torch.randn(D, 2)
    with pytest.raises(EditError, match="span of the earlier rules"):
        preserving_direction(torch.eye(D), kp @ torch.tensor([[1.0], [2.0]]), kp, 0)
    d = preserving_direction(torch.eye(D), torch.randn(D, 1), kp, 0)
    torch.testing.assert_close(kp.T @ d, torch.zeros(2, 1), atol=1e-12, rtol=0)


def test_edits_for_another_model_are_refused():
    clf, (_, c) = _clf(), _moment()
    e = rewrite(clf, _rule(0), c)
    e.check_model(clf)
    with pytest.raises(EditError, match="made for model tiny with weights w-abc.*loaded is tiny with weights w-other"):
        e.check_model(_clf(weights="w-other"), "a.safetensors")
    with pytest.raises(EditError, match="a.safetensors was made for"):
        (e + e).check_model(SimpleNamespace(name="resnet18", weights_id="w-abc"), "a.safetensors")
