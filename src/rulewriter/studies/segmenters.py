"""Segmenters: concept masks from many sources behind one interface, ``seg(image, source=path) -> (H, W) mask``.

Finding a spurious correlation (thesis Section 2.3) needs the region of a concept in many photos: the bus
to stylize, the ground around it to cover in snow. Where the masks come from differs, so every source is a
:class:`Segmenter`: a callable with a ``name`` that returns an (H, W) float32 mask in [0, 1] at the image's
own size, all zeros when the concept is absent.

* :class:`CocoSegmenter`: COCO polygons / RLE, the image looked up by file name.
* :class:`MaskFolderSegmenter`: mask files a user drew, one per image.
* :class:`ContextSegmenter`: where the classifier's own layer context-matches a saved concept.
* :class:`DeepLabSegmenter` (TFLite, Pascal VOC) and :class:`TorchvisionSegmenter`: segmentation networks.
* regions and combinators: :class:`Everything`, :class:`LowerBand`, :class:`Below`, :func:`complement`,
  :class:`Union`, :class:`Intersection`, :class:`Minus` (also ``seg_a | seg_b``, ``&``, ``-``).

Segmenters are usually made from a spec string with :func:`rulewriter.studies.segment.load_segmenter`;
building them directly works too::

    from rulewriter.studies.segmenters import Below, DeepLabSegmenter

    bus = DeepLabSegmenter("bus")
    ground = Below(bus) - bus                                # the ground under and around a bus
    mask = ground(img, source="photos/bus.jpg")              # (H, W) float32 in [0, 1]
"""
from __future__ import annotations

import abc
import contextlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import EditError, ImageLoadError, MaskError, ModelError, RulewriterError, StatsError

__all__ = [
    "MissingMaskError",
    "VOC_CLASSES",
    "Below",
    "CocoSegmenter",
    "ContextSegmenter",
    "DeepLabSegmenter",
    "Everything",
    "Intersection",
    "LowerBand",
    "MaskFolderSegmenter",
    "Minus",
    "Segmenter",
    "SpecError",
    "TorchvisionSegmenter",
    "Union",
    "complement",
    "default_deeplab_model",
]

#: The 21 Pascal VOC segmentation classes in the order the DeepLab and torchvision VOC models predict them.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Everyday names of VOC classes (after normalisation: lower case, no spaces, underscores or hyphens).
_ALIASES = {"airplane": "aeroplane", "plane": "aeroplane", "motorcycle": "motorbike", "tv": "tvmonitor",
            "monitor": "tvmonitor", "couch": "sofa", "table": "diningtable", "plant": "pottedplant"}

DEEPLAB_MODEL = "deeplabv3_mnv2_pascal_quant.tflite"
DEEPLAB_LABELS = "pascal_voc_segmentation_labels.txt"
_DEEPLAB_SIZE = 513
# DeepLab was trained on images padded with the mean pixel (127.5), which the model's uint8 input
# (scale 1/128, zero point 128) encodes as 128: padding with it adds no signal.
_DEEPLAB_PAD = 128

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
class SpecError(RulewriterError, ValueError):
    """A segmenter spec string cannot be parsed; the message lists the spec forms."""


class MissingMaskError(MaskError):
    """A mask folder has no file for an image. A probe over a data set reads this as "concept absent"
    (people mask only the images that show it); a single edit treats it as the error it is."""


# ------------------------------------------------------------------------------------------ base class
def _resize_mask(arr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """A float mask resized to ``(W, H)`` by area averaging (exact fractions when shrinking), float32."""
    if arr.shape == (size_wh[1], size_wh[0]):
        return arr.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size_wh, Image.Resampling.BOX), dtype=np.float32)


