"""Baselines for a new class, and how any new class is scored (thesis Sections 4.1.4 and 4.2).

The baselines are a new row of the final linear layer: a random vector (:func:`random_vector`), the class
feature vector of the masked example (:func:`class_feature_vector`) or the compositional vector, the sum of
part vectors from masked parts in other images (:func:`compositional_vector`); :func:`vector_class`
calibrates any of them like the filter. :func:`evaluate` gives the class-size-weighted ROC AUC of a new
class against all others (:func:`weighted_roc_auc`), the ROC curve, and the operating point.

Example::

    neg = collect_features(clf, paths, None, head=True)
    base = vector_class(clf, class_feature_vector(clf, "car.jpg", "car.png"), neg)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import EditError, LayerError, MaskError
from ..core.rules import as_image
from ..core.trace import Trace, get_module
from .class_filter import DEFAULT_FPR, Features, ImageLike, MaskLike, calibrate, head_layers
from .newclass import NewClass

__all__ = [
    "random_vector",
    "class_feature_vector",
    "compositional_vector",
    "vector_class",
    "class_size_weights",
    "roc_curve",
    "weighted_roc_auc",
    "evaluate",
]


# ------------------------------------------------------------------------------------------ baselines
def random_vector(dim: int, seed: int = 0) -> torch.Tensor:
    """Section 4.1.4's first baseline: final-layer weights drawn from a standard normal (float64).

    Example::

        >>> random_vector(4, seed=0).shape
        torch.Size([4])
    """
    return torch.randn(int(dim), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


@torch.no_grad()
def _masked_head_features(classifier, image: ImageLike, mask: MaskLike) -> torch.Tensor:
    """The mask-weighted mean of the feature map that the final layer pools, (D,) float64."""
    from ..concepts.keys import concept_key
    from ..concepts.masks import mask_to_grid
    from ..core.rules import prepare_mask

    pool, fc = head_layers(classifier.model)
    img = as_image(image)
    m = prepare_mask(classifier, mask, img)
    with Trace(classifier.model, pool, retain_output=False, stop=True) as t:
        t(classifier.preprocess.batch([img]).to(classifier.device, classifier.dtype))
    fmap = t.input.double().cpu()
    d = get_module(classifier.model, fc).in_features
    if fmap.dim() != 4 or fmap.shape[1] != d:
        raise LayerError(f"the map pooled by {pool!r} has shape {tuple(fmap.shape)} but {fc!r} reads {d} features; "
                         "final-layer baselines need global average pooling straight into the last linear layer")
    return concept_key(fmap, mask_to_grid(m, fmap.shape[2:])[None])


def class_feature_vector(classifier, image: ImageLike, mask: MaskLike) -> torch.Tensor:
    """Section 4.1.4's second baseline: the normalised feature vector of the masked example.

    The feature map that the network pools into its final layer, averaged under the silhouette.

    Example::

        >>> v = class_feature_vector(clf, "car.jpg", "car.png")      # doctest: +SKIP
        >>> float(v.norm())                                          # doctest: +SKIP
        1.0
    """
    v = _masked_head_features(classifier, image, mask)
    return v / v.norm().clamp_min(1e-12)


def compositional_vector(classifier, images: Sequence[ImageLike], masks: Sequence[MaskLike]) -> torch.Tensor:
    """Section 4.1.4's third baseline: the sum of the feature vectors of masked parts, normalised.

    Each part (a wheel, a windshield, a hood…) comes masked in its own image, typically other images
    than the example; the part vectors are added in feature space and the sum is normalised.

    Example::

        >>> v = compositional_vector(clf, ["a.jpg", "b.jpg"], ["wheel.png", "hood.png"])   # doctest: +SKIP
    """
    if len(images) != len(masks) or not images:
        raise MaskError(f"need one mask per part image; got {len(images)} images and {len(masks)} masks")
    v = sum(_masked_head_features(classifier, i, m) for i, m in zip(images, masks))
    return v / v.norm().clamp_min(1e-12)


def vector_class(
    classifier, vector: torch.Tensor, negatives: Features, *, name: str = "new class", fpr: float = DEFAULT_FPR,
    meta: dict | None = None,
) -> NewClass:
    """A new class whose final-layer weights are ``vector`` (a baseline), calibrated on ``negatives``.

    ``negatives`` must be recorded with ``head=True``; all of them calibrate (nothing is trained).

    Example::

        >>> neg = collect_features(clf, paths, None, head=True)                 # doctest: +SKIP
        >>> base = vector_class(clf, class_feature_vector(clf, img, m), neg)    # doctest: +SKIP
    """
    fc = head_layers(classifier.model)[1]
    v = torch.as_tensor(vector, dtype=torch.float64).reshape(1, -1)
    new = NewClass(str(name), "vector", fc, v, torch.zeros(1, dtype=torch.float64), "none", 1.0, 0.0,
                   dict(meta or {}))
    cal = calibrate(new.scores(classifier.model, negatives), negatives.logits.amax(1), fpr)
    new.scale, new.shift = cal.scale, cal.shift
    new.meta.update({"model": classifier.name, "weights": classifier.weights_id, "calibration": cal.describe()})
    return new


# ------------------------------------------------------------------------------------------ evaluation
def class_size_weights(groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Per-sample weights ``1 / size of its group``, so that every class counts the same.

    Example::

        >>> class_size_weights(["a", "a", "b"]).tolist()
        [0.5, 0.5, 1.0]
    """
    g = np.asarray(groups)
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


