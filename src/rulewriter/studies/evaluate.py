"""Judge an edit the way the thesis does: what it fixed, and what it broke (Sections 2.2.2–2.2.3, 2.3.3–2.3.4).

An edit is judged on *test sets*: images with their ground truth, each optionally paired with a
*manipulated* copy (the concept changed, e.g. wood pasted onto wheels). The *target* of an edit is the class,
or set of classes, whose images the edit should help (``"car wheel"``; or every car class). Everything
below works for any change that can be applied to a model and undone: an :class:`~rulewriter.core.edit.Edit`,
a :class:`~rulewriter.studies.finetune.WeightDelta` from a baseline, or ``None`` for the unedited model.

A tour::

    from rulewriter.studies.evaluate import TestSet, confusing_set, evaluate_edit, write_report

    # 1. a test set from any labelled folder (wnid or class-name subfolders, or flat nXXXXXXXX_*.jpg)
    ts = TestSet.from_folder(clf, "imagenet-samples/")
    # 2. ... or the thesis's confusing images: the top 1% of a folder by how strongly the concept key
    #    matches, with the texture pasted where it matches (key from the exemplars' masked keys)
    conf = confusing_set(clf, layer, wheel_key, "imagenet-samples/", wood, C=stats.moment())
    # 3. predictions before and after, streamed in batches; the four tests, ROC/AUC, errors corrected,
    #    per-class accuracy shifts
    ev = evaluate_edit(clf, conf, edit, target={817, 511, 479})
    ev.four_tests["manipulated_same"].accuracy_post
    # 4. one JSON file, matplotlib figures and an HTML page
    write_report("rulewriter-eval", clf, ev)

The same from the command line::

    rulewriter evaluate --model efficientnet-lite0 --edit wood-wheel.safetensors --data imagenet-samples/ --json

Definitions (used everywhere below, and in the JSON):

* **ground truth** of an image: a class, or a *set* of classes any of which counts as right (the car photos
  of the wheel experiment are right when called any car class). An empty set is the thesis's "noise"
  label of mislabelled images: nothing is right.
* **top-1 / top-5 accuracy**: the fraction of images whose top-1 class (any of whose top-5) is in the
  ground truth.
* **confidence**: the mean softmax probability the model puts on the ground truth (summed over a set).
* **same class / other classes**: images whose ground truth meets the target set / does not.
* **errors corrected** (Tables 2.3–2.4; EditingClassifiers): among the images the unedited model gets
  wrong, the fraction the edited model gets right. *With respect to the ground truth* "right" means in
  the ground truth; *with respect to the pre-edit prediction* "right" means equal to the unedited model's
  top-1 on the image's unmanipulated original (so on normal images the unedited model is right by
  definition, and only manipulated images can have errors to correct). **Errors introduced** is the
  converse: among the images the unedited model gets right, the fraction the edited model gets wrong.
* **ROC** (Fig. 2-10): the target set is the positive class, every other image negative, scored by the
  probability the model puts on the target set. Without a target, the ROC separates correctly from
  wrongly classified images by top-1 probability (how well confidence ranks correctness).
* **per-class shift**: per ground-truth class, top-1 accuracy after minus before (and the same for confidence).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import EditError, ImageLoadError, MaskError, RulewriterError
from .report import percent

__all__ = [
    "Applicable",
    "ClassShift",
    "Evaluation",
    "MatchedPaste",
    "Predictions",
    "RocCurve",
    "SourceDataset",
    "TestScores",
    "TestSet",
    "accuracy",
    "add_cli",
    "as_label_sets",
    "class_shifts",
    "concept_heatmaps",
    "concept_matcher",
    "concept_scores",
    "confusing_set",
    "errors_corrected",
    "evaluate_edit",
    "four_tests",
    "heat_to_mask",
    "load_source",
    "load_change",
    "match_threshold",
    "mislabelled_set",
    "plot_class_shifts",
    "plot_roc",
    "predict",
    "random_set",
    "roc",
    "select_top",
    "summarize",
    "target_set",
    "write_report",
]

ImageSource = Union[str, Path, Image.Image, Callable[[], Image.Image]]
Label = Union[int, Iterable[int]]
FOUR_TESTS = ("normal_same", "normal_other", "manipulated_same", "manipulated_other")
_TEST_TITLES = {
    "normal_same": "Normal (same class)",
    "normal_other": "Normal (other classes)",
    "manipulated_same": "Manipulated (same class)",
    "manipulated_other": "Manipulated (other classes)",
}


class Applicable(Protocol):
    """Anything that changes a model temporarily: ``with change.applied(model): ...`` restores it on exit.

    :class:`~rulewriter.core.edit.Edit` and :class:`~rulewriter.studies.finetune.WeightDelta` both qualify.
    """

    def applied(self, model: nn.Module) -> ContextManager[nn.Module]: ...


# ------------------------------------------------------------------------------------------ targets, labels
def target_set(target: Label | None) -> frozenset[int]:
    """A target given as one class index or several, as a frozenset (empty for ``None``).

    Example::

        >>> sorted(target_set(479)), sorted(target_set([817, 511]))
        ([479], [511, 817])
    """
    if target is None:
        return frozenset()
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return frozenset([int(target)])
    try:
        out = frozenset(int(t) for t in target)  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise RulewriterError(f"a target is a class index or a set of class indices, got {target!r}") from e
    return out


def as_label_sets(labels: Sequence[Label]) -> list[frozenset[int]]:
    """Ground truths as frozensets: ``3`` → ``{3}``, ``{817, 511}`` stays; ``-1`` (unknown) → ``{}`` (noise).

    Example::

        >>> as_label_sets([3, {5, 4}, -1])
        [frozenset({3}), frozenset({4, 5}), frozenset()]
    """
    out = []
    for y in labels:
        if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
            out.append(frozenset() if int(y) < 0 else frozenset([int(y)]))
        else:
            out.append(target_set(y))
    return out


def _membership(label_sets: Sequence[frozenset[int]], num_classes: int) -> torch.Tensor:
    """(N, num_classes) bool: entry (i, c) is true when class c is in image i's ground truth."""
    m = torch.zeros(len(label_sets), num_classes, dtype=torch.bool)
    for i, s in enumerate(label_sets):
        idx = [c for c in s if 0 <= c < num_classes]
        if idx:
            m[i, idx] = True
    return m


