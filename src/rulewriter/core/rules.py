"""Rules ``k* → v*`` read from images, and :func:`rewrite`, which turns rules into an :class:`Edit`.

A rule pairs the keys of a *manipulated* concept with the values of the *original* one, at the masked
places of a few exemplar images (thesis Sections 2.2.1 and 2.3.1):

* :func:`rule_from_images` reads ``k*`` from a manipulated image (e.g. wood pasted onto the wheels) and
  ``v*`` from the original image at the same places;
* :func:`rule_from_features` builds the manipulated key without new pixels: a texture's features are
  pasted into the masked region at the layer's input.

:func:`rewrite` solves for the update with the second moment of the layer's keys::

    rule = rule_from_images(clf, layer, [car], [wooden_car], [wheel_mask])
    stats = collect_second_moment(clf, layer, "photos/", samples=2000)
    edit = rewrite(clf, rule, stats)           # an Edit: apply, save, undo, compose
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .edit import DEFAULT_RIDGE, Edit, LayerUpdate, projected_gd, solve_lambda, timestamp, update_direction
from ..errors import EditError, MaskError
from .memory import LayerMemory
from .trace import Trace, get_module

__all__ = ["Rule", "load_exemplars", "rule_from_images", "rule_from_features", "rewrite", "layer_io", "prepare_mask",
           "masked_pairs", "describe_sources", "as_image"]

ImageLike = str | Path | Image.Image
MaskLike = str | Path | np.ndarray | Image.Image | torch.Tensor


@dataclass
class Rule:
    """Key/value pairs that the edited layer must map: ``keys[i] → values[i]`` with weight ``weights[i]``.

    ``keys`` is (n, key_dim), ``values`` is (n, value_dim); rows come from the masked locations of the
    exemplars, weighted by how much of each location the mask covers.
    """

    layer: str
    view: int
    keys: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    description: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.values.shape[0] != n or self.weights.shape[0] != n:
            raise EditError("a rule needs as many values and weights as keys")
        if n == 0:
            raise MaskError("the rule has no key: the masks cover no location of the layer's grid")
        for name, t in (("keys", self.keys), ("values", self.values), ("weights", self.weights)):
            if not torch.isfinite(t).all():
                raise EditError(f"rule {name} contain NaN or inf")

    def key(self) -> torch.Tensor:
        """``k*``: the mask-weighted mean key (the thesis's averaged concept key)."""
        w = self.weights.double()
        return (self.keys.double() * w[:, None]).sum(0) / w.sum()

    def value(self) -> torch.Tensor:
        """``v*``: the mask-weighted mean value."""
        w = self.weights.double()
        return (self.values.double() * w[:, None]).sum(0) / w.sum()


def as_image(img: ImageLike) -> Image.Image:
    """An image given as a path or a PIL image, as RGB (files read by :func:`rulewriter.models.data.load_image`).

    Example::

        >>> as_image(Image.new("L", (4, 4))).mode
        'RGB'
    """
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    from ..models.data import load_image

    return load_image(img)


def prepare_mask(classifier, mask: MaskLike, image: Image.Image) -> torch.Tensor:
    """A user mask (any size) → the model's input grid (S × S), through the same resize and crop as the image."""
    from ..concepts.masks import load_mask
    from ..models.preprocess import mask_for_image

    m = load_mask(mask)
    m = classifier.preprocess.mask(mask_for_image(m, image.size))
    if float(m.max()) <= 0:
        raise MaskError("the mask is empty after resizing and cropping to the model's input")
    return m


def layer_io(classifier, layer: str, x: torch.Tensor,
             edit_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``x`` up to ``layer``; return its input and output. ``edit_input`` replaces the input first."""
    model = classifier.model
    module = get_module(model, layer)
    handle = None
    if edit_input is not None:
        handle = module.register_forward_pre_hook(lambda m, args: (edit_input(args[0]), *args[1:]))
    try:
        p = next(model.parameters())
        with torch.no_grad(), Trace(model, layer, stop=True) as tr:
            # Inputs follow the model: its device, and its dtype (a float64 model gets float64 images).
            tr(x.to(p.device, p.dtype if x.is_floating_point() else None))
    finally:
        if handle is not None:
            handle.remove()
    return tr.input, tr.output


def masked_pairs(mem: LayerMemory, keys: torch.Tensor, values: torch.Tensor, masks_s: torch.Tensor):
    """Rows of (key, value, weight) at the key-grid locations the masks cover, float64.

    ``keys`` (N, d, h, w) and ``values`` (N, e, h, w) are one view's keys and values of N exemplars;
    ``masks_s`` (N, S, S) their masks on the input grid, averaged onto the key grid
    (:func:`~rulewriter.concepts.masks.mask_to_grid`): a covered location gives a pair weighted by its coverage.

    Example::

        >>> k, v, w = masked_pairs(mem, keys, values, masks)         # doctest: +SKIP
        >>> k.shape[0] == v.shape[0] == w.shape[0]                   # doctest: +SKIP
        True
    """
    from ..concepts.masks import mask_to_grid

    grid = tuple(keys.shape[2:])
    ks, vs, ws = [], [], []
    for i in range(keys.shape[0]):
        g = mask_to_grid(masks_s[i], grid).to(keys.device)
        sel = g > 0
        ks.append(keys[i].permute(1, 2, 0)[sel])
        vs.append(values[i].permute(1, 2, 0)[sel])
        ws.append(g[sel])
    return torch.cat(ks).double(), torch.cat(vs).double(), torch.cat(ws).double()


def describe_sources(items: Sequence) -> list[str]:
    """How exemplars are named in a rule's description: paths as given, other objects by type.

    Example::

        >>> describe_sources(["car.jpg", 3])
        ['car.jpg', '<int>']
    """
    return [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__}>" for i in items]


def load_exemplars(
    classifier, originals: Sequence[ImageLike], manipulated: Sequence[ImageLike], masks: Sequence[MaskLike]
) -> tuple[list[Image.Image], list[Image.Image], torch.Tensor]:
    """Load aligned (original, manipulated) pairs and their masks on the model's input grid (N, S, S)."""
    if not (len(originals) == len(manipulated) == len(masks)) or not originals:
        raise EditError(
            f"need one manipulated image and one mask per original; got {len(originals)} originals, "
            f"{len(manipulated)} manipulated, {len(masks)} masks"
        )
    orig = [as_image(o) for o in originals]
    man = [as_image(m) for m in manipulated]
    for o, m, src in zip(orig, man, manipulated):
        if o.size != m.size:
            raise EditError(f"manipulated image {src} is {m.size}, its original is {o.size}; they must align")
    return orig, man, torch.stack([prepare_mask(classifier, m, o) for m, o in zip(masks, orig)])


def rule_from_images(
    classifier,
    layer: str,
    originals: Sequence[ImageLike],
    manipulated: Sequence[ImageLike],
    masks: Sequence[MaskLike],
    *,
    view: int = 2,
) -> Rule:
    """Keys from manipulated images, values from the originals, at the masked places (Section 2.2.1).

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        layer: dotted layer name.
        originals: exemplar photos.
        manipulated: the same photos with the concept changed (e.g. a texture pasted into the mask).
        masks: one mask per exemplar, non-zero where the concept is, at the exemplar's size or any size.
        view: memory view (1 or 2; forward direction).

    Example:
        >>> rule = rule_from_images(clf, "_blocks.10._project_conv", ["car.jpg"], ["wood.jpg"], ["wheels.png"])  # doctest: +SKIP
    """
    if view not in (1, 2):
        raise EditError("rules from images are forward-direction edits: use view 1 or 2")
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    orig, man, masks_s = load_exemplars(classifier, originals, manipulated, masks)
    x_o, _ = layer_io(classifier, layer, classifier.preprocess.batch(orig))
    x_m, _ = layer_io(classifier, layer, classifier.preprocess.batch(man))
    keys, values = mem.keys(x_m), mem.values(x_o)
    k, v, w = masked_pairs(mem, keys, values, masks_s)
    desc = {"method": "images", "originals": describe_sources(originals),
            "manipulated": describe_sources(manipulated), "masks": describe_sources(masks)}
    return Rule(layer, view, k, v, w, desc)


def rule_from_features(
    classifier,
    layer: str,
    originals: Sequence[ImageLike],
    masks: Sequence[MaskLike],
    texture: ImageLike,
    *,
    view: int = 2,
) -> Rule:
    """Keys from the texture's features pasted into the masked region at the layer (Section 2.3.1).

    The texture photo runs through the network to the layer; its layer-input features replace the
    original's inside the mask (soft edges blend). Keys come from these pasted features, values from the
    untouched original, so no manipulated image is needed.
    """
    from ..concepts.masks import mask_to_grid
    from ..concepts.manipulate import paste_features

    if len(originals) != len(masks) or not originals:
        raise EditError(f"need one mask per original; got {len(originals)} originals and {len(masks)} masks")
    if view not in (1, 2):
        raise EditError("rules from features are forward-direction edits: use view 1 or 2")
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    pre = classifier.preprocess
    orig = [as_image(o) for o in originals]
    masks_s = torch.stack([prepare_mask(classifier, m, o) for m, o in zip(masks, orig)])
    x_o, _ = layer_io(classifier, layer, pre.batch(orig))
    x_t, _ = layer_io(classifier, layer, pre.batch([as_image(texture)]))
    grid_in = tuple(x_o.shape[2:])
    m_in = torch.stack([mask_to_grid(m, grid_in) for m in masks_s]).to(x_o)
    x_p = paste_features(x_o, x_t, m_in)
    keys, values = mem.keys(x_p), mem.values(x_o)
    k, v, w = masked_pairs(mem, keys, values, masks_s)
    desc = {"method": "features", "originals": describe_sources(originals), "masks": describe_sources(masks),
            "texture": describe_sources([texture])[0]}
    return Rule(layer, view, k, v, w, desc)


def rewrite(
    classifier,
    rules: Rule | Sequence[Rule],
    stats,
    *,
    rank: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    context: str = "mean",
    fit: str = "pairs",
    solver: str = "closed-form",
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps: int = 2000,
    on: Sequence[Edit] = (),
) -> Edit:
    """Solve for the update that makes the layer map each rule's keys to its values.

    Args:
        classifier: the model the rules were read from.
        rules: one rule or several (all of the same layer and view).
        stats: a :class:`~rulewriter.core.stats.SecondMoment` or the matrix ``C``.
        rank: number of update directions. With ``context="mean"`` it is the number of rules (one
            averaged ``k*`` each, eqs. 2.23–2.24). With ``"svd"``/``"zca"`` it is the number of top
            directions of all masked keys (default 1).
        ridge: ``C + ε I`` with ``ε = ridge · tr(C)/d`` (see :data:`~rulewriter.core.edit.DEFAULT_RIDGE`).
        context: where the directions come from: ``"mean"`` (each rule's ``k*``), ``"svd"`` or ``"zca"``.
        fit: ``"pairs"`` fits Λ to every masked (key, value) pair by least squares; ``"mean"`` makes the
            layer map each ``k*`` exactly to its ``v*`` (the thesis's single constraint; needs
            ``context="mean"``).
        solver: ``"closed-form"`` or ``"projected-gd"`` (eq. 2.20, through ``post`` when given).
        post: for projected GD, a map of value rows through what follows the layer.
        on: earlier edits this one is written on (sequential editing, :mod:`rulewriter.core.sequential`):
            the update is solved for the weights they leave and keeps every earlier rule's key ``k*``
            mapping to its output exactly (``ΔW K_p = 0``). Apply the result together with them
            (``sum``/``compose``, ``predict --edit A --edit B``). Without ``on`` the edit is solved alone,
            and summing it with others is approximate.

    Returns:
        an :class:`~rulewriter.core.edit.Edit` with one rank-r update and a JSON description of the rules.
    """
    from ..concepts.keys import context as context_dirs

    rules = [rules] if isinstance(rules, Rule) else list(rules)
    if not rules:
        raise EditError("no rules to rewrite")
    layer, view = rules[0].layer, rules[0].view
    if any((r.layer, r.view) != (layer, view) for r in rules):
        raise EditError("all rules of one rewrite must share a layer and view; compose separate edits instead")
    if fit not in ("pairs", "mean") or context not in ("mean", "svd", "zca"):
        raise EditError(f"unknown fit {fit!r} or context {context!r}")
    if fit == "mean" and context != "mean":
        raise EditError('fit="mean" constrains each rule\'s k*, so it needs context="mean"')
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    c = stats.moment() if hasattr(stats, "moment") else torch.as_tensor(stats)
    if c.shape != (mem.key_dim, mem.key_dim):
        raise EditError(f"statistics are for {c.shape[0]}-dim keys; layer {layer!r} view {view} has {mem.key_dim}")
    k = torch.cat([r.keys for r in rules]).double()
    v = torch.cat([r.values for r in rules]).double()
    w = torch.cat([r.weights for r in rules]).double()
    if context == "mean":
        u = torch.stack([r.key() for r in rules], 1)
        if rank is not None and rank != len(rules):
            raise EditError(f'context="mean" gives one direction per rule ({len(rules)}); got rank={rank}')
    else:
        # One ridge for both: zca's whitening C^{-1/2} and the solve's C⁻¹ must be of the same C + εI.
        u = context_dirs(k, rank or 1, method=context, C=c, weights=w, ridge=ridge)
    on = list(on)
    if on:
        from .sequential import edited_matrix, preserved_keys, preserving_direction

        d = preserving_direction(c, u, preserved_keys(on, layer, view), ridge)
        w0 = edited_matrix(classifier.model, layer, view, on)
    else:
        d = update_direction(c, u, ridge)
        w0 = mem.matrix().double()
    d = d.to(w0.device)
    if fit == "mean":
        kk, vv, ww = u, torch.stack([r.value() for r in rules], 1), None
    else:
        kk, vv, ww = k.T, v.T, w
    if solver == "closed-form":
        lam = solve_lambda(w0, kk, vv, d, ww)
        losses = None
    elif solver == "projected-gd":
        # Targets live after ``post``: the values the original keys produced through it.
        target = vv if post is None else post(vv.T).T
        lam, losses = projected_gd(w0, kk, target, d, post=post, weights=ww, steps=steps)
    else:
        raise EditError(f"unknown solver {solver!r}; use 'closed-form' or 'projected-gd'")
    meta = {
        "created": timestamp(),
        "model": classifier.name,
        "weights": classifier.weights_id,
        "layer": layer,
        "view": view,
        "rank": d.shape[1],
        "ridge": ridge,
        "context": context,
        "fit": fit,
        "solver": solver,
        "n_pairs": int(k.shape[0]),
        "stats": getattr(stats, "count", None),
        "rules": [r.description for r in rules],
    }
    if losses:
        meta["final_loss"] = losses[-1]
    # Each rule's k* → v* is kept with the update, so later edits can preserve it and a library can re-check it.
    from .sequential import restored_fraction

    ks = torch.stack([r.key() for r in rules], 1).to(w0.device)
    vs = torch.stack([r.value() for r in rules], 1).to(w0.device)
    meta["restored"] = restored_fraction(w0 + lam @ d.T, w0, ks, vs).tolist()
    if on:
        meta["after"] = [e.fingerprint() for e in on]
        meta["preserved_keys"] = int(sum(0 if u.keys is None else u.keys.shape[1] for e in on for u in e.updates
                                         if (u.layer, u.view) == (layer, view)))
    return Edit([LayerUpdate(layer, view, lam, d, ks, vs)], meta)
