"""Preprocessing: how a photo, and a mask painted on it, become the tensor a classifier was trained on.

A :class:`Preprocess` resizes the short side, centre-crops and normalises an image; masks go through exactly
the same resize and crop as their image, so a region painted on the photo lands on the same pixels of the
network's input::

    >>> from rulewriter.models.preprocess import imagenet_preprocess, mask_for_image
    >>> pre = imagenet_preprocess()                            # resize 256, crop 224, ImageNet mean/std
    >>> x = pre.batch([img])                                   # PIL images -> (B, 3, 224, 224)
    >>> m = pre.mask(mask_for_image(mask, img.size))           # (224, 224) float32 in [0, 1]
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ImageLoadError, MaskError, ModelError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "imagenet_preprocess", "load_image", "mask_for_image"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}



def _to_mask_array(mask: np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """Any mask → (H, W) float32 in [0, 1], read the way :func:`rulewriter.concepts.masks.load_mask` reads it."""
    if isinstance(mask, Image.Image):
        if mask.mode == "1":
            arr: np.ndarray = np.asarray(mask, dtype=bool)
        elif mask.mode in ("F", "I", "I;16", "L"):
            arr = np.asarray(mask)
        else:
            arr = np.asarray(mask.convert("L"))
    elif isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
        arr = t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()
    else:
        arr = np.asarray(mask)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise MaskError(f"a mask must be 2-D (H, W), got shape {tuple(arr.shape)}")
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.integer):
        top = int(arr.max()) if arr.size else 0
        if arr.size and int(arr.min()) < 0:
            raise MaskError("a mask must not have negative values")
        scale = 1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0
        return arr.astype(np.float32) / scale
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise MaskError("a mask must not contain NaN or infinite values")
    if out.size and (out.min() < 0 or out.max() > 1):
        raise MaskError(f"a float mask must lie in [0, 1], got [{out.min():.3g}, {out.max():.3g}]")
    return out


def mask_for_image(
    mask: np.ndarray | Image.Image | torch.Tensor, image_size_wh: tuple[int, int], resample: str = "bilinear"
) -> np.ndarray:
    """Resize a mask to its image's size, so that :meth:`Preprocess.mask` crops it like the image.

    A mask drawn at another resolution than its photo is resized to the photo's ``(W, H)``; use
    ``resample="nearest"`` to keep a hard mask hard. A mask of another aspect ratio raises MaskError.

    Args:
        mask: (H, W) array, PIL image or tensor; see :func:`rulewriter.concepts.masks.load_mask` for value rules.
        image_size_wh: the image's ``(width, height)``, i.e. ``PIL.Image.size``.
        resample: ``"bilinear"`` (soft edges) or ``"nearest"`` (or any :class:`Preprocess` interpolation).

    Returns:
        An (H, W) float32 array in [0, 1].

    Example::

        >>> m = mask_for_image(np.ones((10, 20), bool), (40, 30))
        >>> m.shape
        (30, 40)
    """
    arr = _to_mask_array(mask)
    w, h = (int(v) for v in image_size_wh)
    if w <= 0 or h <= 0:
        raise MaskError(f"image size must be positive, got {image_size_wh}")
    if resample not in _RESAMPLE:
        raise MaskError(f"unknown resample {resample!r}; choose from {sorted(_RESAMPLE)}")
    if arr.shape == (h, w):
        return arr
    mh, mw = arr.shape
    # A mask is drawn on its photo at any resolution; a different aspect ratio means a different picture.
    if abs(mw / mh - w / h) > 0.02 * (w / h) + 1.0 / min(mh, mw):
        raise MaskError(
            f"mask is {mw}×{mh} but its image is {w}×{h}: the aspect ratios differ, so the mask was not drawn "
            "on this image (a mask may have any resolution, but the same shape as its image)"
        )
    # Mode "F" keeps soft values exact through the resize instead of quantising to 8 bits.
    out = np.asarray(Image.fromarray(arr).resize((w, h), _RESAMPLE[resample]), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


@dataclass
class Preprocess:
    """Resize the short side, center-crop, normalise: the evaluation transform of ImageNet classifiers.

    It reproduces torchvision's ``Resize(resize) → CenterCrop(size) → ToTensor → Normalize`` on PIL
    images (same sizes, rounding and antialiasing) without importing torchvision.

    Example::

        >>> pre = Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> pre.image(Image.new("RGB", (320, 240))).shape
        torch.Size([3, 224, 224])
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        self.size, self.resize = int(self.size), int(self.resize)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.size <= 0 or self.resize < self.size:
            raise ModelError(f"need 0 < size <= resize, got size={self.size}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(f"mean and std need 3 values each and std > 0, got {self.mean}, {self.std}")
        self.interpolation = str(self.interpolation).lower()
        if self.interpolation not in _RESAMPLE:
            raise ModelError(f"unknown interpolation {self.interpolation!r}; choose from {sorted(_RESAMPLE)}")

    def _geometry(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """Resized (W, H) and crop box for an image of size (w, h); torchvision's rounding."""
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        return (nw, nh), (left, top, left + self.size, top + self.size)

    def _resize_crop(self, img: Image.Image, resample: Image.Resampling) -> Image.Image:
        (nw, nh), box = self._geometry(*img.size)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), resample)
        return img.crop(box)

    def image(self, img: Image.Image) -> torch.Tensor:
        """One PIL image → a normalised (3, size, size) float32 tensor.

        Example::

            >>> pre.image(Image.open("cat.jpg")).shape
            torch.Size([3, 224, 224])
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(self._resize_crop(img, _RESAMPLE[self.interpolation]), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (t - mean) / std

    def mask(self, mask: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
        """A mask at its image's size → (size, size) float32 in [0, 1], cropped exactly like the image.

        The mask must already have the image's size (or at least its aspect ratio); when it does not,
        pass it through :func:`mask_for_image` first. Resizing is always bilinear, so soft edges stay soft.

        Example::

            >>> pre.mask(mask_for_image(m, img.size)).shape
            torch.Size([224, 224])
        """
        arr = _to_mask_array(mask)
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise MaskError(f"a mask must not be empty, got shape {arr.shape}")
        out = np.asarray(self._resize_crop(Image.fromarray(arr), Image.Resampling.BILINEAR), dtype=np.float32)
        return torch.from_numpy(np.clip(out, 0.0, 1.0).copy())

    def batch(self, images: Sequence[Image.Image | str | os.PathLike[str]]) -> torch.Tensor:
        """Several images (PIL images, or paths read with :func:`load_image`) → a (B, 3, size, size) tensor.

        Raises :class:`~rulewriter.errors.ImageLoadError` for a file that cannot be read and ``TypeError``
        for anything that is neither an image nor a path (a bare string is not taken as a list of paths).

        Example::

            >>> pre.batch([img1, "photos/cat.jpg"]).shape
            torch.Size([2, 3, 224, 224])
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            raise TypeError(f"batch() takes a list of images or paths, got one {type(images).__name__}; "
                            "wrap it in a list")
        if len(images) == 0:
            return torch.empty(0, 3, self.size, self.size)
        out = []
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                im = load_image(im)
            elif not isinstance(im, Image.Image):
                raise TypeError(f"batch() item {i} is a {type(im).__name__}; give PIL images or paths to image files")
            out.append(self.image(im))
        return torch.stack(out)

    def denormalize(self, t: torch.Tensor) -> Image.Image:
        """Undo the normalisation of one (3, H, W) (or (1, 3, H, W)) tensor for display.

        Example::

            >>> pre.denormalize(pre.image(img)).size
            (224, 224)
        """
        t = t.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        x = (t * std + mean).clamp(0, 1)
        arr = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        return Image.fromarray(arr, "RGB")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used in cache keys).

        Example::

            >>> pre.describe()["size"]
            224
        """
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as RGB, fully decoded, with the file closed again.

    EXIF orientation is applied, so the pixels are the way a browser or photo viewer shows them (and a
    mask drawn on the displayed photo lines up).

    Raises:
        ImageLoadError: the file is missing, a directory, not an image, corrupt or truncated.

    Example::

        >>> img = load_image("photos/cat.jpg")
        >>> img.mode
        'RGB'
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"cannot load image {p}: no such file")
    if p.is_dir():
        raise ImageLoadError(f"cannot load image {p}: it is a directory")
    try:
        with Image.open(p) as im:
            im.load()  # decode now, inside the try, so truncation is caught here and not at first use
            out = ImageOps.exif_transpose(im) or im
            if out.mode == "P" and "transparency" in out.info:
                out = out.convert("RGBA")
            # convert() returns a new in-memory image, so nothing refers to the file once it is closed.
            return out.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = "not an image or unsupported format" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise ImageLoadError(f"cannot load image {p}: {reason or type(e).__name__}") from e


def imagenet_preprocess() -> Preprocess:
    """The standard ImageNet evaluation transform: resize the short side to 256, centre-crop 224, normalise.

    Example::

        >>> imagenet_preprocess().size
        224
    """
    return Preprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)

