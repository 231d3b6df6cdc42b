"""Concepts: from masks drawn on photos to the key ``k*`` a rule edit rewrites.

A layer seen as a memory maps a *key* (the d-dim feature at one grid location, see the thesis, Section 2.1.1)
to a value. A visual concept such as "wheel" is found by masking it in a few photos, downsampling each mask to
the layer's key grid and averaging the keys under the masks (Section 2.1.2, "Context selection")::

    from rulewriter.concepts.masks import load_mask, mask_to_grid, concept_key, context, masked_keys

    mask = load_mask("wheel_mask.png")                  # (H, W) float32 in [0, 1]
    # keys: (N, d, h, w) recorded at the layer for N photos; masks preprocessed to the model's input size
    grid = torch.stack([mask_to_grid(m, keys.shape[-2:]) for m in masks])   # (N, h, w) area weights
    k_star = concept_key(keys, grid)                    # (d,) weighted mean key
    sel, w = masked_keys(keys, grid)                    # (n, d) keys under the masks and their weights
    ctx = context(sel, rank=3, weights=w)               # (d, 3) top directions of those keys

Masks can also come from COCO annotations (polygons or RLE, rasterised with PIL only)::

    index = coco_index("car-parts/trainingset/annotations.json")
    for name in index.images("wheel"):
        m = index.mask(name, "wheel")                   # (H, W) float32, soft at polygon edges

Where a concept fires is shown with :func:`key_match` (the per-location activation of a rank-one edit) and
:func:`overlay` / :func:`save_overlay`, which colour a heatmap with a built-in colormap, so that no
matplotlib is needed.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_bytes
from ..errors import EditError, ImageLoadError, MaskError, StatsError

__all__ = [
    "MaskSource",
    "load_mask",
    "CocoIndex",
    "coco_index",
    "coco_masks",
    "encode_rle",
    "decode_rle",
    "mask_to_grid",
    "masked_keys",
    "concept_key",
    "context",
    "Concept",
    "key_match",
    "colormap",
    "colorize",
    "overlay",
    "save_overlay",
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


def load_mask(source: MaskSource, *, allow_empty: bool = False) -> np.ndarray:
    """Load a concept mask as an (H, W) float32 array in [0, 1] (1 = concept).

    Accepted sources and how they are read:

    * a path or a PIL image: white / non-zero pixels are the concept. Mode L is divided by 255; RGB is
      reduced to luminance (ITU-R 601); RGBA (and LA) use the **alpha** channel when the colour is the
      same in every pixel (a stroke painted on a transparent layer), otherwise the luminance; palette
      images are converted to RGB(A) first; 16-bit images are divided by 65535.
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


