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
    from rulewriter.extensions.inverse import inverse_rule_from_images, inverse_rewrite, collect_key_spectrum

    clf = load_classifier("efficientnet-lite0")
    layer = clf.default_layer
    rule = inverse_rule_from_images(clf, layer, [car], [wooden_car], [wheel_mask], view=3)
    stats = collect_second_moment(clf, layer, "photos/", view=3, samples=1000)   # output-side keys
    edit = inverse_rewrite(clf, rule, stats, solver="pinv")                       # or "transpose"
    spectrum = collect_key_spectrum(clf, layer, "photos/", samples=1000)
    edit_f = inverse_rewrite(clf, rule, spectrum, solver="fourier")
    edit.save("wheel-wood-inverse.safetensors")

Did the edit take hold? Section 3.2 inverts features by gradient descent from a random start and records the
loss and the distance to each target per iteration (the linear stages use conjugate gradients by default:
the same limit, the pre-image nearest the start, in far fewer steps)::

    rec = reconstruct_features(module, y_wheel, {"wheel": x_wheel, "wood": x_wood}, input_shape=x_wheel.shape,
                               mask=wheel_grid)
    rec.closest()                      # "wood" or "wheel"
    plot_reconstructions("curves.png", {"before": rec0, "after": rec})

:func:`reconstruct_key` inverts one output pixel, :func:`reconstruct_features` a whole output map (eqs.
3.14–3.15), :func:`reconstruct_image` the network up to the layer (eqs. 3.9–3.10). Keys and feature maps are
compared by cosine similarity; images by LPIPS when the ``lpips`` package *and* its backbone weights are on
disk, otherwise by :class:`FeatureDistance`, an LPIPS-form distance on the classifier's own early features
(labelled as such wherever it is reported). :func:`dot_similarity` gives the dot-product heatmaps of Figs.
3-4 and 3-5 for :func:`rulewriter.concepts.heatmap.save_overlay`.

Which target a reconstruction aims at matters. Section 3.2 reconstructs the *edited* network's output of the
wheel image through the edited network; the wheel input itself then has zero loss, so the reconstruction
can only drift away from it inside the layer's null space. To see an edit, aim at the *unedited* output
(``protocol="held"`` in the benchmark): the edited layer's pre-images of what a wheel used to produce.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_bytes
from ..core.edit import DEFAULT_RIDGE, Edit, LayerUpdate, solve_lambda, timestamp, update_direction
from ..errors import EditError, LayerError, MaskError, RulewriterError, StatsError
from ..core.memory import LayerMemory
from ..core.rules import Rule, _describe_sources, _pairs, layer_io, load_exemplars, prepare_mask, rewrite
from ..core.stats import atomic_save, read_safetensors, stats_cache_key
from ..core.trace import Trace, get_module

__all__ = [
    "INVERSE_VIEWS",
    "SOLVERS",
    "inverse_rule_from_images",
    "inverse_rewrite",
    "pinv_update",
    "factorize",
    "KeySpectrum",
    "collect_key_spectrum",
    "correlate",
    "conv_lstsq_fourier",
    "fourier_layer_update",
    "Reconstruction",
    "reconstruct_key",
    "reconstruct_features",
    "reconstruct_image",
    "FeatureDistance",
    "perceptual_distance",
    "dot_similarity",
    "plot_reconstructions",
    "add_cli",
]

#: The inverse-direction views (thesis Fig. 2-3, architectures 3 and 4).
INVERSE_VIEWS = (3, 4)
#: Solver name → thesis section.
SOLVERS = {"transpose": "3.1", "pinv": "3.2", "fourier": "3.3"}
SPECTRUM_FORMAT = "rulewriter.key_spectrum/1"


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
    k, v, w = _pairs(mem, keys, values, masks_s)
    desc = {"method": "inverse-images", "originals": _describe_sources(originals),
            "manipulated": _describe_sources(manipulated), "masks": _describe_sources(masks)}
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
    d = update_direction(c, u.double(), ridge)
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


