"""Add a new class to a pretrained classifier from one image (thesis Chapter 4, eqs. 4.1–4.4).

A *class-specific filter* is one extra output channel at a conv layer, trained to light up on the new
class's silhouette in a single example photo and to stay dark on negative photos; a new logit reads only
that filter and is appended to the model's output. Nothing else in the network changes: the original
classes' logits stay bit-for-bit identical on every input.

A tour::

    from rulewriter import load_classifier
    from rulewriter.extensions.newclass import NewClass, add_class

    clf = load_classifier("efficientnet-lite0")
    car = add_class(clf, "car.jpg", "car_silhouette.png", "photos-without-cars/", name="car")
    with car.applied(clf) as ext:              # ext: the same network with 1001 outputs and labels
        print(ext.predict(ext.preprocess.batch([img]), topk=3))
    car.save("car.safetensors")                # safetensors + car.safetensors.json
    car = NewClass.load("car.safetensors")
    handle = car.apply(clf)                    # hooks on clf.model; handle.classifier has the new label
    handle.remove()

From the command line::

    rulewriter add-class --model efficientnet-lite0 --image car.jpg --mask car.png --negatives DIR \\
                         --name car --out car.safetensors
    rulewriter predict --model efficientnet-lite0 --edit car.safetensors photo.jpg

How it works
------------
* **The filter (eqs. 4.2–4.4).** At a groups=1 conv layer with weights ``W0`` (f × c × m × n) the layer
  becomes ``W1 = [W0; w]`` with f+1 filters (:meth:`NewClass.extended_parameters`). Only ``w`` (and its
  bias) is trained, by binary cross-entropy of ``σ(w * X)``: towards the positive example's silhouette
  ``Y[p]`` (the mask area-averaged onto the layer's output grid) and, with weight λ, towards zero on each
  negative::

      J(w) = BCE(w * X[p] ‖ Y[p]) + λ Σᵢ BCE(w * Xᵢ[n] ‖ 0) + (μ/2) κ ‖w‖²                    (eq. 4.4)

  Each BCE is the mean over the grid. The last term is not in the thesis: with one image and hundreds of
  key dimensions the data are linearly separable, so eq. 4.4 alone has no finite minimiser and the
  answer would depend on when gradient descent stops. A ridge relative to the keys' mean energy κ (the
  same ``1e-3`` of the mean energy that :data:`rulewriter.core.edit.DEFAULT_RIDGE` uses for rule edits) makes
  the problem strictly convex; L-BFGS then solves it to convergence, so no learning rate or step count
  needs tuning. ``λ=None`` (the default) is ``1/N``: the N negatives together weigh as much as the one
  positive.
* **Negatives.** The pool of negative photos is split in two by position. From the first half,
  ``"mined"`` (Section 4.1.3) trains on the positive alone, adds the top-scoring images (the worst false
  positives), retrains, and repeats; ``"random"`` draws the same number at random. The second half,
  which the filter never sees, calibrates the logit.
* **The new logit** reads only the new filter: its response map (in logit units, before the sigmoid) is
  pooled (``max``, ``mean``, ``lse`` = log-mean-exp or ``area`` = mean of σ) to a score ``s``, and
  ``logit = a·s + b``. The calibration principle (:func:`calibrate`): on held-out negative images, ``a``
  makes the spread of ``a·s`` equal the spread of the existing classes' largest logit (ratio of
  interquartile ranges), so the new logit moves on the same scale as those it competes with; ``b`` sets
  the operating point so that the new class wins the argmax on exactly a fraction ``fpr`` of them.
* **Baselines** (Section 4.1.4): a new row of the final linear layer, the weights being a random vector
  (:func:`random_vector`), the class feature vector of the masked example (:func:`class_feature_vector`)
  or the compositional vector, the sum of part vectors from masked parts in other images
  (:func:`compositional_vector`); :func:`vector_class` calibrates any of them the same way.
* **Evaluation**: :func:`evaluate` gives the class-size-weighted ROC AUC of the new class against all
  others (:func:`weighted_roc_auc`), the ROC curve, and the true and false positives at the operating
  point (where the new class wins the argmax).

The added class is a hook-based addition: hooks on the chosen layer and on the model compute the new
channel from the layer's input and append the logit; they never modify a tensor the network computes. So
an :class:`~rulewriter.core.edit.Edit` applies to the same model, by the same layer names, before or after it.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import EditError, ImageLoadError, LayerError, MaskError, RulewriterError
from ..core.memory import LayerMemory
from ..core.stats import load_described, save_described
from ..core.trace import Trace, get_module

__all__ = [
    "FORMAT",
    "POOLS",
    "DEFAULT_FPR",
    "DEFAULT_WEIGHT_DECAY",
    "Features",
    "FilterFit",
    "Calibration",
    "NewClass",
    "AttachedClass",
    "collect_features",
    "silhouette_target",
    "pool_map",
    "train_filter",
    "fit_filter",
    "calibrate",
    "add_class",
    "head_layers",
    "random_vector",
    "class_feature_vector",
    "compositional_vector",
    "vector_class",
    "class_size_weights",
    "roc_curve",
    "weighted_roc_auc",
    "evaluate",
    "is_new_class_file",
    "add_cli",
]

FORMAT = "rulewriter.extensions.newclass/1"
#: How the filter's response map becomes one score: the strongest location, the average, a smooth
#: maximum (log-mean-exp, in logit units) or the predicted silhouette area (mean of the sigmoid).
POOLS = ("max", "mean", "lse", "area")
#: The fraction of negative images the new class may win by default. One in a hundred: the new class
#: then costs the existing classes at most about one point of top-1 accuracy.
DEFAULT_FPR = 0.01
#: Ridge on the filter relative to the keys' mean energy; the same fraction as rule edits use.
DEFAULT_WEIGHT_DECAY = 1e-3
CALIBRATION_PRINCIPLE = (
    "logit = a*s + b; on held-out negatives a = IQR(max existing logit) / IQR(s) and b puts the new class "
    "on top of the argmax for a fraction fpr of them"
)

ImageLike = str | Path | Image.Image
MaskLike = str | Path | np.ndarray | Image.Image | torch.Tensor


# ------------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """What the new class needs from each image, recorded in one forward pass.

    ``x``: the chosen layer's input (N, c, H, W), or None when no layer was traced; ``logits``: the
    classifier's logits (N, K); ``head``: the input of the final linear layer (N, D), or None; ``names``:
    where each image came from. Build with :func:`collect_features`; index with :meth:`subset`.
    """

    layer: str | None
    x: torch.Tensor | None
    logits: torch.Tensor
    head: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "Features":
        """The features of the images ``idx`` (in that order)."""
        i = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
        pick = (lambda t: None if t is None else t[i])  # noqa: E731
        names = [self.names[j] for j in i.tolist()] if self.names else []
        return Features(self.layer, pick(self.x), self.logits[i], pick(self.head), names)

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        """Concatenate features recorded at the same layer."""
        if not parts:
            raise EditError("nothing to concatenate")
        if len({p.layer for p in parts}) != 1:
            raise EditError("features recorded at different layers cannot be concatenated")
        cat = (lambda ts: None if any(t is None for t in ts) else torch.cat(ts))  # noqa: E731
        return Features(parts[0].layer, cat([p.x for p in parts]), torch.cat([p.logits for p in parts]),
                        cat([p.head for p in parts]), [n for p in parts for n in p.names])


def _load_image(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    from ..models.data import load_image

    return load_image(img)


def _describe(src: object) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def head_layers(model: nn.Module) -> tuple[str, str]:
    """``(pool, fc)``: the names of the global pooling and the final linear layer of a GAP classifier.

    The baselines of Section 4.1.4 are rows of the final layer ``fc``, read on the feature map that goes
    into ``pool``. Raises :class:`~rulewriter.errors.LayerError` for a model without both.

    Example::

        >>> head_layers(load_classifier("efficientnet-lite0").model)      # doctest: +SKIP
        ('_avg_pooling', '_fc')
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    pools = [n for n, m in model.named_modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))]
    if not linears or not pools:
        raise LayerError(
            f"{type(model).__name__} has no {'final linear layer' if not linears else 'average pooling layer'}; "
            "final-layer baselines need a global-average-pooling head (conv features → avgpool → linear)"
        )
    return pools[-1], linears[-1]


