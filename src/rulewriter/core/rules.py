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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .edit import (DEFAULT_RIDGE, Edit, LayerUpdate, direction_factor, projected_gd, solve_lambda, timestamp,
                   update_direction)
from ..errors import EditError, MaskError
from .memory import LayerMemory
from .trace import Trace, get_module

__all__ = ["Rule", "load_exemplars", "rule_from_images", "rules_from_images", "rule_from_features", "rewrite",
           "rewrite_choosing_layer", "layer_io", "prepare_mask", "masked_pairs", "describe_sources", "as_image"]

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
    #: Which exemplar view each pair was read from, and the views themselves (for choosing the strength by
    #: validation, see :mod:`rulewriter.core.generalise`); None for rules without views. Not saved with an edit.
    pair_view: torch.Tensor | None = field(default=None, repr=False, compare=False)
    views: object = field(default=None, repr=False, compare=False)

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


def masked_pairs(mem: LayerMemory, keys: torch.Tensor, values: torch.Tensor, masks_s: torch.Tensor,
                 with_source: bool = False):
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
    ks, vs, ws, src = [], [], [], []
    for i in range(keys.shape[0]):
        g = mask_to_grid(masks_s[i], grid).to(keys.device)
        sel = g > 0
        ks.append(keys[i].permute(1, 2, 0)[sel])
        vs.append(values[i].permute(1, 2, 0)[sel])
        ws.append(g[sel])
        src.append(torch.full((int(sel.sum()),), i, dtype=torch.long))
    if with_source:  # and the exemplar (image index) of each row
        return torch.cat(ks).double(), torch.cat(vs).double(), torch.cat(ws).double(), torch.cat(src)
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
    views: int = 0,
    seed: int = 0,
) -> Rule:
    """Keys from manipulated images, values from the originals, at the masked places (Section 2.2.1).

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        layer: dotted layer name.
        originals: exemplar photos.
        manipulated: the same photos with the concept changed (e.g. a texture pasted into the mask).
        masks: one mask per exemplar, non-zero where the concept is, at the exemplar's size or any size.
        view: memory view (1 or 2; forward direction).
        views: joint augmentations (crop, flip, scale, lighting) per exemplar whose pairs join the rule
            (default 0: the exemplars alone, the thesis's rule). With views (e.g.
            :data:`~rulewriter.core.generalise.DEFAULT_VIEWS`), the views are kept on the rule and
            :func:`rewrite` chooses the edit's strength, rank and augmentation by validation on them, under
            a locality budget on calibration images (``rewrite(calibration=...)``; ``rulewriter edit`` does
            this by default). Without calibration images the budget is the looser output energy.
        seed: of the augmentations.

    Example:
        >>> rule = rule_from_images(clf, "_blocks.10._project_conv", ["car.jpg"], ["wood.jpg"], ["wheels.png"])  # doctest: +SKIP
    """
    return rules_from_images(classifier, [layer], originals, manipulated, masks, view=view, views=views,
                             seed=seed)[layer]


def rules_from_images(
    classifier,
    layers: Sequence[str],
    originals: Sequence[ImageLike],
    manipulated: Sequence[ImageLike],
    masks: Sequence[MaskLike],
    *,
    view: int = 2,
    views: int = 0,
    seed: int = 0,
) -> dict[str, Rule]:
    """:func:`rule_from_images` at each of ``layers`` from one forward pass over the exemplars (and their
    views): ``{layer: Rule}``, each exactly the rule :func:`rule_from_images` reads there.

    Example::

        rules = rules_from_images(clf, clf.candidate_layers, originals, pasted, masks, views=DEFAULT_VIEWS)
        edit = rewrite_choosing_layer(clf, clf.candidate_layers, rules.__getitem__, stats_at, calibration=cal)
    """
    if view not in (1, 2):
        raise EditError("rules from images are forward-direction edits: use view 1 or 2")
    layers = list(dict.fromkeys(layers))
    mems = {layer: LayerMemory(get_module(classifier.model, layer), view, name=layer) for layer in layers}
    orig, man, masks_s = load_exemplars(classifier, originals, manipulated, masks)
    desc = {"method": "images", "originals": describe_sources(originals),
            "manipulated": describe_sources(manipulated), "masks": describe_sources(masks)}
    views = int(views)
    if views <= 0:  # a few exemplars, run up to each layer only
        out = {}
        for layer, mem in mems.items():
            x_o, _ = layer_io(classifier, layer, classifier.preprocess.batch(orig))
            x_m, _ = layer_io(classifier, layer, classifier.preprocess.batch(man))
            k, v, w = masked_pairs(mem, mem.keys(x_m), mem.values(x_o), masks_s)
            out[layer] = Rule(layer, view, k, v, w, {**desc, "views": 0})
        return out
    return _rules_from_views(classifier, mems, view, orig, man, masks, views, seed, desc)


