"""Trace one layer of a network: record its input and output, edit its output, or stop there.

A :class:`Trace` is a context manager over a named layer. Its hooks live only inside the ``with`` block,
and they are removed on exit even when the forward pass raises::

    with Trace(model, "_blocks.12._project_conv", stop=True) as t:
        model(x)                      # runs only up to the layer
    keys_in, out = t.input, t.output

``stop=True`` raises :class:`StopForward` right after the layer runs; the context manager swallows it,
so the rest of the network never executes. ``edit_output`` replaces the layer's output with
``edit_output(output)``.

A layer whose hook fires twice in one forward pass (a module reused inside a block, such as the shared
``ReLU6`` of an EfficientNet block or the in-place ``ReLU`` of a torchvision ResNet) has no single input or
output, so a second call raises :class:`~rulewriter.errors.LayerError` instead of silently keeping the last
one. Use :meth:`Trace.reset` between forward passes in the same ``with`` block.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import LayerError

__all__ = ["Trace", "StopForward", "get_module"]


class StopForward(Exception):
    """Raised inside a forward pass to stop it after the traced layer; caught by :class:`Trace`."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at a dotted ``name``; a miss raises LayerError with close matches."""
    from ..models.registry import get_module as _get

    return _get(model, name)


class Trace:
    """Record, edit or stop at one layer of ``model``.

    Args:
        model: the network.
        layer: dotted name of the layer (as in ``model.named_modules()``).
        retain_input: keep the layer's (first) input tensor in ``.input``.
        retain_output: keep the layer's output in ``.output``.
        stop: stop the forward pass after this layer.
        edit_output: a function ``output -> new output`` applied inside the forward pass.
        clone: keep copies, not views, so later in-place operations cannot change what was recorded.
        detach: detach recorded tensors from the autograd graph.

    Example:
        >>> with Trace(model, "features.28", stop=True) as t:   # doctest: +SKIP
        ...     model(images)
        >>> t.input.shape                                        # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        retain_input: bool = True,
        retain_output: bool = True,
        stop: bool = False,
        edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        clone: bool = True,
        detach: bool = True,
    ) -> None:
        self.model = model
        self.layer = layer
        self.module = get_module(model, layer)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.stop = stop
        self.edit_output = edit_output
        self.clone = clone
        self.detach = detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.calls = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if self.detach:
            t = t.detach()
        return t.clone() if self.clone else t

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1:
            raise LayerError(
                f"layer {self.layer!r} ran {self.calls} times in one forward pass; it is a module shared "
                "inside its block, so it has no single input or output. Trace the layer before or after it."
            )
        if self.retain_input:
            self.input = self._keep(inputs[0])
        if self.edit_output is not None:
            output = self.edit_output(output)
        if self.retain_output:
            self.output = self._keep(output)
        if self.stop:
            raise StopForward()
        return output

    def reset(self) -> None:
        """Forget what was recorded, before another forward pass inside the same ``with`` block."""
        self.input = self.output = None
        self.calls = 0

    def __enter__(self) -> "Trace":
        if self._handle is not None:
            # A second hook would replace the first handle, which could then never be removed.
            raise LayerError(f"this Trace of {self.layer!r} is already active; use a new Trace to nest")
        self.reset()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove the hook; safe to call twice."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, *args, **kwargs):
        """Run the model with this trace active and return its output (``None`` when stopped).

        Within one ``with`` block each call starts a fresh recording.
        """
        self.reset()
        try:
            return self.model(*args, **kwargs)
        except StopForward:
            return None
