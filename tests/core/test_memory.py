"""Every view of a layer reproduces the layer exactly and round-trips its weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rulewriter.errors import LayerError
from rulewriter.core.memory import LayerMemory

CONVS = [
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(kernel_size=4, stride=3, padding=2, dilation=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=2, stride=2),
]


def _conv(kw: dict) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, **kw).double()


@pytest.mark.parametrize("kw", CONVS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("view", [1, 2, 3, 4])
def test_conv_views_reproduce_layer(kw, view):
    conv = _conv(kw)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    mem = LayerMemory(conv, view)
    y = conv(x)
    torch.testing.assert_close(mem.forward(x), y, rtol=1e-12, atol=1e-12)
    # The matrix round-trips to the weight.
    torch.testing.assert_close(mem.weight_from_matrix(mem.matrix()), conv.weight.detach())
    # Keys and values live on one grid, with the view's sizes.
    k, v = mem.keys(x), mem.values(x)
    assert k.shape[1] == mem.key_dim and v.shape[1] == mem.value_dim
    assert k.shape[2:] == v.shape[2:]
    if view in (1, 2):  # forward memories recall exactly the values: v = M k
        torch.testing.assert_close(torch.einsum("vk,bkhw->bvhw", mem.matrix(), k), v)
    if view == 2:
        b = conv.bias if conv.bias is not None else torch.zeros(5, dtype=x.dtype)
        torch.testing.assert_close(v + b[None, :, None, None], y)
        assert mem.grid(tuple(x.shape[2:])) == tuple(y.shape[2:])
    # Inverse keys are the layer's output without its bias, computed independently of the view code.
    b = conv.bias if conv.bias is not None else torch.zeros(5, dtype=x.dtype)
    y_nobias = y - b[None, :, None, None]
    if view == 3:
        assert k.shape[2:] == y.shape[2:]
        torch.testing.assert_close(k, y_nobias, rtol=1e-12, atol=1e-12)
    if view in (3, 4):  # with y given or not, the keys are the same
        torch.testing.assert_close(mem.keys(x, y), k, rtol=1e-12, atol=1e-12)
    if view == 4 and kw.get("padding_mode", "zeros") == "zeros":
        # View 4 keys are the adjoint of view 1's fold: <fold(P), y − b> = <P, keys4> for any per-pixel P.
        # Take P = M1 x, the per-input-pixel patches, so that fold(P) = conv(x) − b, which the layer itself gives.
        m1 = LayerMemory(conv, 1)
        p = torch.einsum("ok,bkhw->bohw", m1.matrix(), x)
        lhs = (y_nobias * y_nobias).sum()
        rhs = (p * k).sum()
        torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("view", [1, 2, 3, 4])
def test_set_matrix_changes_exactly_the_layer(view):
    conv = _conv(dict(kernel_size=3, padding=1))
    mem = LayerMemory(conv, view)
    m = mem.matrix()
    delta = torch.randn_like(m)
    mem.set_matrix(m + delta)
    torch.testing.assert_close(mem.matrix(), m + delta)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(mem.forward(x), conv(x))


@pytest.mark.parametrize("view", [1, 2, 3, 4])
def test_linear_views(view):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    mem = LayerMemory(lin, view)
    for x in (torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)):
        torch.testing.assert_close(mem.forward(x), lin(x))
    assert mem.matrix().shape == ((4, 6) if view < 3 else (6, 4))
    k = mem.keys(torch.randn(3, 6, dtype=torch.float64))
    assert k.shape == (3, mem.key_dim, 1, 1)


def test_static_same_padding_subclass():
    class StaticSame(nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.static_padding = nn.ZeroPad2d((1, 2, 1, 2))

        def forward(self, x):
            return super().forward(self.static_padding(x))

    torch.manual_seed(0)
    conv = StaticSame(3, 4, 4, stride=2).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    for view in (1, 2, 3, 4):
        mem = LayerMemory(conv, view)
        torch.testing.assert_close(mem.forward(x), conv(x))
        if view in (1, 4):
            assert mem.keys(x).shape[2:] == x.shape[2:]


def test_depthwise_and_other_layers_rejected():
    with pytest.raises(LayerError, match="depthwise"):
        LayerMemory(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(LayerError, match="grouped"):
        LayerMemory(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(LayerError, match="Conv2d and Linear"):
        LayerMemory(nn.ReLU())
    with pytest.raises(LayerError, match="view"):
        LayerMemory(nn.Linear(2, 2), view=5)


def test_bad_matrix_is_refused_and_changes_nothing():
    conv = _conv(dict(kernel_size=3))
    before = conv.weight.detach().clone()
    mem = LayerMemory(conv, 2)
    with pytest.raises(LayerError, match="must be"):
        mem.set_matrix(torch.zeros(3, 3, dtype=torch.float64))
    bad = mem.matrix()
    bad[0, 0] = float("nan")
    with pytest.raises(LayerError, match="NaN"):
        mem.set_matrix(bad)
    assert torch.equal(conv.weight, before)


@pytest.mark.parametrize("wrap", ["parametrize.weight_norm", "parametrize.spectral_norm", "weight_norm", "spectral_norm"])
def test_layers_that_recompute_their_weight_are_refused(wrap):
    """An edit of .weight on a weight-normed layer would be overwritten by the next forward pass."""
    import warnings

    conv = nn.Conv2d(3, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-based forms are deprecated
        if wrap.startswith("parametrize."):
            getattr(nn.utils.parametrizations, wrap.split(".")[1])(conv)
        else:
            getattr(nn.utils, wrap)(conv)
    with pytest.raises(LayerError, match="recomputes its weight"):
        LayerMemory(conv, 2)
