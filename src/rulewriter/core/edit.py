"""Edits: solve for the update ``W1 = W0 + Λ Dᵀ`` and keep it as data (thesis Sections 2.1.5 and 2.4).

The solvers
-----------
Given keys ``K`` (d × n), target values ``V`` (f × n), the layer's memory ``W0`` (f × d) and the second
moment ``C`` of its keys, rewriting minimises the change to every other key's output,
``E‖(W − W0) k‖² = tr(ΔW C ΔWᵀ)``, subject to the new rule. The minimiser always has the form

    ``W1 = W0 + Λ Dᵀ``,  ``D = C⁻¹ K``                                           (eqs. 2.19, 2.24)

* :func:`update_direction` computes ``D = (C + εI)⁻¹ U`` with a Cholesky solve in float64 (never an
  explicit inverse). ``U`` is ``k*`` for one rule or ``r`` context directions for a rank-r edit; ``ε`` is a
  ridge *relative to the mean eigenvalue of C*, so it does not depend on the scale of the keys.
* :func:`solve_lambda` is the closed form for ``Λ``: the weighted least-squares fit of every (key, value)
  pair inside the subspace, ``Λ = R W Aᵀ (A W Aᵀ)⁻¹`` with ``A = Dᵀ K`` and ``R = V − W0 K``. With
  ``D = C⁻¹ K`` and independent keys this is the exact constrained solution ``Λ = R (Kᵀ C⁻¹ K)⁻¹``, so
  ``W1 K = V`` holds and any key with ``kᵀ C⁻¹ K = 0`` keeps its output.
* :func:`projected_gd` is eq. 2.20 as the thesis runs it: gradient steps on ``W`` through an optional
  nonlinearity after the layer, each followed by a projection back onto ``W0 + span(Dᵀ)``.

The data
--------
An :class:`Edit` is a list of :class:`LayerUpdate` (layer, view, ``Λ``, ``D``) plus a JSON description.
It is saved as safetensors with the JSON in the header and beside the file, applied and undone exactly,
and composed with ``+``::

    edit = Edit([LayerUpdate("_blocks.10._project_conv", 2, lam, d)], meta={"rules": [...]})
    with edit.applied(model):           # restores the original weights bit for bit on exit
        logits = model(x)
    edit.save("wood-wheel.safetensors")
"""
from __future__ import annotations

import contextlib
import copy
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import EditError, StatsError
from .memory import LayerMemory
from .artefacts import load_described, save_described

__all__ = [
    "DEFAULT_RIDGE",
    "regularize",
    "update_direction",
    "direction_factor",
    "solve_lambda",
    "projected_gd",
    "LayerUpdate",
    "Edit",
    "AppliedEdit",
    "Reversible",
    "applied_edits",
]

FORMAT = "rulewriter.core.edit/1"
#: Ridge as a fraction of C's mean eigenvalue (tr C / d). Key directions that carry less than 0.1% of the
#: average per-dimension energy are where a few thousand images cannot tell signal from sampling noise, so
#: the update is not allowed to hide in them.
DEFAULT_RIDGE = 1e-3


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise EditError(f"{name} contains NaN or inf")


