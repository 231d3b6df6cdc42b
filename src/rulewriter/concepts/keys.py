"""The concept key ``k*`` and its context: what a rule edit rewrites, read off the keys under the masks.

A layer seen as a memory maps a *key* (the d-dim feature at one grid location, see the thesis, Section 2.1.1)
to a value. A concept's key is the weighted mean of the keys under its masks (downsampled to the key grid
with :func:`rulewriter.concepts.masks.mask_to_grid`), its context the top directions of those keys
(Section 2.1.2, "Context selection")::

    from rulewriter.concepts.keys import concept_key, context, masked_keys

    # keys: (N, d, h, w) recorded at the layer for N photos; grid: (N, h, w) mask weights on the key grid
    k_star = concept_key(keys, grid)                    # (d,) weighted mean key
    sel, w = masked_keys(keys, grid)                    # (n, d) keys under the masks and their weights
    ctx = context(sel, rank=3, weights=w)               # (d, 3) top directions of those keys

:class:`Concept` holds both for one layer and saves them as safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..atomic import atomic_bytes
from ..errors import EditError, MaskError, StatsError

__all__ = ["masked_keys", "concept_key", "context", "top_right_singular", "check_second_moment", "Concept"]


def _check_keys_masks(keys: torch.Tensor, masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(keys, torch.Tensor):
        raise MaskError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    m = masks if isinstance(masks, torch.Tensor) else torch.as_tensor(np.asarray(masks))
    if keys.ndim == 3:  # a single image's keys (d, h, w)
        keys = keys[None]
        if m.ndim == 2:
            m = m[None]
    if keys.ndim != 4:
        raise MaskError(f"keys must be (N, d, h, w) or (d, h, w), got shape {tuple(keys.shape)}")
    if m.ndim == 2 and keys.shape[0] == 1:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise MaskError(f"masks must be (N, h, w) grid weights, got shape {tuple(m.shape)}")
    if m.shape[0] != keys.shape[0]:
        raise MaskError(f"{m.shape[0]} masks for {keys.shape[0]} images (keys shape {tuple(keys.shape)})")
    if tuple(m.shape[-2:]) != tuple(keys.shape[-2:]):
        raise MaskError(
            f"masks are on a {tuple(m.shape[-2:])} grid but keys on {tuple(keys.shape[-2:])}; "
            "downsample the masks with mask_to_grid(mask, keys.shape[-2:])"
        )
    m = m.to(device=keys.device, dtype=torch.float64)
    if torch.isnan(m).any() or (m < 0).any():
        raise MaskError("mask weights must be non-negative numbers (found NaN or negative values)")
    return keys, m


def masked_keys(
    keys: torch.Tensor, masks: torch.Tensor | np.ndarray, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys under the masks: ``(selected (n, d), weights (n,))`` where the grid weight > ``threshold``.

    ``keys`` is (N, d, h, w) (or (d, h, w) for one image), ``masks`` the (N, h, w) grid weights from
    :func:`mask_to_grid`. With the default threshold every location the mask touches is kept, and its
    weight (covered fraction) is returned so that :func:`context` can down-weight edge cells; use
    ``threshold=0.5`` to keep only mostly-covered cells. Keys keep their dtype; weights are float64.

    Example::

        >>> keys = torch.arange(8.).reshape(1, 2, 2, 2)
        >>> sel, w = masked_keys(keys, torch.tensor([[[1., 0.], [0., .5]]]))
        >>> sel.tolist(), w.tolist()
        ([[0.0, 4.0], [3.0, 7.0]], [1.0, 0.5])
    """
    keys, m = _check_keys_masks(keys, masks)
    flat_keys = keys.permute(0, 2, 3, 1).reshape(-1, keys.shape[1])
    flat_m = m.reshape(-1)
    sel = flat_m > threshold
    if not bool(sel.any()):
        raise MaskError(
            f"no key location has mask weight > {threshold} (max is {float(flat_m.max()):.3g}); "
            "lower the threshold, draw larger masks or choose an earlier layer"
        )
    return flat_keys[sel], flat_m[sel]


