"""Editing in the inverse direction, and checking an edit by inverting features (thesis Chapter 3).

In the inverse direction a layer's *output* is the key and its *input* is the value: the memory maps the
``f`` output channels back to the ``c`` input channels (views 3 and 4 of :mod:`rulewriter.core.memory`, whose
memory matrix is ``M = Wᵀ`` in the unfolded layouts ``W2ᵀ`` and ``W1ᵀ``). Chapter 3 tries three ways to
edit that memory; each one here returns an ordinary :class:`~rulewriter.core.edit.Edit` (a
:class:`~rulewriter.core.edit.LayerUpdate` of view 3 or 4 with ``M1 = M0 + Λ Dᵀ``) that saves, loads, applies,
undoes and composes like a forward edit.

=============  =====================================================================================
solver         what it solves
=============  =====================================================================================
``transpose``  Section 3.1, Algorithm 1: the forward closed form on ``M = Wᵀ`` itself:
               ``M1 = M0 + Λ (C⁻¹k*)ᵀ`` with ``C = E[k kᵀ]`` over *output-side* keys, so that
               ``M1 k* = v*`` (eqs. 3.6–3.8); the layer's new weight is ``M1ᵀ``. The network never
               computes ``Wᵀ``, so this constrains nothing the network does (see ``benchmarks/inverse.py``).
``pinv``       Section 3.2: the same closed form on ``P = W†`` (eqs. 3.11–3.13):
               ``P1 = W0† + Λ (C⁻¹k*)ᵀ`` with ``P1 k* = v*``; the layer's new weight is ``P1†``. When
               ``P1`` has full column rank, ``W1 v* = k*`` follows: the forward rule. The change
               ``P1† − W0`` has rank ≤ 3 per rule (a rank-one change of a matrix changes its
               pseudo-inverse by rank ≤ 3); it is factorised by SVD.
``fourier``    Section 3.3: the layer as a convolution. The inverse memory is the adjoint (transposed)
               convolution ``x ≈ M ⊛ y``; eqs. 3.43–3.57 minimise the change of its output over every
               output map, ``E‖ΔM ⊛ y‖²`` with the key autocorrelation ``R_y`` computed in the Fourier
               domain, subject to ``(M0 + ΔM) ⊛ k* = v*`` for the *spatially constant* map ``k*``
               (eq. 3.46). Solved exactly on the layer's own kernel support; see :func:`conv_lstsq_fourier`
               for the thesis's per-frequency formula and why it needs a filter as large as the image.
=============  =====================================================================================

Rules follow Algorithm 1's swap: ``k*`` is the *original* concept's output representation (``W0 A_v``)
and ``v*`` the *manipulated* concept's input representation (``A_k``)::

    from rulewriter import load_classifier, collect_second_moment
    from rulewriter.extensions.fourier import collect_key_spectrum
    from rulewriter.extensions.inverse import inverse_rule_from_images, inverse_rewrite

    clf = load_classifier("efficientnet-lite0")
    layer = clf.default_layer
    rule = inverse_rule_from_images(clf, layer, [car], [wooden_car], [wheel_mask], view=3)
    stats = collect_second_moment(clf, layer, "photos/", view=3, samples=1000)   # output-side keys
    edit = inverse_rewrite(clf, rule, stats, solver="pinv")                       # or "transpose"
    spectrum = collect_key_spectrum(clf, layer, "photos/", samples=1000)
    edit_f = inverse_rewrite(clf, rule, spectrum, solver="fourier")
    edit.save("wheel-wood-inverse.safetensors")

The Fourier formulation (the key spectrum and the convolutional least squares) lives in
:mod:`rulewriter.extensions.fourier`; checking an edit by inverting features in
:mod:`rulewriter.extensions.reconstruct`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.edit import DEFAULT_RIDGE, Edit, LayerUpdate, solve_lambda, timestamp, update_direction
from ..errors import EditError, StatsError
from ..core.memory import LayerMemory
from ..core.rules import Rule, describe_sources, masked_pairs, layer_io, load_exemplars, rewrite
from ..core.trace import get_module
from .fourier import KeySpectrum, fourier_layer_update

__all__ = [
    "INVERSE_VIEWS",
    "SOLVERS",
    "inverse_rule_from_images",
    "inverse_rewrite",
    "pinv_update",
    "factorize",
]

#: The inverse-direction views (thesis Fig. 2-3, architectures 3 and 4).
INVERSE_VIEWS = (3, 4)
#: Solver name → thesis section.
SOLVERS = {"transpose": "3.1", "pinv": "3.2", "fourier": "3.3"}


# ------------------------------------------------------------------------------------------ rules
def _check_view(view: int) -> None:
    if view not in INVERSE_VIEWS:
        raise EditError(
            f"inverse-direction edits use view 3 or 4 (the thesis's architectures 3 and 4), got view {view!r}; "
            "for views 1 and 2 use rulewriter.core.rules.rewrite"
        )


def inverse_rule_from_images(
    classifier,
    layer: str,
    originals: Sequence,
    manipulated: Sequence,
    masks: Sequence,
    *,
    view: int = 3,
) -> Rule:
    """Algorithm 1's rule: keys from the originals' *outputs*, values from the manipulated *inputs*.

    Lines 2–4 of Algorithm 1 (Section 3.1.1): ``k* ← W0 A_v`` (the layer's output, bias removed, for the
    original concept, e.g. a conventional wheel) and ``v* ← A_k`` (the layer's input for the manipulated
    concept, e.g. a wooden wheel), at the masked places. For view 3 a key is one output pixel (``f``) and its
    value the input patch under it (``c·m·n``); for view 4 a key is the patch of outputs an input pixel
    feeds (``f·m·n``) and its value that input pixel (``c``). The pairs are those of
    :func:`~rulewriter.core.rules.rule_from_images` with the roles of input and output swapped.

    Example:
        >>> rule = inverse_rule_from_images(clf, "_blocks.15._project_conv", ["car.jpg"], ["car_wood.jpg"],
        ...                                 ["wheels.png"], view=3)                     # doctest: +SKIP
        >>> rule.keys.shape[1], rule.values.shape[1]                                    # doctest: +SKIP
        (320, 1152)
    """
    _check_view(view)
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    orig, man, masks_s = load_exemplars(classifier, originals, manipulated, masks)
    pre = classifier.preprocess
    x_o, y_o = layer_io(classifier, layer, pre.batch(orig))
    x_m, _ = layer_io(classifier, layer, pre.batch(man))
    with torch.no_grad():  # keys subtract the bias, a parameter; the rule must not carry its graph
        keys, values = mem.keys(x_o, y_o), mem.values(x_m)
    k, v, w = masked_pairs(mem, keys, values, masks_s)
    desc = {"method": "inverse-images", "originals": describe_sources(originals),
            "manipulated": describe_sources(manipulated), "masks": describe_sources(masks)}
    return Rule(layer, view, k, v, w, desc)


# ------------------------------------------------------------------------------------------ updates
def factorize(delta: torch.Tensor, *, atol: float = 0.0, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ΔM = Λ Dᵀ`` by SVD, keeping the singular values above ``max(atol, rtol·σ₁)`` (float64).

    ``rtol`` defaults to ``max(shape)·eps``, numpy's matrix-rank tolerance. At least one column is kept, so a
    zero update is a rank-one update of zeros. Returns ``(Λ, D)`` with ``Λ = U S`` and ``D = V``.

    Example:
        >>> lam, d = factorize(torch.outer(torch.arange(3.), torch.ones(2)))
        >>> lam.shape, d.shape
        (torch.Size([3, 1]), torch.Size([2, 1]))
    """
    delta = delta.double()
    if delta.dim() != 2 or not torch.isfinite(delta).all():
        raise EditError(f"an update must be a finite matrix, got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rtol is None:
        rtol = max(delta.shape) * torch.finfo(torch.float64).eps
    tol = max(float(atol), float(rtol) * float(s[0]) if s.numel() else 0.0)
    r = max(1, int((s > tol).sum()))
    return u[:, :r] * s[:r], vh[:r].T.contiguous()


def pinv_update(
    m0: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    c: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    weights: torch.Tensor | None = None,
    directions: torch.Tensor | None = None,
    rcond: float | None = None,
) -> torch.Tensor:
    """Section 3.2 on matrices: edit ``P = W†`` in closed form, map back with ``†``; returns ``ΔM`` (float64).

    ``m0`` is the inverse memory ``Wᵀ`` (value_dim × key_dim), so the forward map is ``W = m0ᵀ`` and
    ``P0 = W†`` has ``m0``'s shape. With ``D = (C + εI)⁻¹ U`` (``U = directions``, default the keys) and ``Λ``
    fitted by :func:`~rulewriter.core.edit.solve_lambda` to ``P1 K = V`` (eqs. 3.11–3.13 as the forward solution
    2.19–2.21), the new memory is ``M1 = (P1†)ᵀ`` with ``P1 = P0 + Λ Dᵀ``. ``rcond`` is
    :func:`torch.linalg.pinv`'s ``rtol`` (default ``eps·max(shape)``).

    When ``P1`` has full column rank (keys no longer than values, as in view 3 of a 1×1 projection), ``P1† P1
    = I``, so ``W1 v* = k*``: the edited layer maps the value back to the key exactly — the forward rule.

    Example:
        >>> m0 = torch.randn(6, 4, dtype=torch.float64); k = torch.randn(4, 1, dtype=torch.float64)
        >>> v = torch.randn(6, 1, dtype=torch.float64)
        >>> dm = pinv_update(m0, k, v, torch.eye(4, dtype=torch.float64), ridge=0)
        >>> bool(torch.allclose((m0 + dm).T @ v, k))
        True
    """
    m0 = m0.double()
    u = keys if directions is None else directions
    kw = {} if rcond is None else {"rtol": rcond}
    p0 = torch.linalg.pinv(m0.T, **kw)
    d = update_direction(c, u.double(), ridge).to(m0.device)  # C may live on the CPU, the memory on a GPU
    lam = solve_lambda(p0, keys, values, d, weights)
    p1 = p0 + lam @ (d if d.dim() == 2 else d[:, None]).T
    return torch.linalg.pinv(p1, **kw).T - m0


def _moment(stats) -> torch.Tensor:
    if isinstance(stats, KeySpectrum):
        raise StatsError("the transpose and pinv solvers need a SecondMoment of the view's keys, not a KeySpectrum")
    c = stats.moment() if hasattr(stats, "moment") else torch.as_tensor(stats)
    return c.double()


def inverse_rewrite(
    classifier,
    rules: Rule | Sequence[Rule],
    stats,
    *,
    solver: str = "transpose",
    ridge: float = DEFAULT_RIDGE,
    fit: str = "mean",
    rcond: float | None = None,
) -> Edit:
    """Solve an inverse-direction edit with one of the thesis's three formulations (Chapter 3).

    Args:
        classifier: the model the rules were read from.
        rules: rules of view 3 or 4 (from :func:`inverse_rule_from_images`), one layer.
        stats: ``transpose``/``pinv``: a :class:`~rulewriter.core.stats.SecondMoment` of the view's keys (the
            layer's *outputs*, e.g. ``collect_second_moment(..., view=3)``) or its matrix ``C``.
            ``fourier``: a :class:`KeySpectrum` of the layer's output maps.
        solver: ``"transpose"`` (Section 3.1), ``"pinv"`` (3.2) or ``"fourier"`` (3.3); see the module docs.
        ridge: ``C + εI`` with ``ε = ridge·tr(C)/d`` (:data:`~rulewriter.core.edit.DEFAULT_RIDGE`).
        fit: ``"mean"``: each rule's mean key recalls its mean value exactly (the thesis's constraint,
            eqs. 3.8 and 3.13); ``"pairs"``: Λ fits every masked pair (transpose and pinv only).
        rcond: relative cut-off of the pseudo-inverses (pinv only).

    Returns:
        an :class:`~rulewriter.core.edit.Edit` whose update lives in the rules' view; ``meta["solver"]`` names
        the formulation. ``pinv`` and ``fourier`` updates are factorised by SVD, keeping every direction above
        the layer weight's own rounding (``eps`` of its dtype × ``‖M0‖₂``); ``meta["dropped_residual"]`` is
        the Frobenius norm of what was dropped.

    Example:
        >>> edit = inverse_rewrite(clf, rule, collect_second_moment(clf, layer, "photos/", view=3),
        ...                        solver="transpose")                                  # doctest: +SKIP
        >>> edit.updates[0].view, edit.meta["solver"]                                   # doctest: +SKIP
        (3, 'transpose')
    """
    rules = [rules] if isinstance(rules, Rule) else list(rules)
    if not rules:
        raise EditError("no rules to rewrite")
    layer, view = rules[0].layer, rules[0].view
    _check_view(view)
    if any((r.layer, r.view) != (layer, view) for r in rules):
        raise EditError("all rules of one rewrite must share a layer and view; compose separate edits instead")
    if solver not in SOLVERS:
        raise EditError(f"unknown inverse solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if fit not in ("mean", "pairs"):
        raise EditError(f"unknown fit {fit!r}; use 'mean' or 'pairs'")
    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    extra: dict[str, Any] = {}
    if solver == "transpose":
        # Algorithm 1 is the forward closed form applied to M = Wᵀ; rewrite() already handles any view.
        edit = rewrite(classifier, rules, _moment(stats), ridge=ridge, fit=fit, context="mean")
        update = edit.updates[0]
    else:
        m0 = mem.matrix().double()
        if solver == "pinv":
            c = _moment(stats)
            if c.shape != (mem.key_dim, mem.key_dim):
                raise EditError(f"statistics are for {c.shape[0]}-dim keys; {layer!r} view {view} has {mem.key_dim}")
            u = torch.stack([r.key() for r in rules], 1)
            if fit == "mean":
                kk, vv, ww = u, torch.stack([r.value() for r in rules], 1), None
            else:
                kk = torch.cat([r.keys for r in rules]).double().T
                vv = torch.cat([r.values for r in rules]).double().T
                ww = torch.cat([r.weights for r in rules]).double()
            delta = pinv_update(m0, kk, vv, c, ridge=ridge, weights=ww, directions=u, rcond=rcond)
        else:
            if fit != "mean":
                raise EditError('the fourier solver constrains the constant map k* (eq. 3.46); use fit="mean"')
            if not isinstance(stats, KeySpectrum):
                raise StatsError("the fourier solver needs a KeySpectrum of the layer's outputs (collect_key_spectrum)")
            k_pix = torch.stack([_pixel_key(mem, r) for r in rules], 1)
            v_pix = torch.stack([_pixel_value(mem, r) for r in rules], 1)
            dw = fourier_layer_update(mem, stats, k_pix, v_pix, ridge=ridge)
            delta = mem.matrix(weight=dw)
            extra["kernel_update_norm"] = float(dw.norm())
        # Directions of the update below the weight's own rounding (eps of its dtype × ‖M0‖₂) cannot change
        # the stored weight beyond an ulp; they are the pseudo-inverses' rounding, amplified by cond(W).
        atol = torch.finfo(mem.weight.dtype).eps * float(torch.linalg.matrix_norm(m0, ord=2))
        lam, d = factorize(delta, atol=atol)
        extra["dropped_residual"] = float((delta - lam @ d.T).norm())
        update = LayerUpdate(layer, view, lam, d)
    meta = {
        "created": timestamp(),
        "model": classifier.name,
        "weights": classifier.weights_id,
        "direction": "inverse",
        "solver": solver,
        "thesis_section": SOLVERS[solver],
        "layer": layer,
        "view": view,
        "rank": update.rank,
        "ridge": ridge,
        "fit": fit,
        "n_pairs": int(sum(r.keys.shape[0] for r in rules)),
        "stats": getattr(stats, "count", None),
        "rules": [r.description for r in rules],
        **extra,
    }
    return Edit([update], meta)


def _pixel_key(mem: LayerMemory, rule: Rule) -> torch.Tensor:
    """An ``f``-dim output pixel from a rule's keys: view 3 keys are pixels; a view-4 key is a patch of
    outputs, averaged over the taps that exist for its input pixel (a strided layer's other taps are 0)."""
    if rule.view == 3:
        return rule.key()
    k = rule.keys.double().reshape(rule.keys.shape[0], mem.f, mem.patch)
    present = (k.abs().sum(1) > 0).double()  # (n, taps)
    per = (k * present[:, None]).sum(2) / present.sum(1, keepdim=True).clamp_min(1)
    w = rule.weights.double()
    return (per * w[:, None]).sum(0) / w.sum()


def _pixel_value(mem: LayerMemory, rule: Rule) -> torch.Tensor:
    """A ``c``-dim input pixel from a rule's values: view 4 values are pixels; a view-3 value is the input
    patch under the key, averaged over its taps."""
    if rule.view == 4:
        return rule.value()
    return rule.value().reshape(mem.c, mem.patch).mean(1)
