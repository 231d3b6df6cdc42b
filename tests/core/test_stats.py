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
    t = SecondMoment.load(p)
    assert isinstance(t, SecondMoment)  # the object itself, its metadata on it
    assert torch.equal(t.moment(), s.moment()) and t.meta == {"layer": "x"}
    s.meta = {"layer": "y", "view": 2}  # without metadata=, save writes the object's own
    assert SecondMoment.load(s.save(tmp_path / "own.safetensors")).meta == {"layer": "y", "view": 2}
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
    from rulewriter.core.stats import DEFAULT_TOLERANCE

    assert default_precision("cpu") == "fp32" and default_precision("cuda") == "tf32x2"
    with pytest.raises(StatsError, match="precision"):
        key_products(torch.ones(2, 2), "fp8")
    # Keys like a real layer's: non-negative, heavy-tailed, a few near-dead channels, wide dynamic range.
    g = torch.Generator().manual_seed(0)
    k = torch.relu(torch.randn(2000, 1152, generator=g)) ** 2 * torch.logspace(-3, 1, 1152)
    exact = k.double().T @ k.double()
    for device in ("cpu", "cuda"):  # on a CPU the CUDA default's TF32 rounding is emulated
        c = key_products(k, default_precision(device))
        assert float((c - exact).norm() / exact.norm()) <= DEFAULT_TOLERANCE, device
    # The tolerance separates the modes: bf16 products are well outside it on these keys.
    assert float((key_products(k, "bf16") - exact).norm() / exact.norm()) > DEFAULT_TOLERANCE


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


def test_merge_refuses_other_settings_and_images_counted_twice(tmp_path):
    base = {"model": "m", "weights": "w", "layer": "l", "view": 2, "key_dim": 7, "preprocess": {},
            "precision": "fp64", "data": "folder-A"}

    def part(name, **meta):
        s = SecondMoment()
        s.add(_keys(50))
        return s.save(tmp_path / f"{name}.safetensors", {**base, **meta})

    whole, shard0, shard1 = part("whole"), part("s0", shard="0/2"), part("s1", shard="1/2")
    merged, meta = merge_files([shard0, shard1])
    assert meta["count"] == 100 and meta["precision"] == "fp64" and not meta["missing_shards"]
    for bad, why in (([whole, shard0], "counted twice"), ([whole, part("again")], "already in the sum"),
                     ([shard0, part("s1b", shard="1/2", precision="fp32")], "differ"),
                     ([shard0, part("s1c", shard="1/2", amp="bf16")], "differ")):
        with pytest.raises(StatsError, match=why):
            merge_files(bad)
    # Whole files of different images add up, and say which.
    merged, meta = merge_files([whole, part("other", data="folder-B")])
    assert meta["count"] == 100 and meta["data"] == ["folder-A", "folder-B"]


def test_cache_keys_on_content_not_type_and_length(tmp_path):
    """Two different TensorDatasets of one length must not share a cache entry."""
    from rulewriter.core.stats import dataset_fingerprint

    a = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))
    b = torch.utils.data.TensorDataset(torch.ones(4, 3, 8, 8))
    assert dataset_fingerprint(a) != dataset_fingerprint(b)
    assert dataset_fingerprint(a) == dataset_fingerprint(torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8)))
    assert dataset_fingerprint(torch.utils.data.Subset(a, [0, 1])) != dataset_fingerprint(torch.utils.data.Subset(a, [0, 2]))

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), 0

    assert dataset_fingerprint(Opaque()) is None


