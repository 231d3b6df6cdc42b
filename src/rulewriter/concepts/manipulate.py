"""Manipulations that make the *target* of a rule edit: paste a texture onto an object.

The thesis builds ``k*`` from edited inputs: in pixels, by pasting a wooden texture onto car wheels
(Section 2.2.1), or in features, by pasting a texture's features onto a bus's features (Section 2.3.1)::

    from rulewriter.concepts.manipulate import texture_from, paste_texture, paste_features
    from rulewriter.concepts.masks import coco_masks

    photo = Image.open("train1.jpg")
    mask = coco_masks("annotations.json", "train1.jpg", "wheel")         # (H, W) in [0, 1]
    wood = texture_from("spoon.jpg", crop_box=(40, 10, 200, 120))        # or texture_from("skimage:gravel")
    wooden_wheels = paste_texture(photo, mask, wood)                      # keeps the wheel's shading

    # in feature space, at the layer's grid (masks from rulewriter.concepts.masks.mask_to_grid):
    edited = paste_features(feats, tex_feats, grid_mask)                  # feats*(1-m) + tex*m

scikit-image (``pip install rulewriter[demo]``) is needed only for the ``"skimage:<name>"`` textures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rulewriter.concepts.masks import load_mask
from rulewriter.errors import ImageLoadError, MaskError

__all__ = ["TextureSource", "texture_from", "texture_canvas", "paste_texture", "paste_features"]

TextureSource = Union[str, Path, Image.Image]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _skimage_texture(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImageLoadError(
            f"texture 'skimage:{name}' needs scikit-image: pip install rulewriter[demo]"
        ) from exc
    fn = getattr(skimage.data, name, None)
    if not name or name.startswith("_") or not callable(fn):
        known = "gravel, brick, grass, coffee, chelsea, astronaut, rocket, camera, ..."
        raise ImageLoadError(f"skimage.data has no image {name!r} (try {known})")
    try:
        arr = fn()
    except Exception as exc:  # e.g. an image that must be downloaded, on an offline machine
        raise ImageLoadError(f"skimage.data.{name}() failed: {exc}") from exc
    if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
        arr = arr[0]
    if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3):
        raise ImageLoadError(f"skimage.data.{name}() does not return an image")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        arr = np.rint((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ImageLoadError(f"skimage.data.{name}() is a volume {arr.shape}, not an image")
    return Image.fromarray(arr)


def texture_from(source: TextureSource, *, crop_box: Sequence[int] | None = None) -> Image.Image:
    """Load a texture as an RGB PIL image.

    ``source`` is a path, a PIL image or ``"skimage:<name>"`` (``gravel``, ``brick``, ``grass``,
    ``coffee``, ... from ``skimage.data``, needs ``pip install rulewriter[demo]``). Grayscale textures are
    converted to RGB. ``crop_box=(left, top, right, bottom)`` in pixels takes a region, e.g. the wooden
    part of a photo of a spoon. Raises :class:`~rulewriter.errors.ImageLoadError`.

    Example::

        >>> texture_from(Image.new("L", (8, 6)), crop_box=(0, 0, 4, 4)).mode
        'RGB'
        >>> texture_from("skimage:gravel").size                 # doctest: +SKIP
        (512, 512)
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, str) and source.startswith("skimage:"):
        img = _skimage_texture(source[len("skimage:") :])
    elif isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                opened.load()
                img = opened.copy()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(f"cannot read texture {str(source)!r}: {exc}") from exc
    else:
        raise ImageLoadError(f"texture must be a path, a PIL image or 'skimage:<name>', got {type(source).__name__}")
    if img.mode != "RGB":
        # Flatten transparency onto black rather than letting convert() drop it unpredictably.
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    if crop_box is not None:
        try:
            left, top, right, bottom = (int(v) for v in crop_box)
        except (TypeError, ValueError) as exc:
            raise ImageLoadError(f"crop_box must be (left, top, right, bottom), got {crop_box!r}") from exc
        W, H = img.size
        if not (0 <= left < right <= W and 0 <= top < bottom <= H):
            raise ImageLoadError(f"crop_box {tuple(crop_box)} is not inside the {W}x{H} (WxH) texture")
        img = img.crop((left, top, right, bottom))
    return img