def concept_key(keys: torch.Tensor, masks: torch.Tensor | np.ndarray, *, chunk: int = 64) -> torch.Tensor:
    """The concept key ``k* = Σ_i Σ_p m_ip k_ip / Σ m`` (weighted mean of keys under the masks), float64 (d,).

    ``keys`` (N, d, h, w) or (d, h, w); ``masks`` (N, h, w) grid weights. Accumulates in float64, ``chunk``
    images at a time so that large float32 key stacks are not copied whole.

    Example::

        >>> keys = torch.tensor([[[[1., 3.]], [[0., 2.]]]])        # N=1, d=2, h=1, w=2
        >>> concept_key(keys, torch.tensor([[[1., 3.]]])).tolist()   # (1*[1,0] + 3*[3,2]) / 4
        [2.5, 1.5]
    """
    keys, m = _check_keys_masks(keys, masks)
    total = torch.zeros(keys.shape[1], dtype=torch.float64, device=keys.device)
    for start in range(0, keys.shape[0], max(int(chunk), 1)):
        k = keys[start : start + chunk].to(torch.float64)
        total += torch.einsum("ndhw,nhw->d", k, m[start : start + chunk])
    mass = float(m.sum())
    if mass <= 0:
        raise MaskError("all masks are empty on the key grid; nothing to average")
    return total / mass