def regularize(c: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``C + ε I`` with ``ε = ridge · tr(C)/d`` (float64)."""
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise StatsError(f"second moment must be square, got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise StatsError("second moment contains NaN or inf")
    if ridge < 0:
        raise StatsError(f"ridge must be >= 0, got {ridge}")
    c = c.double()
    eps = ridge * torch.diagonal(c).mean()
    return c + eps * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def update_direction(c: torch.Tensor, u: torch.Tensor, ridge: float = DEFAULT_RIDGE, *,
                     factor: torch.Tensor | None = None) -> torch.Tensor:
    """``D = (C + εI)⁻¹ U`` for ``U`` of shape (d,) or (d, r), by Cholesky solve in float64.

    ``factor``: the Cholesky factor of ``C + εI`` from :func:`direction_factor`, when many directions are
    solved against one ``C`` (``c`` and ``ridge`` are then not factorised again).

    Raises StatsError when ``C + εI`` is not positive definite (a singular ``C`` with ``ridge=0``).

    Example:
        >>> c = torch.eye(3) * 2
        >>> update_direction(c, torch.tensor([1., 0., 0.]), ridge=0)
        tensor([0.5000, 0.0000, 0.0000], dtype=torch.float64)
    """
    chol = direction_factor(c, ridge) if factor is None else factor
    vec = u.dim() == 1
    u2 = u.double().reshape(u.shape[0], -1).to(chol.device)
    if u2.shape[0] != chol.shape[0]:
        raise StatsError(f"keys have dimension {u2.shape[0]}, the second moment has {chol.shape[0]}")
    _check_finite("the key", u2)
    d = torch.cholesky_solve(u2, chol)
    return d[:, 0] if vec else d


def direction_factor(c: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The lower Cholesky factor of ``C + εI`` (float64) that :func:`update_direction` solves with.

    Example:
        >>> direction_factor(torch.eye(2) * 4, ridge=0)
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    chol, info = torch.linalg.cholesky_ex(regularize(c, ridge))
    if info.item() != 0:
        raise StatsError(
            "the second moment is singular (not positive definite); collect statistics over more images "
            f"or use a ridge > 0 (got ridge={ridge})"
        )
    return chol


def solve_lambda(
    w0: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    direction: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form ``Λ`` (f × r) minimising ``Σᵢ wᵢ ‖vᵢ − (W0 + Λ Dᵀ) kᵢ‖²`` (eqs. 2.20–2.21, 2.23–2.24).

    Args:
        w0: memory matrix (f × d).
        keys: ``K`` (d × n), one key per column.
        values: ``V`` (f × n), the value each key must recall.
        direction: ``D`` (d × r).
        weights: optional (n,) non-negative weights of the pairs.
    """
    # Everything on the memory's device: statistics are often loaded on the CPU for a CUDA model.
    w0 = w0.double()
    k, v, d = (t.double().to(w0.device) for t in (keys, values, direction))
    if d.dim() == 1:
        d = d[:, None]
    for name, t in (("keys", k), ("values", v), ("direction", d)):
        _check_finite(name, t)
    if k.shape[0] != w0.shape[1] or v.shape[0] != w0.shape[0] or k.shape[1] != v.shape[1] or d.shape[0] != w0.shape[1]:
        raise EditError(
            f"shape mismatch: W0 {tuple(w0.shape)}, K {tuple(k.shape)}, V {tuple(v.shape)}, D {tuple(d.shape)}"
        )
    a = d.T @ k  # (r, n): how strongly each key drives the update
    r = v - w0 @ k
    if weights is not None:
        sw = weights.double().to(w0.device).clamp_min(0).sqrt()[None, :]
        a, r = a * sw, r * sw
    # Least squares Aᵀ Λᵀ = Rᵀ through a QR factorisation of Aᵀ: this works with cond(A), where the normal
    # equations (A Aᵀ) would square it and lose half the digits on nearly collinear rules.
    sv = torch.linalg.svdvals(a)
    if sv.numel() < a.shape[0] or sv.min() <= sv.max() * max(a.shape) * torch.finfo(a.dtype).eps:
        raise EditError(
            "the update directions are degenerate for these keys (Dᵀ K has dependent rows); lower the rank"
        )
    q, rr = torch.linalg.qr(a.T)  # (n, r), (r, r)
    return torch.linalg.solve_triangular(rr, q.T @ r.T, upper=True).T


def _projector(direction: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``X ↦ X D (DᵀD)⁻¹ Dᵀ``: rows of the result lie in span(Dᵀ). Factored, so it costs O(f·d·r), not O(f·d²)."""
    d = direction.double().reshape(direction.shape[0], -1)
    back = torch.linalg.solve(d.T @ d, d.T)  # (r, d)
    return lambda x: (x @ d) @ back


def projected_gd(
    w0: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    direction: torch.Tensor,
    *,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    steps: int = 500,
    tol: float = 0.0,
    rtol: float = 1e-20,
    progress: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Eq. 2.20 by projected gradient descent: minimise ``‖V − post((W0 + ΔW) K)‖²``, project ΔW each step.

    ``post`` maps value rows ``(n, f)`` through whatever follows the layer (a BatchNorm, an activation);
    ``None`` means the layer is linear, where this converges to :func:`solve_lambda`. Each step moves
    along the projected gradient with a backtracking (Armijo) line search, so no learning rate needs
    tuning, then projects ``ΔW`` back onto ``span(Dᵀ)`` as the thesis does.

    Returns ``(Λ, losses)`` with ``Λ = ΔW D (DᵀD)⁻¹``, so that ``ΔW = Λ Dᵀ`` exactly; ``losses[t]`` is the
    loss before step ``t`` and ``losses[-1]`` the loss of the returned ``Λ``. Stops early when the loss
    falls to ``tol`` or to ``rtol`` times its start (``rtol=1e-20`` on a squared loss is a residual of
    1e-10 of the start, float64's working precision), or when a step no longer lowers it measurably.
    """
    from tqdm.auto import tqdm

    w0 = w0.double()
    k, v = keys.double().to(w0.device), values.double().to(w0.device)
    d = direction.double().reshape(direction.shape[0], -1).to(w0.device)
    p = _projector(d)
    wts = None if weights is None else weights.double().to(w0.device)[:, None]
    post = post or (lambda z: z)
    target = v.T

    def objective(delta: torch.Tensor) -> torch.Tensor:
        err = post(((w0 + delta) @ k).T) - target
        return (err.pow(2) * wts).sum() if wts is not None else err.pow(2).sum()

    delta = torch.zeros_like(w0)
    eta = 1.0
    losses: list[float] = []
    for _ in tqdm(range(steps), desc="projected GD", disable=not progress):
        x = delta.clone().requires_grad_(True)
        loss = objective(x)
        (grad,) = torch.autograd.grad(loss, x)
        losses.append(float(loss.detach()))
        if losses[-1] <= max(tol, rtol * losses[0]):
            break
        if len(losses) > 1 and losses[-2] - losses[-1] <= 1e-15 * losses[-2]:
            break  # no measurable progress in float64
        g = p(grad)
        gg = float((g * g).sum())
        if gg == 0.0:
            break
        eta *= 2.0
        with torch.no_grad():
            while eta > 1e-30 and float(objective(delta - eta * g)) > losses[-1] - 0.5 * eta * gg:
                eta *= 0.5
            if eta <= 1e-30:
                break
            delta = p(delta - eta * g)  # the projection onto W0 + Λ Dᵀ
    else:
        with torch.no_grad():
            losses.append(float(objective(delta)))  # the loss of the Λ returned, after the last step
    lam = torch.linalg.solve(d.T @ d, (delta @ d).T).T
    return lam, losses


# ------------------------------------------------------------------------------------------ data
@dataclass
class LayerUpdate:
    """A low-rank update ``Λ Dᵀ`` of one layer's memory matrix in one view."""

    layer: str
    view: int
    lam: torch.Tensor  # (value_dim, r)
    direction: torch.Tensor  # (key_dim, r)
    #: The rules' mean keys k* (key_dim × m) and the values v* they must recall (value_dim × m), kept so that
    #: a later edit can preserve them (:mod:`rulewriter.core.sequential`) and a library can re-check them.
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, t in (("Λ", self.lam), ("D", self.direction)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):  # e.g. scalars in a hand-made file
                raise EditError(f"{name} must be a vector or a matrix, got shape {tuple(getattr(t, 'shape', ()))}")
        if self.lam.dim() == 1:
            self.lam = self.lam[:, None]
        if self.direction.dim() == 1:
            self.direction = self.direction[:, None]
        if self.lam.shape[1] != self.direction.shape[1]:
            raise EditError(f"Λ has rank {self.lam.shape[1]} but D has {self.direction.shape[1]}")
        _check_finite("Λ", self.lam)
        _check_finite("D", self.direction)
        if (self.keys is None) != (self.values is None):
            raise EditError("a layer update keeps its rules' keys and values together, or neither")
        if self.keys is not None:
            if self.keys.dim() == 1:
                self.keys, self.values = self.keys[:, None], self.values[:, None]
            if (self.keys.shape[0] != self.direction.shape[0] or self.values.shape[0] != self.lam.shape[0]
                    or self.keys.shape[1] != self.values.shape[1]):
                raise EditError(f"rule keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} do not "
                                f"fit an update of {self.lam.shape[0]}×{self.direction.shape[0]}")
            _check_finite("rule keys", self.keys)
            _check_finite("rule values", self.values)

    @property
    def rank(self) -> int:
        return self.lam.shape[1]

    def delta(self) -> torch.Tensor:
        """``ΔW = Λ Dᵀ`` (float64), in the view's matrix layout."""
        return self.lam.double() @ self.direction.double().T

    def __repr__(self) -> str:  # the factors' shapes, not their numbers
        return (f"LayerUpdate(layer={self.layer}, view={self.view}, rank={self.rank}, "
                f"value_dim={self.lam.shape[0]}, key_dim={self.direction.shape[0]})")


class Reversible:
    """A change whose ``apply(model)`` returns a handle with ``undo()``; adds the two ways to use it briefly."""

    def apply(self, model: nn.Module):  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Apply inside a ``with`` block; the original weights come back on exit, bit for bit."""
        handle = self.apply(model)
        try:
            yield model
        finally:
            handle.undo()

    def applied_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the change applied; ``model`` itself is not touched."""
        clone = copy.deepcopy(model)
        self.apply(clone)
        return clone


@dataclass
class Edit(Reversible):
    """Rank-r updates of one or more layers, with a JSON description of the rules behind them.

    Example:
        >>> edit = Edit.load("wood-wheel.safetensors")        # doctest: +SKIP
        >>> handle = edit.apply(model)                         # doctest: +SKIP
        >>> handle.undo()                                      # doctest: +SKIP
    """

    updates: list[LayerUpdate]
    meta: dict = field(default_factory=dict)

    # -------------------------------------------------------------- which model
    def made_for(self) -> list[tuple[str | None, str | None]]:
        """The (model, weights id) pairs this edit and every part of a composed edit were made for."""
        out: list[tuple[str | None, str | None]] = []

        def walk(meta: dict) -> None:
            if meta.get("model") is not None or meta.get("weights") is not None:
                out.append((meta.get("model"), meta.get("weights")))
            for m in meta.get("composed", []):
                if isinstance(m, dict):
                    walk(m)

        walk(self.meta)
        return list(dict.fromkeys(out))

    def check_model(self, classifier, source: str | None = None) -> None:
        """Refuse (EditError) an edit made for another model or other weights than ``classifier``'s.

        The edit's ``meta["model"]``/``meta["weights"]`` (and those of each composed part) must equal the
        classifier's ``name`` and ``weights_id``; an edit that records neither (built by hand) passes, as
        nothing says what it was made for. ``source`` names the edit (its file) in the message.

        Example::

            >>> Edit.load("wood-wheel.safetensors").check_model(clf)      # doctest: +SKIP
        """
        name = source or "this edit"
        for model, weights in self.made_for():
            if model not in (None, classifier.name) or weights not in (None, classifier.weights_id):
                raise EditError(
                    f"{name} was made for model {model} with weights {weights}, but the model loaded is "
                    f"{classifier.name} with weights {classifier.weights_id}; rewrite the rule for this model"
                )

    def fingerprint(self) -> str:
        """sha256 (16 hex chars) of the updates' layers, views and factors: names this edit in ``meta["after"]``."""
        import hashlib

        h = hashlib.sha256()
        for u in self.updates:
            h.update(f"{u.layer}|{u.view}|{tuple(u.lam.shape)}|{tuple(u.direction.shape)}|".encode())
            for t in (u.lam, u.direction):
                h.update(t.detach().double().cpu().contiguous().reshape(-1).numpy().tobytes())
        return h.hexdigest()[:16]

    # -------------------------------------------------------------- apply / undo
    def _memories(self, model: nn.Module) -> list[tuple[LayerUpdate, LayerMemory]]:
        from .trace import get_module

        out = []
        for u in self.updates:
            mem = LayerMemory(get_module(model, u.layer), u.view, name=u.layer)
            want = (mem.value_dim, mem.key_dim)
            have = (u.lam.shape[0], u.direction.shape[0])
            if want != have:
                raise EditError(
                    f"edit of {u.layer!r} (view {u.view}) is {have[0]}×{have[1]} but the model's layer is "
                    f"{want[0]}×{want[1]}; this edit was made for another model"
                )
            out.append((u, mem))
        return out

    def apply(self, model: nn.Module) -> "AppliedEdit":
        """Add the updates to ``model``'s in-memory weights. Returns a handle whose ``undo()`` restores them.

        Nothing is written to disk. Every layer is checked before any weight changes, so a mismatch leaves
        the model untouched.
        """
        pairs = self._memories(model)
        backup = self._add_to(pairs)
        return AppliedEdit(model, backup, self)

    def _add_to(self, pairs: list[tuple[LayerUpdate, LayerMemory]]) -> dict[str, torch.Tensor]:
        """Add every update to its layer; returns the weights as they were. All or nothing."""
        backup = {u.layer: mem.weight.detach().clone() for u, mem in pairs}
        try:
            for u, mem in pairs:
                m = mem.matrix().double() + u.delta().to(mem.weight.device)
                mem.set_matrix(m)
                # Finite in float64 can still overflow the layer's dtype (huge factors): refuse, restored below.
                if not torch.isfinite(mem.weight).all():
                    raise EditError(f"the edit makes {u.layer!r}'s weights NaN or inf in {mem.weight.dtype} "
                                    f"(|ΔW| up to {float(u.delta().abs().max()):.3g}); refused")
        except BaseException:
            with torch.no_grad():
                for u, mem in pairs:
                    mem.weight.copy_(backup[u.layer])
            raise
        return backup

    def scaled(self, strength: float) -> "Edit":
        """The same edit with every ``Λ`` multiplied by ``strength`` (its directions unchanged).

        Example:
            >>> e = Edit([LayerUpdate("fc", 2, torch.ones(2, 1), torch.ones(3, 1))])
            >>> e.scaled(2.0).updates[0].lam.flatten().tolist()
            [2.0, 2.0]
        """
        return Edit([LayerUpdate(u.layer, u.view, u.lam * strength, u.direction, u.keys, u.values)
                     for u in self.updates], dict(self.meta))

    # -------------------------------------------------------------- compose
    def __add__(self, other: "Edit") -> "Edit":
        return self.compose(other)

    def compose(self, *others: "Edit") -> "Edit":
        """One edit equal to applying ``self`` then each of ``others``: the sum of their updates.

        Updates of the same layer in the same view are merged into one update of higher rank by
        concatenating their factors: ``Λ1 D1ᵀ + Λ2 D2ᵀ = [Λ1 Λ2] [D1 D2]ᵀ`` (the rules' stored keys and
        values are concatenated too). The sum is exactly what applying the edits one after another gives.
        Whether the rules still *hold* together depends on how the edits were solved: edits solved each
        alone interfere (approximate); an edit solved with ``rewrite(..., on=[earlier])`` was solved for
        the weights the earlier ones leave, so the sum keeps every earlier rule's key exactly
        (see :mod:`rulewriter.core.sequential`).
        """
        merged: dict[tuple[str, int], LayerUpdate] = {}
        order: list[tuple[str, int]] = []

        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:  # keys are kept only when every part kept them
                return None
            return torch.cat([a, b.to(a)], 1)

        for e in (self, *others):
            for u in e.updates:
                key = (u.layer, u.view)
                if key in merged:
                    m = merged[key]
                    keys, values = cat(m.keys, u.keys), cat(m.values, u.values)
                    merged[key] = LayerUpdate(u.layer, u.view, torch.cat([m.lam, u.lam.to(m.lam)], 1),
                                              torch.cat([m.direction, u.direction.to(m.direction)], 1),
                                              keys, None if keys is None else values)
                else:
                    merged[key] = LayerUpdate(u.layer, u.view, u.lam.clone(), u.direction.clone(),
                                              None if u.keys is None else u.keys.clone(),
                                              None if u.values is None else u.values.clone())
                    order.append(key)
        meta = {"composed": [e.meta for e in (self, *others)]}
        return Edit([merged[k] for k in order], meta)

    def __repr__(self) -> str:
        """One short line: the layer(s), view and rank, and how many rules and key/value pairs made it.

        Example::

            >>> Edit([LayerUpdate("fc", 2, torch.ones(3, 1), torch.ones(4, 1))], {"rules": [{}], "n_pairs": 9})
            Edit(layer=fc, view=2, rank=1, rules=1, pairs=9)
        """
        if len(self.updates) == 1:
            u = self.updates[0]
            parts = [f"layer={u.layer}", f"view={u.view}", f"rank={u.rank}"]
        else:
            parts = ["layers=[" + ", ".join(f"{u.layer} (view {u.view}, rank {u.rank})" for u in self.updates) + "]"]

        def count(meta: dict, key: str) -> int:  # composed edits keep each part's meta
            own = len(meta.get(key) or []) if key == "rules" else int(meta.get(key) or 0)
            return own + sum(count(m, key) for m in meta.get("composed", []) if isinstance(m, dict))

        rules, pairs = count(self.meta, "rules"), count(self.meta, "n_pairs")
        parts += [f"rules={rules}"] * bool(rules) + [f"pairs={pairs}"] * bool(pairs)
        return f"Edit({', '.join(parts)})"

    # -------------------------------------------------------------- save / load
    def describe(self) -> dict:
        """The JSON description: updates' layer, view and rank, plus ``meta``."""
        return {
            "format": FORMAT,
            "updates": [{"layer": u.layer, "view": u.view, "rank": u.rank,
                         "value_dim": u.lam.shape[0], "key_dim": u.direction.shape[0],
                         "rule_keys": 0 if u.keys is None else int(u.keys.shape[1])} for u in self.updates],
            "meta": self.meta,
        }

    def save(self, path: str | Path, *, sidecar: bool = True) -> Path:
        """Write ``path`` (safetensors, JSON description in its header) and ``path.json`` beside it.

        Both writes are atomic.
        """
        tensors = {}
        for i, u in enumerate(self.updates):
            tensors[f"updates.{i}.lam"] = u.lam.double()
            tensors[f"updates.{i}.direction"] = u.direction.double()
            if u.keys is not None:
                tensors[f"updates.{i}.keys"] = u.keys.double()
                tensors[f"updates.{i}.values"] = u.values.double()
        return save_described(path, tensors, FORMAT, self.describe(), sidecar=sidecar)

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit saved by :meth:`save`. Pickles are refused; nothing is executed."""
        tensors, desc = load_described(path, FORMAT, "a rulewriter edit")
        try:
            updates = [
                LayerUpdate(u["layer"], int(u["view"]), tensors[f"updates.{i}.lam"],
                            tensors[f"updates.{i}.direction"], tensors.get(f"updates.{i}.keys"),
                            tensors.get(f"updates.{i}.values"))
                for i, u in enumerate(desc["updates"])
            ]
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"{path}: malformed edit description ({e})") from None
        meta = desc.get("meta", {})
        if not isinstance(meta, dict):
            raise EditError(f"{path}: malformed edit description (meta is a {type(meta).__name__}, not an object)")
        return cls(updates, meta)


#: The edits applied to each model, oldest first, so that any one of them can be undone in any order.
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list[AppliedEdit]]" = weakref.WeakKeyDictionary()


class AppliedEdit:
    """Handle returned by :meth:`Edit.apply`; ``undo()`` takes that edit out again.

    Handles may be undone in any order. Undoing the most recent edit restores the weights it found, bit
    for bit; undoing an earlier one restores the weights it found and re-applies the edits made after it,
    so the model ends exactly as if the undone edit had never been applied (assuming the edited layers
    were changed only through edits in between).

    Example:
        >>> h1, h2 = e1.apply(net), e2.apply(net)       # doctest: +SKIP
        >>> h1.undo(); h2.undo()  # net has its original weights again   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, backup: dict[str, torch.Tensor], edit: "Edit | None" = None) -> None:
        self.model = model
        self.backup = backup
        self.edit = edit
        self.active = True
        if edit is not None:
            _APPLIED.setdefault(model, []).append(self)

    def _restore(self) -> None:
        from .trace import get_module

        with torch.no_grad():
            for layer, w in self.backup.items():
                get_module(self.model, layer).weight.copy_(w)

    def undo(self) -> None:
        if not self.active:
            return
        stack = _APPLIED.get(self.model, [])
        at = next((i for i, h in enumerate(stack) if h is self), None)
        later = stack[at + 1:] if at is not None else []
        for h in reversed(later):  # back to the weights this edit found
            h._restore()
        self._restore()
        self.active = False
        if at is not None:
            del stack[at:]
        for h in later:  # the later edits again, on top of the weights without this one
            h.backup = h.edit._add_to(h.edit._memories(self.model))
            stack.append(h)


def applied_edits(model: nn.Module) -> list[Edit]:
    """The edits applied to ``model`` through :meth:`Edit.apply` and not undone, oldest first.

    Example::

        >>> h = edit.apply(net); applied_edits(net) == [edit]          # doctest: +SKIP
        True
    """
    return [h.edit for h in _APPLIED.get(model, []) if h.active and h.edit is not None]


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