@torch.no_grad()
def collect_features(
    classifier,
    images: Sequence[ImageLike],
    layer: str | None,
    *,
    head: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> Features:
    """Run ``images`` through the classifier once; keep ``layer``'s input, the logits and the head input.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier` (with any edits or added classes applied
            that the new class should see and compete with).
        images: paths or PIL images.
        layer: the conv layer whose input the new filter reads (None: do not record one).
        head: also record the input of the final linear layer (for :func:`vector_class`).
        batch_size: images per forward pass.

    Example::

        >>> feats = collect_features(clf, ["a.jpg", "b.jpg"], "_blocks.15._project_conv")   # doctest: +SKIP
        >>> feats.x.shape, feats.logits.shape                                              # doctest: +SKIP
        (torch.Size([2, 1152, 7, 7]), torch.Size([2, 1000]))
    """
    from tqdm.auto import tqdm

    images = list(images)
    if not images:
        raise ImageLoadError("no images given")
    model = classifier.model
    fc = head_layers(model)[1] if head else None
    xs: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    for i in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        batch = classifier.preprocess.batch([_load_image(p) for p in images[i : i + batch_size]])
        with contextlib.ExitStack() as stack:
            tr = stack.enter_context(Trace(model, layer, retain_output=False)) if layer else None
            th = stack.enter_context(Trace(model, fc, retain_output=False)) if fc else None
            out = model(batch.to(classifier.device, classifier.dtype))
            if tr is not None:
                xs.append(tr.input.float().cpu())
            if th is not None:
                hs.append(th.input.float().reshape(batch.shape[0], -1).cpu())
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise EditError("the model must return (batch, classes) logits")
        logits.append(out.float().cpu())
    return Features(layer, torch.cat(xs) if xs else None, torch.cat(logits), torch.cat(hs) if hs else None,
                    [_describe(p) for p in images])


# ------------------------------------------------------------------------------------------ the filter
def _conv_memory(model: nn.Module, layer: str) -> LayerMemory:
    """The layer as a view-2 memory (checks groups=1 and the padding), refusing Linear layers."""
    module = get_module(model, layer)
    mem = LayerMemory(module, view=2, name=layer)  # raises a clear LayerError for depthwise/grouped convs
    if mem.kind != "conv":
        raise LayerError(
            f"layer {layer!r} is a {type(module).__name__}; a class-specific filter needs a conv layer with a "
            "spatial output to match the silhouette against"
        )
    return mem


def _filter_response(mem: LayerMemory, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
    """The new channel ``w * X + b`` (eq. 4.2, its last filter) as an (N, h, w) map, with the layer's padding."""
    w = weight.to(x.dtype).to(x.device)
    b = bias.to(x.dtype).to(x.device)
    out = [F.conv2d(mem._pad(x[i : i + batch_size]), w, b, stride=mem.stride, dilation=mem.dilation)[:, 0]
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0, 1, 1)


def pool_map(z: torch.Tensor, how: str) -> torch.Tensor:
    """Pool a filter response map (N, h, w) in logit units to one score per image.

    ``max``: the strongest location (presence, whatever the object's size); ``mean``: the average, as the
    network's own global average pooling does; ``lse``: log-mean-exp, a smooth maximum; ``area``: the mean
    of σ(z), the fraction of the grid predicted to be the class.

    Example::

        >>> pool_map(torch.tensor([[[0., 2.], [0., 0.]]]), "max")
        tensor([2.])
    """
    if how not in POOLS:
        raise EditError(f"unknown pool {how!r}; choose from {', '.join(POOLS)}")
    flat = z.reshape(z.shape[0], -1)
    if how == "max":
        return flat.amax(1)
    if how == "mean":
        return flat.mean(1)
    if how == "lse":
        return torch.logsumexp(flat, 1) - math.log(flat.shape[1])
    return torch.sigmoid(flat).mean(1)


def silhouette_target(
    classifier, layer: str, image: ImageLike, mask: MaskLike, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """``Y[p]``: the silhouette mask, cropped like the image and area-averaged onto ``layer``'s output grid.

    ``grid`` is the layer's output grid (h, w); when omitted, one blank image runs up to the layer to find it.
    Raises :class:`~rulewriter.errors.MaskError` for an empty mask, a mask of another aspect ratio than
    its image, or a mask that covers no location of the grid.

    Example::

        >>> silhouette_target(clf, "_blocks.15._project_conv", "car.jpg", "car.png").shape   # doctest: +SKIP
        torch.Size([7, 7])
    """
    from ..concepts.masks import mask_to_grid
    from ..core.rules import prepare_mask

    img = _load_image(image)
    m = prepare_mask(classifier, mask, img)
    if grid is None:
        mem = _conv_memory(classifier.model, layer)
        with torch.no_grad(), Trace(classifier.model, layer, stop=True, retain_output=False) as t:
            s = classifier.preprocess.size
            t(torch.zeros(1, 3, s, s, device=classifier.device, dtype=classifier.dtype))
        x = torch.zeros(1, mem.c, *t.input.shape[2:])
        grid = tuple(_filter_response(mem, x, torch.zeros(1, mem.c, *mem.kernel), torch.zeros(1)).shape[1:])
    return mask_to_grid(m, grid)


@dataclass
class FilterFit:
    """A trained class-specific filter: ``weight`` (1, c, m, n), ``bias`` (1,), and the loss history.

    ``history`` holds one value per L-BFGS iteration for ``total`` (J of eq. 4.4 plus the ridge),
    ``positive`` (the positive BCE), ``negative`` (Σᵢ BCE of the negatives, before λ) and ``ridge``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    history: dict[str, list[float]]
    lam: float
    n_negatives: int


def train_filter(
    mem: LayerMemory,
    x_pos: torch.Tensor,
    target: torch.Tensor,
    x_neg: torch.Tensor | None = None,
    *,
    lam: float | None = None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    steps: int = 100,
    tol: float = 1e-9,
) -> FilterFit:
    """Minimise eq. 4.4 (plus a relative ridge) over one new filter, by L-BFGS in float64.

    Args:
        mem: the layer, as ``LayerMemory(module, view=2)`` (its geometry and padding are used).
        x_pos: the positive example's layer input, (1, c, H, W) or (c, H, W).
        target: ``Y[p]``, the silhouette on the layer's output grid (h, w), values in [0, 1].
        x_neg: the negatives' layer inputs (N, c, H, W), or None / empty for the positive alone.
        lam: λ of eq. 4.4; None means ``1/N`` (the negatives together weigh as much as the positive).
        weight_decay: μ, the ridge relative to the keys' mean energy κ.
        steps: at most this many L-BFGS iterations; it stops earlier when J changes by less than ``tol``.

    Returns:
        a :class:`FilterFit`.

    Example::

        >>> fit = train_filter(LayerMemory(conv), x_pos, y_pos, x_neg, lam=0.05)   # doctest: +SKIP
        >>> fit.history["total"][-1] < fit.history["total"][0]                    # doctest: +SKIP
        True
    """
    x_pos = x_pos[None] if x_pos.dim() == 3 else x_pos
    if x_pos.shape[0] != 1:
        raise EditError(f"one positive example, got {x_pos.shape[0]}")
    n_neg = 0 if x_neg is None else int(x_neg.shape[0])
    lam_v = (1.0 / n_neg if n_neg else 0.0) if lam is None else float(lam)
    if lam_v < 0 or not math.isfinite(lam_v):
        raise EditError(f"λ must be a finite number >= 0, got {lam}")
    if weight_decay < 0:
        raise EditError(f"weight_decay must be >= 0, got {weight_decay}")
    kp = mem.keys(x_pos.double())[0]  # (d, h, w): the unfolded patch each output location reads
    if tuple(target.shape) != tuple(kp.shape[1:]):
        raise MaskError(f"the target is {tuple(target.shape)} but the layer's output grid is {tuple(kp.shape[1:])}")
    y_pos = target.double().to(kp.device).reshape(-1)
    if float(y_pos.max()) <= 0:
        raise MaskError("the silhouette covers no location of the layer's output grid")
    n_loc = y_pos.numel()
    rows = [kp.reshape(kp.shape[0], -1).T]  # (L, d)
    use_neg = n_neg > 0 and lam_v > 0
    if use_neg:
        kn = mem.keys(x_neg.double())
        rows.append(kn.permute(0, 2, 3, 1).reshape(-1, kn.shape[1]))
    k = torch.cat(rows)  # every training location, one key per row
    y = torch.cat([y_pos, y_pos.new_zeros(k.shape[0] - n_loc)])
    is_pos = torch.arange(k.shape[0]) < n_loc
    # Each BCE of eq. 4.4 is a mean over its image's grid; λ weighs each negative image.
    omega = torch.where(is_pos, 1.0 / n_loc, lam_v / n_loc).double()
    kappa = float(k.pow(2).sum(1).mean())  # mean key energy: makes μ independent of the keys' scale
    mu = float(weight_decay) * kappa

    def terms(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row BCE, the positive term, the (unweighted) sum of negative BCEs, the ridge."""
        z = k @ v[:-1] + v[-1]
        bce = F.softplus(z) - y * z
        pos = bce[is_pos].mean()
        neg = bce[~is_pos].sum() / n_loc
        return z, pos, neg, 0.5 * mu * (v[:-1] @ v[:-1])

    def loss_grad(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        z, pos, neg, ridge = terms(v)
        r = omega * (torch.sigmoid(z) - y)  # d(loss)/dz, analytic: no autograd needed for logistic loss
        g = torch.cat([k.T @ r + mu * v[:-1], r.sum()[None]])
        return float(pos + lam_v * neg + ridge), g

    history: dict[str, list[float]] = {"total": [], "positive": [], "negative": [], "ridge": []}

    def record(v: torch.Tensor) -> None:
        _, pos, neg, ridge = terms(v)
        history["positive"].append(float(pos))
        history["negative"].append(float(neg))
        history["ridge"].append(float(ridge))
        history["total"].append(float(pos + lam_v * neg + ridge))

    v = _lbfgs(loss_grad, torch.zeros(k.shape[1] + 1, dtype=torch.float64), int(steps), float(tol), record)
    if not torch.isfinite(v).all():
        raise EditError("training the filter diverged (NaN or inf); raise weight_decay")
    weight = v[:-1].reshape(1, mem.c, *mem.kernel).clone()
    return FilterFit(weight, v[-1:].clone(), history, lam_v, n_neg if use_neg else 0)


def _lbfgs(
    loss_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    x: torch.Tensor,
    steps: int,
    tol: float,
    record: Callable[[torch.Tensor], None],
    memory: int = 10,
) -> torch.Tensor:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    Not ``torch.optim.LBFGS``: that imports torch's compiler stack (seconds), and the logistic loss has an
    analytic gradient. ``record(x)`` is called at the start and after every iteration.
    """
    f, g = loss_grad(x)
    record(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(steps):
        q = g.clone()
        alphas = []
        for s, yv, rho in reversed(pairs):
            a = rho * float(s @ q)
            q -= a * yv
            alphas.append(a)
        if pairs:
            s, yv, _ = pairs[-1]
            q *= float(s @ yv) / float(yv @ yv)
        else:
            q /= max(float(g.norm()), 1e-12)  # a first step of unit length
        for (s, yv, rho), a in zip(pairs, reversed(alphas)):
            q += s * (a - rho * float(yv @ q))
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: forget the curvature pairs
            pairs, d, slope = [], -g / max(float(g.norm()), 1e-12), -float(g.norm())
        t = 1.0
        while True:
            f_new, g_new = loss_grad(x + t * d)
            if f_new <= f + 1e-4 * t * slope or t < 1e-14:
                break
            t *= 0.5
        if t < 1e-14:
            break
        s = t * d
        yv = g_new - g
        sy = float(s @ yv)
        if sy > 1e-18:
            pairs = (pairs + [(s, yv, 1.0 / sy)])[-memory:]
        x, g, f_old, f = x + s, g_new, f, f_new
        record(x)
        if abs(f_old - f) <= tol * max(1.0, abs(f)) or float(g.abs().max()) <= 1e-12:
            break
    return x


def fit_filter(
    mem: LayerMemory,
    x_pos: torch.Tensor,
    target: torch.Tensor,
    pool_x: torch.Tensor | None,
    *,
    mode: str = "mined",
    n_negatives: int = 15,
    rounds: int = 3,
    lam: float | None = None,
    pool: str = "max",
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    steps: int = 100,
    seed: int = 0,
) -> tuple[FilterFit, list[int], list[FilterFit]]:
    """Choose negatives from a pool and train the filter on them (Section 4.1.3).

    ``mode="mined"``: train on the positive alone, then ``rounds`` times add the top-scoring images of the
    pool not chosen yet (``n_negatives/rounds`` each, the worst false positives of the current filter)
    and retrain. ``mode="random"``: ``n_negatives`` images drawn at random, one training. ``mode="none"``
    or ``lam=0``: the positive alone.

    Returns ``(fit, chosen pool indices, the fit after each round)``.
    """
    if mode not in ("mined", "random", "none"):
        raise EditError(f"negatives mode must be 'mined', 'random' or 'none', got {mode!r}")
    if pool not in POOLS:
        raise EditError(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    n_pool = 0 if pool_x is None else int(pool_x.shape[0])
    n_negatives = min(int(n_negatives), n_pool)
    if mode == "none" or n_negatives <= 0 or (lam is not None and float(lam) == 0.0):
        fit = train_filter(mem, x_pos, target, None, lam=0.0, weight_decay=weight_decay, steps=steps)
        return fit, [], [fit]
    if mode == "random":
        g = torch.Generator().manual_seed(int(seed))
        chosen = sorted(torch.randperm(n_pool, generator=g)[:n_negatives].tolist())
        fit = train_filter(mem, x_pos, target, pool_x[chosen], lam=lam, weight_decay=weight_decay, steps=steps)
        return fit, chosen, [fit]
    rounds = max(1, min(int(rounds), n_negatives))
    per = [n_negatives // rounds + (1 if r < n_negatives % rounds else 0) for r in range(rounds)]
    fit = train_filter(mem, x_pos, target, None, lam=0.0, weight_decay=weight_decay, steps=steps)
    fits = [fit]
    chosen: list[int] = []
    for k in per:
        with torch.no_grad():
            s = pool_map(_filter_response(mem, pool_x, fit.weight, fit.bias), pool)
        if chosen:
            s[chosen] = -torch.inf
        chosen += torch.argsort(s, descending=True, stable=True)[:k].tolist()
        fit = train_filter(mem, x_pos, target, pool_x[chosen], lam=lam, weight_decay=weight_decay, steps=steps)
        fits.append(fit)
    return fit, chosen, fits


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """``logit = scale · s + shift``, with what it was derived from."""

    scale: float
    shift: float
    fpr: float
    realized_fpr: float
    n: int

    def describe(self) -> dict[str, Any]:
        return {"scale": self.scale, "shift": self.shift, "fpr": self.fpr, "realized_fpr": self.realized_fpr,
                "n": self.n, "principle": CALIBRATION_PRINCIPLE}


def _iqr(v: torch.Tensor) -> float:
    q = torch.quantile(v.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(q[1] - q[0])


def calibrate(scores: torch.Tensor, max_logits: torch.Tensor, fpr: float = DEFAULT_FPR) -> Calibration:
    """The affine map ``logit = a·s + b`` that lets a new class compete with the existing logits.

    On negative images (not used to train the filter): ``a = IQR(M) / IQR(s)``, where ``M`` is each
    image's largest existing logit, so the new logit varies on the same scale as the logits it competes
    with; ``b`` is the ``fpr`` quantile of ``M − a·s``, so the new class wins the argmax on a fraction
    ``fpr`` of them (at most: ties and the quantile round towards fewer). Both come from data; only
    ``fpr``, the false-positive rate a user accepts, is a choice.

    Example::

        >>> cal = calibrate(torch.randn(200), 10 + 2 * torch.randn(200), fpr=0.05)
        >>> 0 < cal.realized_fpr <= 0.05
        True
    """
    s, m = scores.double().flatten(), max_logits.double().flatten()
    if s.numel() != m.numel() or s.numel() < 2:
        raise EditError(f"calibration needs at least 2 negative images with scores and logits, got {s.numel()}")
    if not 0.0 < float(fpr) < 1.0:
        raise EditError(f"fpr must lie in (0, 1), got {fpr}")
    if not (torch.isfinite(s).all() and torch.isfinite(m).all()):
        raise EditError("calibration scores or logits contain NaN or inf")
    spread_s = _iqr(s) or float(s.std())
    spread_m = _iqr(m) or float(m.std())
    a = spread_m / spread_s if spread_s > 0 and spread_m > 0 else 1.0
    # The new class wins where a·s + b > M, i.e. where M − a·s < b. b sits halfway between the k-th and
    # the (k+1)-th smallest gap, k = ⌊fpr·n⌋: exactly k images win (fewer with ties), and the margin keeps
    # float32 rounding in the network from changing that count.
    gap = torch.sort(m - a * s).values
    k = int(math.floor(float(fpr) * gap.numel()))
    lo = gap[k - 1] if k > 0 else gap[0] - (gap[1] - gap[0])
    b = float((lo + gap[k]) / 2)
    realized = float(((a * s + b) > m).double().mean())
    return Calibration(float(a), b, float(fpr), realized, int(s.numel()))


# ------------------------------------------------------------------------------------------ the class
@dataclass
class NewClass:
    """One added class: a new filter at a conv layer (``kind="filter"``) or a new row of the final linear
    layer (``kind="vector"``, the baselines), and the calibrated logit that reads it.

    ``weight`` is (1, c, m, n) for a filter or (1, D) for a vector; ``bias`` is (1,). The new logit is
    ``scale · pool(w * X + b) + shift`` (filter) or ``scale · (w · h + b) + shift`` (vector, ``h`` the final
    layer's input).

    Example::

        >>> car = NewClass.load("car.safetensors")                       # doctest: +SKIP
        >>> with car.applied(clf) as ext:                                # doctest: +SKIP
        ...     ext.predict(ext.preprocess.batch([img]))[0][0]
        (1000, 'car', 0.91)
    """

    name: str
    kind: str
    layer: str
    weight: torch.Tensor
    bias: torch.Tensor
    pool: str
    scale: float
    shift: float
    meta: dict = field(default_factory=dict)
    #: The loss history of the training that made this filter (see :class:`FilterFit`); not saved.
    history: dict[str, list[float]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("filter", "vector"):
            raise EditError(f"kind must be 'filter' or 'vector', got {self.kind!r}")
        if not str(self.name).strip():
            raise EditError("the new class needs a non-empty name")
        want = 4 if self.kind == "filter" else 2
        if self.weight.dim() != want or self.weight.shape[0] != 1:
            raise EditError(f"a {self.kind} class needs a weight of shape (1, ...) with {want} dims, "
                            f"got {tuple(self.weight.shape)}")
        self.bias = self.bias.reshape(-1)
        if self.bias.numel() != 1:
            raise EditError(f"bias must hold one value, got {self.bias.numel()}")
        if self.kind == "filter" and self.pool not in POOLS:
            raise EditError(f"unknown pool {self.pool!r}; choose from {', '.join(POOLS)}")
        for nm, t in (("weight", self.weight), ("bias", self.bias)):
            if not torch.isfinite(t).all():
                raise EditError(f"{nm} contains NaN or inf")
        if not (math.isfinite(self.scale) and math.isfinite(self.shift)):
            raise EditError("calibration contains NaN or inf")

    # -------------------------------------------------------------- scores
    def _check_module(self, module: nn.Module) -> LayerMemory | None:
        if self.kind == "vector":
            if not isinstance(module, nn.Linear) or module.in_features != self.weight.shape[1]:
                raise EditError(f"class {self.name!r} reads a {self.weight.shape[1]}-dim input of linear layer "
                                f"{self.layer!r}, but that layer is {module}; it was made for another model")
            return None
        mem = LayerMemory(module, view=2, name=self.layer)
        if mem.kind != "conv" or (mem.c, *mem.kernel) != tuple(self.weight.shape[1:]):
            raise EditError(f"class {self.name!r} is a filter of shape {tuple(self.weight.shape[1:])} (c, m, n) for "
                            f"layer {self.layer!r}, which does not fit {module}; it was made for another model")
        return mem

    def score_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The raw score ``s`` (before calibration) from the layer's input ``x``."""
        mem = self._check_module(module)
        if mem is None:
            h = x.reshape(x.shape[0], -1)
            return h @ self.weight[0].to(h) + self.bias.to(h)
        return pool_map(_filter_response(mem, x, self.weight, self.bias), self.pool)

    def scores(self, model: nn.Module, feats: Features) -> torch.Tensor:
        """Raw scores of images recorded by :func:`collect_features` (float64, shape (N,))."""
        module = get_module(model, self.layer)
        # In the features' own dtype (float32), as the attached hooks compute it inside the network.
        if self.kind == "vector":
            if feats.head is None:
                raise EditError("these features have no head input; collect them with head=True")
            return self.score_input(module, feats.head).double()
        if feats.x is None or feats.layer != self.layer:
            raise EditError(f"class {self.name!r} reads layer {self.layer!r}; the features were recorded at "
                            f"{feats.layer!r}")
        return self.score_input(module, feats.x).double()

    def logits(self, model: nn.Module, feats: Features) -> torch.Tensor:
        """The calibrated new logit of each image: ``scale · s + shift``."""
        return self.scale * self.scores(model, feats) + self.shift

    def extended_logits(self, model: nn.Module, feats: Features) -> torch.Tensor:
        """The extended model's logits: the recorded ones with the new logit appended (float64)."""
        return torch.cat([feats.logits.double(), self.logits(model, feats)[:, None]], 1)

    def extended_parameters(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1, B1)`` of eq. 4.2: the layer's f filters and biases with the new one appended (f+1).

        The original conv has no bias in many networks; its biases are zeros in ``B1`` then.

        Example::

            >>> w1, b1 = car.extended_parameters(clf.model)           # doctest: +SKIP
            >>> w1.shape
            torch.Size([321, 1152, 1, 1])
        """
        if self.kind != "filter":
            raise EditError("only a filter class extends a conv layer")
        module = get_module(model, self.layer)
        self._check_module(module)
        w0 = module.weight.detach()
        b0 = module.bias.detach() if module.bias is not None else torch.zeros(w0.shape[0], dtype=w0.dtype)
        return (torch.cat([w0, self.weight.to(w0)]), torch.cat([b0.to(w0), self.bias.to(w0)]))

    # -------------------------------------------------------------- attach
    def apply(self, classifier_or_model) -> "AttachedClass":
        """Append the new logit to the model's output, in memory, with hooks; returns a removable handle.

        Given a :class:`~rulewriter.models.registry.Classifier`, ``handle.classifier`` is a Classifier over the same
        network with the new label appended. Nothing the network computes is modified, so the original
        logits stay bit-for-bit identical, and weight edits still apply by the same layer names.
        """
        return AttachedClass(self, classifier_or_model)

    @contextlib.contextmanager
    def applied(self, classifier):
        """Attach inside a ``with`` block and yield the extended classifier (or model); detach on exit."""
        handle = self.apply(classifier)
        try:
            yield handle.classifier if handle.classifier is not None else handle.model
        finally:
            handle.remove()

    def extend(self, classifier):
        """A new Classifier (or model) over a deep copy of the network, with the class attached for good."""
        from ..models.registry import Classifier

        if isinstance(classifier, Classifier):
            clone = copy.copy(classifier)
            clone.model = copy.deepcopy(classifier.model)
            return AttachedClass(self, clone).classifier
        clone = copy.deepcopy(classifier)
        AttachedClass(self, clone)
        return clone

    # -------------------------------------------------------------- save / load
    def describe(self) -> dict[str, Any]:
        """The JSON description saved in the file's header and beside it."""
        return {"format": FORMAT, "name": self.name, "kind": self.kind, "layer": self.layer, "pool": self.pool,
                "weight_shape": list(self.weight.shape), "scale": self.scale, "shift": self.shift,
                "meta": self.meta}

    def save(self, path: str | Path, *, sidecar: bool = True) -> Path:
        """Write ``path`` (safetensors; the JSON description in its header) and ``path.json``, atomically.

        Example::

            >>> car.save("car.safetensors")                       # doctest: +SKIP
            PosixPath('car.safetensors')
        """
        tensors = {"weight": self.weight.double(), "bias": self.bias.double(),
                   "calibration": torch.tensor([self.scale, self.shift], dtype=torch.float64)}
        return save_described(path, tensors, FORMAT, self.describe(), sidecar=sidecar)

    @classmethod
    def load(cls, path: str | Path) -> "NewClass":
        """Read a class saved by :meth:`save`. Pickles are refused; nothing is executed.

        Example::

            >>> NewClass.load("car.safetensors").name             # doctest: +SKIP
            'car'
        """
        tensors, d = load_described(path, FORMAT, "an added class")
        try:
            cal = tensors["calibration"]
            return cls(d["name"], d["kind"], d["layer"], tensors["weight"], tensors["bias"], d["pool"],
                       float(cal[0]), float(cal[1]), d.get("meta", {}))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise EditError(f"{path}: malformed added class ({type(e).__name__}: {e})") from None


class AttachedClass:
    """Hooks that append a :class:`NewClass`'s logit to a model's output; ``remove()`` takes them off.

    A pre-hook on the model forgets the last score, a hook on the class's layer computes the score from the
    layer's input (returning nothing, so the layer's output is untouched), and a hook on the model appends
    ``scale · s + shift`` as a new last column. Several classes attach in order; each appends one column.
    """

    def __init__(self, new: NewClass, target) -> None:
        from ..models.registry import Classifier

        self.new = new
        self.classifier = target if isinstance(target, Classifier) else None
        self.model: nn.Module = target.model if self.classifier is not None else target
        self.module = get_module(self.model, new.layer)
        new._check_module(self.module)
        self._score: torch.Tensor | None = None
        self._fired = 0
        self._handles = [
            self.model.register_forward_pre_hook(self._reset),
            self.module.register_forward_hook(self._on_layer),
            self.model.register_forward_hook(self._on_output),
        ]
        if self.classifier is not None:
            c = self.classifier
            self.classifier = Classifier(
                model=c.model, preprocess=c.preprocess, labels=[*c.labels, new.name], name=c.name,
                weights_id=c.weights_id, default_layer=c.default_layer,
                wnids=None if c.wnids is None else [*c.wnids, f"added:{new.name}"],
            )

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._score, self._fired = None, 0

    def _on_layer(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._fired += 1
        if self._fired > 1:
            raise LayerError(f"layer {self.new.layer!r} ran twice in one forward pass; the added class needs a "
                             "layer that runs once (not a module shared inside a block)")
        with torch.no_grad():
            self._score = self.new.score_input(module, inputs[0].detach())

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._score is None:
            raise LayerError(f"layer {self.new.layer!r} did not run in this forward pass; the added class "
                             f"{self.new.name!r} cannot be computed")
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise EditError("an added class needs a model that returns (batch, classes) logits")
        s = self._score.to(output.dtype)
        logit = self.new.scale * s + self.new.shift
        self._score = None
        # Concatenation copies the original logits unchanged: they stay bit-for-bit identical.
        return torch.cat([output, logit[:, None].to(output.dtype)], 1)

    def remove(self) -> None:
        """Take the hooks off; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles = []

    undo = remove


# ------------------------------------------------------------------------------------------ the recipe
def _pool_paths(negatives, max_negatives: int | None, seed: int) -> list:
    from ..models.data import list_images, subsample

    if isinstance(negatives, (str, Path)):
        paths = list_images(negatives)
    else:
        paths = list(negatives)
    if not paths:
        raise ImageLoadError("no negative images given")
    return subsample(paths, max_negatives, seed=seed) if max_negatives else paths


def add_class(
    classifier,
    image: ImageLike,
    mask: MaskLike,
    negatives: str | Path | Sequence[ImageLike] | Features,
    *,
    name: str = "new class",
    layer: str | None = None,
    lam: float | None = None,
    negatives_mode: str = "mined",
    n_negatives: int = 15,
    rounds: int = 3,
    pool: str = "max",
    fpr: float = DEFAULT_FPR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    steps: int = 100,
    max_negatives: int | None = 500,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> NewClass:
    """Add a class from one example image and its silhouette mask (Chapter 4, eq. 4.4).

    Args:
        classifier: the :class:`~rulewriter.models.registry.Classifier` to extend (edits applied beforehand are seen).
        image: the one example photo of the new class.
        mask: its silhouette (a PNG, white on the object, at any resolution with the photo's aspect ratio).
        negatives: photos without the class: a folder, a list of paths/PIL images, or :class:`Features`
            recorded at ``layer`` with :func:`collect_features`. Images at even positions are candidates
            to train the filter (see ``negatives_mode``), those at odd positions calibrate the logit.
        name: the new class's label.
        layer: the groups=1 conv layer that gets the new filter (default: the classifier's default layer,
            the deepest conv whose output is a whole block's output; for VGG16 the thesis's conv5_3).
        lam: λ of eq. 4.4 (None: ``1/N`` for N training negatives; 0: the positive alone).
        negatives_mode: ``"mined"`` (top-scoring false positives, over ``rounds`` rounds), ``"random"``
            or ``"none"``.
        n_negatives: how many negatives train the filter (at most the half of the pool that may train).
        pool: how the filter's map becomes a score (see :func:`pool_map`).
        fpr: the fraction of negative images the new class may win (see :func:`calibrate`).
        weight_decay: the ridge μ relative to the keys' mean energy.
        steps: L-BFGS iterations at most per training.
        max_negatives: use at most this many images of a negatives folder (a deterministic sample).
        seed: for the negatives sample and ``"random"`` mode.

    Raises:
        LayerError: the layer is depthwise/grouped, not a conv, or not in the model.
        MaskError: the mask is empty, of another aspect ratio than the image, or misses the layer's grid.
        ImageLoadError: an image cannot be read, or there are no negatives.

    Example::

        >>> car = add_class(clf, "car.jpg", "car.png", "no-cars/", name="car")    # doctest: +SKIP
        >>> car.meta["calibration"]["fpr"]                                        # doctest: +SKIP
        0.01
    """
    layer = layer or classifier.default_layer
    if not layer:
        raise LayerError(f"model {classifier.name!r} has no default layer; name the conv layer to extend")
    mem = _conv_memory(classifier.model, layer)
    if pool not in POOLS:
        raise EditError(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    if negatives_mode not in ("mined", "random", "none"):
        raise EditError(f"negatives mode must be 'mined', 'random' or 'none', got {negatives_mode!r}")
    if lam is not None and not (float(lam) >= 0 and math.isfinite(float(lam))):
        raise EditError(f"λ must be a finite number >= 0, got {lam}")
    if not 0.0 < float(fpr) < 1.0:
        raise EditError(f"fpr must lie in (0, 1), got {fpr}")
    if not str(name).strip():
        raise EditError("the new class needs a non-empty name")
    if name in classifier.labels:
        raise EditError(f"{classifier.name} already has a class {name!r} (index {classifier.labels.index(name)}); "
                        "give the new class another name")
    pos = collect_features(classifier, [image], layer)
    grid = tuple(_filter_response(mem, pos.x, torch.zeros(1, mem.c, *mem.kernel), torch.zeros(1)).shape[1:])
    target = silhouette_target(classifier, layer, image, mask, grid)  # mask errors before any long work
    if isinstance(negatives, Features):
        if negatives.layer != layer or negatives.x is None:
            raise EditError(f"the negatives' features were recorded at {negatives.layer!r}, not {layer!r}")
        neg = negatives
    else:
        neg = collect_features(classifier, _pool_paths(negatives, max_negatives, seed), layer,
                               batch_size=batch_size, progress=progress)
    if len(neg) < 4:
        raise ImageLoadError(f"need at least 4 negative images (half to train, half to calibrate), got {len(neg)}")
    # Alternate images train and calibrate. Calibrating on images the filter never saw keeps the false
    # positive rate honest: mining takes the hardest images, and calibrating on what is left of the same
    # set would be calibrating on the easy ones.
    train_idx, cal_idx = list(range(0, len(neg), 2)), list(range(1, len(neg), 2))
    fit, chosen, fits = fit_filter(mem, pos.x, target, neg.x[train_idx], mode=negatives_mode,
                                   n_negatives=n_negatives, rounds=rounds, lam=lam, pool=pool,
                                   weight_decay=weight_decay, steps=steps, seed=seed)
    chosen = [train_idx[i] for i in chosen]
    cal_set = neg.subset(cal_idx)
    s_cal = pool_map(_filter_response(mem, cal_set.x, fit.weight, fit.bias), pool).double()
    cal = calibrate(s_cal, cal_set.logits.amax(1), fpr)
    meta = {
        "model": classifier.name,
        "weights": classifier.weights_id,
        "num_classes": classifier.num_classes,
        "layer_geometry": mem.describe(),
        "image": _describe(image),
        "mask": _describe(mask),
        "lambda": fit.lam,
        "lambda_given": lam,
        "negatives_mode": negatives_mode if fit.n_negatives else "none",
        "negatives": [neg.names[i] for i in chosen] if fit.n_negatives else [],
        "rounds": len(fits) - 1,
        "weight_decay": weight_decay,
        "final_loss": {k: v[-1] for k, v in fit.history.items()},
        "iterations": len(fit.history["total"]) - 1,
        "calibration": cal.describe(),
    }
    new = NewClass(str(name), "filter", layer, fit.weight, fit.bias, pool, cal.scale, cal.shift, meta, fit.history)
    z = new.extended_logits(classifier.model, pos)[0]
    meta["exemplar"] = {"new_logit": float(z[-1]), "max_other_logit": float(z[:-1].max()),
                        "top1": bool(z.argmax() == z.numel() - 1)}
    return new


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
    img = _load_image(image)
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


# ------------------------------------------------------------------------------------------ command line
def is_new_class_file(path: str | Path) -> bool:
    """Whether ``path`` is an added class saved by :meth:`NewClass.save` (reads only the header).

    Example::

        >>> is_new_class_file("car.safetensors")       # doctest: +SKIP
        True
    """
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or head[:1] == b"\x80" or head[:2] == b"PK":
            return False
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"; the edit loader reports it
        return False