class Segmenter(abc.ABC):
    """A source of concept masks: ``seg(image, source=path) -> (H, W) float32 in [0, 1]``.

    Subclasses implement :meth:`_segment`; :meth:`__call__` checks the input and guarantees the output
    contract (float32, the image's ``(H, W)``, values in [0, 1], zeros when the concept is absent).
    ``name`` describes the segmenter (the spec it came from) for reports.

    Example::

        >>> seg = LowerBand(0.5)
        >>> seg(Image.new("RGB", (4, 4))).sum(axis=1).tolist()
        [0.0, 0.0, 4.0, 4.0]
    """

    name: str = "segmenter"

    def __call__(self, image: Image.Image, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise ImageLoadError(f"{self.name}: expected a PIL image, got {type(image).__name__}")
        w, h = image.size
        if w < 1 or h < 1:
            raise ImageLoadError(f"{self.name}: the image is empty ({w}x{h})")
        out = np.asarray(self._segment(image, None if source is None else Path(source)), dtype=np.float32)
        if out.shape != (h, w):
            raise MaskError(f"{self.name} returned a {out.shape} mask for a {h}x{w} (HxW) image")
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(out, 0.0, 1.0)

    @abc.abstractmethod
    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        """The mask of ``image`` (its size, values in [0, 1]); ``source`` is its file or None."""

    def __or__(self, other: "Segmenter") -> "Segmenter":
        return Union(self, other)

    def __and__(self, other: "Segmenter") -> "Segmenter":
        return Intersection(self, other)

    def __sub__(self, other: "Segmenter") -> "Segmenter":
        return Minus(self, other)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _operand(seg: Segmenter) -> str:
    return f"({seg.name})" if isinstance(seg, _Binary) else seg.name


class _Binary(Segmenter):
    symbol = "?"

    def __init__(self, a: Segmenter, b: Segmenter) -> None:
        for s in (a, b):
            if not isinstance(s, Segmenter):
                raise SpecError(f"can only combine segmenters, got {type(s).__name__}")
        self.a, self.b = a, b
        left = a.name if isinstance(a, _Binary) else _operand(a)  # left-associative: no parentheses needed
        self.name = f"{left} {self.symbol} {_operand(b)}"

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        return self._combine(self.a(image, source), self.b(image, source))

    @abc.abstractmethod
    def _combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


class Union(_Binary):
    """Pixels in either mask (the maximum). ``Union(a, b)`` is ``a | b``."""

    symbol = "|"

    def _combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.maximum(a, b)


class Intersection(_Binary):
    """Pixels in both masks (the minimum). ``Intersection(a, b)`` is ``a & b``."""

    symbol = "&"

    def _combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.minimum(a, b)


class Minus(_Binary):
    """Pixels in the first mask and not in the second: ``min(a, 1 - b)``. ``Minus(a, b)`` is ``a - b``.

    Example::

        >>> (LowerBand(0.5) - LowerBand(0.25))(Image.new("RGB", (1, 4)))[:, 0].tolist()
        [0.0, 0.0, 1.0, 0.0]
    """

    symbol = "-"

    def _combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.minimum(a, 1.0 - b)


class Everything(Segmenter):
    """The whole image (spec ``all``); ``Everything() - seg`` is the complement of ``seg``."""

    name = "all"

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        return np.ones((image.size[1], image.size[0]), dtype=np.float32)


def complement(seg: Segmenter) -> Segmenter:
    """Every pixel not in ``seg``'s mask: ``all - seg``.

    Example::

        >>> complement(LowerBand(0.5))(Image.new("RGB", (1, 2)))[:, 0].tolist()
        [1.0, 0.0]
    """
    return Minus(Everything(), seg)


class LowerBand(Segmenter):
    """The bottom ``fraction`` of the image's rows (spec ``lower:F``); partial rows get partial weight."""

    def __init__(self, fraction: float) -> None:
        f = float(fraction)
        if not 0.0 < f <= 1.0:
            raise SpecError(f"lower: the fraction must be in (0, 1], got {fraction!r}")
        self.fraction = f
        self.name = f"lower:{fraction}"

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        w, h = image.size
        top = h * (1.0 - self.fraction)
        rows = np.clip(np.arange(1, h + 1, dtype=np.float64) - top, 0.0, 1.0)  # covered part of each row
        return np.repeat(rows[:, None], w, axis=1).astype(np.float32)


class Below(Segmenter):
    """Every row from the centroid of another segmenter's mask down to the image's bottom (spec ``below:SPEC``).

    For an object standing on the ground, the ground it stands on shows below the object's centre in the
    image; ``below:X - X`` is then the ground under and around X. No mask gives no band.

    Example::

        >>> Below(LowerBand(0.5))(Image.new("RGB", (1, 4)))[:, 0].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """

    def __init__(self, inner: Segmenter) -> None:
        self.inner = inner
        self.name = f"below:{_operand(inner)}"

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        m = self.inner(image, source)
        mass = float(m.sum())
        out = np.zeros_like(m)
        if mass > 0:
            centroid = float((m.sum(axis=1) * np.arange(m.shape[0])).sum()) / mass
            out[int(np.floor(centroid)):, :] = 1.0
        return out


# ------------------------------------------------------------------------------------------ COCO
class CocoSegmenter(Segmenter):
    """Masks from COCO polygon / RLE annotations (spec ``coco:ANNOTATIONS.json:CATEGORY``).

    The image is looked up by the file name of ``source`` (see :class:`rulewriter.concepts.masks.CocoIndex`); an
    image the annotations do not list is a MaskError naming it, one without the category gives zeros. When
    the image was resized (same aspect ratio) the mask follows it.

    Example::

        >>> seg = CocoSegmenter("car-parts/testset/annotations.json", "wheel")      # doctest: +SKIP
        >>> seg(load_image(p), source=p).shape                                     # doctest: +SKIP
        (861, 1024)
    """

    def __init__(self, annotations: str | os.PathLike[str] | Any, category: str | int, *, name: str | None = None) -> None:
        from ..concepts.masks import CocoIndex, coco_index

        self.index = annotations if isinstance(annotations, CocoIndex) else coco_index(annotations)
        self.category = self.index.category_id(category)  # unknown category: MaskError listing them, now
        self.name = name or f"coco:{self.index.source}:{category}"

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        from ..models.preprocess import mask_for_image

        if source is None:
            raise MaskError(f"{self.name}: COCO masks are looked up by file name; pass source=<the image's path>")
        m = self.index.mask(str(source), self.category, allow_empty=True)  # full name first, then basename
        return mask_for_image(m, image.size)


# ------------------------------------------------------------------------------------------ mask files
class MaskFolderSegmenter(Segmenter):
    """Masks a user drew, one file per image (spec ``masks:DIR``).

    For image ``x/foo.jpg`` the mask is ``DIR/foo.png``, else ``DIR/foo.mask.png`` (what ``rulewriter
    segment`` writes), else ``DIR/foo`` with another image extension.
    Files are read like :func:`rulewriter.concepts.masks.load_mask` (white = concept), except that an all-black
    file means the concept is absent (zeros). A mask may have another resolution than its image but not
    another aspect ratio (:func:`rulewriter.models.preprocess.mask_for_image`).

    Example::

        >>> seg = MaskFolderSegmenter("masks/")                        # doctest: +SKIP
        >>> seg(load_image("photos/foo.jpg"), source="photos/foo.jpg")  # reads masks/foo.png  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise MaskError(f"mask folder {str(self.folder)!r} does not exist")
        self.name = name or f"masks:{folder}"

    def mask_path(self, source: str | os.PathLike[str]) -> Path:
        """The mask file of an image path; MaskError naming the files tried when there is none."""
        stem = Path(source).stem
        # <stem>.mask.png is what `rulewriter segment` writes, so its output folder is a mask folder.
        tried = [self.folder / f"{stem}.png", self.folder / f"{stem}.mask.png"]
        tried += [self.folder / f"{stem}{ext}" for ext in _IMAGE_EXTS[1:]]
        for p in tried:
            if p.is_file():
                return p
        raise MissingMaskError(f"no mask for {Path(source).name} in {self.folder}: expected {tried[0].name} or "
                               f"{tried[1].name} (or {stem} with one of {', '.join(_IMAGE_EXTS[1:])})")

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        from ..concepts.masks import load_mask
        from ..models.preprocess import mask_for_image

        if source is None:
            raise MaskError(f"{self.name}: mask files are found by the image's file name; pass source=<path>")
        path = self.mask_path(source)
        m = load_mask(path, allow_empty=True)  # a black mask file says "absent" here
        try:
            return mask_for_image(m, image.size)
        except MaskError as exc:
            raise MaskError(f"{path.name} does not fit {source.name}: {exc}") from exc


# ------------------------------------------------------------------------------------------ context match
def _as_moment(stats: Any, layer: str) -> torch.Tensor | None:
    """The second moment C from a statistics file, a SecondMoment, or a tensor (None stays None)."""
    from ..core.stats import SecondMoment

    if stats is None:
        return None
    if isinstance(stats, torch.Tensor):
        return stats
    if isinstance(stats, SecondMoment):
        return stats.moment()
    s = SecondMoment.load(stats)
    meta = s.meta
    if meta.get("layer") not in (None, layer):
        raise StatsError(f"{stats} holds statistics of layer {meta.get('layer')!r}, the concept is at {layer!r}")
    return s.moment()


def _calibration_images(calibration: Any) -> list[Any]:
    from ..models.data import list_images

    if isinstance(calibration, (str, os.PathLike)):
        return list(list_images(calibration))
    images = list(calibration)
    if not images:
        raise ImageLoadError("the calibration list is empty")
    return images


class ContextSegmenter(Segmenter):
    """Where a classifier's layer context-matches a concept (spec ``context:CONCEPT.safetensors``).

    The heat at a key location ``k`` is ``k·(C+εI)⁻¹k*`` (:func:`rulewriter.studies.testsets.concept_matcher`): how
    strongly a rank-one edit of the concept would fire there. Locations above :attr:`threshold` form the
    mask, mapped back to the image through the preprocessing (:func:`rulewriter.studies.testsets.heat_to_mask`).
    The threshold is an explicit ``threshold``; or, with ``calibration`` images, the ``quantile`` (default
    0.99) of the heat of all their locations; or else half the concept key's own match ``½·k*·(C+εI)⁻¹k*``.
    :attr:`threshold_rule` says which.

    Args:
        concept: a :class:`~rulewriter.concepts.keys.Concept` or its safetensors file.
        classifier: a :class:`~rulewriter.models.registry.Classifier` or a model name; default the model named in
            the concept's metadata (``meta["model"]``), else efficientnet-lite0.
        stats: the layer's second moment: a statistics file, a SecondMoment or a (d, d) tensor; without it
            the heat is the plain dot product ``k·k*``.

    Example::

        >>> seg = ContextSegmenter("wheel.safetensors", clf, stats="C.safetensors", calibration="photos/")  # doctest: +SKIP
        >>> seg.threshold_rule                                                                             # doctest: +SKIP
        'quantile 0.99 of the heat over 200 calibration images'
    """

    def __init__(
        self,
        concept: Any,
        classifier: Any = None,
        *,
        stats: Any = None,
        threshold: float | None = None,
        quantile: float | None = None,
        calibration: Any = None,
        ridge: float | None = None,
        weights: str | None = None,
        batch_size: int = 32,
        name: str | None = None,
    ) -> None:
        from ..concepts.keys import Concept
        from ..core.edit import DEFAULT_RIDGE, update_direction
        from .testsets import concept_heatmaps, concept_matcher, match_threshold
        from ..models.registry import Classifier, load_classifier

        self.concept = concept if isinstance(concept, Concept) else Concept.load(concept)
        wanted = self.concept.meta.get("model")
        if classifier is None:
            classifier = wanted or "efficientnet-lite0"
        if isinstance(classifier, str):
            classifier = load_classifier(classifier, weights=weights)
        elif weights is not None:
            raise SpecError("weights= only applies when the classifier is given by name")
        if not isinstance(classifier, Classifier):
            raise ModelError(f"classifier must be a Classifier or a model name, got {type(classifier).__name__}")
        if wanted and wanted != classifier.name:
            raise EditError(f"the concept was made on {wanted!r}, but the classifier is {classifier.name!r}")
        if threshold is not None and calibration is not None:
            raise SpecError("give either threshold= or calibration= images (with quantile=), not both")
        if quantile is not None and calibration is None:
            raise SpecError("quantile= needs calibration= images to take the quantile over")
        self.classifier = classifier
        self.layer, self.view = self.concept.layer, self.concept.view
        C = _as_moment(stats, self.layer)
        ridge = DEFAULT_RIDGE if ridge is None else float(ridge)
        self._match = concept_matcher(classifier, self.layer, self.concept.key, C=C, ridge=ridge, view=self.view)
        self._lock = threading.Lock()  # the trace hooks the shared model; one image at a time
        if threshold is not None:
            self.threshold = float(threshold)
            self.threshold_rule = "explicit"
        elif calibration is not None:
            q = 0.99 if quantile is None else float(quantile)
            images = _calibration_images(calibration)
            heat = concept_heatmaps(classifier, self.layer, self.concept.key, images, C=C, ridge=ridge,
                                    view=self.view, batch_size=batch_size, progress=False)
            self.threshold = match_threshold(heat, q)
            self.threshold_rule = f"quantile {q} of the heat over {len(images)} calibration images"
        else:
            k = self.concept.key.double()
            direction = k if C is None else update_direction(C, k, ridge).cpu()
            self.threshold = 0.5 * float(k @ direction)
            self.threshold_rule = "half the concept key's own match"
        if not np.isfinite(self.threshold):
            raise StatsError(f"the match threshold is not finite ({self.threshold}); check the statistics")
        self.name = name or (f"context:{self.layer}" if isinstance(concept, Concept) else f"context:{concept}")

    @torch.no_grad()
    def heat(self, image: Image.Image) -> torch.Tensor:
        """The context-match heat of one image on the layer's key grid, (h, w) float32.

        Example::

            >>> seg.heat(img).shape                                   # doctest: +SKIP
            torch.Size([7, 7])
        """
        from ..core.rules import layer_io

        clf = self.classifier
        x = clf.preprocess.batch([image.convert("RGB")]).to(clf.device, clf.dtype)
        with self._lock:
            inp, out = layer_io(clf, self.layer, x)
        return self._match(inp, out)[0]

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        from .testsets import heat_to_mask

        return heat_to_mask(self.classifier.preprocess, self.heat(image), image.size, self.threshold)


# ------------------------------------------------------------------------------------------ class names
def _norm(name: str) -> str:
    key = re.sub(r"[\s_\-]+", "", str(name)).casefold()
    return _ALIASES.get(key, key)


def _class_ids(classes: str | Sequence[str | int], labels: Sequence[str], what: str) -> list[int]:
    """Indices of class names (or ids) in ``labels``; SpecError listing the names on a miss."""
    items = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    if not items or any(c == "" for c in items):
        raise SpecError(f"{what}: give one or more class names separated by commas; known: {', '.join(labels)}")
    table = {_norm(lab): i for i, lab in enumerate(labels)}
    out = []
    for c in items:
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
            i = int(c)
            if not 0 <= i < len(labels):
                raise SpecError(f"{what}: class id {i} is out of range 0..{len(labels) - 1}")
        else:
            i = table.get(_norm(c), -1)
            if i < 0:
                raise SpecError(f"{what}: unknown class {c!r}; known: {', '.join(labels)}")
        if i not in out:
            out.append(i)
    return out


def _shared_models_dirs() -> list[Path]:
    env = os.environ.get("RULEWRITER_SHARED")
    dirs = [Path(env).expanduser() / "models"] if env else []
    return dirs + [Path.cwd().parent / "shared" / "models"]


def default_deeplab_model() -> Path:
    """The DeepLab TFLite file: in ``$RULEWRITER_SHARED/models``, else ``../shared/models`` from the cwd.

    Raises ModelError naming the places looked in.

    Example::

        >>> default_deeplab_model().name                           # doctest: +SKIP
        'deeplabv3_mnv2_pascal_quant.tflite'
    """
    tried = [d / DEEPLAB_MODEL for d in _shared_models_dirs()]
    for p in tried:
        if p.is_file():
            return p
    raise ModelError(f"no DeepLab model: looked for {' and '.join(str(p) for p in tried)}; "
                     "set RULEWRITER_SHARED or give deeplab:CLASS@/path/to/model.tflite")


def _read_labels(path: Path) -> list[str]:
    """Class names from a labels file: one a line, up to the first blank line (notes may follow)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        if not line.strip():
            break
        out.append(line.strip())
    return out


# ------------------------------------------------------------------------------------------ DeepLab TFLite
@contextlib.contextmanager
def native_info_silenced():
    """Drop the ``INFO:`` lines that native code (the TFLite runtime) writes straight to file descriptor 2
    inside the block; any other line it writes there is passed on to stderr."""
    import sys
    import tempfile

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines() if not ln.startswith("INFO:")]
            if rest:
                print("\n".join(rest), file=sys.stderr)