def _sqrt_pair(C: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (C^{1/2}, C^{-1/2}) of ``C + ridge·tr(C)/d·I`` via one eigh, float64."""
    C = C.to(torch.float64)
    C = 0.5 * (C + C.T)
    d = C.shape[0]
    lam = ridge * float(torch.trace(C)) / d
    evals, evecs = torch.linalg.eigh(C + lam * torch.eye(d, dtype=C.dtype, device=C.device))
    if float(evals.min()) <= 0:
        raise StatsError(
            f"second moment C is not positive definite (min eigenvalue {float(evals.min()):.3g} after a ridge "
            f"of {lam:.3g}); collect more statistics or raise ridge"
        )
    root = evals.sqrt()
    return (evecs * root[None, :]) @ evecs.T, (evecs / root[None, :]) @ evecs.T


def check_second_moment(C: torch.Tensor, d: int) -> torch.Tensor:
    """``C`` itself when it is a finite (d, d) tensor, the second moment of ``d``-dim keys; else a StatsError.

    Example::

        >>> check_second_moment(torch.eye(3), 3).shape
        torch.Size([3, 3])
    """
    if not isinstance(C, torch.Tensor) or C.shape != (d, d):
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise StatsError(f"C must be a ({d}, {d}) tensor for {d}-dim keys, got {shape}")
    if not torch.isfinite(C).all():
        raise StatsError("C contains NaN or infinite values")
    return C


def top_right_singular(K: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` right-singular vectors of ``K`` (n, d) as columns (d, rank), largest first.

    Only a few are needed, so they come from ``eigh`` of the smaller Gram matrix (``KᵀK`` when n ≥ d, else
    ``KKᵀ`` mapped back through ``Kᵀ``): 1.6-2 times faster than a full SVD of ~1000 masked keys (measured by
    ``benchmarks/validation_speed.py``), and the same directions up to sign wherever the singular values are
    distinct. Where the requested rank reaches singular values at rounding level (a rank-deficient K) the
    full SVD is used instead, since the Gram matrix cannot resolve those directions.

    Example::

        >>> K = torch.randn(30, 6, dtype=torch.float64)
        >>> V = top_right_singular(K, 2)
        >>> Vh = torch.linalg.svd(K, full_matrices=False)[2]
        >>> torch.allclose((V * Vh[:2].T).sum(0).abs(), torch.ones(2, dtype=K.dtype))
        True
    """
    n, d = K.shape
    if n >= d:
        evals, evecs = torch.linalg.eigh(K.T @ K)
        evals, V = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    else:
        evals, evecs = torch.linalg.eigh(K @ K.T)
        evals, U = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
        V = (K.T @ U) / evals.clamp_min(torch.finfo(K.dtype).tiny).sqrt()[None, :]
    # eigh of a Gram matrix resolves eigenvalues down to about eps·λ_max; below a margin of that, fall back
    floor = 1e3 * torch.finfo(K.dtype).eps * float(evals[0].clamp_min(0)) * max(n, d)
    if evals.numel() < rank or float(evals[-1]) <= floor:
        return torch.linalg.svd(K, full_matrices=False)[2][:rank].T
    return V


def context(
    keys_sel: torch.Tensor,
    rank: int,
    *,
    method: str = "svd",
    C: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ridge: float = 1e-6,
    space: str = "key",
) -> torch.Tensor:
    """Top-``rank`` directions of the selected keys, float64 (d, rank) with orthonormal columns.

    ``method="svd"``: the top right-singular vectors V of the uncentered key matrix K (n, d), i.e. the top
    eigenvectors of the keys' second moment KᵀK. A rank-r edit then updates along ``D = C⁻¹ V``
    (:func:`rulewriter.core.edit.update_direction`).

    ``method="zca"`` (the "ZCA context" of Bau et al.'s ``rewriting``, which whitens keys before the SVD):
    with ``Z = C^{-1/2}`` from ``eigh`` of ``C + ridge·tr(C)/d·I``, whiten the keys ``K_w = K Z`` and take
    the top right-singular vectors Q of K_w. The directions that fire most on the concept's keys *relative
    to all keys* are the update directions ``D = Z Q = C^{-1/2} Q``: a rank-one edit ``W + Λ dᵀ`` with
    ``d = C^{-1/2} q`` fires at key k by ``dᵀk = qᵀ(C^{-1/2}k)``, the whitened key's component along q.
    ``space`` says which of two equivalent forms is returned:

    * ``"key"`` (default): ``U = C^{1/2} Q``, a key-space basis such that ``C⁻¹ U = C^{-1/2} Q``. This is
      what :func:`rulewriter.core.edit.update_direction` expects (it applies C⁻¹), exactly like svd's V.
    * ``"update"``: ``C^{-1/2} Q`` itself, ``rewriting``'s row directions; use them as D directly and do
      **not** apply C⁻¹ again.

    Either is orthonormalised with QR (span and leading direction kept), as ``rewriting`` does; ``space``
    has no effect for ``"svd"``.

    ``weights`` (n,), e.g. from :func:`masked_keys`, scale each key's row by ``sqrt(w)`` so that the SVD
    diagonalises the weighted second moment Σ w k kᵀ. Each column's sign is chosen so that its dot with
    the (weighted) mean key is positive.

    Example::

        >>> ks = torch.randn(50, 8) + 2
        >>> V = context(ks, 3)
        >>> torch.allclose(V.T @ V, torch.eye(3, dtype=V.dtype), atol=1e-10)
        True
    """
    if not isinstance(keys_sel, torch.Tensor) or keys_sel.ndim != 2:
        shape = tuple(keys_sel.shape) if isinstance(keys_sel, torch.Tensor) else type(keys_sel).__name__
        raise MaskError(f"context needs selected keys of shape (n, d), got {shape}")
    n, d = keys_sel.shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= int(rank) <= d:
        raise EditError(f"rank must be an integer in 1..{d} (the key dimension), got {rank!r}")
    rank = int(rank)
    if n < rank:
        raise MaskError(
            f"only {n} masked key locations for a rank-{rank} context; draw larger masks, add images or lower rank"
        )
    if space not in ("key", "update"):
        raise EditError(f"unknown space {space!r}; use 'key' or 'update'")
    K = keys_sel.to(torch.float64)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64, device=K.device).reshape(-1)
        if w.shape[0] != n or (w < 0).any() or not torch.isfinite(w).all():
            raise MaskError(f"weights must be {n} non-negative finite numbers, got shape {tuple(w.shape)}")
        mean = (w[:, None] * K).sum(0) / w.sum().clamp_min(torch.finfo(torch.float64).tiny)
        K = K * w.sqrt()[:, None]
    else:
        mean = K.mean(0)
    if method == "svd":
        D = top_right_singular(K, rank)
    elif method == "zca":
        if C is None:
            raise StatsError("method='zca' needs the layer's second moment C")
        root, Z = _sqrt_pair(check_second_moment(C, d).to(K.device), ridge)
        Q = top_right_singular(K @ Z, rank)
        D, _ = torch.linalg.qr((Z if space == "update" else root) @ Q)
    else:
        raise EditError(f"unknown context method {method!r}; use 'svd' or 'zca'")
    signs = torch.sign(mean @ D)
    signs[signs == 0] = 1.0
    return (D * signs[None, :]).contiguous()


