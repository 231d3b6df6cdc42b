"""The network's tail after an edited layer, run from cached activations.

Validating an edit (scoring candidate strengths on exemplar views, counting the top-1 changes it makes on a
few hundred calibration images) needs only the part of the network after the edited layer.

* :func:`tail_start` and :func:`run_tail` run EfficientNet from the input of a block (or of a stage's first
  project conv), so a candidate edit costs a pass through the last blocks, not through the whole network.
* :class:`LinearTail` goes further where the edited layer's output reaches the next nonlinearity through
  affine maps only: EfficientNet's last block's project conv → BatchNorm → head conv → BatchNorm, and the
  head conv → BatchNorm. There a
  low-rank update ``ΔW = Λ Dᵀ`` changes the head's pre-activation at every position ``p`` by exactly
  ``Σ_j (d_jᵀ k_p) q_j``, where ``q_j`` is ``λ_j`` carried through those maps (without their offsets). With
  each image's keys ``k_p`` and unedited pre-activations cached once, a candidate edit costs a rank-r
  update of the cache, the activation, the pooling and the classifier: about 1/30 of a tail pass, and the
  same logits (checked against the tail when it is built).

Example::

    start = tail_start(model, "_blocks.15._project_conv")          # "_blocks.15"
    logits = run_tail(model, start, block15_inputs)
    lt = LinearTail.build(model, "_blocks.15._project_conv", layer_inputs)
    if lt is not None and lt.covers(model, edit):
        top1 = lt.logits(model, edit).argmax(1)                     # == the edited model's top-1
"""
from __future__ import annotations

import re
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = ["tail_start", "run_tail", "run_head", "read_views", "read_views_at", "LinearTail", "adds_skip",
           "trusting_checked_weights"]

#: This thread's open :func:`trusting_checked_weights` scopes, innermost last (``.scopes``): each maps a
#: LinearTail's id to the map, the model tensors it last found equal to its reference, and their (data
#: pointer, version) signature.
_TRUSTED = threading.local()


def _scopes() -> list[dict[int, tuple]]:
    if not hasattr(_TRUSTED, "scopes"):
        _TRUSTED.scopes = []
    return _TRUSTED.scopes


@contextmanager
def trusting_checked_weights() -> Iterator[None]:
    """Inside (in this thread), :meth:`LinearTail.covers` compares the model's weights with its reference
    once, then trusts them while no tensor it compared is written in place or replaced (PyTorch's version
    counters and data pointers say so; :class:`~rulewriter.core.edit.Edit` writes that way). A search that
    asks ``covers`` a few hundred times saves the comparisons (about 2 ms each for EfficientNet-Lite0's
    head). Code that writes weights through ``.data`` bypasses the counters: do not run it inside.

    Example::

        with trusting_checked_weights():
            for edit in candidates:
                if lt.covers(model, edit): ...
    """
    _scopes().append({})
    try:
        yield
    finally:
        _scopes().pop()


def tail_start(model: nn.Module, layer: str) -> str | None:
    """The module whose input lets an EfficientNet run from just before ``layer`` (None: no shortcut).

    Usually the block holding ``layer``. A block's project conv whose block adds no skip connection (the
    first block of a stage) is its own start: nothing before it in the block reaches the block's output, so
    the tail skips the block's expand and depthwise convs (at block 11 of EfficientNet-Lite0, its widest
    activations and a fifth of a tail pass). Not where :class:`LinearTail` covers the layer: there the tail
    is only the map's fallback, and the block's input is the smaller cache (a sixth of the keys at block 15).
    """
    if not (hasattr(model, "_blocks") and hasattr(model, "_conv_head") and hasattr(model, "_fc")):
        return None
    m = re.match(r"^_blocks\.(\d+)(\.|$)", layer)
    if m:
        block = model._blocks[int(m.group(1))]
        if layer.endswith("._project_conv") and layer.count(".") == 2 and not adds_skip(block) and \
                _edited(model, layer) is None:
            return layer
        return f"_blocks.{int(m.group(1))}"
    if layer == "_conv_head" or layer.startswith(("_bn1", "_fc")):
        return "_conv_head"
    return None