def texture_canvas(texture: Image.Image, size: tuple[int, int], scale: float | None = None) -> np.ndarray:
    """The texture laid over an image of ``size`` (W, H): (H, W, 3) float64 in [0, 1].

    With ``scale=None`` the texture is resized to cover the image once (aspect kept) and centre-cropped;
    with a ``scale`` it is tiled, each tile's short side ``scale`` times the image's short side. This is
    what :func:`paste_texture` blends in under the mask.

    Example::

        >>> texture_canvas(Image.new("RGB", (8, 4), (255, 0, 0)), (6, 6)).shape
        (6, 6, 3)
    """
    W, H = size
    tw, th = texture.size
    if scale is None:
        # Resize to cover the image once (aspect preserved), then centre-crop.
        f = max(W / tw, H / th)
        nw, nh = max(W, round(tw * f)), max(H, round(th * f))
        tex = texture if (nw, nh) == (tw, th) else texture.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - W) // 2, (nh - H) // 2
        arr = np.asarray(tex.crop((left, top, left + W, top + H)), dtype=np.float64)
    else:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        short = max(1, round(scale * min(W, H)))
        f = short / min(tw, th)
        nw, nh = max(1, round(tw * f)), max(1, round(th * f))
        tile = np.asarray(texture if (nw, nh) == (tw, th) else texture.resize((nw, nh), Image.BICUBIC), dtype=np.float64)
        reps = (-(-H // nh), -(-W // nw), 1)
        arr = np.tile(tile, reps)[:H, :W]
    return arr / 255.0


def paste_texture(
    image: Image.Image,
    mask: np.ndarray | torch.Tensor,
    texture: TextureSource,
    *,
    keep_shading: bool = True,
    scale: float | None = None,
    shading_strength: float = 0.75,
) -> Image.Image:
    """Fill the masked region of ``image`` with ``texture``; pixels where the mask is 0 stay exactly as they were.

    ``mask`` is (H, W) in [0, 1] at the image's size (anything :func:`rulewriter.concepts.masks.load_mask`
    accepts); soft edges blend linearly: ``out = image·(1-m) + pasted·m``. The texture is resized to cover
    the image once (centre-cropped), or, with ``scale``, tiled with tiles whose short side is ``scale``
    times the image's short side.

    ``keep_shading`` keeps the object's highlights and shadows: with L the image's luminance (ITU-R 601,
    in [0, 1]) and L̄ its mask-weighted mean inside the mask,
    ``pasted = clip(texture · ((L + ε) / (L̄ + ε)) ** shading_strength, 0, 1)``, ε = 1e-3. A strength of 0
    pastes the flat texture; 1 applies the full relative shading. Without ``keep_shading`` a hard mask
    gives exactly the texture's pixels.

    The result is RGB (RGBA inputs keep their alpha channel). Raises MaskError when the mask's size
    differs from the image's or the mask is empty.

    Example::

        >>> img = Image.new("RGB", (4, 4), (200, 0, 0))
        >>> m = np.zeros((4, 4)); m[:2] = 1
        >>> out = paste_texture(img, m, Image.new("RGB", (4, 4), (0, 0, 255)), keep_shading=False)
        >>> out.getpixel((0, 0)), out.getpixel((0, 3))
        ((0, 0, 255), (200, 0, 0))
    """
    if not isinstance(image, Image.Image):
        raise ImageLoadError(f"image must be a PIL image, got {type(image).__name__}")
    m = load_mask(mask).astype(np.float64)
    W, H = image.size
    if m.shape != (H, W):
        raise MaskError(
            f"mask is {m.shape[0]}x{m.shape[1]} (HxW) but the image is {H}x{W}; "
            "resize the mask to the image (or preprocess both the same way)"
        )
    tex_img = texture_from(texture)
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
    orig = np.asarray(image.convert("RGB"))
    base = orig.astype(np.float64) / 255.0
    tex = texture_canvas(tex_img, (W, H), scale)
    if keep_shading and shading_strength != 0:
        eps = 1e-3
        lum = base @ _LUMA
        mean_lum = float((lum * m).sum() / m.sum())
        gain = ((lum + eps) / (mean_lum + eps)) ** float(shading_strength)
        tex = tex * gain[..., None]
    tex = np.clip(tex, 0.0, 1.0)
    blended = base * (1.0 - m[..., None]) + tex * m[..., None]
    out = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    # Guarantee bit-exact pixels outside the mask whatever the float rounding did.
    out = np.where((m > 0)[..., None], out, orig)
    result = Image.fromarray(out)
    if alpha is not None:
        result.putalpha(alpha)
    return result


def paste_features(
    features: torch.Tensor,
    texture_features: torch.Tensor,
    mask: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """Paste texture features into features under a mask: ``features·(1-m) + texture·m``.

    ``features`` (B, c, H, W); ``texture_features`` (1 or B, c, H', W'), resized bilinearly to (H, W)
    when the sizes differ; ``mask`` (B or 1, H, W) (or (H, W), or with a channel axis (B, 1, H, W))
    weights in [0, 1] on the features' grid, e.g. from :func:`rulewriter.concepts.masks.mask_to_grid`. Where
    m = 0 the features are returned unchanged; where m = 1 they equal the texture features.
    Shape mismatches raise MaskError.

    Example::

        >>> f, t = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
        >>> m = torch.zeros(1, 3, 3); m[0, 1, 1] = 1
        >>> paste_features(f, t, m)[0, :, 1, 1].tolist(), float(paste_features(f, t, m).sum())
        ([1.0, 1.0], 2.0)
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        raise MaskError(f"features must be a (B, c, H, W) tensor, got {getattr(features, 'shape', type(features))}")
    if not isinstance(texture_features, torch.Tensor) or texture_features.ndim not in (3, 4):
        raise MaskError(
            f"texture_features must be a (1 or B, c, H', W') tensor, got {getattr(texture_features, 'shape', type(texture_features))}"
        )
    B, c, H, W = features.shape
    tex = texture_features if texture_features.ndim == 4 else texture_features[None]
    if tex.shape[1] != c:
        raise MaskError(f"texture_features have {tex.shape[1]} channels but features have {c}")
    if tex.shape[0] not in (1, B):
        raise MaskError(f"texture_features batch is {tex.shape[0]}; expected 1 or {B} (features shape {tuple(features.shape)})")
    tex = tex.to(device=features.device)
    if tuple(tex.shape[-2:]) != (H, W):
        resized = F.interpolate(tex.to(torch.float32 if not tex.is_floating_point() else tex.dtype),
                                size=(H, W), mode="bilinear", align_corners=False)
        tex = resized
    tex = tex.to(features.dtype)
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise MaskError(f"a 4-D mask must be (B, 1, H, W), got {tuple(m.shape)}")
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] not in (1, B) or tuple(m.shape[-2:]) != (H, W):
        raise MaskError(
            f"mask must be (1 or {B}, {H}, {W}) to match features {tuple(features.shape)}, got {tuple(m.shape)}; "
            "downsample it with rulewriter.concepts.masks.mask_to_grid"
        )
    m = m.to(device=features.device, dtype=features.dtype if features.is_floating_point() else torch.float32)
    if torch.isnan(m).any() or (m < 0).any() or (m > 1).any():
        raise MaskError("mask weights must lie in [0, 1]")
    m = m[:, None]
    # Written as a sum of products (not lerp) so that m=0 returns the features and m=1 the texture exactly.
    return features * (1 - m) + tex * m
