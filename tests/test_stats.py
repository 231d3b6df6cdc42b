"""Second-moment statistics: exact accumulation, exact merging, safe files, cache keys."""
from __future__ import annotations

import pytest
import torch

from rulewriter.errors import StatsError
from rulewriter.stats import SecondMoment, merge_files


def _keys(n=500, d=7, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 2, d)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_moment_matches_direct_computation(precision):
    k = _keys()
    s = SecondMoment(precision)
    for chunk in k.split(64):
        s.add(chunk)
    direct = k.double().T @ k.double() / len(k)
    tol = 1e-12 if precision == "fp64" else 1e-6
    torch.testing.assert_close(s.moment(), direct, rtol=tol, atol=tol)
    torch.testing.assert_close(s.mean(), k.double().mean(0))
    assert s.count == 500


def test_merged_partials_equal_single_pass(tmp_path):
    k = _keys(1000)
    single = SecondMoment()
    single.add(k)
    parts = [SecondMoment() for _ in range(3)]
    for i, chunk in enumerate(k.split(300)):
        parts[i % 3].add(chunk)
    merged = SecondMoment().merge(parts[0]).merge(parts[1]).merge(parts[2])
    torch.testing.assert_close(merged.moment(), single.moment(), rtol=1e-13, atol=1e-13)
    assert merged.count == single.count
    meta = {"model": "m", "weights": "w", "layer": "l", "view": 2, "key_dim": 7, "preprocess": {}}
    paths = [p.save(tmp_path / f"p{i}.safetensors", meta) for i, p in enumerate(parts)]
    from_files, m = merge_files(paths)
    torch.testing.assert_close(from_files.moment(), single.moment(), rtol=1e-13, atol=1e-13)
    assert m["count"] == 1000
    other = SecondMoment()
    other.add(_keys(10))
    bad = other.save(tmp_path / "bad.safetensors", {**meta, "layer": "other"})
    with pytest.raises(StatsError, match="differ"):
        merge_files([paths[0], bad])


def test_save_load_roundtrip_and_refuses_pickles(tmp_path):
    s = SecondMoment()
    s.add(_keys())
    p = s.save(tmp_path / "s.safetensors", {"layer": "x"})
    t, meta = SecondMoment.load(p)
    assert torch.equal(t.moment(), s.moment()) and meta["layer"] == "x"
    assert not list(tmp_path.glob("*.tmp"))
    torch.save(s.state_dict(), tmp_path / "evil.safetensors")
    with pytest.raises(StatsError, match="pickle"):
        SecondMoment.load(tmp_path / "evil.safetensors")


def test_bad_keys_are_refused_and_change_nothing():
    s = SecondMoment()
    s.add(_keys(10))
    before = s.moment().clone()
    bad = _keys(10)
    bad[3, 2] = float("nan")
    with pytest.raises(StatsError, match="NaN"):
        s.add(bad)
    with pytest.raises(StatsError, match="dimension"):
        s.add(torch.randn(4, 3))
    with pytest.raises(StatsError, match="rows"):
        s.add(torch.randn(4))
    assert torch.equal(s.moment(), before) and s.count == 10
    with pytest.raises(StatsError, match="empty"):
        SecondMoment().moment()
    with pytest.raises(StatsError, match="precision"):
        SecondMoment("fp8")
