"""Concept masks: loading drawn masks, COCO annotations (polygons and RLE) and masks on a layer's key grid.

A visual concept such as "wheel" is found by masking it in a few photos; each mask is read into an (H, W)
float32 array in [0, 1] and downsampled to the layer's key grid, where :mod:`rulewriter.concepts.keys`
averages the keys under it (the thesis, Section 2.1.2, "Context selection")::

    from rulewriter.concepts.masks import load_mask, mask_to_grid

    mask = load_mask("wheel_mask.png")                  # (H, W) float32 in [0, 1]
    grid = mask_to_grid(mask, (7, 7))                   # (7, 7) area weights on the key grid

Masks can also come from COCO annotations (polygons or RLE, rasterised with PIL only)::

    index = coco_index("car-parts/trainingset/annotations.json")
    for name in index.images("wheel"):
        m = index.mask(name, "wheel")                   # (H, W) float32, soft at polygon edges
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import MaskError

__all__ = [
    "MaskSource",
    "load_mask",
    "CocoIndex",
    "coco_index",
    "coco_masks",
    "encode_rle",
    "decode_rle",
    "mask_to_grid",
]

MaskSource = Union[str, Path, np.ndarray, Image.Image, torch.Tensor]

# ITU-R BT.601 luma weights: the same ones PIL uses for convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# Loading masks
# --------------------------------------------------------------------------------------------------------


def _describe(source: object) -> str:
    if isinstance(source, (str, Path)):
        return f"mask file {str(source)!r}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"mask array of shape {tuple(source.shape)}"
    if isinstance(source, Image.Image):
        return f"mask image ({source.mode}, {source.size[0]}x{source.size[1]} WxH)"
    return f"mask of type {type(source).__name__}"


def _scale_to_unit(arr: np.ndarray, what: str) -> np.ndarray:
    """Map a numeric array to float64 in [0, 1] following load_mask's documented rules."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"{what}: unsupported dtype {arr.dtype}; expected bool, integer or float")
    out = arr.astype(np.float64)
    if np.isnan(out).any():
        raise MaskError(f"{what} contains NaN values")
    if not np.isfinite(out).all():
        raise MaskError(f"{what} contains infinite values")
    if out.size and out.min() < 0:
        raise MaskError(f"{what} has negative values (min {out.min():g}); masks must be >= 0")
    if arr.dtype == np.uint8:
        return out / 255.0
    hi = float(out.max()) if out.size else 0.0
    if np.issubdtype(arr.dtype, np.integer):
        if hi <= 1:
            return out
        if hi <= 255:
            return out / 255.0
        if hi <= 65535:
            return out / 65535.0
        raise MaskError(f"{what}: integer values up to {hi:g} cannot be read as a mask")
    if hi > 1.0 + 1e-6:
        raise MaskError(
            f"{what}: float values must lie in [0, 1] (max is {hi:g}); divide by 255 for 8-bit data"
        )
    return np.clip(out, 0.0, 1.0)


def _reduce_channels(chans: np.ndarray, what: str) -> np.ndarray:
    """Reduce (H, W, c) in [0, 1] with c in 1..4 to (H, W): the rule documented in :func:`load_mask`."""
    c = chans.shape[-1]
    if c == 1:
        return chans[..., 0]
    if c == 2:  # luminance + alpha
        lum, alpha = chans[..., 0], chans[..., 1]
        return alpha if np.ptp(lum) == 0 else lum
    if c == 3:
        return chans @ _LUMA
    if c == 4:
        rgb, alpha = chans[..., :3], chans[..., 3]
        # A uniform colour means the drawing lives in the alpha channel (a painted brush stroke on a
        # transparent layer); otherwise the colours carry the mask and alpha is mere decoration.
        uniform = bool((rgb.reshape(-1, 3) == rgb.reshape(-1, 3)[:1]).all()) if rgb.size else True
        return alpha if uniform else rgb @ _LUMA
    raise MaskError(f"{what}: cannot reduce {c} channels to a mask (expected 1, 2, 3 or 4)")


