"""Trace records, edits and stops at a layer, always removes its hooks, and refuses double firing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rulewriter.errors import LayerError
from rulewriter.core.trace import Trace


class Shared(nn.Module):
    """A block that calls one activation module twice, like EfficientNet's MBConv and ResNet's ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(self.act(x))))


def _hooks(m: nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def test_records_input_and_output_and_removes_hooks():
    torch.manual_seed(0)
    net = Shared()
    x = torch.randn(3, 4)
    with Trace(net, "a") as t:
        y = net(x)
    torch.testing.assert_close(t.input, torch.relu(x))
    torch.testing.assert_close(t.output, net.a(torch.relu(x)))
    assert y.shape == (3, 2) and _hooks(net) == 0


def test_stop_skips_the_rest_and_edit_changes_output():
    net = Shared()
    calls = []
    net.b.register_forward_hook(lambda *a: calls.append(1))
    with Trace(net, "a", stop=True) as t:
        assert t(torch.randn(2, 4)) is None
    assert not calls and t.output is not None
    with Trace(net, "a", edit_output=lambda o: o * 0, retain_output=True) as t:
        y = net(torch.randn(2, 4))
    torch.testing.assert_close(y, net.b(torch.zeros(2, 4)))
    assert _hooks(net) == 1  # only the test's own hook


def test_double_firing_is_an_error_and_hooks_are_still_removed():
    net = Shared()
    with pytest.raises(LayerError, match="ran 2 times"):
        with Trace(net, "act"):
            net(torch.randn(2, 4))
    assert _hooks(net) == 0


def test_recorded_tensors_are_copies():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    with Trace(net, "0") as t:
        net(torch.randn(5, 3) - 10)
    assert (t.output < 0).any()  # the in-place ReLU did not clobber what we kept


def test_unknown_layer_suggests_names():
    net = Shared()
    with pytest.raises(LayerError, match="'a'|'b'|act"):
        Trace(net, "actt")


def test_reentering_an_active_trace_is_refused_and_leaves_no_hook():
    from rulewriter.errors import LayerError

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(2, 3)
    y0 = net(x)
    t = Trace(net, "0")
    with t:
        with pytest.raises(LayerError, match="already active"):
            with t:
                pass
        net(x)
    assert not net[0]._forward_hooks
    torch.testing.assert_close(net(x), y0)
    with t:  # used again after it closed: fine
        net(x)
    assert not net[0]._forward_hooks
