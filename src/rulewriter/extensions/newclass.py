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

The pieces live by idea: the filter, its features and its calibration in
:mod:`rulewriter.extensions.class_filter`; the final-layer baselines and the evaluation in
:mod:`rulewriter.extensions.class_baselines`; this module holds the added class itself and the recipe.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import EditError, ImageLoadError, LayerError
from ..core.memory import LayerMemory
from ..core.rules import describe_sources
from ..core.artefacts import load_described, save_described
from ..core.trace import get_module
from .class_filter import (DEFAULT_FPR, DEFAULT_WEIGHT_DECAY, POOLS, Features, ImageLike, MaskLike, calibrate,
                           collect_features, filter_layer, filter_response, fit_filter, pool_map, silhouette_target)

__all__ = [
    "FORMAT",
    "NewClass",
    "AttachedClass",
    "add_class",
    "is_new_class_file",
]

FORMAT = "rulewriter.extensions.newclass/1"


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
        return pool_map(filter_response(mem, x, self.weight, self.bias), self.pool)

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
    mem = filter_layer(classifier.model, layer)
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
    grid = tuple(filter_response(mem, pos.x, torch.zeros(1, mem.c, *mem.kernel), torch.zeros(1)).shape[1:])
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
    s_cal = pool_map(filter_response(mem, cal_set.x, fit.weight, fit.bias), pool).double()
    cal = calibrate(s_cal, cal_set.logits.amax(1), fpr)
    meta = {
        "model": classifier.name,
        "weights": classifier.weights_id,
        "num_classes": classifier.num_classes,
        "layer_geometry": mem.describe(),
        "image": describe_sources([image])[0],
        "mask": describe_sources([mask])[0],
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