@dataclass
class Concept:
    """A concept at one layer: its key ``k*`` (d,) and optional context directions (d, r).

    ``view`` is the layer's memory view (the thesis's architecture 1-4, see :mod:`rulewriter.core.memory`);
    ``context_method`` records how ``context`` was computed ("svd" or "zca", see :func:`context`; both in
    key space, so that the update directions are ``C⁻¹ context``).

    Example::

        >>> c = Concept(key=torch.ones(4), context=None, layer="features.28", view=2, n_images=3)
        >>> Concept.from_dict(c.to_dict(), c.tensors()).layer
        'features.28'
    """

    key: torch.Tensor
    context: torch.Tensor | None
    layer: str
    view: int
    n_images: int
    context_method: str = "svd"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, torch.Tensor) or self.key.ndim != 1:
            raise EditError(f"Concept.key must be a 1-D tensor, got {getattr(self.key, 'shape', type(self.key))}")
        if self.context is not None:
            if not isinstance(self.context, torch.Tensor) or self.context.ndim != 2:
                raise EditError("Concept.context must be a (d, r) tensor or None")
            if self.context.shape[0] != self.key.shape[0]:
                raise EditError(
                    f"Concept.context is {tuple(self.context.shape)} but the key has d={self.key.shape[0]}"
                )

    @property
    def dim(self) -> int:
        """The key dimension d."""
        return int(self.key.shape[0])

    @property
    def rank(self) -> int:
        """Number of context directions (0 without a context)."""
        return 0 if self.context is None else int(self.context.shape[1])

    @classmethod
    def from_keys(
        cls,
        keys: torch.Tensor,
        masks: torch.Tensor | np.ndarray,
        *,
        layer: str,
        view: int,
        rank: int = 0,
        method: str = "svd",
        C: torch.Tensor | None = None,
        threshold: float = 0.0,
    ) -> "Concept":
        """Build a concept from keys (N, d, h, w) and grid masks (N, h, w): key and, if ``rank``, context.

        Example::

            >>> c = Concept.from_keys(torch.rand(2, 4, 3, 3), torch.ones(2, 3, 3), layer="l", view=2, rank=2)
            >>> c.context.shape
            torch.Size([4, 2])
        """
        key = concept_key(keys, masks)
        ctx = None
        if rank:
            sel, w = masked_keys(keys, masks, threshold)
            ctx = context(sel, rank, method=method, C=C, weights=w)
        n_images = 1 if keys.ndim == 3 else int(keys.shape[0])
        return cls(key=key, context=ctx, layer=layer, view=view, n_images=n_images, context_method=method)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able metadata (the tensors come from :meth:`tensors`)."""
        return {
            "layer": self.layer,
            "view": int(self.view),
            "n_images": int(self.n_images),
            "dim": self.dim,
            "rank": self.rank,
            "context_method": self.context_method,
            "meta": dict(self.meta),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``"key"`` and, if present, ``"context"``), contiguous and on the CPU."""
        out = {"key": self.key.detach().cpu().contiguous()}
        if self.context is not None:
            out["context"] = self.context.detach().cpu().contiguous()
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> "Concept":
        """Rebuild from :meth:`to_dict` metadata and :meth:`tensors`."""
        try:
            return cls(
                key=tensors["key"],
                context=tensors.get("context"),
                layer=str(meta["layer"]),
                view=int(meta["view"]),
                n_images=int(meta["n_images"]),
                context_method=str(meta.get("context_method", "svd")),
                meta=dict(meta.get("meta", {})),
            )
        except KeyError as exc:
            raise EditError(f"concept metadata/tensors lack {exc.args[0]!r}") from exc

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors + JSON metadata), atomically.

        Example::

            >>> c.save("wheel.concept.safetensors")                 # doctest: +SKIP
        """
        from safetensors.torch import save as st_save

        blob = st_save(self.tensors(), metadata={"rulewriter.concept": json.dumps(self.to_dict())})
        return atomic_bytes(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> "Concept":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["rulewriter.concept"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise EditError(f"cannot read concept file {str(path)!r}: {exc}") from exc
        return cls.from_dict(meta, tensors)