def run_head(model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """EfficientNet's logits from the head's pre-activation ``_bn1(_conv_head(x))`` (eval mode)."""
    x = model._avg_pooling(model._swish(pre)).flatten(1)
    return model._fc(model._dropout(x))


def adds_skip(block: nn.Module) -> bool:
    """Whether an EfficientNet block adds its input to its output (the condition of its own forward)."""
    args = getattr(block, "_block_args", None)
    if args is None:
        return True  # not a block we know: assume the skip, so its project conv is not a start
    return bool(getattr(block, "id_skip", False) and args.stride == 1 and args.input_filters == args.output_filters)


def run_tail(model: nn.Module, start: str, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet's forward from the input of module ``start`` to the logits (eval mode): a block, a
    block's project conv (see :func:`tail_start`) or the head conv."""
    if start.startswith("_blocks."):
        first = int(start.split(".")[1])
        n = len(model._blocks)
        if start.endswith("._project_conv"):  # the rest of a block without a skip connection
            block = model._blocks[first]
            x = block._bn2(block._project_conv(x))
            first += 1
        for idx in range(first, n):
            rate = model._global_params.drop_connect_rate
            rate = rate * float(idx) / n if rate else rate
            x = model._blocks[idx](x, drop_connect_rate=rate)
    return run_head(model, model._bn1(model._conv_head(x)))


@torch.no_grad()
def read_views(classifier, layer: str, images: torch.Tensor, batch_size: int = 32
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward pass over preprocessed ``images``: the layer's input, the tail's input and the logits.

    The tail's input is None when the model has no tail shortcut for ``layer`` (see :func:`tail_start`).
    """
    at, logits = read_views_at(classifier, [layer], images, batch_size)
    return (*at[layer], logits)


@torch.no_grad()
def read_views_at(classifier, layers: Sequence[str], images: torch.Tensor, batch_size: int = 32
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """:func:`read_views` at several layers from the same forward pass: ``({layer: (its input, its tail's
    input or None)}, logits)``. The images run through the network once, whatever the number of layers.
    """
    from .trace import Trace

    model = classifier.model
    layers = list(dict.fromkeys(layers))
    starts = {layer: tail_start(model, layer) for layer in layers}
    p = next(model.parameters())  # inputs follow the model's device and dtype (a float64 model: float64)
    xs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    ts: dict[str, list[torch.Tensor]] = {s: [] for s in starts.values() if s and s not in xs}  # not twice
    ls = []
    for i in range(0, images.shape[0], batch_size):
        with ExitStack() as stack:
            trs = {layer: stack.enter_context(Trace(model, layer, retain_output=False, clone=True))
                   for layer in layers}
            tts = {s: stack.enter_context(Trace(model, s, retain_output=False, clone=True)) for s in ts}
            ls.append(model(images[i:i + batch_size].to(p.device, p.dtype)))
            for layer, tr in trs.items():
                xs[layer].append(tr.input)
            for s, tr in tts.items():
                ts[s].append(tr.input)
    full = torch.cat(ls)
    out = {}
    for layer in layers:
        start = starts[layer]
        x_in = torch.cat(xs[layer])
        chunks = (xs if start in xs else ts)[start] if start else None
        tail_in = (x_in if start == layer else torch.cat(chunks)) if start else None  # a layer of its own start
        if start is not None:  # trust the shortcut only where it reproduces the model
            diff = float((torch.cat([run_tail(model, start, t) for t in chunks]) - full).abs().max())
            if diff > 1e-4 * max(1.0, float(full.abs().max())):
                tail_in = None
        out[layer] = (x_in, tail_in)
    return out, full


def _is_pointwise(conv: Any) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)


def _edited(model: nn.Module, layer: str) -> nn.Conv2d | None:
    """The conv :class:`LinearTail` covers at ``layer``: the last block's project conv or the head conv."""
    if not all(hasattr(model, a) for a in ("_blocks", "_conv_head", "_bn1", "_fc", "_swish", "_avg_pooling")):
        return None
    if layer == "_conv_head":
        return model._conv_head if _is_pointwise(model._conv_head) else None
    last = len(model._blocks) - 1
    if layer != f"_blocks.{last}._project_conv":
        return None
    block = model._blocks[last]
    args = getattr(block, "_block_args", None)
    if args is None or (block.id_skip and args.stride == 1 and args.input_filters == args.output_filters):
        return None  # a skip connection adds the block's input: not the case this map covers
    return block._project_conv if _is_pointwise(block._project_conv) else None


def _stretch(model: nn.Module, layer: str) -> list[nn.Module] | None:
    """The affine modules from ``layer``'s output to the head's activation, where the model has them."""
    if _edited(model, layer) is None:
        return None
    if layer == "_conv_head":
        return [model._bn1]
    head = model._conv_head
    if not _is_pointwise(head):
        return None
    return [model._blocks[len(model._blocks) - 1]._bn2, head, model._bn1]


def _state(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in list(m.parameters()) + list(m.buffers())]


@dataclass
class LinearTail:
    """Keys and unedited head pre-activations of a set of images at the last EfficientNet block's project
    conv or at the head conv, for the exact logits of a low-rank edit of that layer without a tail pass
    (see the module text).

    Build it with :meth:`build` (None where the model or layer has no such stretch, or where the map does not
    reproduce the model). :meth:`covers` says whether an edit is one it computes exactly: a single view-2
    update of this layer, on a model in eval mode whose weights from the layer to the classifier are still
    those the cache was read with; other edits need the tail.
    """

    layer: str
    keys: torch.Tensor  # (N, P, key_dim): the layer's input channels at each of P positions
    pre: torch.Tensor  # (N, P, channels): the head's unedited pre-activation at each position
    grid: tuple[int, int]
    reference: list[torch.Tensor]  # copies of the weights and buffers from the layer to the classifier
    batch_size: int = 50

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, layer: str, layer_input: torch.Tensor) -> "LinearTail | None":
        """From ``layer_input`` (N, c, h, w), the input of ``layer`` for N images; None where not covered."""
        stretch = _stretch(model, layer) if not model.training else None
        if stretch is None or layer_input.dim() != 4 or layer_input.shape[0] == 0:
            return None
        conv = _edited(model, layer)
        p = conv.weight
        n, c, h, w = layer_input.shape
        if c != conv.in_channels:
            return None
        pres = []
        for i in range(0, n, 50):
            z = conv(layer_input[i:i + 50].to(p.device, p.dtype))
            for m in stretch:
                z = m(z)
            pres.append(z.flatten(2).transpose(1, 2).cpu())
        keys = layer_input.flatten(2).transpose(1, 2).to(p.dtype).cpu().contiguous()
        ref = [t.detach().clone() for t in _state([conv, *stretch, model._fc])]
        out = cls(layer, keys, torch.cat(pres).contiguous(), (h, w), ref)
        if not out._reproduces(model, layer_input[:8]):
            return None
        return out

    def subset(self, idx: torch.Tensor) -> "LinearTail":
        """The same map for the images ``idx`` only."""
        return LinearTail(self.layer, self.keys[idx], self.pre[idx], self.grid, self.reference, self.batch_size)

    def _modules(self, model: nn.Module) -> list[nn.Module]:
        return [_edited(model, self.layer), *(_stretch(model, self.layer) or []), model._fc]

    def covers(self, model: nn.Module, edit: Any) -> bool:
        """True when :meth:`logits` is exact for ``edit`` on ``model`` as it is now."""
        ups = getattr(edit, "updates", None)
        if model.training or not ups or len(ups) != 1:
            return False
        u = ups[0]
        if u.layer != self.layer or u.view != 2 or u.direction.shape[0] != self.keys.shape[2]:
            return False
        if _stretch(model, self.layer) is None:
            return False
        now = _state(self._modules(model))
        if len(now) != len(self.reference):
            return False
        scopes = _scopes()
        memo = scopes[-1] if scopes else None
        sig = tuple((id(t), t.data_ptr(), t._version) for t in now)
        if memo is not None and id(self) in memo and memo[id(self)][2] == sig:
            return True
        same = all(a.shape == b.shape and torch.equal(a.detach().to(b.device), b) for a, b in zip(now, self.reference))
        if same and memo is not None:  # the tensors are held, so their ids and pointers cannot be reused meanwhile
            memo[id(self)] = (self, now, sig)
        return same

    @torch.no_grad()
    def logits(self, model: nn.Module, edit: Any | None = None) -> torch.Tensor:
        """Logits of the cached images with ``edit`` applied (None: unedited); check :meth:`covers` first."""
        p = next(model.parameters())
        q = None
        if edit is not None:
            u = edit.updates[0]
            stretch = _stretch(model, self.layer)
            lam = u.lam.to(p.device, p.dtype).T  # (r, value_dim): each update column as a 1×1 feature map
            qz = lam[:, :, None, None]
            zero = torch.zeros_like(qz[:1])
            for m in stretch:
                qz, zero = m(qz), m(zero)
            q = (qz - zero).flatten(1)  # (r, channels): the offsets cancel, the linear part stays
            dirs = u.direction.to(p.device, p.dtype)
        out = []
        h, w = self.grid
        pool = model._avg_pooling
        global_mean = isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
        for i in range(0, len(self), self.batch_size):
            pre = self.pre[i:i + self.batch_size].to(p.device)
            if q is not None:
                k = self.keys[i:i + self.batch_size].to(p.device)
                g = k.reshape(-1, k.shape[2]) @ dirs  # (b·P, r): dᵀk at each position
                pre = torch.addmm(pre.reshape(-1, pre.shape[2]), g, q).reshape(pre.shape)
            if global_mean:  # the activation is elementwise and the pooling a mean: no NCHW copy needed
                out.append(model._fc(model._dropout(model._swish(pre).mean(1))).cpu())
            else:
                out.append(run_head(model, pre.transpose(1, 2).reshape(pre.shape[0], -1, h, w)).cpu())
        return torch.cat(out)

    def _reproduces(self, model: nn.Module, layer_input: torch.Tensor) -> bool:
        """The map's logits against the model's own modules, unedited and under a random rank-1 edit."""
        from .edit import Edit, LayerUpdate

        conv = _edited(model, self.layer)
        p = conv.weight
        x = layer_input.to(p.device, p.dtype)

        def after(z: torch.Tensor) -> torch.Tensor:
            for m in _stretch(model, self.layer):
                z = m(z)
            return run_head(model, z)

        gen = torch.Generator().manual_seed(0)
        lam = torch.randn(conv.out_channels, 1, generator=gen, dtype=torch.float64)
        d = torch.randn(conv.in_channels, 1, generator=gen, dtype=torch.float64)
        lam *= float(p.norm()) / float(lam.norm() * d.norm()) * 0.1
        edit = Edit([LayerUpdate(self.layer, 2, lam, d)])
        sub = LinearTail(self.layer, self.keys[:x.shape[0]], self.pre[:x.shape[0]], self.grid, self.reference)
        want0 = after(conv(x)).cpu()
        with edit.applied(model):
            want1 = after(conv(x)).cpu()
        got0, got1 = sub.logits(model), sub.logits(model, edit)
        tol = 1e-4 * max(1.0, float(want1.abs().max()))
        return float((got0 - want0).abs().max()) <= tol and float((got1 - want1).abs().max()) <= tol
