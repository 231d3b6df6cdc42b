"""The numbers an edit is judged by: predictions kept small, accuracy, the four tests, errors corrected, ROC, per-class shifts.

These are the measurements of Sections 2.2.2–2.2.3 and 2.3.3–2.3.4 of the thesis, computed exactly from
:class:`Predictions` (top-k and two probability masses per image); :mod:`rulewriter.studies.evaluate`
makes the predictions and :mod:`rulewriter.studies.evaluation_report` draws them.

Example::

    >>> p = Predictions.from_logits(torch.tensor([[2., 1, 0], [0, 1, 2]]), [0, 1], k=2)
    >>> accuracy(p, [0, 1])
    0.5


Definitions (used everywhere below, and in the JSON):

* **ground truth** of an image: a class, or a *set* of classes any of which counts as right (the car photos
  of the wheel experiment are right when called any car class). An empty set (or -1) is the thesis's
  "noise" label: nothing is right.
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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ..errors import RulewriterError

__all__ = [
    "FOUR_TESTS",
    "TEST_TITLES",
    "ClassShift",
    "Label",
    "Predictions",
    "RocCurve",
    "TestScores",
    "accuracy",
    "as_label_sets",
    "class_shifts",
    "errors_corrected",
    "four_tests",
    "label_name",
    "roc",
    "summarize",
    "target_set",
]

Label = Union[int, Iterable[int]]
FOUR_TESTS = ("normal_same", "normal_other", "manipulated_same", "manipulated_other")
#: The four tests' titles in reports, by key of :data:`FOUR_TESTS`.
TEST_TITLES = {
    "normal_same": "Normal (same class)",
    "normal_other": "Normal (other classes)",
    "manipulated_same": "Manipulated (same class)",
    "manipulated_other": "Manipulated (other classes)",
}


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


def label_name(s: frozenset[int], class_names: Sequence[str] | None, groups: Mapping[frozenset[int], str]) -> str:
    """A ground truth as reports show it: its group's name, ``"noise"``, a class name, or a short set of them.

    Example::

        >>> label_name(frozenset({1}), ["cat", "dog"], {}), label_name(frozenset(), None, {})
        ('dog', 'noise')
    """
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
        out.append(ClassShift(s, label_name(s, class_names, groups or {}), len(idx), float(ok_b[i].mean()),
                              float(ok_a[i].mean()), float(before.label_prob[i].mean()),
                              float(after.label_prob[i].mean())))
    out.sort(key=lambda c: (c.shift, c.confidence_post - c.confidence_pre, c.name))
    return out