def _rules_from_views(classifier, mems: dict[str, LayerMemory], view: int, orig: list[Image.Image],
                      man: list[Image.Image], masks: Sequence[MaskLike], views: int, seed: int, desc: dict
                      ) -> dict[str, Rule]:
    """Each layer's rule read from each exemplar and its joint augmentations, with the views kept for
    validation; the views run through the network once for every layer."""
    from ..concepts.masks import load_mask
    from .generalise import ViewSet, exemplar_views
    from .locality import exact_map
    from ..models.preprocess import mask_for_image
    from .tail import read_views_at, tail_start

    full_masks = [mask_for_image(load_mask(m), o.size) for m, o in zip(masks, orig)]
    vo, vm, vk, groups = exemplar_views(orig, man, full_masks, views, seed=seed)
    pre = classifier.preprocess
    # A view whose mask the centre crop loses adds no pair; it still validates (its whole image).
    masks_s = torch.stack([pre.mask(m) for m in vk])
    keep = [i for i in range(len(vo)) if float(masks_s[i].max()) > 0]
    at_o, logits = read_views_at(classifier, list(mems), pre.batch(vo))
    at_m, logits_m = read_views_at(classifier, list(mems), pre.batch(vm))
    per = (len(vo) // len(orig)) - 1
    own = torch.arange(len(vo)) % (per + 1) == 0
    desc = {**desc, "views": per, "augmentation": "joint crop (35-100% of the area), flip, scale to 256 px, "
            "brightness/contrast/colour ±20%", "seed": seed}
    out = {}
    for layer, mem in mems.items():
        (x_o, t_o), (x_m, t_m) = at_o[layer], at_m[layer]
        keys, values = mem.keys(x_m[keep]), mem.values(x_o[keep])
        k, v, w, src = masked_pairs(mem, keys, values, masks_s[keep], with_source=True)
        pair_view = torch.as_tensor(keep, dtype=torch.long)[src]
        if t_o is None or t_m is None:  # no tail shortcut: validation runs the whole model on the images
            start, t_o, t_m = None, pre.batch(vo), pre.batch(vm)
        else:
            start = tail_start(classifier.model, layer)
        vs = ViewSet(start, t_o, t_m, logits.argmax(1).cpu(), torch.as_tensor(groups, dtype=torch.long), own,
                     masks=masks_s)
        vs.linear_orig, vs.linear_man = (exact_map(classifier.model, layer, x, x_logits)
                                         for x, x_logits in ((x_o, logits), (x_m, logits_m)))
        out[layer] = Rule(layer, view, k, v, w, dict(desc), pair_view=pair_view, views=vs)
    return out


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
    context: str = "auto",
    fit: str = "pairs",
    solver: str = "closed-form",
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps: int = 2000,
    on: Sequence[Edit] = (),
    strength: float | str = "auto",
    budget: Any = None,
    calibration: Any = None,
    to_beat: Sequence[Any] | None = None,
    ties_win: bool = False,
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
        context: where the directions come from: ``"mean"`` (each rule's ``k*``), ``"uniform"`` (each
            rule's ``k*`` through ``(C + λΣ + εI)⁻¹``, :func:`concept_spread`: the update responds alike to all
            of the concept's keys, not only to their mean), ``"svd"`` or ``"zca"``.
            ``"auto"`` (the default) validates the mean key, the uniform one and the top 4 SVD directions
            of the masked keys, with and without the augmented views' pairs, along with the strength (see
            ``strength``) when the rule carries exemplar views and no rank is given; otherwise ``"mean"``.
        fit: ``"pairs"`` fits Λ to every masked (key, value) pair by least squares; ``"mean"`` makes the
            layer map each ``k*`` exactly to its ``v*`` (the thesis's single constraint; needs
            ``context="mean"`` or ``"uniform"``).
        solver: ``"closed-form"`` or ``"projected-gd"`` (eq. 2.20, through ``post`` when given).
        post: for projected GD, a map of value rows through what follows the layer.
        strength: the magnitude ``s`` of the update along its direction (``s·Λ``). ``"auto"`` chooses it
            per edit by validation on the rule's exemplar views (leave one exemplar out), under a
            collateral budget (:func:`rulewriter.core.generalise.choose_strength`); a rule without views,
            or the projected-GD solver, gets 1. A number fixes it.
        calibration: images the budget is measured on, as top-1 changes: a
            :class:`~rulewriter.core.generalise.Calibration` or anything
            :func:`~rulewriter.core.generalise.calibration_set` takes (a folder, paths, a Dataset, a
            preprocessed batch); use the statistics images. None: the budget is the layer's output energy
            on the statistics keys (exact from ``C``, but looser than top-1 locality).
        budget: the budget of ``"auto"``: a :class:`~rulewriter.core.generalise.LocalityBudget` with
            calibration images (default ``LocalityBudget()``: top-1 changes on ≤ 0.5 % of them and ≤ 5 % of
            their near ties), else a relative output energy (default
            :data:`~rulewriter.core.generalise.DEFAULT_COLLATERAL`).
        on: earlier edits this one is written on (sequential editing, :mod:`rulewriter.core.sequential`):
            the update is solved for the weights they leave and keeps every earlier rule's key ``k*``
            mapping to its output exactly (``ΔW K_p = 0``). Apply the result together with them
            (``sum``/``compose``, ``predict --edit A --edit B``). Without ``on`` the edit is solved alone,
            and summing it with others is approximate.
        to_beat: with ``strength="auto"``, the :func:`~rulewriter.core.generalise.layer_score` of another
            edit of the same rule (:func:`rewrite_choosing_layer` passes the best of the layers before;
            ``ties_win``: whether this layer wins a tie): once no setting that is still possible could
            score above it, the validation stops and the edit is the closed form, its
            ``meta["strength"]["pruned"]`` set (it cannot win the layer choice).

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
    if fit not in ("pairs", "mean") or context not in ("auto", "mean", "uniform", "svd", "zca"):
        raise EditError(f"unknown fit {fit!r} or context {context!r}")
    on = list(on)
    # Validation applies candidate edits to the model alone, so an edit written on earlier ones is not validated.
    validated = (strength == "auto" and solver == "closed-form" and len(rules) == 1 and not on
                 and rules[0].views is not None and rules[0].pair_view is not None)
    search = context == "auto" and rank is None and fit == "pairs" and validated
    context = "mean" if context == "auto" else context
    if fit == "mean" and context not in ("mean", "uniform"):
        raise EditError('fit="mean" constrains each rule\'s k*, so it needs context="mean" or "uniform"')
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    c = stats.moment() if hasattr(stats, "moment") else torch.as_tensor(stats)
    if c.shape != (mem.key_dim, mem.key_dim):
        raise EditError(f"statistics are for {c.shape[0]}-dim keys; layer {layer!r} view {view} has {mem.key_dim}")
    if context in ("mean", "uniform") and rank is not None and rank != len(rules):
        raise EditError(f'context="{context}" gives one direction per rule ({len(rules)}); got rank={rank}')
    if solver not in ("closed-form", "projected-gd"):
        raise EditError(f"unknown solver {solver!r}; use 'closed-form' or 'projected-gd'")
    if on:
        from .sequential import edited_matrix, preserved_keys, preserving_direction

        preserved = preserved_keys(on, layer, view)
        w0 = edited_matrix(classifier.model, layer, view, on)
    else:
        w0 = mem.matrix().double()

    factor: list[torch.Tensor] = []

    def solve(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], context: str = context,
              rank: int | None = rank):
        """Λ and D from each rule's (keys, values, weights)."""
        k = torch.cat([p[0] for p in parts]).double()
        v = torch.cat([p[1] for p in parts]).double()
        w = torch.cat([p[2] for p in parts]).double()
        if context in ("mean", "uniform"):  # each rule's mask-weighted mean key k* (Rule.key)
            u = torch.stack([(pk * pw[:, None]).sum(0) / pw.sum() for pk, _, pw in parts], 1)
        else:
            # One ridge for both: zca's whitening C^{-1/2} and the solve's C⁻¹ must be of the same C + εI.
            u = context_dirs(k, rank or 1, method=context, C=c, weights=w, ridge=ridge)
        if on:
            d = preserving_direction(c, u, preserved, ridge)
        elif context == "uniform":
            d = update_direction(c + concept_spread(parts, c), u, ridge)
        else:  # one factorisation of C + εI for every candidate and fold (the uniform one has its own)
            if not factor:
                factor.append(direction_factor(c, ridge))
            d = update_direction(c, u, ridge, factor=factor[0])
        d = d.to(w0.device)
        if fit == "mean":
            kk, ww = u, None
            vv = torch.stack([(pv * pw[:, None]).sum(0) / pw.sum() for _, pv, pw in parts], 1)
        else:
            kk, vv, ww = k.T, v.T, w
        if solver == "closed-form":
            return solve_lambda(w0, kk, vv, d, ww), d, None, k.shape[0]
        # Targets live after ``post``: the values the original keys produced through it.
        target = vv if post is None else post(vv.T).T
        lam, losses = projected_gd(w0, kk, target, d, post=post, weights=ww, steps=steps)
        return lam, d, losses, k.shape[0]

    parts = [(r.keys.double(), r.values.double(), r.weights.double()) for r in rules]
    lam, d, losses, n_pairs = solve(parts)
    # Candidates, simplest first: the exemplars' own pairs or all views; the mean key, the uniform one or SVD
    # directions.
    cands = ([(ctx, r, aug) for ctx, r in [("mean", 1), ("uniform", 1)] + [("svd", r) for r in SEARCH_RANKS]
              for aug in (False, True)] if search else None)
    choice = _strength(classifier, rules, solve, parts, lam, d, w0, c, layer, view, strength, budget, solver,
                       cands, on, calibration, to_beat, ties_win)
    if choice.get("candidate"):
        context, rank, aug = choice["candidate"]
        choice["augmented"] = bool(aug)
        lam, d, losses, n_pairs = solve(_own_pairs(rules[0], parts) if not aug else parts, context, rank)
    lam = lam * choice["chosen"]
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
        "n_pairs": int(n_pairs),
        "stats": getattr(stats, "count", None),
        "strength": choice,
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


