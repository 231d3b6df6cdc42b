"""Second-moment statistics: exact accumulation, exact merging, safe files, cache keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rulewriter.errors import StatsError
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.core.stats import SecondMoment, _round_mantissa, default_precision, key_products, merge_files


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


# ------------------------------------------------------------------------------------------ precision modes
@pytest.mark.parametrize("precision,tol", [("fp64", 1e-15), ("fp32", 1e-6), ("tf32x2", 1e-6), ("tf32", 1e-3),
                                           ("bf16", 1e-2)])
def test_key_products_in_each_precision(precision, tol):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4000, 64, generator=g) * 3 + 1
    ref = k.double().T @ k.double()
    got = key_products(k, precision)
    assert got.dtype == torch.float64
    err = float((got - ref).norm() / ref.norm())
    assert err < tol
    if precision in ("tf32", "bf16"):
        assert err > 1e-7  # the rounding is really applied, not silently fp32


def test_mantissa_rounding_keeps_the_asked_bits():
    x = torch.randn(1000)
    for bits in (10, 7):
        r = _round_mantissa(x, bits)
        low = r.view(torch.int32) & ((1 << (23 - bits)) - 1)
        assert int(low.abs().sum()) == 0
        assert float(((r - x).abs() / x.abs()).max()) <= 2.0 ** -(bits + 1) * (1 + 1e-6)


def test_default_precision_is_within_tolerance_and_device_aware():
    assert default_precision("cpu") == "fp32" and default_precision("cuda") == "tf32x2"
    with pytest.raises(StatsError, match="precision"):
        key_products(torch.ones(2, 2), "fp8")


def test_bf16_autocast_and_channels_last_forward(tmp_path):
    from rulewriter.core.stats import collect_second_moment

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, padding=1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    clf = load_classifier(net, preprocess=Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3))
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        imgs.append(p)
    kw = dict(view=2, precision="fp64", progress=False)
    ref = collect_second_moment(clf, "2", imgs, **kw).moment()
    cl = collect_second_moment(clf, "2", imgs, channels_last=True, **kw).moment()
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-6)
    assert net[0].weight.is_contiguous()  # the model's memory format is restored
    bf = collect_second_moment(clf, "2", imgs, amp="bf16", **kw).moment()
    err = float((bf - ref).norm() / ref.norm())
    assert 1e-6 < err < 3e-2  # bf16 activations really change the keys, a little
    with pytest.raises(StatsError, match="amp"):
        collect_second_moment(clf, "2", imgs, amp="fp16", **kw)


@pytest.mark.parametrize("precision", ["fp64", "fp32", "tf32x2", "tf32", "bf16"])
def test_symmetric_blocks_equal_the_full_product(precision, monkeypatch):
    import rulewriter.core.stats as S

    g = torch.Generator().manual_seed(1)
    k = torch.randn(300, 37, generator=g) + 0.5
    full = key_products(k, precision)
    monkeypatch.setattr(S, "SYMMETRIC_MIN_DIM", 8)  # 37 columns in 8 blocks of 5 (the last one short)
    blocked = key_products(k, precision)
    torch.testing.assert_close(blocked, blocked.T, rtol=0, atol=0)
    tol = 1e-12 if precision == "fp64" else 1e-5
    torch.testing.assert_close(blocked, full, rtol=tol, atol=tol * float(full.abs().max()))
    s = S.SecondMoment(precision)
    s.add(k)
    torch.testing.assert_close(s.moment(), full / 300, rtol=tol, atol=tol * float(full.abs().max()))
