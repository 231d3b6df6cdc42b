"""The class-specific filter of a new class (thesis Sections 4.1.1–4.1.3, eqs. 4.2–4.4), and its calibration.

:func:`collect_features` records what a new class needs from each image in one forward pass
(:class:`Features`); :func:`silhouette_target` puts the example's mask on the layer's output grid;
:func:`train_filter` fits the one extra filter by L-BFGS on the ridge-regularised eq. 4.4 and
:func:`fit_filter` adds mined or random negatives; :func:`pool_map` turns its response map into a score and
:func:`calibrate` makes that score a logit on the existing classes' scale. See
:mod:`rulewriter.extensions.newclass` for the whole recipe (:func:`~rulewriter.extensions.newclass.add_class`).

Example::

    mem = filter_layer(clf.model, layer)
    fit = train_filter(mem, pos.x, target, neg.x)
    s = pool_map(filter_response(mem, neg.x, fit.weight, fit.bias), "max")
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import EditError, ImageLoadError, LayerError, MaskError
from ..core.memory import LayerMemory
from ..core.rules import as_image, describe_sources
from ..core.trace import Trace, get_module

__all__ = [
    "POOLS",
    "DEFAULT_FPR",
    "DEFAULT_WEIGHT_DECAY",
    "CALIBRATION_PRINCIPLE",
    "Features",
    "FilterFit",
    "Calibration",
    "collect_features",
    "filter_layer",
    "filter_response",
    "head_layers",
    "silhouette_target",
    "pool_map",
    "train_filter",
    "fit_filter",
    "calibrate",
    "ImageLike",
    "MaskLike",
]

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
        batch = classifier.preprocess.batch([as_image(p) for p in images[i : i + batch_size]])
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
                    describe_sources(images))


# ------------------------------------------------------------------------------------------ the filter
def filter_layer(model: nn.Module, layer: str) -> LayerMemory:
    """The conv layer a class-specific filter is added to, as a view-2 memory (checks groups=1 and the padding).

    Refuses Linear layers: the filter is matched against a silhouette, so it needs a spatial output.

    Example::

        >>> filter_layer(clf.model, "_blocks.15._project_conv").kind       # doctest: +SKIP
        'conv'
    """
    module = get_module(model, layer)
    mem = LayerMemory(module, view=2, name=layer)  # raises a clear LayerError for depthwise/grouped convs
    if mem.kind != "conv":
        raise LayerError(
            f"layer {layer!r} is a {type(module).__name__}; a class-specific filter needs a conv layer with a "
            "spatial output to match the silhouette against"
        )
    return mem


def filter_response(mem: LayerMemory, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """The new channel ``w * X + b`` (eq. 4.2, its last filter) as an (N, h, w) map, with the layer's padding.

    Example::

        >>> z = filter_response(mem, feats.x, fit.weight, fit.bias)        # doctest: +SKIP
    """
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

    img = as_image(image)
    m = prepare_mask(classifier, mask, img)
    if grid is None:
        mem = filter_layer(classifier.model, layer)
        with torch.no_grad(), Trace(classifier.model, layer, stop=True, retain_output=False) as t:
            s = classifier.preprocess.size
            t(torch.zeros(1, 3, s, s, device=classifier.device, dtype=classifier.dtype))
        x = torch.zeros(1, mem.c, *t.input.shape[2:])
        grid = tuple(filter_response(mem, x, torch.zeros(1, mem.c, *mem.kernel), torch.zeros(1)).shape[1:])
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
            s = pool_map(filter_response(mem, pool_x, fit.weight, fit.bias), pool)
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