def _array_to_mask(arr: np.ndarray, what: str, channels_first: bool) -> np.ndarray:
    if arr.ndim == 2:
        return _scale_to_unit(arr, what)
    if arr.ndim != 3:
        raise MaskError(f"{what}: expected a 2-D (H, W) mask or 3-D with a channel axis, got ndim={arr.ndim}")
    # A singleton axis is unambiguous, whatever the other sizes.
    if arr.shape[0] == 1:
        return _scale_to_unit(arr[0], what)
    if arr.shape[-1] == 1:
        return _scale_to_unit(arr[..., 0], what)
    first, last = arr.shape[0], arr.shape[-1]
    order = ("first", "last") if channels_first else ("last", "first")
    for where in order:
        if where == "last" and last <= 4:
            return _reduce_channels(_scale_to_unit(arr, what), what)
        if where == "first" and first <= 4:
            return _reduce_channels(_scale_to_unit(np.moveaxis(arr, 0, -1), what), what)
    raise MaskError(
        f"{what}: a 3-D mask needs a channel axis of size 1-4 first or last; got shape {tuple(arr.shape)}"
    )


def _image_to_mask(img: Image.Image, what: str) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I;16"):
        img = img.convert("I")
    arr = np.asarray(img)
    if img.mode == "I":  # 32-bit ints from a 16-bit PNG
        arr = arr.astype(np.int64)
    elif img.mode == "F":
        arr = arr.astype(np.float64)
    return _array_to_mask(arr, what, channels_first=False)


#: Image formats whose compression changes pixel values: masks in them are thresholded at half.
LOSSY_FORMATS = ("JPEG", "MPO")


