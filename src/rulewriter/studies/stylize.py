"""Give a concept a new appearance inside its mask: a pasted texture, or Gram-matrix style transfer.

The thesis finds a spurious correlation by repainting one concept (the paintwork of buses as gravel,
Section 2.3, Fig. 2-11) and watching which classes break. A *stylizer* does the repainting: a callable
``(image, mask) -> image`` with a ``.name``, which leaves every pixel outside the mask exactly as it was::

    from rulewriter.studies.stylize import GramStyle, TexturePaste, stylizer_from

    paste = TexturePaste("skimage:gravel")                   # pixels of the texture, shading kept
    gram = GramStyle(clf, "../shared/data/textures/snow_texture.jpg")   # Gatys style transfer, masked
    out = gram(photo, mask)                                  # mask: (H, W) in [0, 1] at the photo's size
    s = stylizer_from("gram:skimage:gravel", clf)            # the same from a spec string (CLI)

:class:`GramStyle` optimises the masked pixels only, on the *classifier's own* features (no extra
network, no extra weights): the style loss matches Gram matrices of the texture's features at one layer
per resolution stage, with the masked region's Grams weighted by the mask; a content loss at the stage of
stride 8 keeps the object's layout. See the class for the choices and measured times.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ImageLoadError, MaskError, RulewriterError

__all__ = ["Stylizer", "TexturePaste", "GramStyle", "stylizer_from", "style_layers", "masked_gram", "check_mask"]


@runtime_checkable
class Stylizer(Protocol):
    """Anything that repaints a masked concept: ``stylizer(image, mask) -> image`` plus a ``name``.

    Contract: the result has the image's size and mode RGB; where the mask is 0 the pixels are the
    image's own, bit for bit; soft masks blend ``image·(1-m) + new·m``.
    """

    name: str

    def __call__(self, image: Image.Image, mask: np.ndarray) -> Image.Image: ...


def check_mask(image: Image.Image, mask) -> np.ndarray:
    """The mask as (H, W) float32 in [0, 1] at the image's size; MaskError for a wrong size or an empty mask.

    Example::

        >>> check_mask(Image.new("RGB", (3, 2)), np.ones((2, 3))).shape
        (2, 3)
    """
    from ..concepts.masks import load_mask

    if not isinstance(image, Image.Image):
        raise ImageLoadError(f"image must be a PIL image, got {type(image).__name__}")
    m = load_mask(mask)  # raises MaskError when empty or malformed
    W, H = image.size
    if m.shape != (H, W):
        raise MaskError(f"mask is {m.shape[0]}x{m.shape[1]} (HxW) but the image is {H}x{W}; "
                        "give the mask at the image's size (rulewriter.models.preprocess.mask_for_image resizes one)")
    return m


def _composite(image: Image.Image, new_rgb: np.ndarray, m: np.ndarray) -> Image.Image:
    """``image·(1-m) + new·m`` in uint8, with the pixels where m = 0 copied from the image bit for bit."""
    orig = np.asarray(image.convert("RGB"))
    blend = orig.astype(np.float64) * (1 - m[..., None]) + new_rgb.astype(np.float64) * m[..., None]
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where((m > 0)[..., None], out, orig))


def _texture_spec(texture) -> str:
    return str(texture) if isinstance(texture, (str, Path)) else f"<{type(texture).__name__}>"


class TexturePaste:
    """Paste a texture's pixels into the mask, keeping the object's shading (:func:`manipulate.paste_texture`).

    Args:
        texture: a path, a PIL image or ``"skimage:<name>"`` (see :func:`rulewriter.concepts.manipulate.texture_from`).
        scale: ``None`` resizes the texture to cover the image once; a number tiles it with tiles whose
            short side is ``scale`` times the image's short side.
        shading_strength: how much of the object's relative luminance modulates the texture (0: flat
            texture, 1: full shading); 0.75 as in :func:`~rulewriter.concepts.manipulate.paste_texture`.

    Example::

        >>> paste = TexturePaste(Image.new("RGB", (4, 4), (0, 0, 255)))
        >>> m = np.zeros((4, 4), np.float32); m[:2] = 1
        >>> paste(Image.new("RGB", (4, 4), (200, 0, 0)), m).getpixel((0, 3))
        (200, 0, 0)
    """

    def __init__(self, texture, *, scale: float | None = None, shading_strength: float = 0.75) -> None:
        from ..concepts.manipulate import texture_from

        self.texture = texture_from(texture)  # fail now on a bad texture, not at the first image
        self.scale, self.shading_strength = scale, float(shading_strength)
        self.name = f"paste:{_texture_spec(texture)}"
        #: The texture as a spec string (a path or ``skimage:NAME``), ``None`` for an in-memory image.
        self.texture_spec = str(texture) if isinstance(texture, (str, Path)) else None

    def __call__(self, image: Image.Image, mask) -> Image.Image:
        from ..concepts.manipulate import paste_texture

        m = check_mask(image, mask)
        out = paste_texture(image.convert("RGB"), m, self.texture, scale=self.scale,
                            shading_strength=self.shading_strength)
        return _composite(image, np.asarray(out), m)


# ------------------------------------------------------------------------------------------ Gram style
def style_layers(model: nn.Module, size: int = 224, *, max_stride: int = 16) -> tuple[list[str], str]:
    """Layers for style transfer chosen by resolution: the first conv of each stage, and the content layer.

    A dummy forward pass at ``size`` × ``size`` records every ``nn.Conv2d``'s output resolution in
    execution order. Style layers: the first conv that outputs each stride 2, 4, ..., ``max_stride``
    (one layer per resolution stage, the first of it, as Gatys et al. take ``conv1_1`` ... ``conv5_1``;
    strides above 16 leave a 7×7 grid at 224 px, too coarse for a mask, and stopping early keeps the
    optimisation cheap). Content layer: the last conv at stride 8 (Gatys's ``conv4_2`` sits inside the
    stride-8 stage), or the deepest style layer if the model has no stride-8 stage.

    Example::

        >>> style_layers(load_classifier("efficientnet-lite0").model)     # doctest: +SKIP
        (['_conv_stem', '_blocks.1._depthwise_conv', '_blocks.3._depthwise_conv', '_blocks.5._depthwise_conv'], '_blocks.5._expand_conv')
    """
    order: list[tuple[str, int]] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(
                lambda m, a, out, name=name: order.append((name, int(out.shape[-1])))))
    was_training = model.training
    p = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=p.device if p is not None else "cpu",
                              dtype=p.dtype if p is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    first: dict[int, str] = {}
    last: dict[int, str] = {}
    for name, w in order:
        stride = size // max(w, 1)
        if w > 0 and size % w == 0 and 2 <= stride <= max_stride and stride & (stride - 1) == 0:
            first.setdefault(stride, name)
            last[stride] = name
    if not first:
        raise RulewriterError("found no conv layer with an output stride of 2..16; name style layers explicitly")
    styles = [first[s] for s in sorted(first)]
    content = last.get(8, styles[-1])
    return styles, content


def masked_gram(feats: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mask-weighted Gram matrix of (B, C, H, W) features: ``Σₚ wₚ fₚ fₚᵀ / Σₚ wₚ`` per image, (B, C, C).

    Without weights every location counts once (the plain Gram, normalised by the number of locations),
    so a texture's statistics and a masked region's are on the same scale whatever the region's area.

    Example::

        >>> f = torch.ones(1, 2, 2, 2); w = torch.tensor([[1., 0], [0, 0]])
        >>> masked_gram(f, w).tolist()
        [[[1.0, 1.0], [1.0, 1.0]]]
    """
    B, C, H, W = feats.shape
    if weights is None:
        weights = feats.new_ones(H, W)
    w = weights.to(feats).reshape(-1, 1, H * W) if weights.dim() == 3 else weights.to(feats).reshape(1, 1, H * W)
    f = feats.reshape(B, C, H * W)
    return torch.einsum("bcp,bdp->bcd", f * w, f) / w.sum(-1, keepdim=True).clamp_min(1e-12)