def test_generic_datasets_never_share_a_cache_entry_and_the_model_comes_back_as_it_was(tmp_path):
    from rulewriter.core.stats import collect_second_moment

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    clf = load_classifier(net, preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))
    kw = dict(view=2, precision="fp64", progress=False, cache_dir=tmp_path / "cache")
    a = torch.utils.data.TensorDataset(torch.randn(20, 3, 8, 8), torch.zeros(20))
    b = torch.utils.data.TensorDataset(torch.randn(20, 3, 8, 8) * 3, torch.zeros(20))
    ca, cb = (collect_second_moment(clf, "2", d, **kw).moment() for d in (a, b))
    fresh = collect_second_moment(clf, "2", b, **{**kw, "cache_dir": None}).moment()
    torch.testing.assert_close(cb, fresh)  # the second dataset gets its own C, not the first's
    assert not torch.allclose(ca, cb)

    class Opaque(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]

    with pytest.warns(UserWarning, match="not cached"):
        co = collect_second_moment(clf, "2", Opaque(b), **kw).moment()
    torch.testing.assert_close(co, fresh)
    # A channels_last model stays channels_last.
    net.to(memory_format=torch.channels_last)
    collect_second_moment(clf, "2", a, **{**kw, "cache_dir": None, "channels_last": False})
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()


def test_cuda_tf32_uses_the_current_api_and_restores_it():
    """The legacy allow_tf32 flag raises once the newer fp32_precision setting has been used (torch ≥ 2.9)."""
    from rulewriter.core.stats import cuda_tf32

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"  # as any other library in the process may have done
        with cuda_tf32(True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
        with cuda_tf32(False):
            assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


def test_several_layers_from_one_pass_equal_one_collection_per_layer_and_share_their_cache(tmp_path):
    """collect_second_moments: each layer's C exactly as collect_second_moment gives it, from one forward
    pass a batch; the cache files are the one-layer ones (a later one-layer call reads them), a cached layer
    is read, not collected, and an interrupted run resumes from the partial files it saved."""
    from rulewriter.core import stats as S

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1),
                              torch.nn.ReLU(), torch.nn.Conv2d(5, 6, 1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    clf = load_classifier(net, preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8), torch.zeros(40))
    kw = dict(view=2, precision="fp64", progress=False, batch_size=8, num_workers=0)
    layers = ["4", "0", "2"]
    one = {layer: S.collect_second_moment(clf, layer, data, **kw) for layer in layers}
    calls = []
    hook = net[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        both = S.collect_second_moments(clf, layers, data, cache_dir=tmp_path, **kw)
        assert len(calls) == 5  # 40 images in batches of 8: one pass each, whatever the number of layers
        assert list(both) == layers
        for layer in layers:
            assert torch.equal(both[layer].moment(), one[layer].moment()) and both[layer].count == one[layer].count
        calls.clear()
        again = S.collect_second_moment(clf, "2", data, cache_dir=tmp_path, **kw)  # the one-layer cache entry
        assert not calls and torch.equal(again.moment(), one["2"].moment())
        (p,) = tmp_path.glob("stats-*-2-v2-*.safetensors")
        p.unlink()  # only layer 2 is missing: the others are read
        got = S.collect_second_moments(clf, layers, data, cache_dir=tmp_path, **kw)
        assert len(calls) == 5 and all(torch.equal(got[k].moment(), one[k].moment()) for k in layers)
    finally:
        hook.remove()
    # Interrupted after 3 batches (checkpoints every 2): the rerun resumes from the 16 images saved.
    for p in tmp_path.glob("stats-*.safetensors"):
        p.unlink()
    real, seen = S.SecondMoment.add, []

    def add(self, keys):
        seen.append(1)
        if len(seen) > 3 * len(layers):
            raise KeyboardInterrupt
        return real(self, keys)

    S.SecondMoment.add = add
    try:
        with pytest.raises(KeyboardInterrupt):
            S.collect_second_moments(clf, layers, data, cache_dir=tmp_path, checkpoint_every=2, **kw)
    finally:
        S.SecondMoment.add = real
    assert len(list(tmp_path.glob("*.partial-0of1.safetensors"))) == len(layers)  # one per layer, none complete
    assert not [p for p in tmp_path.glob("stats-*.safetensors") if ".partial" not in p.name]
    calls.clear()
    hook = net[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        resumed = S.collect_second_moments(clf, layers, data, cache_dir=tmp_path, checkpoint_every=2, **kw)
    finally:
        hook.remove()
    assert len(calls) == 3  # 24 of the 40 images left
    for layer in layers:
        torch.testing.assert_close(resumed[layer].moment(), one[layer].moment(), rtol=1e-12, atol=1e-12)
        assert resumed[layer].count == one[layer].count
