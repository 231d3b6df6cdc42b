"""A layer as a linear associative memory, ``value ≈ M · key`` (thesis Section 2.1.1, Figs. 2-2 and 2-3).

A convolution is unfold → matrix multiply → fold. Where the matrix sits gives the thesis's four
*architectures* (views) of one ``Conv2d`` with ``c`` input channels, ``f`` filters and an ``m × n`` kernel:

========  =====================  ===========  ==============  ====================================
view      direction              key size     value size      memory matrix ``M``
========  =====================  ===========  ==============  ====================================
1         forward                c            f·m·n           ``W1``: one input pixel → a patch
2         forward                c·m·n        f               ``W2``: an unfolded patch → one pixel
3         inverse                f            c·m·n           ``W2ᵀ``
4         inverse                f·m·n        c               ``W1ᵀ``
========  =====================  ===========  ==============  ====================================

Every view computes the layer exactly: :meth:`LayerMemory.forward` rebuilds the output from the input with
unfold/fold and ``M`` (views 3 and 4 use ``Mᵀ``, the forward map that the inverse memory transposes), and
:meth:`LayerMemory.set_matrix` writes an edited ``M`` back into the layer's weight. A ``Linear`` layer is the
1×1 case: views 1 and 2 are ``W``, views 3 and 4 are ``Wᵀ``.

Keys and values come back as feature maps ``(B, d, h, w)``: one ``d``-dim key per location of the view's
grid (the output grid for views 2 and 3, the input grid for views 1 and 4)::

    mem = LayerMemory(model._blocks[10]._project_conv, view=2)
    with Trace(model, "_blocks.10._project_conv", stop=True) as t:
        model(x)
    keys = mem.keys(t.input)              # (B, 672, 14, 14)
    assert torch.allclose(mem.forward(t.input), t.output, atol=1e-5)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerError

__all__ = ["LayerMemory", "VIEWS"]

VIEWS = {
    1: "forward: key = input pixel (c), value = output patch (f·m·n)",
    2: "forward: key = input patch (c·m·n), value = output pixel (f)",
    3: "inverse: key = output pixel (f), value = input patch (c·m·n)",
    4: "inverse: key = output patch (f·m·n), value = input pixel (c)",
}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _recomputed_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is recomputed from other parameters at each forward pass."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return True
    # The older hook-based weight_norm / spectral_norm keep weight_g, weight_v or weight_orig.
    return any(hasattr(module, n) for n in ("weight_g", "weight_v", "weight_orig"))


class LayerMemory:
    """View a ``Conv2d`` (groups=1) or ``Linear`` layer as a key→value matrix in one of four views.

    Args:
        module: the layer. Conv2d subclasses that pad in their own ``forward`` through a
            ``static_padding`` module (EfficientNet's ``Conv2dStaticSamePadding``) are supported.
        view: 1–4, the thesis's architecture (see the module docstring).
        name: the layer's dotted name, for messages.

    Example:
        >>> mem = LayerMemory(torch.nn.Conv2d(8, 16, 3, padding=1), view=2)
        >>> mem.matrix().shape
        torch.Size([16, 72])
    """

    def __init__(self, module: nn.Module, view: int = 2, *, name: str = "") -> None:
        if view not in VIEWS:
            raise LayerError(f"view must be one of 1, 2, 3, 4 (the thesis's architectures), got {view!r}")
        self.module = module
        self.view = view
        self.name = name or type(module).__name__
        if _recomputed_weight(module):
            raise LayerError(
                f"layer {self.name!r} recomputes its weight on every forward pass (weight_norm, spectral_norm or "
                "another parametrization), so an edit of .weight would not last; remove it first, e.g. "
                "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') or "
                "torch.nn.utils.remove_weight_norm(layer)"
            )
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                kind = "depthwise" if module.groups == module.in_channels else "grouped"
                raise LayerError(
                    f"layer {self.name!r} is a {kind} convolution (groups={module.groups}); each filter sees "
                    "only its own channels, so it is not one key→value memory. Choose a groups=1 conv "
                    "(for EfficientNet/MobileNet blocks, the _project_conv or _expand_conv)."
                )
            if type(module).forward is not nn.Conv2d.forward and not isinstance(
                getattr(module, "static_padding", None), nn.Module
            ):
                raise LayerError(
                    f"layer {self.name!r} ({type(module).__name__}) overrides Conv2d.forward in a way "
                    "rulewriter cannot reproduce exactly; only plain Conv2d and static-padding subclasses are supported"
                )
            self.kind = "conv"
            self.c, self.f = module.in_channels, module.out_channels
            self.kernel = _pair(module.kernel_size)
            self.stride = _pair(module.stride)
            self.dilation = _pair(module.dilation)
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
            self.c, self.f = module.in_features, module.out_features
            self.kernel = self.stride = self.dilation = (1, 1)
        else:
            raise LayerError(
                f"layer {self.name!r} is a {type(module).__name__}; only Conv2d and Linear layers are memories"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def patch(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def key_dim(self) -> int:
        """Length of one key in this view."""
        return {1: self.c, 2: self.c * self.patch, 3: self.f, 4: self.f * self.patch}[self.view]

    @property
    def value_dim(self) -> int:
        """Length of one value in this view."""
        return {1: self.f * self.patch, 2: self.f, 3: self.c * self.patch, 4: self.c}[self.view]

    @property
    def forward_direction(self) -> bool:
        return self.view in (1, 2)

    def describe(self) -> dict:
        """JSON-able description of the layer geometry and view."""
        return {
            "layer": self.name,
            "view": self.view,
            "kind": self.kind,
            "in_channels": self.c,
            "out_channels": self.f,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "dilation": list(self.dilation),
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
        }

    # ------------------------------------------------------------ weight <-> M
    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def _w1(self, w: torch.Tensor) -> torch.Tensor:
        # W1[(f, a, b), c] = W[f, c, a, b]
        f, c = w.shape[:2]
        return w.permute(0, 2, 3, 1).reshape(f * self.patch, c) if w.dim() == 4 else w

    def _w2(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The memory matrix ``M`` of this view (a new tensor; editing it does not touch the layer)."""
        w = (self.weight if weight is None else weight).detach()
        m = {1: self._w1, 2: self._w2, 3: lambda t: self._w2(t).T, 4: lambda t: self._w1(t).T}[self.view](w)
        return m.clone()

    def weight_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """The layer weight (in the layer's shape) whose memory in this view is ``m``."""
        want = (self.value_dim, self.key_dim)
        if tuple(m.shape) != want:
            raise LayerError(f"matrix for view {self.view} of {self.name!r} must be {want}, got {tuple(m.shape)}")
        if self.view in (3, 4):
            m = m.T
        if self.kind == "linear":
            return m.clone()
        kh, kw = self.kernel
        if self.view in (2, 3):
            return m.reshape(self.f, self.c, kh, kw).clone()
        return m.reshape(self.f, kh, kw, self.c).permute(0, 3, 1, 2).contiguous()

    def set_matrix(self, m: torch.Tensor) -> None:
        """Write ``m`` back into the layer's weight, in place, keeping the weight's dtype and device."""
        if not torch.isfinite(m).all():
            raise LayerError(f"refusing to write a matrix with NaN or inf into {self.name!r}")
        w = self.weight_from_matrix(m)
        with torch.no_grad():
            self.weight.copy_(w.to(self.weight.dtype))

    # ------------------------------------------------------------------ geometry
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every padding the layer applies, so the views can use padding 0."""
        mod = self.module
        sp = getattr(mod, "static_padding", None)
        if isinstance(sp, nn.Module):
            x = sp(x)
        pads = mod._reversed_padding_repeated_twice
        if any(pads):
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, pads, mode=mode)
        return x

    def _as_map(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Linear inputs (..., c) become (B, c, L, 1) maps; returns the map and the original leading shape."""
        lead = tuple(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1]) if x.dim() != 3 else x
        if x.dim() == 3:  # (B, T, c): keep tokens as the grid
            return flat.permute(0, 2, 1).unsqueeze(-1), lead
        return flat[:, :, None, None], lead

    def _unfold(self, xp: torch.Tensor) -> torch.Tensor:
        """(B, c, Hp, Wp) padded → (B, c·m·n, Ho, Wo) patches on the output grid."""
        b = xp.shape[0]
        cols = F.unfold(xp, self.kernel, dilation=self.dilation, stride=self.stride)
        ho = (xp.shape[2] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (xp.shape[3] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return cols.reshape(b, -1, ho, wo)

    def _flip(self, t: torch.Tensor, ch: int) -> torch.Tensor:
        """Reverse the kernel axes of a (B, ch·m·n, L) tensor."""
        b, _, L = t.shape
        return t.reshape(b, ch, *self.kernel, L).flip(2, 3).reshape(b, ch * self.patch, L)

    def _fold(self, cols: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """Scatter per-input-pixel patches (B, f·m·n, Hp·Wp) to the output grid (the adjoint of unfold).

        Input pixel u sends kernel offset a to output u - a·d at stride 1; flipping the kernel turns this
        into ``F.fold`` with padding (m-1)·d. Striding then keeps every s-th output.
        """
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        h1, w1 = hp - dh * (kh - 1), wp - dw * (kw - 1)
        full = F.fold(
            self._flip(cols, self.f), (h1, w1), self.kernel, dilation=self.dilation,
            padding=(dh * (kh - 1), dw * (kw - 1)),
        )
        return full[:, :, ::sh, ::sw]

    def _unfold_adjoint_outputs(self, y: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """For each padded input pixel, the (f·m·n) patch of outputs it feeds: the adjoint of :meth:`_fold`."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        h1, w1 = hp - dh * (kh - 1), wp - dw * (kw - 1)
        full = y.new_zeros(y.shape[0], y.shape[1], h1, w1)
        full[:, :, ::sh, ::sw] = y
        cols = F.unfold(full, self.kernel, dilation=self.dilation, padding=(dh * (kh - 1), dw * (kw - 1)))
        return self._flip(cols, self.f).reshape(y.shape[0], -1, hp, wp)

    def _crop_input_grid(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Cut a padded-grid map back to the layer input's grid (padding pixels are not keys)."""
        if self.kind == "linear":
            return t
        sp = getattr(self.module, "static_padding", None)
        pads = list(self.module._reversed_padding_repeated_twice)
        if isinstance(sp, nn.Module) and hasattr(sp, "padding"):
            extra = list(sp.padding) if not isinstance(sp.padding, int) else [sp.padding] * 4
            pads = [a + b for a, b in zip(pads, extra)]
        left, right, top, bottom = pads
        return t[:, :, top : t.shape[2] - bottom, left : t.shape[3] - right]

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, m: torch.Tensor | None = None, *, bias: bool = True) -> torch.Tensor:
        """The layer's output for input ``x``, computed through this view's matrix (default: the layer's own).

        This is how the thesis's architectures compute a convolution: unfold, multiply by the 1×1 memory
        matrix, fold. It equals ``module(x)`` up to float rounding.
        """
        m = self.matrix() if m is None else m
        m = m.to(x.dtype)
        fwd = m.T if self.view in (3, 4) else m  # inverse memories store the transpose of the forward map
        b = self.bias if bias else None
        if self.kind == "linear":
            y = x @ fwd.T
            return y + b.to(y.dtype) if b is not None else y
        xp = self._pad(x)
        if self.view in (2, 3):
            cols = self._unfold(xp)  # (B, c·m·n, Ho, Wo)
            y = torch.einsum("ok,bkhw->bohw", fwd, cols)
        else:
            hp, wp = xp.shape[2:]
            per_pixel = torch.einsum("ok,bkl->bol", fwd, xp.reshape(xp.shape[0], self.c, -1))
            y = self._fold(per_pixel, hp, wp)
        return y + b.to(y.dtype)[None, :, None, None] if b is not None else y

    def keys(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Keys as a map ``(B, key_dim, h, w)``.

        Forward views read keys from the layer's input ``x``. Inverse views read them from its output
        ``y`` (computed from ``x`` when not given), with the bias removed so that keys are linear in ``x``.
        """
        if self.kind == "linear":
            src = x if self.forward_direction else self._nobias(x, y)
            return self._as_map(src)[0]
        if self.view == 1:
            return x
        if self.view == 2:
            return self._unfold(self._pad(x))
        yb = self._nobias(x, y)
        if self.view == 3:
            return yb
        xp = self._pad(x)
        return self._crop_input_grid(self._unfold_adjoint_outputs(yb, *xp.shape[2:]), x)

    def values(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Values as a map ``(B, value_dim, h, w)`` on the same grid as :meth:`keys`.

        Forward views: what the memory recalls for each key, ``M · k`` (for view 2 this is the layer's output
        without bias; for view 1, the patch that an input pixel contributes). Inverse views: the layer's
        input at the key's place (view 3: the unfolded input patch; view 4: the input pixel).
        """
        if self.forward_direction:
            k = self.keys(x)
            return torch.einsum("vk,bkhw->bvhw", self.matrix().to(k.dtype), k)
        if self.kind == "linear":
            return self._as_map(x)[0]
        if self.view == 3:
            return self._unfold(self._pad(x))
        return x

    def _nobias(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The layer's output without its bias: computed so from ``x``, or ``y`` with the bias taken off."""
        if y is None:
            return self.forward(x, bias=False)
        if self.bias is not None:
            b = self.bias.to(y.dtype)
            y = y - (b[None, :, None, None] if self.kind == "conv" else b)
        return y

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) of the key grid for a layer input of spatial size ``input_hw``."""
        if self.kind == "linear" or self.view in (1, 4):
            return tuple(input_hw) if self.kind == "conv" else (1, 1)
        x = torch.zeros(1, self.c, *input_hw)
        return tuple(self._unfold(self._pad(x)).shape[2:])

    def flat_keys(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Keys as rows ``(B·h·w, key_dim)``, the form statistics consume."""
        k = self.keys(x, y)
        return k.permute(0, 2, 3, 1).reshape(-1, k.shape[1])
