"""Heatmaps: where a concept fires (:func:`key_match`) and pictures of it, with a built-in colormap.

:func:`key_match` is the per-location activation of a rank-one edit along the concept key; :func:`overlay`
and :func:`save_overlay` colour a heatmap with :func:`colormap` and blend it over the photo, so that no
matplotlib is needed::

    from rulewriter.concepts.heatmap import key_match, save_overlay

    heat = key_match(keys[0], k_star, C)                # (h, w) k_loc · (C + εI)⁻¹ k*, the edit's ridge
    save_overlay("wheel_heat.png", "car.jpg", heat)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_bytes
from ..errors import ImageLoadError, MaskError, StatsError
from .keys import check_second_moment

__all__ = ["MATCH_RIDGE", "key_match", "colormap", "colorize", "overlay", "save_overlay", "shared_scale", "colorbar"]

#: The ridge :func:`key_match` regularises ``C`` with by default: the edit's default ridge
#: (``rulewriter.core.edit.DEFAULT_RIDGE``; concepts sit below core, so the value is repeated here and a
#: test checks the two agree).
MATCH_RIDGE = 1e-3


def key_match(keys: torch.Tensor, key: torch.Tensor, C: torch.Tensor | None = None, *,
              ridge: float = MATCH_RIDGE) -> torch.Tensor:
    """How strongly each grid location matches the concept key: (h, w), or (N, h, w) for (N, d, h, w) keys.

    Without ``C`` this is the plain dot product ``k_loc · k*``. With the layer's second moment ``C`` it is
    ``k_loc · (C + εI)^{-1} k*`` with ``ε = ridge · tr(C)/d``, the regularisation ``rewrite`` solves with,
    computed with a linear solve: with the edit's ``ridge`` this is exactly how strongly the rank-one edit
    ``W + Λ ((C + εI)^{-1} k*)ᵀ`` fires at that location (the edit adds ``Λ · ((C + εI)^{-1}k*)ᵀ k_loc``
    there), i.e. the edit's per-location "activation". Pass the ridge the edit used (``ridge=0`` for an
    edit solved with the bare ``C``). Returned in float32 (float64 for float64 keys).

    Example::

        >>> keys = torch.zeros(2, 1, 2); keys[0, 0, 1] = 3.0
        >>> key_match(keys, torch.tensor([1.0, 0.0])).tolist()
        [[0.0, 3.0]]
    """
    if not isinstance(keys, torch.Tensor) or keys.ndim not in (3, 4):
        raise MaskError(f"keys must be (d, h, w) or (N, d, h, w), got {getattr(keys, 'shape', type(keys))}")
    d = keys.shape[-3]
    k = torch.as_tensor(key).reshape(-1)
    if k.shape[0] != d:
        raise MaskError(f"key has {k.shape[0]} dims but keys have d={d} (shape {tuple(keys.shape)})")
    q = k.to(device=keys.device, dtype=torch.float64)
    if not ridge >= 0:
        raise StatsError(f"ridge must be >= 0, got {ridge}")
    if C is not None:
        C64 = check_second_moment(C, d).to(device=keys.device, dtype=torch.float64)
        if ridge:  # the same ε = ridge · tr(C)/d as rulewriter.core.edit.regularize
            C64 = C64 + ridge * torch.diagonal(C64).mean() * torch.eye(d, dtype=C64.dtype, device=C64.device)
        try:
            q = torch.linalg.solve(C64, q)
        except RuntimeError as exc:  # torch raises a LinAlgError (a RuntimeError) for singular C
            raise StatsError(f"C + εI is singular (ridge {ridge}); cannot compute (C + εI)^-1 k*: {exc}") from exc
    dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    return torch.einsum("...dhw,d->...hw", keys.to(dtype), q.to(dtype))


def _interp_table(anchors: Sequence[Sequence[int]]) -> np.ndarray:
    a = np.asarray(anchors, dtype=np.float64)
    xs = np.linspace(0.0, 1.0, len(a))
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, xs, a[:, c]) for c in range(3)], axis=1)


# 17 evenly spaced samples of matplotlib's 'inferno' (CC0), linearly interpolated to 256 entries.
_INFERNO = [
    (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110), (138, 34, 106),
    (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9),
    (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164),
]


def colormap(name: str = "jet") -> np.ndarray:
    """A 256-entry RGB lookup table (256, 3) uint8.

    Built in (numpy only): ``"jet"``, ``"inferno"``, ``"hot"``, ``"gray"``. Any other name is looked up in
    matplotlib when it is installed.

    Example::

        >>> colormap("jet")[[0, 255]].tolist()
        [[0, 0, 128], [128, 0, 0]]
    """
    t = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        table = np.stack([np.clip(1.5 - np.abs(4 * t - s), 0, 1) for s in (3.0, 2.0, 1.0)], axis=1) * 255
    elif name == "inferno":
        table = _interp_table(_INFERNO)
    elif name == "hot":
        table = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=1) * 255
    elif name == "gray":
        table = np.repeat(t[:, None], 3, axis=1) * 255
    else:
        try:
            import matplotlib
        except ImportError as exc:
            raise ValueError(
                f"unknown colormap {name!r}: built in are jet, inferno, hot, gray "
                "(others need matplotlib: pip install rulewriter[plots])"
            ) from exc
        try:
            cmap = matplotlib.colormaps[name]
        except KeyError as exc:
            raise ValueError(f"unknown colormap {name!r}") from exc
        table = cmap(t)[:, :3] * 255
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


def _normalize_heat(heat: np.ndarray, normalize: str | None) -> np.ndarray:
    heat = np.nan_to_num(heat.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if normalize == "max":
        heat = np.clip(heat, 0.0, None)
        hi = heat.max() if heat.size else 0.0
        return heat / hi if hi > 0 else np.zeros_like(heat)
    if normalize == "minmax":
        lo, hi = (heat.min(), heat.max()) if heat.size else (0.0, 0.0)
        return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    if normalize in (None, "none"):
        return np.clip(heat, 0.0, 1.0)
    raise ValueError(f"unknown normalize={normalize!r}; use 'max', 'minmax' or 'none'")


def colorize(heat: torch.Tensor | np.ndarray, cmap: str = "jet", normalize: str | None = "max") -> Image.Image:
    """Colour an (h, w) heatmap at its own resolution (RGB image), with :func:`colormap`.

    Example::

        >>> colorize(np.eye(3)).size
        (3, 3)
    """
    arr = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    if arr.ndim != 2:
        raise MaskError(f"heatmap must be 2-D (h, w), got shape {tuple(arr.shape)}")
    idx = np.rint(_normalize_heat(arr, normalize) * 255).astype(np.uint8)
    return Image.fromarray(colormap(cmap)[idx])


def _as_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {str(image)!r}: {exc}") from exc


def overlay(
    image: Image.Image | str | Path,
    heat: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    normalize: str | None = "max",
    cmap: str = "jet",
) -> Image.Image:
    """Blend a coloured heatmap over ``image``: an RGB image of the same size.

    ``heat`` (h, w) is normalised (``"max"``: negatives clipped to 0, divided by the max; ``"minmax"``:
    scaled to [0, 1]; ``"none"``: clipped to [0, 1], for a scale shared across images), upsampled
    bilinearly to the image size, coloured with :func:`colormap` and blended with weight ``alpha``.

    Example::

        >>> img = Image.new("RGB", (64, 48))
        >>> overlay(img, torch.rand(7, 7)).size
        (64, 48)
    """
    img = _as_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    arr = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    if arr.ndim != 2 or arr.size == 0:
        raise MaskError(f"heatmap must be a non-empty 2-D (h, w) array, got shape {tuple(arr.shape)}")
    norm = torch.from_numpy(_normalize_heat(arr, normalize))
    W, H = img.size
    up = torch.nn.functional.interpolate(norm[None, None], size=(H, W), mode="bilinear", align_corners=False)
    idx = np.rint(up[0, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    colour = colormap(cmap)[idx].astype(np.float64)
    base = np.asarray(img.convert("RGB"), dtype=np.float64)
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def save_overlay(path: str | Path, image: Image.Image | str | Path, heat: torch.Tensor | np.ndarray, **kw: Any) -> Path:
    """Write :func:`overlay` (``**kw`` are its options) as a PNG, atomically; returns the path.

    Example::

        >>> save_overlay("wheel_heat.png", img, key_match(keys, k_star, C))    # doctest: +SKIP
    """
    picture = overlay(image, heat, **kw)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return atomic_bytes(path, buf.getvalue())


def shared_scale(heats: Sequence[torch.Tensor | np.ndarray]) -> tuple[list[np.ndarray], float]:
    """One colour scale for several heatmaps: each clipped at 0 and divided by the largest value of them all.

    Returns the scaled maps (for ``overlay(..., normalize="none")``) and that largest value, so that a
    colour bar (:func:`colorbar`) can say what red means. Scaling each image to its own maximum would make
    every photo look "hot", however weakly the concept matches it.

    Example:
        >>> maps, vmax = shared_scale([np.array([[1.0, 2.0]]), np.array([[4.0, -1.0]])])
        >>> vmax, maps[0].tolist(), maps[1].tolist()
        (4.0, [[0.25, 0.5]], [[1.0, 0.0]])
    """
    arrs = [np.nan_to_num((h.detach().cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h))
                          .astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None) for h in heats]
    vmax = max([float(a.max()) for a in arrs if a.size] + [0.0])
    scale = vmax if vmax > 0 else 1.0
    return [a / scale for a in arrs], vmax


def colorbar(vmax: float, *, height: int = 224, width: int = 18, cmap: str = "jet", ticks: int = 5,
             label: str | None = None) -> Image.Image:
    """A vertical colour bar from 0 (bottom) to ``vmax`` (top) with labelled ticks, as an RGB image.

    Example:
        >>> colorbar(2.0, label="×k*").mode
        'RGB'
    """
    from PIL import ImageDraw

    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, 1)
    bar = colorize(ramp, cmap=cmap, normalize="none")
    font_w = 7 * max(len(f"{vmax * i / (ticks - 1):.3g}") for i in range(ticks)) + 8
    top = 14 if label else 6
    img = Image.new("RGB", (width + font_w, height + top + 6), "white")
    img.paste(bar, (0, top))
    draw = ImageDraw.Draw(img)
    for i in range(ticks):
        y = top + round((height - 1) * (1 - i / (ticks - 1)))
        draw.line([(width, y), (width + 3, y)], fill="black")
        draw.text((width + 5, max(0, y - 6)), f"{vmax * i / (ticks - 1):.3g}", fill="black")
    if label:
        draw.text((0, 0), label, fill="black")
    return img
