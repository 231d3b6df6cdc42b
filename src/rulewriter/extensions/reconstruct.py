"""Checking an edit by inverting features (thesis Section 3.2, Figs. 3-4 to 3-9).

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
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_bytes
from ..errors import EditError, LayerError, MaskError, RulewriterError
from ..core.memory import LayerMemory
from ..core.trace import Trace, get_module

__all__ = [
    "Reconstruction",
    "reconstruct_key",
    "reconstruct_features",
    "reconstruct_image",
    "FeatureDistance",
    "perceptual_distance",
    "dot_similarity",
    "plot_reconstructions",
]


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
    # The image lives where the model does, in its dtype (a float64 model inverts in float64).
    p0 = next(model.parameters())
    dev, dt = p0.device, p0.dtype
    target = target.to(dev, dt)
    lo = torch.tensor([(0 - m) / s for m, s in zip(pre.mean, pre.std)], dtype=dt, device=dev)[None, :, None, None]
    hi = torch.tensor([(1 - m) / s for m, s in zip(pre.mean, pre.std)], dtype=dt, device=dev)[None, :, None, None]
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(1, 3, pre.size, pre.size, generator=g, dtype=torch.float64).to(dev, dt)
    x = (lo + (hi - lo) * start).requires_grad_(True)
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