def rewrite_choosing_layer(
    classifier,
    layers: Sequence[str],
    rule_at: Callable[[str], Rule],
    stats_at: Callable[[str], Any],
    *,
    calibration_at: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Edit:
    """:func:`rewrite` the same exemplars at each of ``layers`` and keep the edit whose own validation wins.

    ``rule_at(layer)`` reads the rule at a layer (with exemplar views, so each edit is validated) and
    ``stats_at(layer)`` gives that layer's statistics; ``kwargs`` go to :func:`rewrite` (``calibration=``
    as data, not a :class:`~rulewriter.core.generalise.Calibration`, which belongs to one layer: read at
    every layer from one forward pass, :func:`~rulewriter.core.locality.calibration_sets`; or
    ``calibration_at(layer)``, e.g. each layer's cached Calibration). The edits
    are compared by :func:`rulewriter.core.generalise.choose_layer` on what each one's strength choice
    recorded (exemplars restored, within the locality budget, left-out views right), never on held-out
    photos; ties keep the earlier layer, so list the model's default first
    (:attr:`~rulewriter.models.registry.Classifier.candidate_layers`). The chosen edit's
    ``meta["layer_choice"]`` keeps every layer's scores and the reason. The default layer is written
    first, then the deeper layers before the shallower; a layer whose settings cannot score above the best
    layer already written is not validated in full (``to_beat``; its row says ``pruned``): it could not have
    won, so the choice is exactly that of every layer in full.

    Example::

        layers = clf.candidate_layers                      # the default layer first
        edit = rewrite_choosing_layer(
            clf, layers, lambda l: rule_from_images(clf, l, originals, pasted, masks, views=DEFAULT_VIEWS),
            lambda l: collect_second_moment(clf, l, stats_paths), calibration=cal_paths)
        edit.meta["layer_choice"]["chosen"], edit.meta["layer_choice"]["reason"]    # doctest: +SKIP
    """
    from .generalise import choose_layer, chosen_row, layer_score
    from .locality import Calibration, calibration_sets

    layers = list(dict.fromkeys(layers))
    if not layers:
        raise EditError("no layer to rewrite")
    if isinstance(kwargs.get("calibration"), Calibration) and len(layers) > 1:
        raise EditError("a Calibration belongs to one layer; pass the calibration images themselves")
    data = kwargs.get("calibration")
    shared: dict[str, Calibration] = {}

    def at(layer: str, rule: Rule) -> dict[str, Any]:
        if calibration_at is not None:
            return {**kwargs, "calibration": calibration_at(layer)}
        if data is None or isinstance(data, Calibration) or not _validates(
                [rule] if isinstance(rule, Rule) else list(rule), kwargs.get("strength", "auto"),
                kwargs.get("solver", "closed-form"), kwargs.get("on", ())):
            return kwargs
        if not shared:  # every layer's calibration images from one forward pass, not one per layer
            shared.update(calibration_sets(classifier, layers, data))
        return {**kwargs, "calibration": shared[layer]}

    # The default layer first, then the deeper layers before the shallower (their tails are shorter, so
    # their measurements cheaper). A layer whose edit cannot score above the best one already written
    # cannot win choose_layer: its validation stops as soon as that is settled. Both are exact:
    # the choice is the one every layer validated in full would give, in the order given.
    position = {name: i for i, (name, _) in enumerate(classifier.model.named_modules())}
    order = [0] + sorted(range(1, len(layers)), key=lambda i: -position.get(layers[i], -1))
    edits: dict[int, Edit] = {}
    best: tuple[int, tuple] | None = None  # the layer scoring highest so far and its layer_score
    for i in order:
        rule = rule_at(layers[i])
        edits[i] = rewrite(classifier, rule, stats_at(layers[i]), **at(layers[i], rule),
                           to_beat=None if best is None else best[1], ties_win=best is not None and i < best[0])
        score = layer_score(chosen_row(edits[i].meta.get("strength", {})))
        if score is not None and (best is None or (score, -i) > (best[1], -best[0])):  # ties to the earlier
            best = (i, score)
    got = choose_layer(layers, [edits[i].meta.get("strength", {}) for i in range(len(layers))])
    edit = edits[got["index"]]
    edit.meta["layer_choice"] = got
    return edit


#: Context ranks that ``context="auto"`` validates beside the mean key (rank 1), each with and without the
#: augmented views' pairs.
SEARCH_RANKS = (4,)


def concept_spread(parts, c: torch.Tensor) -> torch.Tensor:
    """``λ Σ``: the weighted second moment of each rule's keys about its own ``k*``, scaled to ``C``'s trace.

    Added to ``C`` in the direction's solve (``context="uniform"``), it asks the update to respond alike to
    every key of the concept, not only to its mean: ``d = (C + λΣ + εI)⁻¹ k*`` minimises ``dᵀCd`` (the change
    to other keys) plus ``λ dᵀΣd`` (how unevenly the concept's own keys move) at ``dᵀk* = 1``; ``λ = tr C / tr Σ``
    weighs the two alike.
    """
    sig = torch.zeros_like(c, dtype=torch.float64)
    total = 0.0
    for pk, _, pw in parts:
        k, w = pk.double().to(c.device), pw.double().to(c.device)
        dev = k - (k * w[:, None]).sum(0) / w.sum()
        sig += (dev * w[:, None]).T @ dev
        total += float(w.sum())
    sig /= max(total, 1e-12)
    tr = float(sig.trace())
    return sig * (float(c.double().trace()) / tr) if tr > 0 else sig


def _own_pairs(rule: Rule, parts):
    """The pairs read from the exemplars themselves (not their augmented views)."""
    keep = rule.views.own[rule.pair_view]
    pk, pv, pw = parts[0]
    return [(pk[keep], pv[keep], pw[keep])]


def _validates(rules: Sequence[Rule], strength: Any, solver: str, on: Sequence[Edit]) -> bool:
    """Whether :func:`rewrite` validates this edit (and so measures it on calibration images)."""
    return strength == "auto" and solver == "closed-form" and len(rules) == 1 and not on and \
        rules[0].views is not None and rules[0].pair_view is not None


def _strength(classifier, rules: list[Rule], solve, parts, lam, d, w0, c, layer: str, view: int,
              strength: float | str, budget: Any, solver: str, cands: list | None = None,
              on: Sequence[Edit] = (), calibration: Any = None, to_beat: Sequence[Any] | None = None,
              ties_win: bool = False) -> dict:
    """The strength for :func:`rewrite` and why (a JSON-ready dict, see generalise.StrengthChoice)."""
    from .generalise import StrengthChoice, choose_strength
    from .locality import DEFAULT_COLLATERAL, Calibration, LocalityBudget, calibration_set, relative_collateral

    w0c = w0.double()
    reference = float(((w0c @ c.double().to(w0c.device)) * w0c).sum())  # tr(W0 C W0ᵀ), once for every candidate
    unit = relative_collateral(w0, (lam, d), c, reference=reference)
    validating = _validates(rules, strength, solver, on)
    if calibration is not None and validating and not isinstance(calibration, Calibration):
        calibration = calibration_set(classifier, layer, calibration)
    if budget is None:
        budget = LocalityBudget() if calibration is not None else DEFAULT_COLLATERAL
    elif isinstance(budget, LocalityBudget) and calibration is None and validating:
        raise EditError("a LocalityBudget is measured on calibration images: pass calibration=")
    elif not isinstance(budget, LocalityBudget):
        budget = float(budget)
    if strength != "auto":
        try:
            s = float(strength)
        except (TypeError, ValueError):
            raise EditError(f'strength must be "auto" or a number, got {strength!r}') from None
        if not math.isfinite(s) or s <= 0:
            raise EditError(f"strength must be a positive number, got {strength!r}")
        return {**StrengthChoice(s, "given", budget=budget).to_dict(), "collateral": unit * s * s}
    if solver != "closed-form":
        why = "the projected-GD solver is not validated: strength 1"
    elif len(rules) != 1 or rules[0].views is None or rules[0].pair_view is None:
        why = "the rule carries no exemplar views to validate on: strength 1 (the closed form)"
    elif on:
        why = "an edit written on earlier edits is not validated: strength 1 (the closed form)"
    else:
        why = None
    if why is not None:
        return {**StrengthChoice(1.0, why, budget=budget).to_dict(), "collateral": unit}
    rule = rules[0]
    views = rule.views
    pair_group = views.group[rule.pair_view]

    def measure(lam_c: torch.Tensor, d_c: torch.Tensor, s: float, stop=None) -> Any:
        energy = relative_collateral(w0, (lam_c, d_c), c, reference=reference) * s * s
        if not isinstance(budget, LocalityBudget):
            return energy
        edit = Edit([LayerUpdate(layer, view, lam_c * s, d_c)])
        return {**calibration.changed(classifier.model, edit, stop=stop), "energy": energy}

    def fold_edit(left_out: int | None, cand: tuple | None = None) -> Edit:
        keep = torch.ones_like(pair_group, dtype=torch.bool) if left_out is None else pair_group != left_out
        if cand is not None and not cand[2]:  # without augmentation: the exemplars' own pairs only
            keep &= views.own[rule.pair_view]
        if not bool(keep.any()):
            raise EditError("a validation fold leaves no pair to fit")
        pk, pv, pw = parts[0]
        sub = [(pk[keep], pv[keep], pw[keep])]
        lam_f, d_f, _, _ = solve(sub) if cand is None else solve(sub, cand[0], cand[1])
        return Edit([LayerUpdate(layer, view, lam_f, d_f)])

    if cands is None:
        out = choose_strength(classifier.model, views, fold_edit, lambda s, stop=None: measure(lam, d, s, stop),
                              budget=budget, to_beat=to_beat, ties_win=ties_win)
        return {**out.to_dict(), "collateral": unit * out.chosen ** 2}
    full: dict[tuple, tuple] = {}

    def cand_collateral(s: float, cand: tuple, stop=None) -> Any:
        return measure(*full[cand], s, stop)

    def safe_fold(left_out: int | None, cand: tuple) -> Edit:
        try:
            return fold_edit(left_out, cand)
        except (EditError, MaskError):  # too few keys left in this fold for the rank: it scores as no edit
            return Edit([LayerUpdate(layer, view, torch.zeros(w0.shape[0], 1), torch.ones(w0.shape[1], 1))])

    ok = []
    for cand in cands:  # a rank the masked keys cannot support is not a candidate
        try:  # the full solve is kept for cand_collateral, so each candidate is solved once
            lam_c, d_c, _, _ = solve(parts if cand[2] else _own_pairs(rule, parts), cand[0], cand[1])
        except (EditError, MaskError):  # context() says MaskError when the keys are fewer than the rank
            continue
        full[cand] = (lam_c, d_c)
        ok.append(cand)
    out = choose_strength(classifier.model, views, safe_fold, cand_collateral, budget=budget, candidates=ok,
                          to_beat=to_beat, ties_win=ties_win)
    lam_c, d_c = full[tuple(out.candidate)]  # the output energy alone: no calibration pass
    return {**out.to_dict(), "collateral": relative_collateral(w0, (lam_c, d_c), c, reference=reference) * out.chosen ** 2}