def load_mask(source: MaskSource, *, allow_empty: bool = False) -> np.ndarray:
    """Load a concept mask as an (H, W) float32 array in [0, 1] (1 = concept).

    Accepted sources and how they are read:

    * a path or a PIL image: white / non-zero pixels are the concept. Mode L is divided by 255; RGB is
      reduced to luminance (ITU-R 601); RGBA (and LA) use the **alpha** channel when the colour is the
      same in every pixel (a stroke painted on a transparent layer), otherwise the luminance; palette
      images are converted to RGB(A) first; 16-bit images are divided by 65535. A JPEG mask is then
      thresholded at half (1 where ≥ 0.5): its compression noise would otherwise widen the concept.
    * a numpy array or a torch tensor: ``bool`` is 0/1; ``uint8`` is divided by 255; other integers are
      used as they are when at most 1, divided by 255 when at most 255 (else by 65535); floats must lie
      in [0, 1]. A 3-D array must have a channel axis of size 1-4, reduced as for images (size 1:
      squeezed, 2: luminance+alpha, 3: RGB, 4: RGBA). Numpy arrays are read channels-last first
      (``(H, W, C)``), tensors channels-first first (``(C, H, W)``).

    Raises :class:`~rulewriter.errors.MaskError` for an unreadable file, a wrong number of dimensions,
    NaN / infinite / negative values, or an empty (all-zero) mask unless ``allow_empty`` (where an empty
    mask means "the concept is absent", e.g. a segmenter's mask folder).

    Example::

        >>> m = load_mask(np.array([[0, 1], [1, 1]], dtype=bool))
        >>> m.dtype, float(m.sum())
        (dtype('float32'), 3.0)
    """
    what = _describe(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            with Image.open(path) as img:
                img.load()
                out = _image_to_mask(img, what)
                if img.format in LOSSY_FORMATS:
                    # Compression noise leaves faint non-zero pixels all around the concept, which would widen
                    # the mask; a lossy file cannot carry soft edges anyway, so it is read as black/white.
                    out = (out >= 0.5).astype(np.float32)
        except MaskError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise MaskError(f"cannot read {what}: {exc}") from exc
    elif isinstance(source, Image.Image):
        out = _image_to_mask(source, what)
    elif isinstance(source, torch.Tensor):
        out = _array_to_mask(source.detach().cpu().numpy(), what, channels_first=True)
    elif isinstance(source, np.ndarray):
        out = _array_to_mask(source, what, channels_first=False)
    else:
        raise MaskError(f"cannot read a {what}; expected a path, PIL image, numpy array or torch tensor")
    if not allow_empty and (out.size == 0 or not (out > 0).any()):
        raise MaskError(f"{what} is empty (no non-zero pixel); draw the concept in white")
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------
# COCO annotations
# --------------------------------------------------------------------------------------------------------


def encode_rle(mask: np.ndarray | torch.Tensor, compressed: bool = True) -> dict[str, Any]:
    """Encode a binary (H, W) mask as COCO run-length encoding ``{"size": [H, W], "counts": ...}``.

    Runs alternate 0s and 1s, start with 0s and follow column-major (Fortran) order, as in COCO.
    ``compressed=True`` gives the compact string form of pycocotools; ``False`` a list of ints.
    Values > 0.5 count as 1.

    Example::

        >>> encode_rle(np.array([[0, 1], [1, 1]]), compressed=False)
        {'size': [2, 2], 'counts': [1, 3]}
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise MaskError(f"encode_rle needs a 2-D mask, got shape {tuple(arr.shape)}")
    flat = (arr.ravel(order="F") > 0.5).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:  # COCO runs always begin with a (possibly empty) run of zeros
        counts = [0] + counts
    size = [int(arr.shape[0]), int(arr.shape[1])]
    if not compressed:
        return {"size": size, "counts": [int(c) for c in counts]}
    return {"size": size, "counts": _rle_to_string(counts)}


def _rle_to_string(counts: Sequence[int]) -> str:
    # pycocotools' rleToString: deltas against the run two back (same value) from the 4th run on,
    # each written as little-endian 5-bit groups with a continuation bit, offset into printable ASCII.
    out: list[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as the C code's on a signed long
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rle_from_string(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    n = len(s)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise MaskError(f"corrupt compressed RLE string (truncated at character {p})")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise MaskError(f"corrupt compressed RLE string (bad character {s[p]!r} at {p})")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)  # sign-extend the last group
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed string or list of counts) into an (H, W) float32 0/1 mask.

    Example::

        >>> decode_rle({"size": [2, 2], "counts": [1, 3]}).tolist()
        [[0.0, 1.0], [1.0, 1.0]]
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts_raw = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise MaskError(f"RLE must be a dict with 'size' [H, W] and 'counts'; got {rle!r:.200}") from exc
    if isinstance(counts_raw, bytes):
        counts_raw = counts_raw.decode("ascii")
    counts = _rle_from_string(counts_raw) if isinstance(counts_raw, str) else [int(c) for c in counts_raw]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise MaskError(f"RLE counts sum to {sum(counts)} (or are negative) but size is {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=np.float32)
    values[1::2] = 1.0
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F").astype(np.float32)


def _rasterize_polygons(polys: Sequence[Sequence[float]], height: int, width: int, supersample: int) -> np.ndarray:
    """Union of polygons as an (H, W) float32 coverage map, drawn with PIL at ``supersample``x resolution.

    PIL fills pixels whose *index* lies between the rounded edges, which adds about one (sub)pixel along
    edges; drawing at s-times the resolution and area-averaging shrinks that bias s-fold and gives soft,
    area-true edges. Only the polygons' bounding box is drawn, which keeps large photos cheap.
    """
    out = np.zeros((height, width), dtype=np.float32)
    arrays = []
    for poly in polys:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(xy) >= 3 and np.isfinite(xy).all():
            arrays.append(xy)
    if not arrays:
        return out
    allxy = np.concatenate(arrays)
    x0 = max(int(math.floor(allxy[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(allxy[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(allxy[:, 0].max())) + 1, width)
    y1 = min(int(math.ceil(allxy[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return out
    s = int(supersample)
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    for xy in arrays:
        # COCO coordinates are continuous (pixel p spans [p, p+1)); PIL addresses pixel centres, hence -0.5.
        pts = [((x - x0) * s - 0.5, (y - y0) * s - 0.5) for x, y in xy]
        draw.polygon(pts, fill=255)
    sub = np.asarray(canvas, dtype=np.float32) / 255.0
    cov = sub.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cov
    return out


def _segmentation_mask(seg: Any, height: int, width: int, supersample: int, what: str) -> np.ndarray:
    if isinstance(seg, str):  # some exporters store the polygon list as a JSON string
        try:
            seg = json.loads(seg)
        except json.JSONDecodeError as exc:
            raise MaskError(f"{what}: segmentation is a string that is not JSON") from exc
    if isinstance(seg, Mapping):
        m = decode_rle(seg)
        if m.shape != (height, width):
            raise MaskError(f"{what}: RLE size {m.shape[0]}x{m.shape[1]} differs from image {height}x{width}")
        return m
    if isinstance(seg, (list, tuple)):
        if not seg:
            return np.zeros((height, width), dtype=np.float32)
        if all(isinstance(v, (int, float)) for v in seg):  # a single flat polygon, not wrapped in a list
            seg = [seg]
        return _rasterize_polygons(seg, height, width, supersample)
    raise MaskError(f"{what}: unsupported segmentation of type {type(seg).__name__}")


class CocoIndex:
    """COCO annotations parsed once, for fast per-image masks.

    Images are matched by file-name basename, so ``"JPEGImages/train1.jpg"``, ``"train1.jpg"`` and a full
    path all find the same entry.

    Example::

        >>> index = coco_index("car-parts/trainingset/annotations.json")      # doctest: +SKIP
        >>> names = index.images("wheel")                                    # doctest: +SKIP
        >>> index.mask(names[0], "wheel").shape                              # doctest: +SKIP
        (512, 512)
    """

    def __init__(self, data: Mapping[str, Any], source: str = "annotations", *, supersample: int = 4) -> None:
        if not isinstance(data, Mapping) or "images" not in data or "annotations" not in data:
            raise MaskError(f"{source}: not COCO annotations (needs 'images' and 'annotations' lists)")
        if supersample < 1:
            raise MaskError(f"supersample must be >= 1, got {supersample}")
        self.source = source
        self.supersample = int(supersample)
        self._cat_by_id: dict[int, str] = {}
        for cat in data.get("categories", []):
            self._cat_by_id[int(cat["id"])] = str(cat.get("name", cat["id"]))
        self._cat_by_name: dict[str, int] = {name: cid for cid, name in self._cat_by_id.items()}
        self._images: dict[int, Mapping[str, Any]] = {}
        self._by_name: dict[str, list[int]] = {}
        for img in data["images"]:
            iid = int(img["id"])
            self._images[iid] = img
            self._by_name.setdefault(str(img["file_name"]), []).append(iid)
            base = os.path.basename(str(img["file_name"]).replace("\\", "/"))
            if base != img["file_name"]:
                self._by_name.setdefault(base, []).append(iid)
        self._anns: dict[tuple[int, int], list[Any]] = {}
        for ann in data["annotations"]:
            key = (int(ann["image_id"]), int(ann["category_id"]))
            self._anns.setdefault(key, []).append(ann["segmentation"])

    @property
    def categories(self) -> dict[str, int]:
        """Category name → id."""
        return dict(self._cat_by_name)

    def category_id(self, category: str | int) -> int:
        """The id of a category given by name (case-insensitive fallback) or id."""
        if isinstance(category, (int, np.integer)) and not isinstance(category, bool):
            if int(category) in self._cat_by_id:
                return int(category)
        elif isinstance(category, str):
            if category in self._cat_by_name:
                return self._cat_by_name[category]
            folded = {n.lower(): i for n, i in self._cat_by_name.items()}
            if category.lower() in folded:
                return folded[category.lower()]
        listing = ", ".join(f"{n!r} ({i})" for n, i in sorted(self._cat_by_name.items(), key=lambda t: t[1]))
        raise MaskError(f"unknown category {category!r} in {self.source}; available: {listing}")

    def _image_id(self, file_name: str | Path) -> int:
        name = str(file_name)
        ids = self._by_name.get(name)
        if ids is None:
            ids = self._by_name.get(os.path.basename(name.replace("\\", "/")))
        if not ids:
            raise MaskError(f"image {name!r} is not in {self.source} ({len(self._images)} images, matched by file name)")
        if len(set(ids)) > 1:
            raise MaskError(f"image name {name!r} matches {len(set(ids))} entries in {self.source}; pass its full file_name")
        return ids[0]

    def __contains__(self, file_name: object) -> bool:
        try:
            self._image_id(str(file_name))
        except MaskError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._images)

    def images(self, category: str | int) -> list[str]:
        """File names (as stored) of the images with at least one instance of ``category``, in file order."""
        cid = self.category_id(category)
        return [str(img["file_name"]) for iid, img in self._images.items() if self._anns.get((iid, cid))]

    def size(self, file_name: str | Path) -> tuple[int, int]:
        """(H, W) of an image as recorded in the annotations."""
        img = self._images[self._image_id(file_name)]
        if "height" not in img or "width" not in img:
            raise MaskError(f"image {file_name!r} has no width/height in {self.source}")
        return int(img["height"]), int(img["width"])

    def mask(self, file_name: str | Path, category: str | int = "wheel", *, allow_empty: bool = False) -> np.ndarray:
        """Union of all instances of ``category`` on one image, (H, W) float32 in [0, 1].

        Polygon edges are soft (area coverage); RLE masks are 0/1. Raises MaskError when the image has no
        instance of the category unless ``allow_empty``.
        """
        cid = self.category_id(category)
        iid = self._image_id(file_name)
        height, width = self.size(file_name)
        out = np.zeros((height, width), dtype=np.float32)
        what = f"{self.source}, image {file_name!r}"
        for seg in self._anns.get((iid, cid), []):
            np.maximum(out, _segmentation_mask(seg, height, width, self.supersample, what), out=out)
        if not allow_empty and not (out > 0).any():
            raise MaskError(f"image {file_name!r} has no {self._cat_by_id[cid]!r} region in {self.source}")
        return out


def coco_index(annotations: str | Path | Mapping[str, Any], *, supersample: int = 4) -> CocoIndex:
    """Parse COCO annotations (a JSON path or an already loaded dict) once.

    Example::

        >>> idx = coco_index({"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
        ...                   "categories": [{"id": 7, "name": "wheel"}],
        ...                   "annotations": [{"image_id": 1, "category_id": 7,
        ...                                    "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]})
        >>> idx.images("wheel")
        ['a.jpg']
    """
    if isinstance(annotations, (str, Path)):
        path = Path(annotations)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MaskError(f"cannot read COCO annotations {str(path)!r}: {exc}") from exc
        return CocoIndex(data, str(path), supersample=supersample)
    return CocoIndex(annotations, "annotations", supersample=supersample)


def coco_masks(
    annotations: str | Path | Mapping[str, Any] | CocoIndex,
    image: str | Path,
    category: str | int = "wheel",
    *,
    allow_empty: bool = False,
) -> np.ndarray:
    """(H, W) float32 union of all ``category`` polygons / RLE masks on ``image`` (matched by basename).

    When ``image`` names an existing file, its size is checked against the annotations (a mismatch,
    e.g. an EXIF-rotated photo, raises MaskError rather than returning a misaligned mask). For many
    images build a :class:`CocoIndex` once with :func:`coco_index` instead.

    Example::

        >>> m = coco_masks("trainingset/annotations.json", "trainingset/JPEGImages/train1.jpg")  # doctest: +SKIP
    """
    index = annotations if isinstance(annotations, CocoIndex) else coco_index(annotations)
    mask = index.mask(image, category, allow_empty=allow_empty)
    path = Path(image)
    if path.is_file():
        try:
            with Image.open(path) as img:
                w, h = img.size
        except OSError:
            return mask  # not an image we can open; the annotations are all we have
        if (h, w) != mask.shape:
            raise MaskError(
                f"annotations say {path.name} is {mask.shape[0]}x{mask.shape[1]} (HxW) but the file is {h}x{w}"
            )
    return mask


# --------------------------------------------------------------------------------------------------------
# Masks on the key grid, concept keys and contexts
# --------------------------------------------------------------------------------------------------------


def _area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights: fraction of output cell i covered by input pixel p (rows sum to 1)."""
    edges_out = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    lo = torch.maximum(edges_out[:-1, None], torch.arange(n_in, dtype=torch.float64)[None, :])
    hi = torch.minimum(edges_out[1:, None], torch.arange(1, n_in + 1, dtype=torch.float64)[None, :])
    return (hi - lo).clamp_min(0) / (n_in / n_out)


def mask_to_grid(mask: torch.Tensor | np.ndarray, grid: tuple[int, int] | Sequence[int] | torch.Size) -> torch.Tensor:
    """Area-average an (H, W) mask (or an (N, H, W) stack) down to the key grid ``(h, w)``, float32 on the CPU.

    Each grid cell gets the exact fraction of its area covered by the mask (weighted by the mask's
    values), also when H, W are not multiples of h, w. The mean of the result equals the mean of the mask.
    Raises MaskError when a mask covers no key location at all.

    Example::

        >>> g = mask_to_grid(np.pad(np.ones((4, 4)), ((0, 4), (0, 4))), (2, 2))
        >>> g.tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if t.dtype == torch.bool:
        t = t.to(torch.float64)
    if t.ndim not in (2, 3):
        raise MaskError(f"mask_to_grid needs an (H, W) or (N, H, W) mask, got shape {tuple(t.shape)}")
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError) as exc:
        raise MaskError(f"grid must be (h, w), got {grid!r}") from exc
    if h < 1 or w < 1:
        raise MaskError(f"grid must be positive, got {(h, w)}")
    t = t.detach().to("cpu", torch.float64)
    if torch.isnan(t).any():
        raise MaskError(f"mask of shape {tuple(t.shape)} contains NaN values")
    H, W = t.shape[-2:]
    if H == 0 or W == 0:
        raise MaskError(f"mask of shape {tuple(t.shape)} is empty")
    # Separable exact-area resampling: one small matrix per axis, exact for any sizes.
    out = _area_matrix(H, h) @ t @ _area_matrix(W, w).T
    flat = out.reshape(-1, h * w) if out.ndim == 3 else out.reshape(1, -1)
    empty = (flat.abs().amax(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        where = "" if out.ndim == 2 else f" (masks {empty[:10]})"
        raise MaskError(
            f"mask covers no key location at this layer{where}; draw a larger mask or choose an earlier layer"
        )
    return out.to(torch.float32)
