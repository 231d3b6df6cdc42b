"""Many rules in one layer: sequential edits that keep the earlier rules, and checking which rules hold.

Why
---
Each edit of :func:`~rulewriter.core.rules.rewrite` is the minimiser of ``tr(ΔW C ΔWᵀ)`` subject to its
own rule, solved as if it were alone. Summing such edits (``Edit + Edit``, ``predict --edit A --edit B``)
moves every earlier rule's key too: ``(Δ1 + Δ2) k1* = Δ1 k1* + Δ2 k1*`` and ``Δ2 k1*`` is not zero, so rule
50 can undo rule 3. That composition is **approximate**.

Sequential editing with preservation
------------------------------------
A new rule written *on* earlier edits minimises the same collateral change subject to the new rule **and**
``ΔW K_p = 0``, where ``K_p`` holds the mean keys ``k*`` of every earlier rule of the layer (kept in each
edit's :class:`~rulewriter.core.edit.LayerUpdate` ``keys``). The minimiser keeps the thesis's form
``ΔW = Λ Dᵀ`` with the direction projected C-orthogonally off the preserved keys
(:func:`preserving_direction`)::

    D = C⁻¹U − C⁻¹K_p (K_pᵀ C⁻¹ K_p)⁻¹ K_pᵀ C⁻¹U,       so  Dᵀ K_p = 0 exactly,

the classifier analogue of AlphaEdit's null-space projection (with C's metric rather than a plain
projector) and, rule by rule, of MEMIT's batch solve. ``Λ`` is then fitted on the weights the earlier
edits leave (``W0 + Σ ΔW_earlier``). What is exact and what is not:

* **exact**: every earlier rule's mean key ``k*`` keeps the output it had (to float64 round-off), so a rule
  that held still holds at its key; any key C-orthogonal to all rules' keys keeps its output (``ridge=0``);
  and with ``fit="mean"`` the sequential result equals the batch solve of all rules together (both are the
  unique minimiser with every ``k*`` constrained).
* **approximate**: an earlier rule's *other* masked key/value pairs (``fit="pairs"``) move by the new
  update's action on them, which is small but not zero; edits of *other* layers are not preserved (they
  change the keys reaching this layer); a sequential edit applied without the edits it was written on is
  the wrong update (its ``meta["after"]`` lists their fingerprints, :func:`missing_predecessors` finds them).

Batch editing
-------------
``rewrite(clf, [rule1, …, rule_m], stats)`` solves all rules together in one closed form (rank m):
``D = C⁻¹K``, ``Λ`` by least squares over every pair, or with ``fit="mean"`` the exact constrained
minimiser ``ΔW = R (KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ`` (``R = V − W0 K``). Sequential and batch compose exactly with
``+``: an edit's update is data, and applying the sum is applying each in turn.

Checking
--------
:func:`rules_holding` measures, for every rule kept in a set of edits, how much of the gap between the
unedited layer's output at ``k*`` and its target ``v*`` the edited layer closes::

    ρ = 1 − ‖W k* − v*‖ / ‖W_orig k* − v*‖          (1: the key recalls its value exactly; 0: as unedited)

Example::

    e1 = rewrite(clf, rule1, stats)
    e2 = rewrite(clf, rule2, stats, on=[e1])       # keeps rule1's key mapping to its value
    with (e1 + e2).applied(clf.model):
        ...
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import EditError
from .edit import Edit, applied_edits, regularize, update_direction

__all__ = ["preserved_keys", "preserving_direction", "edited_matrix", "missing_predecessors", "restored_fraction",
           "rules_holding", "HOLD_FRACTION"]

#: A rule "still holds" when it keeps at least half of the gap it closed when it was written (ρ ≥ ½ ρ₀):
#: the midpoint between "as written" and "as if never written", with no tuning to any result.
HOLD_FRACTION = 0.5


def preserved_keys(edits: Sequence[Edit], layer: str, view: int) -> torch.Tensor | None:
    """The rules' mean keys (key_dim × p, float64) that ``edits`` keep for ``layer`` in ``view``; None if none.

    Example::

        >>> preserved_keys([e1, e2], "_blocks.10._project_conv", 2).shape      # doctest: +SKIP
        torch.Size([672, 2])
    """
    ks = [u.keys.double() for e in edits for u in e.updates
          if (u.layer, u.view) == (layer, view) and u.keys is not None]
    return torch.cat(ks, 1) if ks else None


def preserving_direction(c: torch.Tensor, u: torch.Tensor, preserve: torch.Tensor | None,
                         ridge: float) -> torch.Tensor:
    """``D = (C+εI)⁻¹U`` projected so that ``Dᵀ K_p = 0``: updates along ``D`` leave every preserved key's output.

    ``U`` (d × r) are the new rule's directions, ``preserve`` (d × p) the earlier rules' keys. ``ΔW = Λ Dᵀ`` is
    then the minimiser of ``tr(ΔW (C+εI) ΔWᵀ)`` over updates that vanish on ``K_p``. Dependent preserved keys
    (the same rule written twice) are handled by a pseudo-inverse: the constraint is on their span.

    Raises EditError when a new direction lies in the span of the preserved keys (it cannot change without
    moving an earlier rule: write those rules together in one batch instead).

    Example::

        >>> d = preserving_direction(torch.eye(3), torch.tensor([[1.], [1.], [0.]]), torch.tensor([[1.], [0.], [0.]]), 0)
        >>> d.T
        tensor([[0., 1., 0.]], dtype=torch.float64)
    """
    if preserve is None or preserve.shape[1] == 0:
        return update_direction(c, u.reshape(u.shape[0], -1), ridge)
    creg = regularize(c, ridge)
    u2 = u.double().reshape(u.shape[0], -1).to(creg.device)
    kp = preserve.double().to(creg.device)
    if kp.shape[0] != creg.shape[0]:
        raise EditError(f"preserved keys have dimension {kp.shape[0]}, the second moment has {creg.shape[0]}")
    chol = _cholesky(creg, ridge)
    both = torch.cholesky_solve(torch.cat([u2, kp], 1), chol)  # one solve for C⁻¹U and C⁻¹K_p
    du, dp = both[:, : u2.shape[1]], both[:, u2.shape[1]:]
    g = kp.T @ dp  # K_pᵀ C⁻¹ K_p, symmetric positive semi-definite
    proj = torch.linalg.pinv(g, hermitian=True, rtol=g.shape[0] * torch.finfo(g.dtype).eps) @ (kp.T @ du)
    d = du - dp @ proj
    # How much of each direction's C-norm survives the projection: nothing left means the new key is a
    # combination of earlier ones.
    kept = (d * (creg @ d)).sum(0) / (du * (creg @ du)).sum(0).clamp_min(torch.finfo(du.dtype).tiny)
    if bool((kept < 1e-10).any()):
        raise EditError("the new rule's key lies in the span of the earlier rules' keys: it cannot change "
                        "without moving them; write these rules together in one batch instead")
    return d


def _cholesky(creg: torch.Tensor, ridge: float) -> torch.Tensor:
    from ..errors import StatsError

    chol, info = torch.linalg.cholesky_ex(creg)
    if info.item() != 0:
        raise StatsError("the second moment is singular (not positive definite); collect statistics over more "
                         f"images or use a ridge > 0 (got ridge={ridge})")
    return chol


def edited_matrix(model: nn.Module, layer: str, view: int, on: Sequence[Edit]) -> torch.Tensor:
    """The layer's memory matrix (float64) with every edit of ``on`` in it.

    Edits of ``on`` already applied to ``model`` (through :meth:`Edit.apply`) are in its weights; the others
    are added here, so the caller may pass the model either way. The model is not changed.
    """
    from .memory import LayerMemory
    from .trace import get_module

    mem = LayerMemory(get_module(model, layer), view, name=layer)
    w = mem.matrix().double()
    live = {e.fingerprint() for e in applied_edits(model)}
    lams, dirs = [], []
    for e in on:
        if e.fingerprint() in live:
            continue
        for u in e.updates:
            if (u.layer, u.view) == (layer, view):
                if u.lam.shape[0] != w.shape[0] or u.direction.shape[0] != w.shape[1]:
                    raise EditError(f"an earlier edit of {layer!r} is {u.lam.shape[0]}×{u.direction.shape[0]} but "
                                    f"the layer is {w.shape[0]}×{w.shape[1]}; it was made for another model")
                lams.append(u.lam.double().to(w.device))
                dirs.append(u.direction.double().to(w.device))
    if lams:  # Σ Λᵢ Dᵢᵀ = [Λ₁ … Λₙ] [D₁ … Dₙ]ᵀ: one product instead of one full-size matrix per edit
        w = w + torch.cat(lams, 1) @ torch.cat(dirs, 1).T
    return w


def missing_predecessors(edits: Sequence[Edit]) -> list[tuple[int, str]]:
    """``(index, fingerprint)`` of each edit an edit of ``edits`` was written on (``meta["after"]``) but that is absent.

    Applying a sequential edit without its predecessors gives the wrong update, silently; this finds it.
    """
    have = {e.fingerprint() for e in edits}
    return [(i, fp) for i, e in enumerate(edits) for fp in e.meta.get("after", []) if fp not in have]


def restored_fraction(w: torch.Tensor, w_orig: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``ρ = 1 − ‖W k − v‖ / ‖W_orig k − v‖`` per column of ``keys``/``values`` (float64; 1 where W_orig k = v).

    Example::

        >>> w0 = torch.zeros(1, 1); restored_fraction(torch.ones(1, 1), w0, torch.ones(1, 1), torch.ones(1, 1))
        tensor([1.], dtype=torch.float64)
    """
    k, v = keys.double().to(w.device), values.double().to(w.device)
    now = (w.double() @ k - v).norm(dim=0)
    before = (w_orig.double().to(w.device) @ k - v).norm(dim=0)
    safe = before.clamp_min(torch.finfo(before.dtype).tiny)
    return torch.where(before > 0, 1 - now / safe, torch.ones_like(now))