# ------------------------------------------------------------------------------------------ predictions
@dataclass
class Predictions:
    """What a model said about each image of a test set, kept small: top-k and two probability masses.

    Attributes:
        topk: (N, k) class indices, best first.
        topk_prob: (N, k) their softmax probabilities.
        label_prob: (N,) probability on the image's ground truth (summed over a set; 0 for noise).
        target_prob: (N,) probability on the target set (0 when there is no target).

    Example::

        >>> p = Predictions.from_logits(torch.tensor([[2.0, 0.0, 0.0]]), [0], target={1}, k=2)
        >>> p.top1.tolist(), round(float(p.label_prob[0]), 3)
        ([0], 0.787)
    """

    topk: np.ndarray
    topk_prob: np.ndarray
    label_prob: np.ndarray
    target_prob: np.ndarray

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, labels: Sequence[Label], target: Label | None = None, k: int = 5
    ) -> "Predictions":
        """Softmax the logits (float64) and keep the top-``k`` and the probability masses."""
        if logits.dim() != 2 or logits.shape[0] != len(labels):
            raise RulewriterError(f"logits {tuple(logits.shape)} do not fit {len(labels)} labels")
        probs = torch.softmax(logits.detach().double().cpu(), dim=1)
        k = max(1, min(int(k), probs.shape[1]))
        p, idx = probs.topk(k, dim=1)
        member = _membership(as_label_sets(labels), probs.shape[1])
        tgt = sorted(c for c in target_set(target) if 0 <= c < probs.shape[1])
        target_prob = probs[:, tgt].sum(1) if tgt else torch.zeros(probs.shape[0], dtype=probs.dtype)
        return cls(idx.numpy().astype(np.int64), p.numpy(), (probs * member).sum(1).numpy(), target_prob.numpy())

    @classmethod
    def concat(cls, parts: Sequence["Predictions"]) -> "Predictions":
        """Predictions of consecutive batches as one."""
        if not parts:
            return cls(np.zeros((0, 5), np.int64), np.zeros((0, 5)), np.zeros(0), np.zeros(0))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("topk", "topk_prob", "label_prob", "target_prob")))

    def __len__(self) -> int:
        return int(self.topk.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Predictions":
        """The predictions of the images ``idx`` (indices or a boolean mask)."""
        i = np.asarray(idx)
        return Predictions(self.topk[i], self.topk_prob[i], self.label_prob[i], self.target_prob[i])

    @property
    def top1(self) -> np.ndarray:
        """(N,) top-1 class indices."""
        return self.topk[:, 0]

    @property
    def top1_prob(self) -> np.ndarray:
        """(N,) top-1 probabilities."""
        return self.topk_prob[:, 0]

    def correct(self, labels: Sequence[Label], k: int = 1) -> np.ndarray:
        """(N,) bool: the top-1 (any of the top-``k``) is in the ground truth."""
        sets = as_label_sets(labels)
        if len(sets) != len(self):
            raise RulewriterError(f"{len(sets)} labels for {len(self)} predictions")
        if k > self.topk.shape[1]:
            raise RulewriterError(f"top-{k} asked but only the top-{self.topk.shape[1]} were kept")
        return np.array([any(int(c) in s for c in row[:k]) for row, s in zip(self.topk, sets)], dtype=bool)

    def agrees(self, reference_top1: Sequence[int] | np.ndarray) -> np.ndarray:
        """(N,) bool: the top-1 equals a reference top-1 (e.g. the unedited model's on the original)."""
        ref = np.asarray(reference_top1)
        if ref.shape != (len(self),):
            raise RulewriterError(f"reference has shape {ref.shape}, expected ({len(self)},)")
        return self.top1 == ref


# ------------------------------------------------------------------------------------------ metrics
def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def accuracy(pred: Predictions, labels: Sequence[Label], k: int = 1) -> float | None:
    """Top-``k`` accuracy as a fraction in [0, 1] (``None`` for no images).

    Example::

        >>> p = Predictions.from_logits(torch.tensor([[2., 1, 0], [0, 1, 2]]), [0, 1], k=2)
        >>> accuracy(p, [0, 1]), accuracy(p, [0, 1], k=2)
        (0.5, 1.0)
    """
    return _mean(pred.correct(labels, k))


def summarize(pred: Predictions, labels: Sequence[Label]) -> dict[str, Any]:
    """``{"n_images", "top1", "top5", "confidence"}``: accuracies and mean confidence as fractions.

    ``top5`` is top-k accuracy with k the number of classes kept (5 unless the model has fewer classes).

    Example::

        >>> p = Predictions.from_logits(torch.tensor([[0., 1.]]), [0])
        >>> summarize(p, [0])["top1"], summarize(p, [0])["top5"], round(summarize(p, [0])["confidence"], 3)
        (0.0, 1.0, 0.269)
    """
    k = min(5, pred.topk.shape[1])
    return {"n_images": len(pred), "top1": accuracy(pred, labels, 1), "top5": accuracy(pred, labels, k),
            "confidence": _mean(pred.label_prob)}


def errors_corrected(right_before: np.ndarray, right_after: np.ndarray) -> dict[str, Any]:
    """Errors corrected and introduced between two models, from per-image right/wrong flags.

    ``fraction`` = (wrong before and right after) / (wrong before): among the images the unedited model
    gets wrong, the fraction the edited model gets right (``None`` when there were no errors).
    ``introduced_fraction`` = (right before and wrong after) / (right before).

    Example::

        >>> errors_corrected(np.array([0, 0, 0, 1], bool), np.array([1, 1, 0, 0], bool))["fraction"]
        0.6666666666666666
    """
    b, a = np.asarray(right_before, bool), np.asarray(right_after, bool)
    if b.shape != a.shape:
        raise RulewriterError(f"before {b.shape} and after {a.shape} differ in shape")
    n_err, n_ok = int((~b).sum()), int(b.sum())
    fixed, broken = int((~b & a).sum()), int((b & ~a).sum())
    return {"n_errors_before": n_err, "corrected": fixed, "fraction": fixed / n_err if n_err else None,
            "n_right_before": n_ok, "introduced": broken, "introduced_fraction": broken / n_ok if n_ok else None}


@dataclass
class TestScores:
    """One of the four tests (Table 2.1): accuracy and mean confidence before (pre) and after (post)."""

    n: int
    accuracy_pre: float | None
    accuracy_post: float | None
    confidence_pre: float | None
    confidence_post: float | None

    __test__ = False  # a pytest collection hint: this is not a test class

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def four_tests(
    labels: Sequence[Label],
    target: Label,
    normal: tuple[Predictions, Predictions],
    manipulated: tuple[Predictions, Predictions] | None = None,
) -> dict[str, TestScores]:
    """The thesis's four tests: normal / manipulated images × same class / other classes (Table 2.1).

    Args:
        labels: the ground truth of the images (the manipulated images share their original's).
        target: the edit's target class or set of classes; "same class" images have ground truth in it.
        normal: predictions on the normal images (before, after).
        manipulated: predictions on the manipulated copies (before, after), same order; ``None`` skips them.

    Returns:
        ``{"normal_same", "normal_other", "manipulated_same", "manipulated_other"}`` → :class:`TestScores`.

    Example::

        >>> b = Predictions.from_logits(torch.tensor([[1., 0], [1., 0]]), [0, 1])
        >>> a = Predictions.from_logits(torch.tensor([[1., 0], [0., 1]]), [0, 1])
        >>> t = four_tests([0, 1], 0, (b, a))
        >>> t["normal_other"].accuracy_pre, t["normal_other"].accuracy_post
        (0.0, 1.0)
    """
    sets = as_label_sets(labels)
    tgt = target_set(target)
    if not tgt:
        raise RulewriterError("the four tests need a target class (or set of classes)")
    same = np.array([bool(s & tgt) for s in sets], dtype=bool)
    out: dict[str, TestScores] = {}
    for kind, pair in (("normal", normal), ("manipulated", manipulated)):
        if pair is None:
            continue
        before, after = pair
        if len(before) != len(sets) or len(after) != len(sets):
            raise RulewriterError(f"{kind}: {len(before)}/{len(after)} predictions for {len(sets)} labels")
        for part, sel in (("same", same), ("other", ~same)):
            lab = [s for s, keep in zip(sets, sel) if keep]
            pb, pa = before.subset(sel), after.subset(sel)
            out[f"{kind}_{part}"] = TestScores(int(sel.sum()), accuracy(pb, lab), accuracy(pa, lab),
                                               _mean(pb.label_prob), _mean(pa.label_prob))
    return out


@dataclass
class RocCurve:
    """A receiver-operating curve (scikit-learn's ``roc_curve``) and its area (``roc_auc_score``)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict[str, Any]:
        # inf thresholds (scikit-learn's first point) are not JSON; the curve starts at (0, 0) anyway.
        thr = [None if not math.isfinite(t) else float(t) for t in self.thresholds]
        return {"auc": self.auc, "n_positive": self.n_positive, "n_negative": self.n_negative,
                "fpr": self.fpr.tolist(), "tpr": self.tpr.tolist(), "thresholds": thr}


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError as e:
        raise RulewriterError("ROC curves need scikit-learn: pip install 'rulewriter[eval]'") from e
    return metrics


def roc(scores: np.ndarray, positive: np.ndarray) -> RocCurve | None:
    """ROC curve and AUC of ``scores`` for the boolean ``positive`` labels; ``None`` if only one class is present.

    Example::

        >>> roc(np.array([0.9, 0.2, 0.6]), np.array([True, False, False])).auc
        1.0
    """
    s, y = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    m = _sklearn_metrics()
    fpr, tpr, thr = m.roc_curve(y, s)
    return RocCurve(fpr, tpr, thr, float(m.roc_auc_score(y, s)), n_pos, n_neg)


@dataclass
class ClassShift:
    """Accuracy and confidence of one ground-truth class before and after an edit."""

    label: frozenset[int]
    name: str
    n: int
    accuracy_pre: float
    accuracy_post: float
    confidence_pre: float
    confidence_post: float

    @property
    def shift(self) -> float:
        """Top-1 accuracy after minus before."""
        return self.accuracy_post - self.accuracy_pre

    def to_dict(self) -> dict[str, Any]:
        return {"classes": sorted(self.label), "name": self.name, "n": self.n, "accuracy_pre": self.accuracy_pre,
                "accuracy_post": self.accuracy_post, "shift": self.shift, "confidence_pre": self.confidence_pre,
                "confidence_post": self.confidence_post,
                "confidence_shift": self.confidence_post - self.confidence_pre}


def _label_name(s: frozenset[int], class_names: Sequence[str] | None, groups: Mapping[frozenset[int], str]) -> str:
    if s in groups:
        return groups[s]
    if not s:
        return "noise"
    names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c) for c in sorted(s)]
    return names[0] if len(names) == 1 else "{" + ", ".join(names[:3]) + (", …}" if len(names) > 3 else "}")


def class_shifts(
    labels: Sequence[Label],
    before: Predictions,
    after: Predictions,
    class_names: Sequence[str] | None = None,
    groups: Mapping[frozenset[int], str] | None = None,
) -> list[ClassShift]:
    """Per-class top-1 accuracy and confidence before and after, sorted by shift (most hurt first).

    Images are grouped by their ground truth (a set of classes is one group; name it in ``groups``).

    Example::

        >>> b = Predictions.from_logits(torch.tensor([[1., 0], [1., 0]]), [0, 1])
        >>> a = Predictions.from_logits(torch.tensor([[0., 1], [0., 1]]), [0, 1])
        >>> [(s.name, s.shift) for s in class_shifts([0, 1], b, a, ["cat", "dog"])]
        [('cat', -1.0), ('dog', 1.0)]
    """
    sets = as_label_sets(labels)
    ok_b, ok_a = before.correct(sets), after.correct(sets)
    by_class: dict[frozenset[int], list[int]] = {}
    for i, s in enumerate(sets):
        by_class.setdefault(s, []).append(i)
    out = []
    for s, idx in by_class.items():
        i = np.asarray(idx)
        out.append(ClassShift(s, _label_name(s, class_names, groups or {}), len(idx), float(ok_b[i].mean()),
                              float(ok_a[i].mean()), float(before.label_prob[i].mean()),
                              float(after.label_prob[i].mean())))
    out.sort(key=lambda c: (c.shift, c.confidence_post - c.confidence_pre, c.name))
    return out


# ------------------------------------------------------------------------------------------ streaming
class SourceDataset(torch.utils.data.Dataset):
    """Image sources (paths, PIL images, or callables that make one) → ``(preprocessed tensor, index)``.

    Example::

        >>> x, i = SourceDataset(["a.jpg", MatchedPaste(...)], clf.preprocess)[1]     # doctest: +SKIP
    """

    def __init__(self, sources: Sequence[ImageSource], preprocess) -> None:
        self.sources, self.preprocess = list(sources), preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess.image(load_source(self.sources[i])), i


def load_source(src: ImageSource) -> Image.Image:
    """A test-set image as RGB: read a path (clear errors for bad files), copy a PIL image, or call a maker."""
    from ..models.data import load_image

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (str, Path)):
        return load_image(src)
    if callable(src):
        return src().convert("RGB")
    raise ImageLoadError(f"not an image source: {type(src).__name__}")


def _change_context(change: Applicable | None, model: nn.Module) -> ContextManager[Any]:
    return contextlib.nullcontext(model) if change is None else change.applied(model)


@torch.no_grad()
def predict(
    classifier,
    images: Sequence[ImageSource],
    labels: Sequence[Label],
    variants: Mapping[str, Applicable | None] | None = None,
    *,
    target: Label | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, Predictions]:
    """Stream images through the model once, predicting under each variant (an edit, a baseline, or None).

    Each batch is decoded once and run under every variant in turn (each change is applied and undone
    around its forward pass, so the model is never left edited), so evaluating an edit costs one pass over
    the data. Only top-5 and two probabilities per image are kept, never activations.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier` (its model and device are used).
        images: paths, PIL images, or callables returning a PIL image (made lazily, e.g. a manipulation).
        labels: one ground truth per image (a class index, a set of them, or -1 for noise).
        variants: name → change; default ``{"before": None}``.
        target: the target class or set (for :attr:`Predictions.target_prob`).
        batch_size, num_workers: the DataLoader's knobs (lower the batch size to save memory).
        progress: show a tqdm bar.

    Example::

        >>> preds = predict(clf, ["a.jpg", "b.jpg"], [817, 479], {"before": None, "after": edit})  # doctest: +SKIP
        >>> summarize(preds["after"], [817, 479])["top1"]                                          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if len(images) != len(labels):
        raise RulewriterError(f"{len(images)} images but {len(labels)} labels")
    if not len(images):
        raise ImageLoadError("no images to evaluate")
    if batch_size < 1:
        raise RulewriterError(f"batch size must be at least 1, got {batch_size}")
    from ..core import distributed as D

    variants = dict(variants) if variants is not None else {"before": None}
    sets = as_label_sets(labels)
    model = classifier.model
    was_training = model.training
    model.eval()
    mine = D.shard_indices(len(images))  # all of them outside torchrun
    cuda = classifier.device.type == "cuda"
    loader = torch.utils.data.DataLoader(SourceDataset([images[i] for i in mine], classifier.preprocess),
                                         batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         pin_memory=cuda)
    parts: dict[str, list[Predictions]] = {name: [] for name in variants}
    try:
        for x, idx in tqdm(loader, desc=desc, unit="batch", disable=not progress or not D.is_main()):
            x = x.to(classifier.device, classifier.dtype, non_blocking=cuda)
            lab = [sets[mine[int(i)]] for i in idx]
            for name, change in variants.items():
                with _change_context(change, model):
                    logits = model(x)
                parts[name].append(Predictions.from_logits(logits, lab, target))
    finally:
        model.train(was_training)
    out = {name: Predictions.concat(p) for name, p in parts.items()}
    if D.is_distributed():
        # Every rank gets every prediction, back in the order of ``images``.
        gathered = D.all_gather_objects((mine, out))
        order = np.argsort(np.concatenate([np.asarray(m, dtype=np.int64) for m, _ in gathered]), kind="stable")
        out = {name: Predictions.concat([o[name] for _, o in gathered]).subset(order) for name in variants}
    return out


# ------------------------------------------------------------------------------------------ test sets
@dataclass
class TestSet:
    """Images with their ground truth, optionally paired with manipulated copies (same order).

    Attributes:
        name: shown in reports.
        images: image sources (paths, PIL images, or callables that make one).
        labels: ground truth per image (class index, set of classes, or -1 / empty set for noise).
        manipulated: the manipulated copy of each image, or ``None``.
        groups: names for ground-truth sets, e.g. ``{frozenset(CARS): "car"}``.
        info: how the set was made (JSON-able), e.g. thresholds and selection sizes.

    Example::

        >>> ts = TestSet("cars", ["car1.jpg"], [{817, 511}], groups={frozenset({817, 511}): "car"})
        >>> len(ts)
        1
    """

    name: str
    images: list[ImageSource]
    labels: list[Label]
    manipulated: list[ImageSource] | None = None
    groups: dict[frozenset[int], str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    __test__ = False  # a pytest collection hint: this is not a test class

    def __post_init__(self) -> None:
        self.images, self.labels = list(self.images), list(self.labels)
        if len(self.images) != len(self.labels):
            raise RulewriterError(f"test set {self.name!r}: {len(self.images)} images, {len(self.labels)} labels")
        if self.manipulated is not None and len(self.manipulated) != len(self.images):
            raise RulewriterError(f"test set {self.name!r}: {len(self.manipulated)} manipulated copies for "
                                  f"{len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, classifier, root: str | Path, *, samples: int | None = None, seed: int = 0,
                    name: str | None = None) -> "TestSet":
        """Every labelled image under ``root`` (see :func:`rulewriter.models.data.labelled_images`), or a sample.

        Example::

            >>> TestSet.from_folder(clf, "imagenet-samples/", samples=100).info["n_in_folder"]  # doctest: +SKIP
            1000
        """
        from ..models.data import labelled_images, subsample

        pairs = labelled_images(root, classifier.labels, classifier.wnids)
        chosen = subsample(pairs, samples, seed=seed)
        return cls(name or str(root), [p for p, _ in chosen], [y for _, y in chosen],
                   info={"source": str(root), "n_in_folder": len(pairs), "samples": samples, "seed": seed})

    def subset(self, idx: Sequence[int], name: str | None = None, **info: Any) -> "TestSet":
        """The images ``idx`` (with their labels and manipulated copies)."""
        idx = [int(i) for i in idx]
        man = None if self.manipulated is None else [self.manipulated[i] for i in idx]
        return TestSet(name or self.name, [self.images[i] for i in idx], [self.labels[i] for i in idx], man,
                       dict(self.groups), {**self.info, **info})


def random_set(classifier, root: str | Path, n: int | None = None, *, seed: int = 0) -> TestSet:
    """The thesis's *random images*: ``n`` images of a labelled folder (a deterministic sample; all for None).

    Example::

        >>> rand = random_set(clf, "imagenet-val/", 5000)      # doctest: +SKIP
    """
    ts = TestSet.from_folder(classifier, root, samples=n, seed=seed, name="random images")
    ts.info["kind"] = "random"
    return ts


def mislabelled_set(testset: TestSet, target: Label, new_label: Label = -1) -> TestSet:
    """The thesis's *mislabelled images*: the target-class images of ``testset`` with their label replaced.

    The default new label is noise (-1: no class is right), as the thesis relabels "car wheel" images to a
    noise class; accuracy then counts nothing as right, and in the ROC these images become negatives, so
    the curve shows how much the edit pushes images of the target towards the target anyway.

    Example::

        >>> mis = mislabelled_set(TestSet("t", ["a.jpg", "b.jpg"], [479, 3]), 479)
        >>> mis.labels
        [-1]
    """
    tgt = target_set(target)
    keep = [i for i, s in enumerate(as_label_sets(testset.labels)) if s & tgt]
    out = testset.subset(keep, name="mislabelled images", kind="mislabelled", relabelled_to=str(new_label))
    out.labels = [new_label] * len(keep)
    return out


def concept_matcher(
    classifier,
    layer: str,
    key: torch.Tensor,
    *,
    C: torch.Tensor | None = None,
    ridge: float | None = None,
    view: int = 2,
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A function ``(layer input, layer output) → (B, h, w) heat`` that context-matches ``key`` at ``layer``.

    With the layer's second moment ``C`` the heat at a location is ``k · (C + εI)⁻¹ k*``: how strongly the
    rank-one edit along ``key`` fires there (see :func:`rulewriter.concepts.masks.key_match`), with ``ε`` the
    edit's ridge (default :data:`~rulewriter.core.edit.DEFAULT_RIDGE`). Without ``C`` it is ``k · k*``. The output
    is needed only for the inverse views (3, 4).

    Example::

        >>> match = concept_matcher(clf, layer, wheel_key, C=stats.moment())         # doctest: +SKIP
        >>> with Trace(clf.model, layer) as t:                                       # doctest: +SKIP
        ...     clf.model(x)
        >>> heat = match(t.input, t.output)                                          # doctest: +SKIP
    """
    from ..concepts.masks import key_match
    from ..core.edit import DEFAULT_RIDGE, update_direction
    from ..core.memory import LayerMemory
    from ..core.trace import get_module

    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    k = torch.as_tensor(key).double().reshape(-1)
    if k.shape[0] != mem.key_dim:
        raise MaskError(f"the concept key has {k.shape[0]} dims; layer {layer!r} view {view} has {mem.key_dim}")
    # C⁻¹k* once, with the same ridge as the edit, rather than one solve per batch.
    q = k if C is None else update_direction(C, k, DEFAULT_RIDGE if ridge is None else ridge)

    def match(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return key_match(mem.keys(x, y).double(), q.to(x.device)).float().cpu()

    match.forward_direction = mem.forward_direction  # type: ignore[attr-defined]
    return match


@torch.no_grad()
def concept_heatmaps(
    classifier,
    layer: str,
    key: torch.Tensor,
    images: Sequence[ImageSource],
    *,
    C: torch.Tensor | None = None,
    ridge: float | None = None,
    view: int = 2,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """Context-match a concept key over images: the heatmap of every image, (N, h, w) float32.

    See :func:`concept_matcher` for what the heat is. Streams the images up to the layer only and keeps
    only the small heatmaps.

    Example::

        >>> heat = concept_heatmaps(clf, layer, wheel_key, paths, C=stats.moment())   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..core.trace import Trace

    match = concept_matcher(classifier, layer, key, C=C, ridge=ridge, view=view)
    loader = torch.utils.data.DataLoader(SourceDataset(images, classifier.preprocess), batch_size=batch_size)
    out = []
    with Trace(classifier.model, layer, retain_output=not match.forward_direction, stop=True) as tr:
        for x, _ in tqdm(loader, desc=f"match {layer}", unit="batch", disable=not progress):
            tr(x.to(classifier.device, classifier.dtype))
            out.append(match(tr.input, tr.output))
    return torch.cat(out)


def match_threshold(heatmaps: torch.Tensor | np.ndarray, quantile: float = 0.99) -> float:
    """The heat above which a location counts as the concept: the ``quantile`` of all locations' heat.

    The default keeps the top 1% of locations over the dataset (network dissection's convention for a
    unit's receptive region).

    Example::

        >>> round(match_threshold(torch.arange(100.).reshape(4, 5, 5), 0.9), 6)
        89.1
    """
    if not 0.0 < quantile < 1.0:
        raise RulewriterError(f"quantile must be in (0, 1), got {quantile}")
    h = np.asarray(heatmaps, dtype=np.float64).reshape(-1)
    if not h.size:
        raise RulewriterError("no heatmaps to threshold")
    return float(np.quantile(h, quantile))


def concept_scores(heatmaps: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """Amount of concept activation per image: the sum of the heat at its locations above ``threshold``.

    Example::

        >>> concept_scores(np.array([[[1., 5.], [3., 0.]]]), 2.0).tolist()
        [8.0]
    """
    h = np.asarray(heatmaps, dtype=np.float64)
    return np.where(h > threshold, h, 0.0).reshape(h.shape[0], -1).sum(1)


def select_top(scores: np.ndarray, fraction: float = 0.01) -> list[int]:
    """Indices of the top ``fraction`` of images by score (at least one), best first; zero scores never.

    Example::

        >>> select_top(np.array([0., 3., 1., 2.]), 0.5)
        [1, 3]
    """
    if not 0.0 < fraction <= 1.0:
        raise RulewriterError(f"fraction must be in (0, 1], got {fraction}")
    s = np.asarray(scores, dtype=np.float64)
    n = max(1, int(round(fraction * len(s))))
    order = np.argsort(-s, kind="stable")[:n]
    return [int(i) for i in order if s[i] > 0]


def heat_to_mask(preprocess, heat: torch.Tensor | np.ndarray, image_size: tuple[int, int],
                 threshold: float) -> np.ndarray:
    """Where a heatmap exceeds ``threshold``, as a 0/1 mask at the original image's size ``(W, H)``.

    The heatmap lives on the network's input crop; it is upsampled bilinearly to the crop, thresholded,
    and mapped back through the inverse of the preprocessing's resize and crop (zero outside the crop).

    Example::

        >>> pre = Preprocess(224, 256, (.5,) * 3, (.5,) * 3)                     # doctest: +SKIP
        >>> heat_to_mask(pre, torch.ones(7, 7), (300, 200), 0.5).shape           # doctest: +SKIP
        (200, 300)
    """
    w, h = (int(v) for v in image_size)
    (nw, nh), (left, top, right, bottom) = preprocess._geometry(w, h)  # the crop Preprocess.image takes
    t = torch.as_tensor(np.asarray(heat), dtype=torch.float32)
    if t.dim() != 2:
        raise MaskError(f"a heatmap is (h, w), got shape {tuple(t.shape)}")
    up = F.interpolate(t[None, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)
    frame = np.zeros((nh, nw), dtype=np.float32)
    frame[top:bottom, left:right] = (up[0, 0] > threshold).numpy()
    if (nw, nh) == (w, h):
        return frame
    back = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return (back >= 0.5).astype(np.float32)


@dataclass
class MatchedPaste:
    """A lazily made manipulated image: ``texture`` pasted where the concept heatmap exceeds the threshold.

    Calling it loads the image, builds the mask with :func:`heat_to_mask` and pastes with
    :func:`rulewriter.concepts.manipulate.paste_texture` (keeping the shading); an image without a matched region
    comes back unchanged. Being a plain dataclass it can cross DataLoader worker processes.
    """

    source: ImageSource
    heat: np.ndarray
    threshold: float
    texture: Image.Image
    preprocess: Any

    def mask(self, image_size: tuple[int, int]) -> np.ndarray:
        """The matched region on an image of ``image_size`` (W, H), 0/1."""
        return heat_to_mask(self.preprocess, self.heat, image_size, self.threshold)

    def __call__(self) -> Image.Image:
        from ..concepts.manipulate import paste_texture

        img = load_source(self.source)
        m = self.mask(img.size)
        return paste_texture(img, m, self.texture) if m.any() else img


def confusing_set(
    classifier,
    layer: str,
    key: torch.Tensor,
    data: str | Path | TestSet,
    texture: Image.Image,
    *,
    C: torch.Tensor | None = None,
    fraction: float = 0.01,
    quantile: float = 0.99,
    heatmaps: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> TestSet:
    """The thesis's *confusing images* (Section 2.2.2), built from any labelled folder.

    The concept ``key`` is context-matched over every image (:func:`concept_heatmaps`); a location matches
    when its heat exceeds the ``quantile`` of all locations (:func:`match_threshold`); images are ranked by
    the amount of matched activation (:func:`concept_scores`) and the top ``fraction`` are kept
    (:func:`select_top`). Each kept image gets a manipulated copy with ``texture`` pasted onto its matched
    regions (:class:`MatchedPaste`, made lazily when evaluated).

    Args:
        classifier, layer: the model and the layer whose keys are matched (usually the edited layer).
        key: the concept key ``(d,)`` to match, e.g. the masked mean key of the exemplars' *original*
            concept (the wheels), so that images with wheels are found.
        data: a labelled image folder or a :class:`TestSet`.
        texture: what to paste (the manipulation, e.g. wood).
        C: the layer's second moment; with it, the heat is exactly where an edit along ``key`` fires.
        fraction: share of images kept (the thesis: 1%).
        quantile: threshold of the matched region.
        heatmaps: precomputed heatmaps of ``data`` (skips the streaming pass).

    Example::

        >>> conf = confusing_set(clf, layer, wheel_key, "imagenet-val/", wood, C=stats.moment())  # doctest: +SKIP
    """
    ts = data if isinstance(data, TestSet) else TestSet.from_folder(classifier, data)
    heat = heatmaps if heatmaps is not None else concept_heatmaps(
        classifier, layer, key, ts.images, C=C, batch_size=batch_size, progress=progress)
    if heat.shape[0] != len(ts):
        raise RulewriterError(f"{heat.shape[0]} heatmaps for {len(ts)} images")
    tau = match_threshold(heat, quantile)
    scores = concept_scores(heat, tau)
    keep = select_top(scores, fraction)
    if not keep:
        raise RulewriterError("no image has a location above the match threshold; lower the quantile")
    out = ts.subset(keep, name="confusing images", kind="confusing", layer=layer, threshold=tau,
                    quantile=quantile, fraction=fraction, n_scanned=len(ts),
                    scores=[float(scores[i]) for i in keep])
    out.manipulated = [MatchedPaste(ts.images[i], np.asarray(heat[i]), tau, texture, classifier.preprocess)
                       for i in keep]
    return out


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """Everything :func:`evaluate_edit` measured on one test set (see the module docstring for definitions).

    ``predictions`` maps ``"normal"`` (and ``"manipulated"``) to ``{"before": …, "after": …}``
    (only ``"before"`` without an edit).
    """

    name: str
    labels: list[frozenset[int]]
    target: frozenset[int]
    predictions: dict[str, dict[str, Predictions]]
    sources: list[str]
    groups: dict[frozenset[int], str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def edited(self) -> bool:
        return "after" in self.predictions["normal"]

    def summary(self, kind: str = "normal") -> dict[str, Any]:
        """``{"n_images", "top1", "top5", "confidence"}`` (before only), or ``{"n_images", "before", "after"}``."""
        p = self.predictions[kind]
        if "after" not in p:
            return summarize(p["before"], self.labels)
        b, a = summarize(p["before"], self.labels), summarize(p["after"], self.labels)
        for d in (b, a):
            d.pop("n_images")
        return {"n_images": len(self.labels), "before": b, "after": a,
                "changed_top1": int((p["before"].top1 != p["after"].top1).sum())}

    @property
    def four_tests(self) -> dict[str, TestScores]:
        """The four tests (needs a target; the manipulated ones need manipulated copies)."""
        if not self.target or not self.edited:
            return {}
        p = self.predictions
        man = (p["manipulated"]["before"], p["manipulated"]["after"]) if "manipulated" in p else None
        return four_tests(self.labels, self.target, (p["normal"]["before"], p["normal"]["after"]), man)

    def errors(self) -> dict[str, Any]:
        """Errors corrected / introduced, w.r.t. the ground truth and the pre-edit prediction, per image kind."""
        if not self.edited:
            return {}
        ref = self.predictions["normal"]["before"].top1
        out = {}
        for kind, p in self.predictions.items():
            b, a = p["before"], p["after"]
            out[kind] = {
                "ground_truth": errors_corrected(b.correct(self.labels), a.correct(self.labels)),
                "pre_edit_prediction": errors_corrected(b.agrees(ref), a.agrees(ref)),
                "accuracy_wrt_pre_edit_prediction": {"pre": float(b.agrees(ref).mean()),
                                                     "post": float(a.agrees(ref).mean())},
            }
        return out

    def rocs(self) -> dict[str, dict[str, RocCurve | None]]:
        """ROC curves per image kind and model: target vs rest, or (no target) right vs wrong by confidence."""
        out: dict[str, dict[str, RocCurve | None]] = {}
        positive = np.array([bool(s & self.target) for s in self.labels])
        for kind, p in self.predictions.items():
            out[kind] = {}
            for model, pred in p.items():
                if self.target:
                    out[kind][model] = roc(pred.target_prob, positive)
                else:
                    out[kind][model] = roc(pred.top1_prob, pred.correct(self.labels))
        return out

    def class_shifts(self, kind: str = "normal", class_names: Sequence[str] | None = None) -> list[ClassShift]:
        """Per-class accuracy shifts of one image kind (empty without an edit)."""
        if not self.edited:
            return []
        p = self.predictions[kind]
        return class_shifts(self.labels, p["before"], p["after"], class_names, self.groups)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Everything as JSON-able data, including per-image top-1 before/after."""
        d: dict[str, Any] = {"name": self.name, "target": sorted(self.target), "info": self.info,
                             "normal": self.summary("normal")}
        if "manipulated" in self.predictions:
            d["manipulated"] = self.summary("manipulated")
        if self.edited:
            d["four_tests"] = {k: v.to_dict() for k, v in self.four_tests.items()}
            d["errors"] = self.errors()
            d["class_shifts"] = {k: [c.to_dict() for c in self.class_shifts(k, class_names)] for k in self.predictions}
        d["roc"] = {k: {m: (c.to_dict() if c is not None else None) for m, c in v.items()}
                    for k, v in self.rocs().items()}
        d["roc_kind"] = "target vs rest by target probability" if self.target else \
            "correct vs wrong by top-1 probability"
        rows = []
        for i, src in enumerate(self.sources):
            row: dict[str, Any] = {"image": src, "label": sorted(self.labels[i])}
            for kind, p in self.predictions.items():
                for model, pred in p.items():
                    row[f"{kind}_{model}"] = int(pred.top1[i])
            rows.append(row)
        d["images"] = rows
        return d


def _describe_source(src: ImageSource) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, MatchedPaste):
        return f"{_describe_source(src.source)} (texture pasted on matched regions)"
    return f"<{type(src).__name__}>"


def evaluate_edit(
    classifier,
    testset: TestSet,
    change: Applicable | None = None,
    *,
    target: Label | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Predict a test set (and its manipulated copies) before and after a change, in one streamed pass each.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        testset: the images; its manipulated copies, if any, are evaluated too.
        change: an :class:`~rulewriter.core.edit.Edit`, a :class:`~rulewriter.studies.finetune.WeightDelta`, or
            ``None`` to evaluate the unedited model alone.
        target: the edit's target class or set of classes (for the four tests and the target ROC).
        batch_size, num_workers, progress: streaming knobs.

    Returns:
        an :class:`Evaluation`; ``.to_dict()`` is what ``rulewriter evaluate`` writes.

    Example::

        >>> ev = evaluate_edit(clf, TestSet.from_folder(clf, "val/"), edit, target=479)   # doctest: +SKIP
        >>> ev.summary()["after"]["top1"]                                                # doctest: +SKIP
    """
    variants: dict[str, Applicable | None] = {"before": None}
    if change is not None:
        variants["after"] = change
    kw = dict(target=target, batch_size=batch_size, num_workers=num_workers, progress=progress)
    preds = {"normal": predict(classifier, testset.images, testset.labels, variants, desc=testset.name, **kw)}
    if testset.manipulated is not None:
        preds["manipulated"] = predict(classifier, testset.manipulated, testset.labels, variants,
                                       desc=f"{testset.name} (manipulated)", **kw)
    return Evaluation(testset.name, as_label_sets(testset.labels), target_set(target), preds,
                      [_describe_source(s) for s in testset.images], dict(testset.groups), dict(testset.info))


def load_change(path: str | Path) -> Applicable:
    """Load a saved change: a rulewriter :class:`~rulewriter.core.edit.Edit` or a :class:`~rulewriter.studies.finetune.WeightDelta`.

    Pickles are refused, as everywhere in rulewriter.

    Example::

        >>> change = load_change("wood-wheel.safetensors")     # doctest: +SKIP
    """
    from ..core.edit import FORMAT as EDIT_FORMAT
    from ..core.edit import Edit
    from .finetune import FORMAT as DELTA_FORMAT
    from .finetune import WeightDelta
    from ..core.stats import read_safetensors

    _, header = read_safetensors(Path(path), EditError)
    fmt = header.get("format")
    if fmt == EDIT_FORMAT:
        return Edit.load(path)
    if fmt == DELTA_FORMAT:
        return WeightDelta.load(path)
    raise EditError(f"{path} is safetensors but neither a rulewriter edit nor a weight delta (format {fmt!r})")


# ------------------------------------------------------------------------------------------ figures, report
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RulewriterError("figures need matplotlib: pip install 'rulewriter[eval]'") from e
    return plt


def plot_roc(curves: Mapping[str, RocCurve | None], title: str, *, positive: str = "target", ax=None):
    """One ROC plot with a curve (and its AUC in the legend) per named curve; missing curves are skipped.

    Draws into ``ax`` when given (for a panel of a larger figure); returns the figure.

    Example::

        >>> fig = plot_roc({"before": roc_b, "after": roc_a}, "confusing images")   # doctest: +SKIP
    """
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(4.2, 4.0), dpi=110)
    fig = ax.figure
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
    styles = ["-", "--", "-.", ":"]
    for i, (name, c) in enumerate(curves.items()):
        if c is None:
            continue
        ax.plot(c.fpr, c.tpr, lw=1.8, ls=styles[i % len(styles)], label=f"{name} (AUC {c.auc:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive})")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_class_shifts(shifts: Sequence[ClassShift], title: str, *, top: int = 15):
    """Bar chart of the classes whose accuracy (and confidence) moved most: hurt ones red, helped ones green.

    Example::

        >>> fig = plot_class_shifts(ev.class_shifts(), "imagenet-samples")   # doctest: +SKIP
    """
    plt = _pyplot()
    moved = [s for s in shifts if s.shift != 0 or abs(s.confidence_post - s.confidence_pre) > 0.01]
    moved.sort(key=lambda s: (-abs(s.shift), -abs(s.confidence_post - s.confidence_pre)))
    moved = sorted(moved[:top], key=lambda s: (s.shift, s.confidence_post - s.confidence_pre))
    fig, ax = plt.subplots(figsize=(7.6, 1.3 + 0.28 * max(len(moved), 1)), dpi=110)
    if not moved:
        ax.text(0.5, 0.5, "no class changed", ha="center", va="center")
        ax.set_axis_off()
    else:
        y = np.arange(len(moved))
        acc = [100 * s.shift for s in moved]
        conf = [100 * (s.confidence_post - s.confidence_pre) for s in moved]
        ax.barh(y + 0.2, acc, height=0.4, color=["#c0392b" if v < 0 else "#1e8449" for v in acc],
                label="top-1 accuracy (points)")
        ax.barh(y - 0.2, conf, height=0.4, color="#7f8c8d", label="confidence (points)")
        ax.set_yticks(y, [f"{s.name} (n={s.n})" for s in moved], fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("after − before")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _top3(pred: Predictions, i: int, names: Sequence[str]) -> list[tuple[str, float]]:
    return [(names[int(c)], float(q)) for c, q in zip(pred.topk[i][:3], pred.topk_prob[i][:3])]


def write_report(out_dir: str | Path, classifier, evaluation: Evaluation, *, change_path: str | None = None,
                 examples: int = 12) -> dict[str, Path]:
    """Write ``evaluation.json``, the figures (``roc_*.png``, ``class_shifts*.png``) and ``index.html``.

    The page opens with the headline numbers, then the four tests (with a target), errors corrected, the
    ROC curves, the classes that moved most, and up to ``examples`` images whose top-1 the change flipped.
    Every file is written atomically. Returns the paths by name.

    Example::

        >>> paths = write_report("rulewriter-eval", clf, ev)     # doctest: +SKIP
        >>> paths["html"]                                        # doctest: +SKIP
        PosixPath('rulewriter-eval/index.html')
    """
    from ..atomic import atomic_bytes
    from .report import (card, data_table, figure, html_page, paragraph, prediction_table, save_figure,
                         section, write_html)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RulewriterError(f"{out} exists and is not a folder")
    names = classifier.labels
    ev = evaluation
    data = ev.to_dict(names)
    data["model"] = classifier.describe()
    data["change"] = change_path
    paths: dict[str, Path] = {}
    paths["json"] = atomic_bytes(out / "evaluation.json", (json.dumps(data, indent=1, default=str) + "\n").encode())

    # figures
    figs: list[tuple[str, Path]] = []
    positive = "target" if ev.target else "correct"
    for kind, curves in ev.rocs().items():
        if any(c is not None for c in curves.values()):
            what = "target vs rest" if ev.target else "correct vs wrong, by top-1 probability"
            p = save_figure(out / f"roc_{kind}.png", plot_roc(curves, f"{ev.name}: {kind} images\n({what})",
                                                              positive=positive))
            paths[f"roc_{kind}"] = p
            figs.append((f"ROC, {kind} images", p))
    if ev.edited:
        for kind in ev.predictions:
            p = save_figure(out / f"class_shifts_{kind}.png",
                            plot_class_shifts(ev.class_shifts(kind, names), f"{ev.name}: {kind} images"))
            paths[f"class_shifts_{kind}"] = p
            figs.append((f"per-class shifts, {kind} images", p))

    # page
    sections = []
    head = []
    for kind in ev.predictions:
        s = ev.summary(kind)
        if ev.edited:
            rows = [[m, percent(s[m]["top1"]), percent(s[m]["top5"]), f"{s[m]['confidence']:.3f}"]
                    for m in ("before", "after")]
            sub = f"{s['n_images']} images; top-1 changed on {s['changed_top1']}"
        else:
            rows = [["model", percent(s["top1"]), percent(s["top5"]), f"{s['confidence']:.3f}"]]
            sub = f"{s['n_images']} images"
        head.append(card(f"{kind} images", [data_table(["", "top-1", "top-5", "confidence"], rows)], subtitle=sub))
    intro = [f"Model {classifier.name}; test set {ev.name}."]
    if change_path:
        intro.append(f"Change: {change_path} (applied in memory; no weights were written).")
    if ev.target:
        intro.append("Target: " + ", ".join(names[c] if c < len(names) else str(c) for c in sorted(ev.target)))
    sections.append(section("Summary", head, intro=intro))
    if ev.edited and ev.target:
        rows = [[_TEST_TITLES[k], t.n, percent(t.accuracy_pre), percent(t.accuracy_post),
                 "—" if t.confidence_pre is None else f"{t.confidence_pre:.3f}",
                 "—" if t.confidence_post is None else f"{t.confidence_post:.3f}"]
                for k, t in ev.four_tests.items()]
        sections.append(section("The four tests (thesis Table 2.1)", [card("accuracy and confidence", [
            data_table(["test", "n", "accuracy pre", "accuracy post", "confidence pre", "confidence post"], rows)],
            wide=True)]))
    if ev.edited:
        rows = []
        for kind, e in ev.errors().items():
            for ref, v in (("ground truth", e["ground_truth"]), ("pre-edit prediction", e["pre_edit_prediction"])):
                rows.append([kind, ref, f"{v['corrected']}/{v['n_errors_before']}", percent(v["fraction"]),
                             f"{v['introduced']}/{v['n_right_before']}", percent(v["introduced_fraction"])])
        sections.append(section("Errors corrected and introduced", [card("per image kind and reference", [
            data_table(["images", "w.r.t.", "corrected", "share", "introduced", "share"], rows)], wide=True)],
            intro="Errors corrected: among images the unedited model gets wrong, the share the edited model gets "
                  "right. Introduced: among images it gets right, the share the edited model gets wrong."))
    sections.append(section("Figures", [card(t, [figure(p, t)]) for t, p in figs]))
    if ev.edited:
        shifts = ev.class_shifts("normal", names)
        worst = [s for s in shifts if s.shift < 0][:10]
        best = [s for s in reversed(shifts) if s.shift > 0][:10]
        rows = [[s.name, s.n, percent(s.accuracy_pre), percent(s.accuracy_post), f"{100 * s.shift:+.1f}"]
                for s in worst + best]
        if rows:
            sections.append(section("Classes that moved most", [card("most hurt, then most helped", [
                data_table(["class", "n", "accuracy pre", "accuracy post", "shift (points)"], rows)], wide=True)]))
        p = ev.predictions["normal"]
        flipped = np.flatnonzero(p["before"].top1 != p["after"].top1)[:examples]
        cards = []
        for i in flipped:
            src = ev.sources[i]
            parts = []
            if Path(src).is_file():
                img = load_source(src)
                parts.append(figure(classifier.preprocess.denormalize(classifier.preprocess.image(img)),
                                    Path(src).name, max_side=224))
            parts.append(prediction_table(_top3(p["before"], i, names), _top3(p["after"], i, names)))
            cards.append(card(_label_name(ev.labels[i], names, ev.groups), parts, subtitle="ground truth"))
        sections.append(section("Images whose top-1 changed", cards,
                                intro=[f"{len(np.flatnonzero(p['before'].top1 != p['after'].top1))} images changed; "
                                       f"the first {len(cards)} are shown."] if cards else ["No top-1 changed."]))
    sections.append(section("Files", body=[paragraph(f"All numbers: {paths['json'].name}. Figures: "
                                                     + ", ".join(p.name for _, p in figs) + ".", cls="muted")]))
    paths["html"] = write_html(out / "index.html", html_page(f"rulewriter evaluation: {ev.name}", sections))
    return paths