class DeepLabSegmenter(Segmenter):
    """DeepLabV3-MobileNetV2 (Pascal VOC, TFLite) masks of one or more classes (spec ``deeplab:bus,car``).

    The image is resized (keeping its aspect ratio) so that its long side is 513 and padded with the mean
    pixel; the class map of the image's part is area-averaged back to the image's size, so mask edges are
    the fraction of each pixel the classes cover. Needs ``pip install 'rulewriter[segment]'``
    (``ai-edge-litert``). The interpreter is made once per segmenter and used under a lock (it is not
    thread-safe).

    Args:
        classes: names (``"bus,car"`` or a list; everyday aliases such as ``motorcycle`` work) or ids.
        model: the ``.tflite`` file; default :func:`default_deeplab_model`.
        labels: class names of the model (a list or a file); default the labels file beside the model
            when there is one, else :data:`VOC_CLASSES`.
        num_threads: interpreter threads (None: the runtime's default).

    Example::

        >>> seg = DeepLabSegmenter("bus")                                   # doctest: +SKIP
        >>> float(seg(load_image("school_bus.jpg")).mean()) > 0.2           # doctest: +SKIP
        True
    """

    def __init__(self, classes: str | Sequence[str | int], model: str | os.PathLike[str] | None = None, *,
                 labels: Sequence[str] | str | os.PathLike[str] | None = None, num_threads: int | None = None,
                 name: str | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError("deeplab: segmenters need the TFLite runtime: pip install 'rulewriter[segment]' "
                             "(the ai-edge-litert package)") from exc
        self.model_path = default_deeplab_model() if model is None else Path(model).expanduser()
        if not self.model_path.is_file():
            raise ModelError(f"DeepLab model file not found: {self.model_path}")
        if labels is None:
            beside = self.model_path.parent / DEEPLAB_LABELS
            labels = _read_labels(beside) if beside.is_file() else list(VOC_CLASSES)
        elif isinstance(labels, (str, os.PathLike)):
            labels = _read_labels(Path(labels))
        self.labels = list(labels)
        self.class_ids = _class_ids(classes, self.labels, "deeplab")
        self.classes = [self.labels[i] for i in self.class_ids]
        try:
            with native_info_silenced():  # the runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate"
                self._interpreter = Interpreter(model_path=str(self.model_path), num_threads=num_threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load the TFLite model {self.model_path}: {exc}") from exc
        inp = self._interpreter.get_input_details()[0]
        self._input = int(inp["index"])
        self._output = int(self._interpreter.get_output_details()[0]["index"])
        shape = tuple(int(v) for v in inp["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or inp["dtype"] != np.uint8:
            raise ModelError(f"{self.model_path} takes {shape} {inp['dtype']}; expected [1, H, W, 3] uint8 "
                             "(a quantised DeepLab with an ArgMax output)")
        self.input_size = (shape[2], shape[1])  # (W, H)
        self._lock = threading.Lock()
        default = model is None
        self.name = name or f"deeplab:{','.join(self.classes)}" + ("" if default else f"@{model}")

    def class_map(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """The model's class ids on its input (H_in, W_in) and the ``(w, h)`` of the image inside it.

        Example::

            >>> ids, (w, h) = seg.class_map(img)                 # doctest: +SKIP
            >>> ids[:h, :w]                                       # the image's part
        """
        w, h = image.size
        tw, th = self.input_size
        s = min(tw / w, th / h)
        nw, nh = min(tw, max(1, round(w * s))), min(th, max(1, round(h * s)))
        canvas = np.full((th, tw, 3), _DEEPLAB_PAD, dtype=np.uint8)
        canvas[:nh, :nw] = np.asarray(image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR))
        with self._lock:
            self._interpreter.set_tensor(self._input, canvas[None])
            self._interpreter.invoke()
            ids = np.array(self._interpreter.get_tensor(self._output))
        return ids.reshape(th, tw), (nw, nh)

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        ids, (nw, nh) = self.class_map(image)
        member = np.isin(ids[:nh, :nw], self.class_ids).astype(np.float32)
        return _resize_mask(member, image.size)


# ------------------------------------------------------------------------------------------ torchvision
class TorchvisionSegmenter(Segmenter):
    """A torchvision semantic segmentation model's masks of some classes (spec ``torchvision:MODEL:CLASS``).

    Weights as for classifiers in :mod:`rulewriter.models.registry`, never downloaded: ``None`` searches the torch
    hub cache for the model's published weights; a file path (``.pth`` state dict or ``.safetensors``); a
    weights name such as ``"COCO_WITH_VOC_LABELS_V1"`` (from the cache); ``"none"`` for a random init.
    Preprocessing follows the weights' transform (short side resized to 520, ImageNet normalisation);
    ``size`` overrides the short side (smaller is faster and uses less memory).

    Example::

        >>> seg = TorchvisionSegmenter("lraspp_mobilenet_v3_large", "bus", weights="none", size=64)
        >>> seg(Image.new("RGB", (40, 30))).shape
        (30, 40)
    """

    def __init__(self, model: str, classes: str | Sequence[str | int], *, weights: str | os.PathLike[str] | None = None,
                 size: int | None = None, device: str | torch.device = "cpu", name: str | None = None) -> None:
        from ..models.registry import hub_checkpoint, is_random_weights, load_state_into, read_state_dict, torchvision_module

        tv = torchvision_module()
        names = sorted(tv.models.list_models(module=tv.models.segmentation))
        key = model.strip().lower().replace("-", "_")
        if key not in names:
            raise SpecError(f"torchvision: unknown segmentation model {model!r}; available: {', '.join(names)}")
        enum = tv.models.get_model_weights(key)
        members = list(enum)
        default = enum.DEFAULT
        cats = default.meta.get("categories")
        self.labels = list(cats) if cats else list(VOC_CLASSES)
        self.class_ids = _class_ids(classes, self.labels, f"torchvision:{key}")
        self.classes = [_norm(self.labels[i]) for i in self.class_ids]

        def build(aux: bool) -> torch.nn.Module:
            # weights_backbone=None: the builders would otherwise fetch ImageNet backbone weights.
            kw: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": len(self.labels)}
            if aux:
                kw["aux_loss"] = True
            return tv.models.get_model(key, **kw).float()

        member = default
        if is_random_weights(weights):
            net = build(False)
        else:
            chosen = None
            if isinstance(weights, str) and weights.split(".")[-1] in enum.__members__ \
                    and not Path(weights).expanduser().is_file():
                chosen = enum[weights.split(".")[-1]]
            if weights is not None and chosen is None:
                path = Path(weights).expanduser()
            else:
                candidates = [chosen] if chosen is not None else [default] + [m for m in members if m is not default]
                found = [(m, hub_checkpoint(m.url)) for m in candidates]
                hit = next(((m, p) for m, p in found if p.is_file()), None)
                if hit is None:
                    looked = ", ".join(str(p) for _, p in found)
                    raise ModelError(
                        f"no weights for {key}: not in the torch hub cache (looked for {looked}). Download "
                        f"{candidates[0].url} there, or give torchvision:{key}:CLASS@/path/weights.pth, "
                        "or @none for a random init")
                member, path = hit
            sd = read_state_dict(path)
            net = build(any(k.startswith("aux_classifier.") for k in sd))
            load_state_into(net, sd, str(path))
        self.model = net.eval().to(device)
        t = member.transforms()
        resize = getattr(t, "resize_size", None) or [520]
        self.size = int(size) if size is not None else int(resize[0] if isinstance(resize, (list, tuple)) else resize)
        if self.size < 1:
            raise SpecError(f"size must be positive, got {size}")
        self.mean = tuple(float(v) for v in getattr(t, "mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in getattr(t, "std", (0.229, 0.224, 0.225)))
        w_tag = "" if weights is None else f"@{weights}"
        self.name = name or f"torchvision:{key}:{','.join(self.classes)}{w_tag}"

    @torch.no_grad()
    def logits(self, image: Image.Image) -> torch.Tensor:
        """Class scores (K, h, w) at the resized input (short side :attr:`size`), on the CPU.

        Example::

            >>> seg.logits(img).shape[0]                          # doctest: +SKIP
            21
        """
        w, h = image.size
        s = self.size / min(w, h)
        nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
        arr = np.asarray(image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        x = (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(self.mean)[:, None, None]) \
            / torch.tensor(self.std)[:, None, None]
        p = next(self.model.parameters())
        out = self.model(x[None].to(p.device, p.dtype))["out"]
        return out[0].float().cpu()

    def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
        ids = self.logits(image).argmax(0).numpy()
        member = np.isin(ids, self.class_ids).astype(np.float32)
        return _resize_mask(member, image.size)