def rules_holding(model: nn.Module, edits: Sequence[Edit]) -> list[list[dict]]:
    """For each edit, each of its kept rules with ``ρ`` when *all* ``edits`` are applied together, and whether it holds.

    ``model`` must be unedited (its weights are the ``W_orig`` of :func:`restored_fraction`); it is left as
    it was. A rule holds when ``ρ ≥ HOLD_FRACTION · ρ₀``, ``ρ₀`` being what it closed when it was written
    (``meta["restored"]``; 1 when unknown). Edits that kept no keys give an empty list.

    Example::

        >>> rules_holding(clf.model, [e1, e2])[1][0]["holds"]          # doctest: +SKIP
        True
    """
    from .memory import LayerMemory
    from .trace import get_module

    orig: dict[tuple[str, int], torch.Tensor] = {}
    for e in edits:
        for u in e.updates:
            if (u.layer, u.view) not in orig:
                orig[(u.layer, u.view)] = LayerMemory(get_module(model, u.layer), u.view, name=u.layer).matrix().double()
    together = edits[0].compose(*edits[1:]) if edits else Edit([])
    out: list[list[dict]] = []
    with together.applied(model):
        now = {key: LayerMemory(get_module(model, key[0]), key[1], name=key[0]).matrix().double() for key in orig}
        for e in edits:
            rows: list[dict] = []
            written = list(e.meta.get("restored") or [])
            for u in e.updates:
                if u.keys is None:
                    continue
                key = (u.layer, u.view)
                rho = restored_fraction(now[key], orig[key], u.keys, u.values)
                for j, r in enumerate(rho.tolist()):
                    r0 = float(written[len(rows)]) if len(rows) < len(written) else 1.0
                    rows.append({"layer": u.layer, "view": u.view, "rule": len(rows), "restored": r,
                                 "restored_when_written": r0, "holds": bool(r >= HOLD_FRACTION * r0)})
            out.append(rows)
    return out