def roc_curve(scores, labels, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted ROC curve: ``(fpr, tpr, thresholds)``, from (0, 0) to (1, 1), one point per distinct score.

    ``labels`` are 1 for the new class and 0 for all others. Tied scores form one step (a diagonal segment).

    Example::

        >>> fpr, tpr, _ = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (s.shape == y.shape == w.shape):
        raise EditError(f"scores, labels and weights differ in length: {s.shape}, {y.shape}, {w.shape}")
    if not np.isfinite(s).all():
        raise EditError("scores contain NaN or inf")
    pos, neg = float(w[y].sum()), float(w[~y].sum())
    if pos <= 0 or neg <= 0:
        raise EditError("a ROC curve needs positive and negative examples")
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each run of tied scores
    tp = np.cumsum(w * y)[last]
    fp = np.cumsum(w * ~y)[last]
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, s[last]]


def weighted_roc_auc(scores, labels, groups=None) -> float:
    """ROC AUC of the new class against all others, each sample weighted by 1 / its class's size.

    ``groups`` names each sample's class (the original class of each negative); positives form one
    group. Without ``groups`` every negative counts the same. Equals the probability that a positive
    outscores a negative (ties count half), with each class weighted equally (Section 4.1.4).

    Example::

        >>> weighted_roc_auc([0.9, 0.8, 0.1, 0.7], [1, 1, 0, 0])
        1.0
    """
    y = np.asarray(labels).ravel().astype(bool)
    if groups is None:
        w = np.where(y, 1.0 / max(int(y.sum()), 1), 1.0 / max(int((~y).sum()), 1))
    else:
        g = np.asarray(groups, dtype=object).ravel()
        g = np.where(y, "__new_class__", g.astype(str))
        w = class_size_weights(g)
    fpr, tpr, _ = roc_curve(scores, y, w)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def evaluate(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, *, new_index: int = -1, neg_groups: Sequence[Any] | None = None,
    score: str = "softmax",
) -> dict[str, Any]:
    """AUC, ROC curve and the operating point of a new class, from the extended model's logits.

    Args:
        pos_logits: (P, K+1) logits of images of the new class.
        neg_logits: (N, K+1) logits of images of other classes.
        new_index: the new class's column.
        neg_groups: each negative's original class, for class-size weights.
        score: ``"softmax"`` ranks by the new class's probability (what the extended classifier says),
            ``"logit"`` by its logit alone.

    Returns:
        ``auc``, ``roc`` (fpr, tpr lists), ``tp``/``fp`` (images whose top-1 is the new class), ``n_pos``,
        ``n_neg``, ``tpr_at_op``, ``fpr_at_op``.

    Example::

        >>> r = evaluate(torch.tensor([[0., 3.]]), torch.tensor([[2., 0.], [1., 0.]]))
        >>> r["auc"], r["tp"], r["fp"]
        (1.0, 1, 0)
    """
    lp, ln = pos_logits.double(), neg_logits.double()
    k = lp.shape[1]
    j = new_index % k

    def s(z: torch.Tensor) -> np.ndarray:
        return (torch.log_softmax(z, 1)[:, j] if score == "softmax" else z[:, j]).numpy()

    if score not in ("softmax", "logit"):
        raise EditError(f"score must be 'softmax' or 'logit', got {score!r}")
    scores = np.r_[s(lp), s(ln)]
    labels = np.r_[np.ones(len(lp)), np.zeros(len(ln))]
    groups = None if neg_groups is None else np.r_[np.array(["__pos__"] * len(lp), dtype=object),
                                                   np.asarray(list(neg_groups), dtype=object)]
    auc = weighted_roc_auc(scores, labels, groups)
    w = None if groups is None else class_size_weights(np.where(labels > 0, "__pos__", groups.astype(str)))
    fpr, tpr, _ = roc_curve(scores, labels, w)
    tp = int((lp.argmax(1) == j).sum())
    fp = int((ln.argmax(1) == j).sum())
    return {"auc": auc, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "tp": tp, "fp": fp,
            "n_pos": len(lp), "n_neg": len(ln), "tpr_at_op": tp / max(len(lp), 1), "fpr_at_op": fp / max(len(ln), 1)}