def _check_keys_masks(keys: torch.Tensor, masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(keys, torch.Tensor):
        raise MaskError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    m = masks if isinstance(masks, torch.Tensor) else torch.as_tensor(np.asarray(masks))
    if keys.ndim == 3:  # a single image's keys (d, h, w)
        keys = keys[None]
        if m.ndim == 2:
            m = m[None]
    if keys.ndim != 4:
        raise MaskError(f"keys must be (N, d, h, w) or (d, h, w), got shape {tuple(keys.shape)}")
    if m.ndim == 2 and keys.shape[0] == 1:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise MaskError(f"masks must be (N, h, w) grid weights, got shape {tuple(m.shape)}")
    if m.shape[0] != keys.shape[0]:
        raise MaskError(f"{m.shape[0]} masks for {keys.shape[0]} images (keys shape {tuple(keys.shape)})")
    if tuple(m.shape[-2:]) != tuple(keys.shape[-2:]):
        raise MaskError(
            f"masks are on a {tuple(m.shape[-2:])} grid but keys on {tuple(keys.shape[-2:])}; "
            "downsample the masks with mask_to_grid(mask, keys.shape[-2:])"
        )
    m = m.to(device=keys.device, dtype=torch.float64)
    if torch.isnan(m).any() or (m < 0).any():
        raise MaskError("mask weights must be non-negative numbers (found NaN or negative values)")
    return keys, m


def masked_keys(
    keys: torch.Tensor, masks: torch.Tensor | np.ndarray, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys under the masks: ``(selected (n, d), weights (n,))`` where the grid weight > ``threshold``.

    ``keys`` is (N, d, h, w) (or (d, h, w) for one image), ``masks`` the (N, h, w) grid weights from
    :func:`mask_to_grid`. With the default threshold every location the mask touches is kept, and its
    weight (covered fraction) is returned so that :func:`context` can down-weight edge cells; use
    ``threshold=0.5`` to keep only mostly-covered cells. Keys keep their dtype; weights are float64.

    Example::

        >>> keys = torch.arange(8.).reshape(1, 2, 2, 2)
        >>> sel, w = masked_keys(keys, torch.tensor([[[1., 0.], [0., .5]]]))
        >>> sel.tolist(), w.tolist()
        ([[0.0, 4.0], [3.0, 7.0]], [1.0, 0.5])
    """
    keys, m = _check_keys_masks(keys, masks)
    flat_keys = keys.permute(0, 2, 3, 1).reshape(-1, keys.shape[1])
    flat_m = m.reshape(-1)
    sel = flat_m > threshold
    if not bool(sel.any()):
        raise MaskError(
            f"no key location has mask weight > {threshold} (max is {float(flat_m.max()):.3g}); "
            "lower the threshold, draw larger masks or choose an earlier layer"
        )
    return flat_keys[sel], flat_m[sel]


def concept_key(keys: torch.Tensor, masks: torch.Tensor | np.ndarray, *, chunk: int = 64) -> torch.Tensor:
    """The concept key ``k* = Σ_i Σ_p m_ip k_ip / Σ m`` (weighted mean of keys under the masks), float64 (d,).

    ``keys`` (N, d, h, w) or (d, h, w); ``masks`` (N, h, w) grid weights. Accumulates in float64, ``chunk``
    images at a time so that large float32 key stacks are not copied whole.

    Example::

        >>> keys = torch.tensor([[[[1., 3.]], [[0., 2.]]]])        # N=1, d=2, h=1, w=2
        >>> concept_key(keys, torch.tensor([[[1., 3.]]])).tolist()   # (1*[1,0] + 3*[3,2]) / 4
        [2.5, 1.5]
    """
    keys, m = _check_keys_masks(keys, masks)
    total = torch.zeros(keys.shape[1], dtype=torch.float64, device=keys.device)
    for start in range(0, keys.shape[0], max(int(chunk), 1)):
        k = keys[start : start + chunk].to(torch.float64)
        total += torch.einsum("ndhw,nhw->d", k, m[start : start + chunk])
    mass = float(m.sum())
    if mass <= 0:
        raise MaskError("all masks are empty on the key grid; nothing to average")
    return total / mass


def _sqrt_pair(C: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (C^{1/2}, C^{-1/2}) of ``C + ridge·tr(C)/d·I`` via one eigh, float64."""
    C = C.to(torch.float64)
    C = 0.5 * (C + C.T)
    d = C.shape[0]
    lam = ridge * float(torch.trace(C)) / d
    evals, evecs = torch.linalg.eigh(C + lam * torch.eye(d, dtype=C.dtype, device=C.device))
    if float(evals.min()) <= 0:
        raise StatsError(
            f"second moment C is not positive definite (min eigenvalue {float(evals.min()):.3g} after a ridge "
            f"of {lam:.3g}); collect more statistics or raise ridge"
        )
    root = evals.sqrt()
    return (evecs * root[None, :]) @ evecs.T, (evecs / root[None, :]) @ evecs.T


def _check_C(C: torch.Tensor, d: int) -> torch.Tensor:
    if not isinstance(C, torch.Tensor) or C.shape != (d, d):
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise StatsError(f"C must be a ({d}, {d}) tensor for {d}-dim keys, got {shape}")
    if not torch.isfinite(C).all():
        raise StatsError("C contains NaN or infinite values")
    return C


def context(
    keys_sel: torch.Tensor,
    rank: int,
    *,
    method: str = "svd",
    C: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ridge: float = 1e-6,
    space: str = "key",
) -> torch.Tensor:
    """Top-``rank`` directions of the selected keys, float64 (d, rank) with orthonormal columns.

    ``method="svd"``: the top right-singular vectors V of the uncentered key matrix K (n, d), i.e. the top
    eigenvectors of the keys' second moment KᵀK. A rank-r edit then updates along ``D = C⁻¹ V``
    (:func:`rulewriter.core.edit.update_direction`).

    ``method="zca"`` (the "ZCA context" of Bau et al.'s ``rewriting``, which whitens keys before the SVD):
    with ``Z = C^{-1/2}`` from ``eigh`` of ``C + ridge·tr(C)/d·I``, whiten the keys ``K_w = K Z`` and take
    the top right-singular vectors Q of K_w. The directions that fire most on the concept's keys *relative
    to all keys* are the update directions ``D = Z Q = C^{-1/2} Q``: a rank-one edit ``W + Λ dᵀ`` with
    ``d = C^{-1/2} q`` fires at key k by ``dᵀk = qᵀ(C^{-1/2}k)``, the whitened key's component along q.
    ``space`` says which of two equivalent forms is returned:

    * ``"key"`` (default): ``U = C^{1/2} Q``, a key-space basis such that ``C⁻¹ U = C^{-1/2} Q``. This is
      what :func:`rulewriter.core.edit.update_direction` expects (it applies C⁻¹), exactly like svd's V.
    * ``"update"``: ``C^{-1/2} Q`` itself, ``rewriting``'s row directions; use them as D directly and do
      **not** apply C⁻¹ again.

    Either is orthonormalised with QR (span and leading direction kept), as ``rewriting`` does; ``space``
    has no effect for ``"svd"``.

    ``weights`` (n,), e.g. from :func:`masked_keys`, scale each key's row by ``sqrt(w)`` so that the SVD
    diagonalises the weighted second moment Σ w k kᵀ. Each column's sign is chosen so that its dot with
    the (weighted) mean key is positive.

    Example::

        >>> ks = torch.randn(50, 8) + 2
        >>> V = context(ks, 3)
        >>> torch.allclose(V.T @ V, torch.eye(3, dtype=V.dtype), atol=1e-10)
        True
    """
    if not isinstance(keys_sel, torch.Tensor) or keys_sel.ndim != 2:
        shape = tuple(keys_sel.shape) if isinstance(keys_sel, torch.Tensor) else type(keys_sel).__name__
        raise MaskError(f"context needs selected keys of shape (n, d), got {shape}")
    n, d = keys_sel.shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= int(rank) <= d:
        raise EditError(f"rank must be an integer in 1..{d} (the key dimension), got {rank!r}")
    rank = int(rank)
    if n < rank:
        raise MaskError(
            f"only {n} masked key locations for a rank-{rank} context; draw larger masks, add images or lower rank"
        )
    if space not in ("key", "update"):
        raise EditError(f"unknown space {space!r}; use 'key' or 'update'")
    K = keys_sel.to(torch.float64)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64, device=K.device).reshape(-1)
        if w.shape[0] != n or (w < 0).any() or not torch.isfinite(w).all():
            raise MaskError(f"weights must be {n} non-negative finite numbers, got shape {tuple(w.shape)}")
        mean = (w[:, None] * K).sum(0) / w.sum().clamp_min(torch.finfo(torch.float64).tiny)
        K = K * w.sqrt()[:, None]
    else:
        mean = K.mean(0)
    if method == "svd":
        _, _, Vh = torch.linalg.svd(K, full_matrices=False)
        D = Vh[:rank].T
    elif method == "zca":
        if C is None:
            raise StatsError("method='zca' needs the layer's second moment C")
        root, Z = _sqrt_pair(_check_C(C, d).to(K.device), ridge)
        _, _, Vh = torch.linalg.svd(K @ Z, full_matrices=False)
        Q = Vh[:rank].T
        D, _ = torch.linalg.qr((Z if space == "update" else root) @ Q)
    else:
        raise EditError(f"unknown context method {method!r}; use 'svd' or 'zca'")
    signs = torch.sign(mean @ D)
    signs[signs == 0] = 1.0
    return (D * signs[None, :]).contiguous()


@dataclass
class Concept:
    """A concept at one layer: its key ``k*`` (d,) and optional context directions (d, r).

    ``view`` is the layer's memory view (the thesis's architecture 1-4, see :mod:`rulewriter.core.memory`);
    ``context_method`` records how ``context`` was computed ("svd" or "zca", see :func:`context`; both in
    key space, so that the update directions are ``C⁻¹ context``).

    Example::

        >>> c = Concept(key=torch.ones(4), context=None, layer="features.28", view=2, n_images=3)
        >>> Concept.from_dict(c.to_dict(), c.tensors()).layer
        'features.28'
    """

    key: torch.Tensor
    context: torch.Tensor | None
    layer: str
    view: int
    n_images: int
    context_method: str = "svd"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, torch.Tensor) or self.key.ndim != 1:
            raise EditError(f"Concept.key must be a 1-D tensor, got {getattr(self.key, 'shape', type(self.key))}")
        if self.context is not None:
            if not isinstance(self.context, torch.Tensor) or self.context.ndim != 2:
                raise EditError("Concept.context must be a (d, r) tensor or None")
            if self.context.shape[0] != self.key.shape[0]:
                raise EditError(
                    f"Concept.context is {tuple(self.context.shape)} but the key has d={self.key.shape[0]}"
                )

    @property
    def dim(self) -> int:
        """The key dimension d."""
        return int(self.key.shape[0])

    @property
    def rank(self) -> int:
        """Number of context directions (0 without a context)."""
        return 0 if self.context is None else int(self.context.shape[1])

    @classmethod
    def from_keys(
        cls,
        keys: torch.Tensor,
        masks: torch.Tensor | np.ndarray,
        *,
        layer: str,
        view: int,
        rank: int = 0,
        method: str = "svd",
        C: torch.Tensor | None = None,
        threshold: float = 0.0,
    ) -> "Concept":
        """Build a concept from keys (N, d, h, w) and grid masks (N, h, w): key and, if ``rank``, context.

        Example::

            >>> c = Concept.from_keys(torch.rand(2, 4, 3, 3), torch.ones(2, 3, 3), layer="l", view=2, rank=2)
            >>> c.context.shape
            torch.Size([4, 2])
        """
        key = concept_key(keys, masks)
        ctx = None
        if rank:
            sel, w = masked_keys(keys, masks, threshold)
            ctx = context(sel, rank, method=method, C=C, weights=w)
        n_images = 1 if keys.ndim == 3 else int(keys.shape[0])
        return cls(key=key, context=ctx, layer=layer, view=view, n_images=n_images, context_method=method)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able metadata (the tensors come from :meth:`tensors`)."""
        return {
            "layer": self.layer,
            "view": int(self.view),
            "n_images": int(self.n_images),
            "dim": self.dim,
            "rank": self.rank,
            "context_method": self.context_method,
            "meta": dict(self.meta),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``"key"`` and, if present, ``"context"``), contiguous and on the CPU."""
        out = {"key": self.key.detach().cpu().contiguous()}
        if self.context is not None:
            out["context"] = self.context.detach().cpu().contiguous()
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> "Concept":
        """Rebuild from :meth:`to_dict` metadata and :meth:`tensors`."""
        try:
            return cls(
                key=tensors["key"],
                context=tensors.get("context"),
                layer=str(meta["layer"]),
                view=int(meta["view"]),
                n_images=int(meta["n_images"]),
                context_method=str(meta.get("context_method", "svd")),
                meta=dict(meta.get("meta", {})),
            )
        except KeyError as exc:
            raise EditError(f"concept metadata/tensors lack {exc.args[0]!r}") from exc

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors + JSON metadata), atomically.

        Example::

            >>> c.save("wheel.concept.safetensors")                 # doctest: +SKIP
        """
        from safetensors.torch import save as st_save

        blob = st_save(self.tensors(), metadata={"rulewriter.concept": json.dumps(self.to_dict())})
        return atomic_bytes(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> "Concept":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["rulewriter.concept"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise EditError(f"cannot read concept file {str(path)!r}: {exc}") from exc
        return cls.from_dict(meta, tensors)


# --------------------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------------------


def key_match(keys: torch.Tensor, key: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    """How strongly each grid location matches the concept key: (h, w), or (N, h, w) for (N, d, h, w) keys.

    Without ``C`` this is the plain dot product ``k_loc · k*``. With the layer's second moment ``C`` it is
    ``k_loc · C^{-1} k*``, computed with a linear solve: exactly how strongly the rank-one edit
    ``W + Λ (C^{-1} k*)ᵀ`` fires at that location (the edit adds ``Λ · (C^{-1}k*)ᵀ k_loc`` there), i.e. the
    edit's per-location "activation". Returned in float32 (float64 for float64 keys).

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
    if C is not None:
        C64 = _check_C(C, d).to(device=keys.device, dtype=torch.float64)
        try:
            q = torch.linalg.solve(C64, q)
        except RuntimeError as exc:  # torch raises a LinAlgError (a RuntimeError) for singular C
            raise StatsError(f"C is singular; cannot compute C^-1 k*: {exc}") from exc
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
