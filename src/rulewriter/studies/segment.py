"""The segmenter spec language: one string names a mask source, ``load_segmenter(spec) -> Segmenter``.

Every mask source is a :class:`~rulewriter.studies.segmenters.Segmenter` (see
:mod:`rulewriter.studies.segmenters`): a callable with a ``name`` that returns an (H, W) float32 mask in
[0, 1] at the image's own size, all zeros when the concept is absent. A segmenter is made from a spec
string, which is also its name in reports::

    from rulewriter.studies.segment import load_segmenter

    seg = load_segmenter("deeplab:bus,car")                  # DeepLabV3-MobileNetV2 (TFLite), Pascal VOC classes
    mask = seg(img, source="photos/bus.jpg")                 # (H, W) float32 in [0, 1]
    seg.name                                                 # 'deeplab:bus,car', recorded in reports

    load_segmenter("coco:car-parts/testset/annotations.json:wheel")   # COCO polygons / RLE, by file name
    load_segmenter("masks:my-masks/")                                 # my-masks/<image stem>.png
    load_segmenter("context:wheel.concept.safetensors?stats=C.safetensors&calibration=photos/")
    load_segmenter("torchvision:deeplabv3_mobilenet_v3_large:bus@weights.pth")
    load_segmenter("below:deeplab:bus - deeplab:bus")        # the ground under and around a bus

Spec forms (:data:`SPEC_FORMS` lists them; a bad spec raises
:class:`~rulewriter.studies.segmenters.SpecError` that repeats the list):

* ``coco:ANNOTATIONS.json:CATEGORY``: the union of the category's polygons / RLE masks; the image is looked
  up by the file name of ``source`` (not in the annotations: MaskError; no instance there: zeros).
* ``masks:DIR``: ``DIR/<stem of source>.png`` (or ``<stem>.mask.png``, as ``rulewriter segment`` writes,
  or the stem with another image extension); black means
  absent. A missing file or a mask of another aspect ratio than its image is a MaskError.
* ``context:CONCEPT.safetensors[?OPTIONS]``: where the classifier's layer context-matches a saved
  :class:`~rulewriter.concepts.keys.Concept`: the heat ``k·(C+εI)⁻¹k*`` (:func:`rulewriter.studies.testsets.concept_matcher`)
  thresholded and mapped back to the image (:func:`rulewriter.studies.testsets.heat_to_mask`; the network sees the
  centre crop only, so the rest of the image is zero). OPTIONS (``&``-separated, or keyword arguments of
  :func:`load_segmenter`): ``model=NAME``, ``weights=FILE``, ``stats=FILE``, ``threshold=X``,
  ``quantile=Q``, ``calibration=DIR``. The threshold is, in order: an explicit ``threshold``; with
  ``calibration`` images, the ``quantile`` (default 0.99, the thesis's top 1%) of all locations' heat over
  them (:func:`rulewriter.studies.testsets.match_threshold`); otherwise half the concept key's match with itself,
  ``½·k*·(C+εI)⁻¹k*``: a location matches when it responds at least half as strongly as the concept's
  average key, the half-maximum rule, which needs no data.
* ``deeplab:CLASS[,CLASS...][@MODEL.tflite]``: DeepLabV3-MobileNetV2 on Pascal VOC (``pip install
  'rulewriter[segment]'``). The default model is ``deeplabv3_mnv2_pascal_quant.tflite`` in
  ``$RULEWRITER_SHARED/models`` or ``../shared/models`` (relative to the working directory).
* ``torchvision:MODEL:CLASS[,CLASS...][@WEIGHTS]``: a torchvision segmentation model
  (``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, ``fcn_resnet50``...). WEIGHTS is a local
  file, a weights name (``COCO_WITH_VOC_LABELS_V1``) or ``none`` (random init); without it the torch hub
  cache is searched. Nothing is downloaded.
* regions: ``all`` (every pixel), ``lower:F`` (the bottom fraction F of the image), ``below:SPEC`` (every
  row from the centroid of SPEC's mask down: where the ground lies for an object standing on it).
* ``A | B`` (union, max), ``A & B`` (intersection, min), ``A - B`` (difference, ``min(A, 1 - B)``), with
  spaces around the operator, evaluated left to right; parentheses group.

Segmenters combine in Python too: ``seg_a | seg_b``, ``seg_a & seg_b``, ``seg_a - seg_b``.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import Any

import torch

from .segmenters import (
    Below,
    CocoSegmenter,
    ContextSegmenter,
    DeepLabSegmenter,
    Everything,
    Intersection,
    LowerBand,
    MaskFolderSegmenter,
    Minus,
    Segmenter,
    SpecError,
    TorchvisionSegmenter,
    Union,
)

__all__ = ["SPEC_FORMS", "load_segmenter"]

SPEC_FORMS = """\
segmenter specs:
  coco:ANNOTATIONS.json:CATEGORY          COCO polygons/RLE of CATEGORY; image looked up by file name
  masks:DIR                               DIR/<image stem>.png (or .mask.png, .jpg...) per image; black = absent
  context:CONCEPT.safetensors[?OPTIONS]   context match of a saved concept at its layer; OPTIONS like
                                          model=NAME&stats=FILE&threshold=X or quantile=Q&calibration=DIR
  deeplab:CLASS[,CLASS...][@MODEL.tflite] DeepLabV3-MobileNetV2, Pascal VOC classes (bus, car, person, ...)
  torchvision:MODEL:CLASS[,CLASS...][@WEIGHTS|@none]
                                          torchvision segmentation model (deeplabv3_mobilenet_v3_large, ...)
  all | lower:FRACTION | below:SPEC       whole image / bottom band / rows from SPEC's centroid down
  A | B, A & B, A - B                     union, intersection, difference (spaces around the operator)"""

_OPERATOR = re.compile(r"\s+([|&-])\s+")


def _spec_error(msg: str) -> SpecError:
    return SpecError(f"{msg}\n{SPEC_FORMS}")


# ------------------------------------------------------------------------------------------ spec parsing
def _split_top(spec: str) -> tuple[list[str], list[str]]:
    """Operands and operators at parenthesis depth 0 (operators need whitespace on both sides)."""
    operands, ops, depth, start = [], [], 0, 0
    i = 0
    while i < len(spec):
        ch = spec[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _spec_error(f"unbalanced ')' in segmenter spec {spec!r}")
        elif depth == 0 and ch.isspace():
            m = _OPERATOR.match(spec, i)
            if m:
                operands.append(spec[start:i])
                ops.append(m.group(1))
                i = start = m.end()
                continue
        i += 1
    if depth != 0:
        raise _spec_error(f"unbalanced '(' in segmenter spec {spec!r}")
    operands.append(spec[start:])
    return operands, ops


def _options(text: str) -> tuple[str, dict[str, str]]:
    if "?" not in text:
        return text, {}
    base, _, query = text.rpartition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    opts: dict[str, str] = {}
    for k, v in pairs:
        if k in opts:
            raise _spec_error(f"option {k!r} given twice in {text!r}")
        opts[k] = v
    return base, opts


_CONTEXT_KEYS = ("classifier", "model", "weights", "stats", "threshold", "quantile", "calibration", "ridge")
_QUERY_KEYS = _CONTEXT_KEYS[1:]  # a classifier object cannot be written in a spec


def _build(spec: str, ctx: dict[str, Any], used: set[str]) -> Segmenter:
    spec = spec.strip()
    if not spec:
        raise _spec_error("empty segmenter spec")
    operands, ops = _split_top(spec)
    if ops:
        seg = _build(operands[0], ctx, used)
        for op, text in zip(ops, operands[1:]):
            other = _build(text, ctx, used)
            seg = {"|": Union, "&": Intersection, "-": Minus}[op](seg, other)
        return seg
    if spec.startswith("(") and spec.endswith(")"):
        return _build(spec[1:-1], ctx, used)
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "all" and not sep:
        return Everything()
    if not sep:
        raise _spec_error(f"unknown segmenter spec {spec!r}")
    if kind == "coco":
        path, sep2, category = rest.rpartition(":")
        if not sep2 or not path or not category:
            raise _spec_error(f"coco: needs coco:ANNOTATIONS.json:CATEGORY, got {spec!r}")
        return CocoSegmenter(path, category, name=spec)
    if kind == "masks":
        if not rest:
            raise _spec_error("masks: needs a folder, masks:DIR")
        return MaskFolderSegmenter(rest, name=spec)
    if kind == "deeplab":
        classes, _, model = rest.partition("@")
        used.add("num_threads")
        return DeepLabSegmenter(classes, model or None, num_threads=ctx.get("num_threads"), name=spec)
    if kind == "torchvision":
        body, _, weights = rest.partition("@")
        model, sep2, classes = body.partition(":")
        if not sep2 or not model or not classes:
            raise _spec_error(f"torchvision: needs torchvision:MODEL:CLASS[,CLASS...][@WEIGHTS], got {spec!r}")
        used.add("size")
        return TorchvisionSegmenter(model, classes, weights=weights or None, size=ctx.get("size"),
                                    device=ctx.get("device", "cpu"), name=spec)
    if kind == "lower":
        try:
            return LowerBand(float(rest))
        except ValueError as exc:
            raise _spec_error(f"lower: needs a fraction in (0, 1], got {rest!r}") from exc
    if kind == "below":
        return Below(_build(rest, ctx, used))
    if kind == "context":
        path, opts = _options(rest)
        unknown = sorted(set(opts) - set(_QUERY_KEYS))
        if unknown:
            raise _spec_error(f"context: unknown option(s) {', '.join(unknown)}; known: {', '.join(_QUERY_KEYS)}")
        kw = {k: ctx[k] for k in _CONTEXT_KEYS if ctx.get(k) is not None}
        for k, v in opts.items():
            if k in kw and str(kw[k]) != v:
                raise _spec_error(f"context option {k} is {v!r} in the spec but {kw[k]!r} as an argument")
            kw[k] = v
        used.update(k for k in _CONTEXT_KEYS if ctx.get(k) is not None)
        try:
            for k in ("threshold", "quantile", "ridge"):
                if k in kw:
                    kw[k] = float(kw[k])
        except ValueError as exc:
            raise _spec_error(f"context: {exc}") from exc
        classifier, model = kw.pop("classifier", None), kw.pop("model", None)
        if classifier is not None and model is not None:
            raise _spec_error(f"context: the spec names model={model!r} but a classifier was passed too")
        classifier = model if classifier is None else classifier
        if isinstance(classifier, str) and str(ctx.get("device", "cpu")) != "cpu":
            from ..models.registry import load_classifier

            classifier = load_classifier(classifier, weights=kw.pop("weights", None), device=ctx["device"])
        return ContextSegmenter(path, classifier, batch_size=ctx.get("batch_size", 32), name=spec, **kw)
    raise _spec_error(f"unknown segmenter kind {kind!r} in {spec!r}")


def load_segmenter(
    spec: str | Segmenter,
    *,
    classifier: Any = None,
    stats: Any = None,
    threshold: float | None = None,
    quantile: float | None = None,
    calibration: Any = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    size: int | None = None,
    num_threads: int | None = None,
    batch_size: int = 32,
) -> Segmenter:
    """A segmenter from a spec string (see :data:`SPEC_FORMS` and the module docstring).

    The keyword arguments configure the sources that use them: ``classifier``, ``weights``, ``stats``,
    ``threshold``, ``quantile`` and ``calibration`` the ``context:`` segmenters (see
    :class:`ContextSegmenter`); ``size`` the ``torchvision:`` ones; ``num_threads`` the ``deeplab:`` ones;
    ``device`` both torch-based kinds. An option no part of the spec uses is an error rather than silently
    ignored. A :class:`Segmenter` passed as ``spec`` is returned as it is.

    Raises:
        SpecError: the spec cannot be parsed (the message lists the forms); other rulewriter errors for
        missing files, unknown classes or a missing optional package.

    Example::

        >>> from PIL import Image
        >>> seg = load_segmenter("lower:0.5 - all")
        >>> seg.name, float(seg(Image.new("RGB", (4, 4))).max())
        ('lower:0.5 - all', 0.0)
    """
    if isinstance(spec, Segmenter):
        return spec
    if not isinstance(spec, str):
        raise _spec_error(f"a segmenter spec is a string, got {type(spec).__name__}")
    ctx: dict[str, Any] = {"classifier": classifier, "stats": stats, "threshold": threshold, "quantile": quantile,
                           "calibration": calibration, "weights": weights, "device": device, "size": size,
                           "num_threads": num_threads, "batch_size": batch_size}
    used: set[str] = set()
    seg = _build(spec, ctx, used)
    unused = [k for k in ("classifier", "weights", "stats", "threshold", "quantile", "calibration", "size",
                          "num_threads") if ctx[k] is not None and k not in used]
    if unused:
        raise SpecError(f"{', '.join(unused)} given, but no part of {spec!r} uses it (context: uses classifier, "
                        "weights, stats, threshold, quantile, calibration; torchvision: size; deeplab: num_threads)")
    return seg
