"""Images and masks that reach the app: decoding uploads safely, painted masks, PNG/JPEG encoding, size limits.

Every upload is decoded with PIL and re-checked (format, size, pixel count); nothing is trusted by name.

Example::

    >>> from PIL import Image
    >>> decode_image_bytes(png_bytes(Image.new("RGB", (4, 3)))).size
    (4, 3)
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from ..errors import ImageLoadError, MaskError

__all__ = ["MAX_PIXELS", "MAX_UPLOAD_BYTES", "PAGE_SIDE", "UPLOAD_FORMATS", "decode_base64", "decode_image_bytes",
           "fit_upload", "image_bytes", "jpeg_bytes", "mask_box", "png_bytes", "read_mask"]

#: Uploads (images, edits, masks) larger than this are refused: a photo or an edit of one layer is far
#: smaller, and the limit bounds what one request can make the server hold in memory.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Whole request bodies: one upload plus multipart overhead, or a JSON body with a base64 mask (4/3 larger).
#: Decoded images larger than this many pixels are refused (PIL's own bomb guard is only a warning below 2×).
MAX_PIXELS = 40_000_000
#: The longest side the page's editor shows an image at (app.js asks for max_side=1024): a mask painted
#: there carries no finer detail, so an upload is never kept larger than this on its long side.
PAGE_SIDE = 1024
#: Formats an upload may have; everything is decoded with PIL and re-checked, never trusted by name.
UPLOAD_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})


def png_bytes(img: Image.Image) -> bytes:
    """An image as PNG bytes (lossless: masks and manipulated exemplars)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 88) -> bytes:
    """An image as JPEG bytes (photos shown in the page)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image_bytes(data: bytes, what: str = "upload") -> Image.Image:
    """Bytes → an RGB PIL image, refusing anything that is not a whole, modest image of an allowed format.

    Raises :class:`~rulewriter.errors.ImageLoadError` (size, format, corrupt data, too many pixels).

    Example::

        >>> decode_image_bytes(png_bytes(Image.new("RGB", (4, 3)))).size
        (4, 3)
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageLoadError(f"{what} is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    if not data:
        raise ImageLoadError(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            w, h = probe.size
            probe.verify()  # structure check before any pixel is decoded
        if fmt not in UPLOAD_FORMATS:
            raise ImageLoadError(f"{what} is {fmt or 'not an image'}; allowed: {', '.join(sorted(UPLOAD_FORMATS))}")
        if w * h > MAX_PIXELS or w < 1 or h < 1:
            raise ImageLoadError(f"{what} is {w}×{h} pixels; the limit is {MAX_PIXELS} pixels")
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: open again
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert("RGB") if im.mode not in ("RGBA", "LA") else im.copy()
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{what} is not a readable image ({e})") from None


def fit_upload(img: Image.Image, model_side: int) -> Image.Image:
    """``img`` downscaled on arrival to what the page and the model need, never enlarged.

    The long side need not exceed :data:`PAGE_SIDE` (what the editor shows), but the short side is kept at
    least ``model_side`` (the model's resize, e.g. 256), so the model sees the same pixels it would see
    from the original.

    Example::

        >>> fit_upload(Image.new("RGB", (6300, 6300)), 256).size
        (1024, 1024)
        >>> fit_upload(Image.new("RGB", (4000, 500)), 256).size
        (2048, 256)
    """
    w, h = img.size
    scale = min(1.0, max(PAGE_SIDE / max(w, h), model_side / min(w, h)))
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def image_bytes(img: Image.Image) -> int:
    """The memory an image's pixels take (width × height × bands)."""
    return img.width * img.height * len(img.getbands())


def decode_base64(text: str, what: str = "mask") -> bytes:
    """A ``data:...;base64,`` URL or a bare base64 string → bytes (size-limited)."""
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]
    if len(text) > MAX_UPLOAD_BYTES * 4 // 3 + 8:
        raise MaskError(f"{what} is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MaskError(f"{what} is not valid base64 (send a PNG as a data: URL or base64 text)") from None


def read_mask(text: str, image_size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A painted mask (PNG as base64) → (H, W) float32 in [0, 1] at the image's size.

    The mask may have any resolution with the image's aspect ratio. Raises MaskError when it is not an
    image, has another aspect ratio, or is empty.
    """
    from ..concepts.masks import load_mask
    from ..models.preprocess import mask_for_image

    data = decode_base64(text, what)
    try:
        img = decode_image_bytes(data, what)
    except ImageLoadError as e:
        raise MaskError(str(e)) from None
    m = load_mask(img)  # MaskError when empty
    m = mask_for_image(m, image_size)
    if not (m > 0).any():
        raise MaskError(f"{what} is empty after resizing to the image")
    return m


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box ``(left, top, right, bottom)`` of a mask's non-zero pixels.

    Example::

        >>> m = np.zeros((4, 6)); m[1:3, 2:5] = 1
        >>> mask_box(m)
        (2, 1, 5, 3)
    """
    ys, xs = np.nonzero(mask > 0)
    if not len(xs):
        raise MaskError("the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