class _Features:
    """Several layers' outputs in one forward pass, stopping after the last one needed."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        from ..core.trace import get_module

        self.model, self.layers = model, list(dict.fromkeys(layers))
        self.modules = {n: get_module(model, n) for n in self.layers}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from ..core.trace import StopForward

        out: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(m, a, o):
                out[name] = o
                if len(out) == len(self.layers):
                    raise StopForward()
            return fn

        handles = [mod.register_forward_hook(hook(n)) for n, mod in self.modules.items()]
        try:
            self.model(x)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise RulewriterError(f"layers {missing} did not run in the forward pass")
        return out


class GramStyle:
    """Gatys style transfer inside a mask, on the classifier's own features (no extra weights).

    The image is resized so its short side is the classifier's input size (``preprocess.size``; the
    whole image, not the centre crop, so mask parts outside the crop are stylized too). The pixels are
    parametrised as ``x = image·(1−m) + z·m`` and only ``z`` is optimised (Adam, ``steps`` steps,
    ``z`` kept in [0, 1]), starting from the image itself (Gatys's content initialisation). Adam moves
    each pixel by about ``lr`` per step, so the default ``lr = 1/steps`` is the smallest rate whose
    budget can still carry any pixel across the whole range; larger rates leave coloured speckle:

    * style loss: for each style layer l, ``‖G_l(x; m_l) − G_l(texture)‖² / ‖G_l(texture)‖²``, where
      ``G(x; m_l)`` is the Gram of x's features weighted by the mask area-averaged onto layer l's grid
      (:func:`masked_gram`) and ``G(texture)`` the plain Gram of the texture's features (the texture
      resized to cover the same canvas). The relative error puts every layer on the same scale, so
      the layers weigh equally: the averaged loss is 1 for features with no texture statistics at all;
    * content loss: at the content layer, ``Σ m (F(x) − F(image))² / Σ m F(image)²``, weighted by
      ``content_weight``. Its default 0.2 lets the style term dominate (a relative error of 1 in the
      style is worth a 45% change of the object's content features) while keeping its layout.

    Layers default to :func:`style_layers`: one conv per resolution stage (strides 2, 4, 8, 16),
    content at stride 8. The result is resized back to the original size and composited inside the
    original mask; pixels outside the mask are the original's, bit for bit. Deterministic: no random
    initialisation, and ``seed`` fixes torch's generator around the optimisation.

    The default layers stop the forward pass at block 5 of EfficientNet-Lite0, so a step is cheap:
    measured on this project's shared (busy) 2-core CPU, 100 steps took 6.8 s on skimage's coffee photo
    (gravel; a 224×336 canvas; style loss 7.9 → 0.03 at lr 0.03) and 5.7 s on the school bus of
    imagenet-samples (snow; style loss 1.28 → 0.18). Fewer steps (50) already show the texture.

    Example::

        >>> gram = GramStyle(clf, "skimage:gravel", steps=100)        # doctest: +SKIP
        >>> out = gram(photo, mask)                                    # doctest: +SKIP
        >>> gram.last_losses["style"][-1] < gram.last_losses["style"][0]   # doctest: +SKIP
        True
    """

    def __init__(
        self,
        classifier,
        texture,
        *,
        layers: Sequence[str] | None = None,
        content_layer: str | None = None,
        steps: int = 100,
        lr: float | None = None,
        content_weight: float = 0.2,
        size: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        from ..concepts.manipulate import texture_from

        lr = 1.0 / steps if lr is None and steps >= 1 else lr
        if steps < 1 or lr is None or lr <= 0 or content_weight < 0:
            raise RulewriterError(f"need steps >= 1, lr > 0, content_weight >= 0; got {steps}, {lr}, {content_weight}")
        self.classifier = classifier
        self.texture = texture_from(texture)
        self.size = int(size or classifier.preprocess.size)
        if layers is None or content_layer is None:
            auto_styles, auto_content = style_layers(classifier.model, self.size)
            layers = list(layers) if layers is not None else auto_styles
            content_layer = content_layer or auto_content
        self.layers, self.content_layer = list(layers), content_layer
        self._feats = _Features(classifier.model, [*self.layers, self.content_layer])
        self.steps, self.lr, self.content_weight = int(steps), float(lr), float(content_weight)
        self.seed, self.progress = int(seed), progress
        self.name = f"gram:{_texture_spec(texture)}"
        self.texture_spec = str(texture) if isinstance(texture, (str, Path)) else None
        self._texture_grams: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.last_losses: dict[str, list[float]] = {}
        self.last_seconds: float | None = None

    # -------------------------------------------------------------- pieces
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.classifier.preprocess
        mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(pre.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.classifier.device, self.classifier.dtype)

    def canvas_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) of the optimisation canvas: the image scaled so its short side is ``size``."""
        W, H = image_size
        f = self.size / min(W, H)
        return max(1, round(W * f)), max(1, round(H * f))

    def texture_grams(self, canvas: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The texture's Gram matrix at each style layer, the texture covering a canvas of (W, H)."""
        if canvas not in self._texture_grams:
            from ..concepts.manipulate import texture_canvas

            tex = Image.fromarray(np.clip(np.rint(texture_canvas(self.texture, canvas, None) * 255), 0, 255)
                                  .astype(np.uint8))
            with torch.no_grad():
                f = self._feats(self._normalize(self._to_tensor(tex)))
            self._texture_grams[canvas] = {n: masked_gram(f[n].double())[0] for n in self.layers}
        return self._texture_grams[canvas]

    def losses(self, x: torch.Tensor, m: torch.Tensor, target: dict[str, torch.Tensor],
               content: torch.Tensor, grids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(style, content) losses of pixels ``x`` (1, 3, H, W) in [0, 1] under the canvas mask ``m``."""
        f = self._feats(self._normalize(x))
        style = x.new_zeros((), dtype=torch.float64)
        for n in self.layers:
            g = masked_gram(f[n].double(), grids[n])[0]
            style = style + (g - target[n]).pow(2).sum() / target[n].pow(2).sum().clamp_min(1e-12)
        style = style / len(self.layers)
        mc = grids[self.content_layer]
        fc = f[self.content_layer].double()
        cont = ((fc - content).pow(2) * mc).sum() / ((content.pow(2) * mc).sum()).clamp_min(1e-12)
        return style, cont

    # -------------------------------------------------------------- run
    def __call__(self, image: Image.Image, mask) -> Image.Image:
        from tqdm.auto import tqdm

        from ..concepts.masks import mask_to_grid

        m_full = check_mask(image, mask)
        t0 = time.perf_counter()
        canvas = self.canvas_size(image.size)
        small = image.convert("RGB").resize(canvas, Image.Resampling.BICUBIC) if canvas != image.size else image.convert("RGB")
        m_small = np.clip(np.asarray(Image.fromarray(m_full).resize(canvas, Image.Resampling.BILINEAR)
                                     if canvas != image.size else m_full, dtype=np.float32), 0, 1)
        if not (m_small > 0).any():
            raise MaskError("the mask vanishes at the classifier's input resolution; draw a larger mask")
        model = self.classifier.model
        target = self.texture_grams(canvas)
        x0 = self._to_tensor(small)
        m = torch.from_numpy(m_small).to(x0)[None, None]
        with torch.no_grad():
            f0 = self._feats(self._normalize(x0))
        grids = {}
        for n, t in f0.items():
            try:
                grids[n] = mask_to_grid(m_small, t.shape[-2:]).to(x0.device, torch.float64)
            except MaskError:
                grids[n] = torch.zeros(t.shape[-2:], dtype=torch.float64, device=x0.device)
        content = f0[self.content_layer].double()
        flags = {k: p.requires_grad for k, p in model.named_parameters()}
        was_training = model.training
        devices = [x0.device] if x0.device.type == "cuda" else []
        losses: dict[str, list[float]] = {"style": [], "content": [], "total": []}
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            z = x0.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.lr)
            try:
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                for _ in tqdm(range(self.steps), desc="gram style", disable=not self.progress):
                    x = x0 * (1 - m) + z * m
                    s, c = self.losses(x, m, target, content, grids)
                    loss = s + self.content_weight * c
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        z.clamp_(0, 1)
                    losses["style"].append(float(s.detach()))
                    losses["content"].append(float(c.detach()))
                    losses["total"].append(float(loss.detach()))
                with torch.no_grad():
                    s, c = self.losses(x0 * (1 - m) + z * m, m, target, content, grids)
                losses["style"].append(float(s))
                losses["content"].append(float(c))
                losses["total"].append(float(s + self.content_weight * c))
            finally:
                for k, p in model.named_parameters():
                    p.requires_grad_(flags[k])
                model.train(was_training)
        self.last_losses = losses
        out_small = (z.detach()[0].permute(1, 2, 0).clamp(0, 1).cpu().float().numpy() * 255.0)
        new = Image.fromarray(np.clip(np.rint(out_small), 0, 255).astype(np.uint8))
        if new.size != image.size:
            new = new.resize(image.size, Image.Resampling.BICUBIC)
        result = _composite(image, np.asarray(new), m_full)
        self.last_seconds = time.perf_counter() - t0
        return result


# ------------------------------------------------------------------------------------------ specs
def stylizer_from(spec: str, classifier=None, **kwargs) -> TexturePaste | GramStyle:
    """A stylizer from ``"paste:TEXTURE"`` or ``"gram:TEXTURE"`` (``gram`` needs the classifier).

    ``TEXTURE`` is anything :func:`rulewriter.concepts.manipulate.texture_from` reads: an image path (e.g. the
    snow photo ``../shared/data/textures/snow_texture.jpg``) or ``skimage:gravel`` / ``brick`` / ``grass``.
    Extra keyword arguments go to the stylizer's constructor. The texture is read now, so a bad spec
    fails before any image is processed.

    Example::

        >>> stylizer_from("paste:skimage:gravel").name            # doctest: +SKIP
        'paste:skimage:gravel'
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise RulewriterError(f"a stylizer spec is 'paste:TEXTURE' or 'gram:TEXTURE', got {spec!r}")
    kind, texture = spec.split(":", 1)
    kind = kind.strip().lower()
    if not texture:
        raise RulewriterError(f"stylizer spec {spec!r} names no texture")
    if kind == "paste":
        return TexturePaste(texture, **kwargs)
    if kind == "gram":
        if classifier is None:
            raise RulewriterError("a 'gram:' stylizer optimises on a classifier's features; pass the classifier")
        return GramStyle(classifier, texture, **kwargs)
    raise RulewriterError(f"unknown stylizer {kind!r} in {spec!r}; use 'paste:TEXTURE' or 'gram:TEXTURE'")