# ------------------------------------------------------------------------------------------ Fourier
def correlate(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Circular cross-correlation ``R[p, q](Δ) = Σ_n Σ_x a_p(x) b_q(x + Δ)`` via the FFT (float64).

    ``a`` (N, p, H, W), ``b`` (N, q, H, W) (default ``a``: the autocorrelation ``R_A`` of eq. 3.36). The
    DFT of ``R`` over ``Δ`` is ``Σ_n conj(â_p) b̂_q``, the spectra of eq. 3.39. Returns (p, q, H, W).

    Example:
        >>> a = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        >>> r = correlate(a)
        >>> bool(torch.allclose(r[:, :, 0, 0], torch.einsum("nphw,nqhw->pq", a, a)))
        True
    """
    b = a if b is None else b
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise EditError(f"correlate needs (N, p, H, W) and (N, q, H, W) maps, got {tuple(a.shape)}, {tuple(b.shape)}")
    fa, fb = torch.fft.fft2(a.double()), torch.fft.fft2(b.double())
    return torch.fft.ifft2(torch.einsum("nphw,nqhw->pqhw", fa.conj(), fb)).real


def _toeplitz(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``C[(p', t'), (p, t)] = R[p', p](δ_t − δ_t')``: the Gram matrix of shifted maps (Toeplitz blocks)."""
    p, _, h, w = r.shape
    dh = (offsets[None, :, 0] - offsets[:, None, 0]) % h  # (t', t)
    dw = (offsets[None, :, 1] - offsets[:, None, 1]) % w
    blocks = r[:, :, dh, dw]  # (p', p, t', t)
    t = offsets.shape[0]
    return blocks.permute(0, 2, 1, 3).reshape(p * t, p * t)


def _as_cols(t: torch.Tensor | None, n: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.double()
    t = t[:, None] if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[0] != n:
        raise EditError(f"{what} must have {n} rows, got shape {tuple(t.shape)}")
    return t


def conv_lstsq_fourier(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    offsets: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """Least-squares circular convolution ``V ≈ K ⋆ A`` in the Fourier domain (Section 3.3, eqs. 3.37–3.57).

    The model is the multichannel circular cross-correlation ``V_o(x) = Σ_p Σ_t K[o, p, t] A_p(x + δ_t)``
    over maps ``inputs`` A (N, p, H, W) and ``targets`` V (N, o, H, W), float64.

    * ``offsets=None`` (the thesis's formula): the filter spans the whole H×W grid. Parseval makes the
      problem separable per frequency ω: ``conj(K̂(ω)) = S_VA(ω) S_AA(ω)⁻¹`` with the cross-spectra
      ``S_VA = Σ V̂ Âᴴ = F(V ⋆ A)`` and ``S_AA = Σ Â Âᴴ = F(R_A)`` (eqs. 3.39–3.42, the inverse being a
      p×p solve per frequency). Returns K as (o, p, H, W), indexed by the offset δ.
    * ``offsets=[(dh, dw), ...]``: the filter is confined to those taps (a real layer's m×n kernel). The
      support couples the frequencies, so eq. 3.37 is solved on the support itself: the normal equations
      ``K C = Y`` with Toeplitz blocks ``C[(p',t'),(p,t)] = R_A[p',p](δ_t − δ_t')`` and
      ``Y[o,(p,t)] = R_VA[o,p](δ_t)``, both correlations taken by FFT (:func:`correlate`).
      Returns K as (o, p, T).

    ``key`` (p,) or (p, r) and ``value`` (o,) or (o, r) add the constraint of eqs. 3.44–3.46: the filter's
    response to the spatially constant map ``k*`` is ``v*``, ``Σ_{p,t} K[o,p,t] k*_p = v*_o``. Its Lagrange
    term is constant over the taps (eq. 3.50), so with full support it lives at ω = 0 only (eq. 3.55): the
    constrained filter differs from the unconstrained one by a constant over the whole grid. On a tap
    support it is the forward rank-r update ``Λ (C⁻¹κ)ᵀ`` with ``κ = k*`` repeated over the taps.
    ``ridge`` adds ``ε = ridge·tr/d`` to each normal matrix (0: exact, singular spectra raise StatsError).

    Example:
        >>> a = torch.randn(16, 2, 4, 4, dtype=torch.float64)
        >>> k = torch.randn(3, 2, 2, dtype=torch.float64)        # two taps: δ = (0, 0) and (0, 1)
        >>> v = torch.einsum("opt,tnphw->nohw", k, torch.stack([a, torch.roll(a, -1, 3)]))
        >>> torch.allclose(conv_lstsq_fourier(a, v, offsets=[(0, 0), (0, 1)]), k)
        True
    """
    a, v = inputs.double(), targets.double()
    if a.dim() != 4 or v.dim() != 4 or a.shape[0] != v.shape[0] or a.shape[2:] != v.shape[2:]:
        raise EditError(f"inputs and targets must be (N, p, H, W) and (N, o, H, W) on one grid, got "
                        f"{tuple(a.shape)} and {tuple(v.shape)}")
    n, p, h, w = a.shape
    o = v.shape[1]
    key, value = _as_cols(key, p, "key"), _as_cols(value, o, "value")
    if (key is None) != (value is None) or (key is not None and key.shape[1] != value.shape[1]):
        raise EditError("give key and value together, with one column per constraint")
    if offsets is None:
        fa, fv = torch.fft.fft2(a), torch.fft.fft2(v)
        s_aa = torch.einsum("nphw,nqhw->hwpq", fa, fa.conj())
        s_va = torch.einsum("nohw,nqhw->hwoq", fv, fa.conj())
        if ridge:
            eps = ridge * torch.diagonal(s_aa, dim1=-2, dim2=-1).real.mean(-1)
            s_aa = s_aa + eps[..., None, None] * torch.eye(p, dtype=s_aa.dtype)
        try:
            g = torch.linalg.solve(s_aa, s_va, left=False)  # G S_AA = S_VA, one p×p system per frequency
        except RuntimeError as e:
            raise StatsError(f"a cross-spectrum S_AA(ω) is singular ({e}); use more maps or ridge > 0") from None
        if key is not None:
            # Only the DC term carries the constraint (eq. 3.55): the forward closed form at ω = 0.
            g0 = g[0, 0].real
            d = update_direction(s_aa[0, 0].real, key, 0.0)
            g[0, 0] = (g0 + solve_lambda(g0, key, value, d) @ d.T).to(g.dtype)
        return torch.fft.ifft2(g.conj().permute(2, 3, 0, 1)).real  # eqs. 3.41–3.42
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
    c = _toeplitz(correlate(a), off)
    y = correlate(v, a)[:, :, off[:, 0] % h, off[:, 1] % w].reshape(o, p * off.shape[0])
    k = update_direction(c, y.T, ridge).T  # K = Y C⁻¹ by Cholesky
    if key is not None:
        kappa = key.repeat_interleave(off.shape[0], dim=0)  # k* at every tap, (p, t) order
        d = update_direction(c, kappa, ridge)
        k = k + solve_lambda(k, kappa, value, d) @ d.T
    return k.reshape(o, p, off.shape[0])


class KeySpectrum:
    """Cross-spectra ``Σ conj(ŷ_f(ω)) ŷ_g(ω)`` of a layer's output maps: ``F(R_y)`` of eq. 3.39, mergeable.

    The Fourier solver's statistic: :meth:`autocorrelation` gives ``R_y[f, g](Δ) = E Σ_x y_f(x) y_g(x+Δ)``
    (circular) for every offset of the output grid. Sums are complex128; the maps must share one grid.

    Example:
        >>> s = KeySpectrum(); s.add(torch.randn(4, 3, 5, 6))
        >>> s.autocorrelation().shape
        torch.Size([3, 3, 5, 6])
    """

    def __init__(self) -> None:
        self.spec: torch.Tensor | None = None  # (f, f, H, W//2+1) complex128
        self.grid: tuple[int, int] | None = None
        self.count = 0

    @property
    def dim(self) -> int:
        return 0 if self.spec is None else int(self.spec.shape[0])

    def add(self, maps: torch.Tensor) -> None:
        """Add output maps (B, f, H, W) (bias removed)."""
        if maps.dim() != 4:
            raise StatsError(f"a key spectrum takes (B, f, H, W) maps, got {tuple(maps.shape)}")
        grid = tuple(maps.shape[2:])
        if self.grid is not None and (grid != self.grid or maps.shape[1] != self.dim):
            raise StatsError(f"maps {tuple(maps.shape[1:])} do not match the spectrum's {self.dim}×{self.grid}")
        y = torch.fft.rfft2(maps.detach().double())
        part = torch.einsum("bfhw,bghw->fghw", y.conj(), y)
        self.spec = part if self.spec is None else self.spec + part.to(self.spec.device)
        self.grid = grid
        self.count += int(maps.shape[0])

    def merge(self, other: "KeySpectrum") -> "KeySpectrum":
        """Add another spectrum of the same layer (in place) and return self."""
        if other.spec is None:
            return self
        if self.spec is None:
            self.spec, self.grid = other.spec.clone(), other.grid
        elif other.grid != self.grid or other.dim != self.dim:
            raise StatsError("cannot merge spectra of different grids or channel counts")
        else:
            self.spec = self.spec + other.spec.to(self.spec.device)
        self.count += other.count
        return self

    def autocorrelation(self) -> torch.Tensor:
        """``R_y`` (f, f, H, W) float64, the mean over maps of ``Σ_x y_f(x) y_g(x + Δ)``."""
        if self.spec is None or not self.count:
            raise StatsError("no maps were added; the key spectrum is empty")
        return torch.fft.irfft2(self.spec, s=self.grid) / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.spec is None:
            raise StatsError("no maps were added; nothing to save")
        return {"count": torch.tensor([self.count], dtype=torch.int64),
                "grid": torch.tensor(self.grid, dtype=torch.int64),
                "real": self.spec.real.contiguous().cpu(), "imag": self.spec.imag.contiguous().cpu()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        try:
            self.count = int(state["count"].reshape(-1)[0])
            self.grid = tuple(int(g) for g in state["grid"].tolist())
            self.spec = torch.complex(state["real"].double(), state["imag"].double())
        except (KeyError, RuntimeError) as e:
            raise StatsError(f"key spectrum file is malformed ({e})") from None

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write atomically as safetensors (real and imaginary parts); ``metadata`` goes in the header."""
        header = {"format": SPECTRUM_FORMAT, "meta": json.dumps(metadata or {}, sort_keys=True, default=str)}
        return atomic_save(self.state_dict(), Path(path), header)

    @classmethod
    def load(cls, path: str | Path) -> tuple["KeySpectrum", dict]:
        """Read a spectrum saved by :meth:`save`; returns it and its metadata."""
        tensors, header = read_safetensors(Path(path), StatsError)
        if header.get("format") != SPECTRUM_FORMAT:
            raise StatsError(f"{path} is not a rulewriter key spectrum (format {header.get('format')!r})")
        s = cls()
        s.load_state_dict(tensors)
        return s, json.loads(header.get("meta", "{}"))


def _output_maps(mem: LayerMemory, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The layer's output maps without bias, (B, f, H, W); Linear outputs become (B, f, L, 1)."""
    return LayerMemory(mem.module, 3, name=mem.name).keys(x, y)


def collect_key_spectrum(
    classifier,
    layer: str,
    data,
    *,
    samples: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> KeySpectrum:
    """Stream images to ``layer`` and collect the :class:`KeySpectrum` of its output maps (for ``fourier``).

    Arguments as :func:`~rulewriter.core.stats.collect_second_moment` (same data sources, subsampling and cache
    keys). Example:

        >>> spec = collect_key_spectrum(clf, "_conv_stem", "photos/", samples=200)       # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..core.stats import _dataset, _fingerprint

    model = classifier.model
    mem = LayerMemory(get_module(model, layer), 3, name=layer)
    ds = _dataset(classifier, data, samples, seed)
    if len(ds) == 0:
        raise StatsError("no images to collect statistics from")
    meta = {"kind": "key_spectrum", "model": classifier.name, "weights": classifier.weights_id, "layer": layer,
            "data": _fingerprint(ds), "n_images": len(ds), "seed": seed,
            "preprocess": classifier.preprocess.describe()}
    cache = None
    if cache_dir is not None:
        key = stats_cache_key(meta)
        cache = Path(cache_dir).expanduser() / f"spectrum-{classifier.name}-{layer.replace('/', '_')}-{key[:16]}.safetensors"
        if cache.is_file():
            spec, saved = KeySpectrum.load(cache)
            if saved.get("key") == key:
                return spec
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    spec = KeySpectrum()
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.no_grad(), Trace(model, layer, stop=True) as tr:
            for batch in tqdm(loader, desc=f"spectrum {layer}", disable=not progress, unit="batch"):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                tr(x.to(device))
                spec.add(_output_maps(mem, tr.input, tr.output))
    finally:
        model.train(was_training)
    if cache is not None:
        spec.save(cache, {**meta, "key": stats_cache_key(meta), "count": spec.count})
    return spec


def _pads(mem: LayerMemory) -> tuple[int, int]:
    """Total top and left padding (module padding plus a static-padding module)."""
    if mem.kind == "linear":
        return 0, 0
    left, _, top, _ = mem.module._reversed_padding_repeated_twice
    sp = getattr(mem.module, "static_padding", None)
    extra = getattr(sp, "padding", 0) if isinstance(sp, nn.Module) else 0
    extra = [extra] * 4 if isinstance(extra, int) else list(extra)
    return int(top) + int(extra[2]), int(left) + int(extra[0])


def _phase_taps(mem: LayerMemory) -> dict[tuple[int, int], list[tuple[int, int, int, int]]]:
    """For each input phase φ, the taps ``(a_h, a_w, e_h, e_w)`` of the adjoint convolution.

    The layer computes ``y(i) = Σ_a W(a) x(s·i + d·a − p)``. An input pixel ``u = s·j + φ`` is read by tap
    ``a`` when ``d·a − p ≡ φ (mod s)``, from the output ``i = j − e`` with ``e = (d·a − p − φ) / s``; so
    each phase of the input is a stride-1 convolution of the output map (a polyphase decomposition).
    """
    (kh, kw), (sh, sw), (dh, dw) = mem.kernel, mem.stride, mem.dilation
    pt, pl = _pads(mem)
    out: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for ah in range(kh):
        qh = dh * ah - pt
        for aw in range(kw):
            qw = dw * aw - pl
            phase = (qh % sh, qw % sw)
            out.setdefault(phase, []).append((ah, aw, (qh - phase[0]) // sh, (qw - phase[1]) // sw))
    return out


def fourier_layer_update(
    mem: LayerMemory,
    spectrum: KeySpectrum,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """The layer's weight change (float64, the weight's shape) from eqs. 3.52–3.57 in the inverse direction.

    The inverse memory is the adjoint convolution ``x ≈ M ⊛ y`` (``M[c, f, a] = W[f, c, a]``). Following
    Section 2.1.4 its data term takes the values the memory recalls, ``V = M0 ⊛ y``, so ``M0`` is the
    least-squares solution (eq. 3.38 holds) and the objective is the collateral change ``Σ‖ΔM ⊛ y‖²``
    over the output maps of ``spectrum``, subject to ``(M0 + ΔM) ⊛ k* = v*`` for the constant map ``k*``
    (eq. 3.46). A strided layer is split into input phases (:func:`_phase_taps`); each phase is a stride-1
    convolution with its own taps and gets the closed form on its Toeplitz-block ``C`` built from ``R_y``
    (eq. 3.36, by FFT). ``keys`` (f, r) and ``values`` (c, r) are the constraint pairs, one per column.

    For a 1×1 stride-1 layer ``C = R_y(0) = E[y yᵀ]``: the update equals the ``transpose`` solver's.
    """
    if spectrum.dim != mem.f:
        raise StatsError(f"the spectrum has {spectrum.dim} channels; {mem.name!r} has {mem.f} outputs")
    keys, values = _as_cols(keys, mem.f, "keys"), _as_cols(values, mem.c, "values")
    r_y = spectrum.autocorrelation()
    w0 = mem.weight.detach().double()
    w0 = w0[:, :, None, None] if w0.dim() == 2 else w0
    dw = torch.zeros_like(w0)
    for phase, taps in _phase_taps(mem).items():
        ah = torch.tensor([t[0] for t in taps])
        aw = torch.tensor([t[1] for t in taps])
        offsets = torch.tensor([(-t[2], -t[3]) for t in taps])  # x_φ(j) reads y(j − e) = y(j + δ)
        c = _toeplitz(r_y, offsets)
        m0 = w0[:, :, ah, aw].permute(1, 0, 2).reshape(mem.c, -1)  # (c, (f, t))
        kappa = keys.repeat_interleave(len(taps), dim=0)
        d = update_direction(c, kappa, ridge)
        lam = solve_lambda(m0, kappa, values, d)
        dw[:, :, ah, aw] = (lam @ d.T).reshape(mem.c, mem.f, len(taps)).permute(1, 0, 2)
    return dw.reshape(mem.weight.shape)


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


# ------------------------------------------------------------------------------------------ reconstructions
@dataclass
class Reconstruction:
    """A reconstruction by gradient descent and its history (Figs. 3-7 to 3-9).

    ``losses[t]`` and ``distances[name][t]`` are measured at iterate ``t`` (``t = 0`` is the random start,
    the last entry is ``result``). ``metric`` says what the distances are; ``higher_is_closer`` is True for
    similarities (cosine) and False for distances.
    """

    stage: str
    result: torch.Tensor
    losses: list[float]
    distances: dict[str, list[float]]
    metric: str
    higher_is_closer: bool
    info: dict[str, Any] = field(default_factory=dict)

    def final(self) -> dict[str, float]:
        """The last distance to each target."""
        return {k: v[-1] for k, v in self.distances.items()}

    def closest(self) -> str | None:
        """The target the final reconstruction is closest to (None without targets)."""
        fin = self.final()
        if not fin:
            return None
        return (max if self.higher_is_closer else min)(fin, key=fin.get)

    def to_dict(self, every: int = 1) -> dict[str, Any]:
        """A JSON-able summary; ``every`` thins the per-iteration curves."""
        def thin(xs: list[float]) -> list[float]:
            keep = xs[::every] + ([xs[-1]] if (len(xs) - 1) % every else [])
            return [float(f"{x:.6g}") for x in keep]

        return {"stage": self.stage, "metric": self.metric, "higher_is_closer": self.higher_is_closer,
                "steps": len(self.losses) - 1, "final_loss": self.losses[-1], "final": self.final(),
                "closest": self.closest(), "every": every, "losses": thin(self.losses),
                "distances": {k: thin(v) for k, v in self.distances.items()}, **self.info}

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Write the loss and distance curves as a PNG (see :func:`plot_reconstructions`)."""
        return plot_reconstructions(path, {self.stage: self}, title=title)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _least_squares_descent(
    forward: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    steps: int,
    method: str,
    sigma_max_sq: float,
    track: Callable[[torch.Tensor], None],
    rcond: float = 0.0,
) -> tuple[torch.Tensor, list[float]]:
    """Minimise ``‖A x − b‖² + λ‖x − x0‖²`` from ``x0``, ``λ = (rcond·σ_max)²``; returns ``(x, losses)``.

    ``losses`` are the data term ``‖A x − b‖²`` at every iterate (``track(x)`` sees each one). ``"cg"`` is
    conjugate-gradient least squares (CGLS); ``"gd"`` plain gradient descent with step ``1/L``. Both only
    ever add vectors in the row space of A to ``x0``, so both converge to the same point: the minimiser
    nearest the start, the null-space part of ``x0`` kept. The damping ``λ`` makes directions that A scales
    by less than ``rcond·σ_max`` part of that null space, as ``rcond`` does for a pseudo-inverse; without
    it, a target with a small component off A's range would be met by moving ~1/σ along them (gradient
    descent only gets there after ~(σ_max/σ)² steps, conjugate gradients within rank(A) steps).
    """
    lam = (rcond ** 2) * sigma_max_sq
    x = x0.clone()
    r = b - forward(x)
    losses = [float((r * r).sum())]
    track(x)
    if method == "gd":
        step = 1.0 / (2.0 * (sigma_max_sq + lam))
        for _ in range(steps):
            x = x + step * 2.0 * (adjoint(r) - lam * (x - x0))
            r = b - forward(x)
            losses.append(float((r * r).sum()))
            track(x)
        return x, losses
    z = torch.zeros_like(x0)  # x = x0 + z
    s = adjoint(r)
    p = s.clone()
    gamma = float((s * s).sum())
    # Past convergence the search direction is rounding noise and CG's step would amplify it.
    floor = gamma * (64 * torch.finfo(torch.float64).eps) ** 2
    for _ in range(steps):
        if gamma <= floor:  # converged: stay put, keep recording
            losses.append(losses[-1])
            track(x)
            continue
        q = forward(p)
        alpha = gamma / max(float((q * q).sum()) + lam * float((p * p).sum()), 1e-300)
        z = z + alpha * p
        x = x0 + z
        r = r - alpha * q
        s = adjoint(r) - lam * z
        gamma_new = float((s * s).sum())
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
        losses.append(float((r * r).sum()))
        track(x)
    return x, losses


def _check_method(method: str) -> None:
    if method not in ("cg", "gd"):
        raise EditError(f"unknown method {method!r}; use 'cg' (conjugate gradients) or 'gd' (gradient descent)")


def reconstruct_key(
    module: nn.Module,
    output_pixel: torch.Tensor,
    targets: Mapping[str, torch.Tensor] | None = None,
    *,
    steps: int = 300,
    seed: int = 0,
    init_scale: float = 1.0,
    method: str = "cg",
    rcond: float = 1e-6,
) -> Reconstruction:
    """The key (the unfolded input patch, ``c·m·n``) that one output pixel came from, by gradient descent.

    Minimises ``‖W2 k + b − y‖²`` (the layer at one pixel, view 2's matrix, float64) from
    ``k0 ~ N(0, init_scale²)``: by conjugate gradients (``method="cg"``) or plain gradient descent with step
    ``1/L`` (``"gd"``); both converge to the pre-image nearest ``k0``. When the patch is longer than the pixel
    (``c·m·n > f``) the random start's null-space part stays in the answer. Directions the layer scales by less
    than ``rcond·σ_max`` count as null space (a damping ``(rcond·σ_max)²‖k − k0‖²``), as for a pseudo-inverse:
    otherwise a target slightly off the layer's range is met by moving ~1/σ along them. Distances are
    cosine similarities to each target key (``c·m·n``).

    Example:
        >>> conv = torch.nn.Conv2d(3, 12, 1)
        >>> k = torch.randn(3); y = conv(k[None, :, None, None])[0, :, 0, 0]
        >>> rec = reconstruct_key(conv, y.detach(), {"truth": k}, steps=20)
        >>> rec.final()["truth"] > 0.999
        True
    """
    _check_method(method)
    mem = LayerMemory(module, 2)
    w = mem.matrix().double()
    y = output_pixel.detach().double().reshape(-1)
    if y.shape[0] != w.shape[0]:
        raise EditError(f"an output pixel of this layer has {w.shape[0]} channels, got {y.shape[0]}")
    if mem.bias is not None:
        y = y - mem.bias.detach().double()
    targets = {k: v.detach().double().reshape(-1) for k, v in (targets or {}).items()}
    for name, t in targets.items():
        if t.shape[0] != w.shape[1]:
            raise EditError(f"target {name!r} has {t.shape[0]} entries; a key of this layer has {w.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(w.shape[1], generator=g, dtype=torch.float64) * init_scale
    dist: dict[str, list[float]] = {n: [] for n in targets}

    def track(k: torch.Tensor) -> None:
        for n, tg in targets.items():
            dist[n].append(_cos(k, tg))

    k, losses = _least_squares_descent(lambda v: w @ v, lambda r: w.T @ r, y, k0, steps, method,
                                       float(torch.linalg.matrix_norm(w, ord=2)) ** 2, track, rcond)
    return Reconstruction("key", k, losses, dist, "cosine similarity", True, {"method": method, "rcond": rcond})


def _lipschitz(linear: Callable[[torch.Tensor], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor],
               shape: Sequence[int], dtype: torch.dtype, iters: int = 20, seed: int = 0) -> float:
    """``σ_max²`` of a linear map by power iteration on ``AᵀA``, with a 2% margin."""
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(*shape, generator=g).to(dtype)
    est = 0.0
    for _ in range(iters):
        v = v / v.norm()
        ata = adjoint(linear(v))
        est = float((ata * v).sum())
        v = ata
    return est * 1.02


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        return float(per_pixel.mean())
    m = mask.to(per_pixel)
    return float((per_pixel * m).sum() / m.sum().clamp_min(1e-12))


def _pixel_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine over channels of two (c, h, w) maps, (h, w)."""
    a, b = a.double(), b.double()
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)


def reconstruct_features(
    module: nn.Module,
    output_map: torch.Tensor,
    targets: Mapping[str, torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int],
    mask: torch.Tensor | None = None,
    steps: int = 300,
    seed: int = 0,
    init_scale: float = 1.0,
    method: str = "cg",
    rcond: float = 1e-6,
) -> Reconstruction:
    """The layer's input feature map from its output map, by gradient descent (eqs. 3.14–3.15).

    Minimises ``‖l(A) − A_w‖²`` through the layer itself (its padding, stride and bias; a float64 copy)
    from ``A0 ~ N(0, init_scale²)``, by conjugate gradients (``method="cg"``) or gradient descent with step
    ``1/L`` (``"gd"``, ``L`` by power iteration); the adjoint comes from autograd. ``rcond`` treats directions
    the layer nearly annihilates as null space, as in :func:`reconstruct_key`. ``input_shape`` is
    (c, H, W) or (1, c, H, W). Distances: the per-pixel cosine similarity to each target map, averaged with
    the grid weights ``mask`` (h, w) when given (e.g. the wheel pixels), else over all pixels.

    Example:
        >>> conv = torch.nn.Conv2d(4, 9, 3, padding=1)
        >>> a = torch.randn(1, 4, 6, 6)
        >>> rec = reconstruct_features(conv, conv(a).detach(), {"truth": a}, input_shape=a.shape, steps=60)
        >>> rec.final()["truth"] > 0.999
        True
    """
    import copy

    _check_method(method)
    shape = tuple(input_shape)
    shape = shape if len(shape) == 4 else (1, *shape)
    if shape[0] != 1:
        raise EditError(f"reconstruct one feature map at a time; input_shape has batch {shape[0]}")
    layer = copy.deepcopy(module).double().requires_grad_(False)
    target = output_map.detach().double()
    target = target if target.dim() == 4 else target[None]
    tg = {n: (t.detach()[0] if t.dim() == 4 else t.detach()) for n, t in (targets or {}).items()}
    for name, t in tg.items():
        if tuple(t.shape) != shape[1:]:
            raise EditError(f"target {name!r} is {tuple(t.shape)}; the input map is {shape[1:]}")
    zero = torch.zeros(shape, dtype=torch.float64)
    with torch.no_grad():
        offset = layer(zero)  # the bias (and nothing else: the layer is affine)
    if offset.shape != target.shape:
        raise EditError(f"an input of shape {shape} gives outputs {tuple(offset.shape)}, the target is "
                        f"{tuple(target.shape)}; pass the layer's input_shape")

    def linear(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(x) - offset

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        x = zero.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(layer(x), x, grad_outputs=r)
        return g

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * init_scale
    dist: dict[str, list[float]] = {n: [] for n in tg}

    def track(x: torch.Tensor) -> None:
        for n, tt in tg.items():
            dist[n].append(_masked_mean(_pixel_cos(x[0], tt), mask))

    sigma_sq = _lipschitz(linear, adjoint, shape, torch.float64, seed=seed)
    x, losses = _least_squares_descent(linear, adjoint, target - offset, x0, steps, method, sigma_sq, track, rcond)
    return Reconstruction("features", x, losses, dist, "cosine similarity (per pixel, mask-weighted mean)", True,
                          {"method": method, "rcond": rcond})


# ------------------------------------------------------------------------------------------ image distance
_LITE0_DISTANCE_LAYERS = ("_blocks.2", "_blocks.4", "_blocks.7")


class FeatureDistance:
    """LPIPS-form distance on the classifier's own features — *not* LPIPS (no learned weights).

    For each layer, features are unit-normalised over channels at every location, and the squared
    difference is averaged over locations (weighted by ``mask`` resampled to the layer's grid) and then over
    layers: ``d = mean_l Σ_x m(x) ‖f̂_l(a)(x) − f̂_l(b)(x)‖² / Σ_x m(x)`` ∈ [0, 4]. Layers default to the ends
    of EfficientNet's 56-, 28- and 14-pixel stages, else three evenly spaced convs of the network's first
    half.

    Example:
        >>> dist = FeatureDistance(clf)                                   # doctest: +SKIP
        >>> dist(img_a, dist.features(img_b))                             # doctest: +SKIP
        0.41
    """

    def __init__(self, classifier, layers: Sequence[str] | None = None, mask: torch.Tensor | None = None) -> None:
        self.model = classifier.model
        if layers is None:
            names = {n for n, _ in self.model.named_modules()}
            if all(n in names for n in _LITE0_DISTANCE_LAYERS):
                layers = _LITE0_DISTANCE_LAYERS
            else:
                convs = [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]
                if len(convs) < 3:
                    raise LayerError("FeatureDistance needs layers= for a model with fewer than 3 convs")
                half = convs[: max(3, len(convs) // 2)]
                layers = [half[len(half) // 4], half[len(half) // 2], half[-1]]
        self.layers = list(layers)
        for name in self.layers:
            get_module(self.model, name)
        self.mask = mask
        self._grids: dict[tuple[int, ...], torch.Tensor] = {}
        self.label = ("classifier-feature distance (LPIPS form, unweighted, on this classifier's "
                      f"{', '.join(self.layers)} outputs; not LPIPS)")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised features of one image (1, 3, S, S) at each layer."""
        from contextlib import ExitStack

        traces = []
        with torch.no_grad(), ExitStack() as stack:
            for i, name in enumerate(self.layers):
                traces.append(stack.enter_context(
                    Trace(self.model, name, retain_input=False, stop=i == len(self.layers) - 1)))
            traces[-1](x)  # stops after the deepest layer; the other traces were fresh on entry
        return self.normalize([t.output for t in traces])

    @staticmethod
    def normalize(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The layers' raw outputs → the unit-normalised features :meth:`compare` takes."""
        return [F.normalize(o.detach().double(), dim=1, eps=1e-10) for o in outputs]

    def compare(self, fx: Sequence[torch.Tensor], ft: Sequence[torch.Tensor]) -> float:
        """The distance between two images given their :meth:`features`."""
        from ..concepts.masks import mask_to_grid

        total = 0.0
        for a, b in zip(fx, ft):
            per = (a - b).pow(2).sum(1)[0]
            key = tuple(per.shape)
            if self.mask is not None and key not in self._grids:
                self._grids[key] = mask_to_grid(self.mask, key).double()
            total += _masked_mean(per, None if self.mask is None else self._grids[key])
        return total / len(self.layers)

    def __call__(self, x: torch.Tensor, target_features: Sequence[torch.Tensor]) -> float:
        return self.compare(self.features(x), target_features)


class _LpipsDistance:
    """The real LPIPS (AlexNet backbone), masked like :class:`FeatureDistance`."""

    def __init__(self, classifier, mask: torch.Tensor | None) -> None:
        import lpips

        self.net = lpips.LPIPS(net="alex", spatial=True, verbose=False).eval()
        self.pre = classifier.preprocess
        self.mask = mask
        self.label = "LPIPS (alex, v0.1)"

    def _to_lpips(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.pre.mean)[:, None, None]
        std = torch.tensor(self.pre.std)[:, None, None]
        return (x * std + mean) * 2 - 1  # LPIPS takes RGB in [-1, 1]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self._to_lpips(x.detach())]

    def compare(self, fx: Sequence[torch.Tensor], ft: Sequence[torch.Tensor]) -> float:
        with torch.no_grad():
            per = self.net(fx[0], ft[0])[0, 0].double()
        m = None if self.mask is None else F.interpolate(self.mask[None, None].double(), size=per.shape)[0, 0]
        return _masked_mean(per, m)

    def __call__(self, x: torch.Tensor, target_features: Sequence[torch.Tensor]) -> float:
        return self.compare(self.features(x), target_features)


def _lpips_ready() -> bool:
    """True when ``lpips`` imports and AlexNet's ImageNet weights are already in the torch hub cache."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return any(hub.glob("alexnet-*.pth"))


def perceptual_distance(classifier, mask: torch.Tensor | None = None, *, prefer_lpips: bool = True):
    """The image distance of Fig. 3-9: LPIPS when it can run offline, else :class:`FeatureDistance`.

    The returned object has ``features(x)``, ``compare(fx, ft)``, ``__call__(x, ft)`` and a ``label`` to print beside
    every number. ``mask`` (S, S) restricts the distance to a region (e.g. the wheels). Nothing is downloaded.

    Example:
        >>> dist = perceptual_distance(clf)                               # doctest: +SKIP
        >>> dist.label                                                    # doctest: +SKIP
        'classifier-feature distance (LPIPS form, ...; not LPIPS)'
    """
    if prefer_lpips and _lpips_ready():
        return _LpipsDistance(classifier, mask)
    return FeatureDistance(classifier, mask=mask)


def reconstruct_image(
    classifier,
    layer: str,
    target_output: torch.Tensor,
    targets: Mapping[str, torch.Tensor] | None = None,
    *,
    mask: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
    distance=None,
) -> Reconstruction:
    """An image whose output at ``layer`` matches ``target_output``, by gradient descent (eqs. 3.9–3.10).

    Adam on the preprocessed image from uniform random pixels, with a cosine-decaying learning rate, kept
    inside the valid pixel range; the loss is ``‖F(x) − T‖²`` (sum) with ``F`` the network up to and
    including ``layer`` as it is now (apply an edit first to invert the edited network). ``targets`` are
    preprocessed images (1, 3, S, S); their distance to the iterate is measured with ``distance`` (default
    :func:`perceptual_distance` restricted to ``mask``), whose ``label`` becomes the metric.

    Example:
        >>> rec = reconstruct_image(clf, layer, y_car, {"car": x_car, "wooden": x_wood}, mask=wheels,
        ...                         steps=150)                                              # doctest: +SKIP
        >>> rec.closest()                                                                   # doctest: +SKIP
        'car'
    """
    model = classifier.model
    pre = classifier.preprocess
    dist = distance if distance is not None else perceptual_distance(classifier, mask)
    tfeat = {n: dist.features(t if t.dim() == 4 else t[None]) for n, t in (targets or {}).items()}
    target = target_output.detach()
    target = target if target.dim() == 4 else target[None]
    lo = torch.tensor([(0 - m) / s for m, s in zip(pre.mean, pre.std)])[None, :, None, None]
    hi = torch.tensor([(1 - m) / s for m, s in zip(pre.mean, pre.std)])[None, :, None, None]
    g = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand(1, 3, pre.size, pre.size, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    losses: list[float] = []
    hist: dict[str, list[float]] = {n: [] for n in tfeat}
    was_training = model.training
    model.eval()
    # A FeatureDistance on this very network reads its layers during the loss pass: no second forward.
    shared = isinstance(dist, FeatureDistance) and dist.model is model
    from contextlib import ExitStack

    try:
        with ExitStack() as stack:
            side = [stack.enter_context(Trace(model, n, retain_input=False)) for n in dist.layers] if shared else []
            tr = stack.enter_context(Trace(model, layer, stop=True, detach=False, clone=False))
            for t in range(steps + 1):
                for s in side:
                    s.reset()
                with torch.enable_grad():
                    tr(x)
                    if tr.output.shape != target.shape:
                        raise EditError(f"layer output is {tuple(tr.output.shape)}, target is {tuple(target.shape)}")
                    loss = (tr.output - target).pow(2).sum()
                losses.append(float(loss.detach()))
                if shared and all(s.output is not None for s in side):
                    fx = dist.normalize([s.output for s in side])
                else:  # the distance's layers lie past ``layer`` (or it is another network)
                    fx = dist.features(x.detach())
                for n, fts in tfeat.items():
                    hist[n].append(dist.compare(fx, fts))
                if t == steps:
                    break
                for group in opt.param_groups:  # cosine decay: large moves first, then settle
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return Reconstruction("image", x.detach(), losses, hist, dist.label, False, {"lr": lr})


# ------------------------------------------------------------------------------------------ heatmaps, plots
def dot_similarity(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dot-product similarity per grid location (Figs. 3-4 and 3-5), (h, w) float64.

    ``recon`` (c, h, w) or (1, c, h, w). ``target`` is a map of the same shape (pairs of corresponding
    points: ``Σ_c r(x) t(x)``) or one vector (c,) matched against every location (as
    :func:`~rulewriter.concepts.heatmap.key_match`). Overlay it with :func:`rulewriter.concepts.heatmap.save_overlay`.

    Example:
        >>> dot_similarity(torch.ones(2, 1, 3), torch.tensor([1., 2.])).tolist()
        [[3.0, 3.0, 3.0]]
    """
    from ..concepts.heatmap import key_match

    r = recon[0] if recon.dim() == 4 else recon
    if target.dim() == 1:
        return key_match(r.double(), target.double())
    t = target[0] if target.dim() == 4 else target
    if t.shape != r.shape:
        raise MaskError(f"target map {tuple(t.shape)} does not match the reconstruction {tuple(r.shape)}")
    return (r.double() * t.double()).sum(0)


def plot_reconstructions(path: str | Path, runs: Mapping[str, Reconstruction], title: str = "") -> Path:
    """Loss (log scale) and distance-to-each-target curves of several reconstructions, as one PNG.

    One colour per run (e.g. ``"before"``, ``"after pinv"``), one line style per target (as Figs. 3-7 to
    3-9). Needs matplotlib (``pip install rulewriter[plots]``); written atomically.

    Example:
        >>> plot_reconstructions("keys.png", {"before": rec0, "after": rec1}, title="keys")   # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RulewriterError("plotting needs matplotlib: pip install 'rulewriter[plots]'") from e
    if not runs:
        raise RulewriterError("nothing to plot")
    styles = ["-", "--", ":", "-."]
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    metric = ""
    for i, (name, rec) in enumerate(runs.items()):
        col = colours[i % len(colours)]
        ax_l.plot(np.maximum(np.asarray(rec.losses), 1e-300), color=col, label=name)
        for j, (tname, ys) in enumerate(rec.distances.items()):
            ax_d.plot(ys, color=col, linestyle=styles[j % len(styles)], label=f"{name}: to {tname}")
        metric = rec.metric
    ax_l.set_yscale("log")
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("reconstruction loss")
    ax_l.legend(fontsize=7)
    ax_d.set_xlabel("iteration")
    ax_d.set_ylabel(metric if len(metric) < 40 else metric[:37] + "...")
    ax_d.legend(fontsize=7)
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    if len(metric) >= 40:
        fig.text(0.5, 0.005, metric, ha="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_bytes(Path(path), buf.getvalue())
