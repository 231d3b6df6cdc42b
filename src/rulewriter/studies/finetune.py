"""Baselines that an edit is compared with: fine-tune one layer, or retrain the last layer (Section 2.3.3).

Both train on the same exemplars as the rewrite (e.g. the manipulated photos, labelled with the class the
unedited model gave their originals) and both return a :class:`WeightDelta`: the change to the trained
parameters, kept as data like an :class:`~rulewriter.core.edit.Edit`. The model's own weights are restored bit
for bit before the function returns, so a baseline is applied, undone, saved and evaluated exactly like an
edit::

    from rulewriter.studies.finetune import finetune_layer, retrain_last_layer

    ft = finetune_layer(clf, "_blocks.15._project_conv", manipulated, labels)    # eq. 2.22, SGD
    last = retrain_last_layer(clf, manipulated, labels)                          # the final Linear only
    with ft.applied(clf.model):                    # original weights come back on exit, bit for bit
        logits = clf.model(x)
    ft.save("finetune.safetensors")                # safetensors + finetune.safetensors.json

* :func:`finetune_layer` minimises ``Σᵢ CE(h(W ⊛ Xᵢ), Yᵢ)`` over the layer's weight ``W`` (and its bias, if
  it has one) with stochastic gradient descent, every other parameter frozen (thesis eq. 2.22). The
  network stays in eval mode, so BatchNorm statistics and dropout do not change either.
* :func:`retrain_last_layer` does the same for the final ``nn.Linear``; it reads the Linear's inputs once
  and trains on them, which is exact when the Linear's output is the model's output (checked, with a
  fallback to full forward passes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch import nn

from ..errors import EditError, LayerError, RulewriterError
from ..core.edit import Reversible
from ..core.artefacts import load_described, save_described

__all__ = ["FORMAT", "LEARNING_RATES", "AppliedDelta", "WeightDelta", "finetune_layer", "last_linear",
           "retrain_last_layer", "smallest_fitting_lr"]

FORMAT = "rulewriter.weight_delta/1"
#: The learning rates :func:`smallest_fitting_lr` tries, smallest first.
LEARNING_RATES = (1e-4, 1e-3, 1e-2)


# ------------------------------------------------------------------------------------------ the data
@dataclass
class WeightDelta(Reversible):
    """Additive changes to named parameters (``"_fc.weight"``, ``"_fc.bias"``), kept in float64.

    float64 holds the exact difference of two float32 tensors, so applying a delta found by training
    reproduces the trained weights bit for bit, and undoing restores the originals bit for bit.

    Example::

        >>> net = nn.Linear(2, 1)
        >>> d = WeightDelta({"weight": torch.ones(1, 2, dtype=torch.float64)})
        >>> with d.applied(net):
        ...     pass                                  # net.weight is W + 1 in here, W again after
    """

    deltas: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.deltas:
            raise EditError("a weight delta needs at least one parameter")
        for name, t in self.deltas.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise EditError(f"delta of {name!r} must be a floating-point tensor")
            if not torch.isfinite(t).all():
                raise EditError(f"delta of {name!r} contains NaN or inf")
        self.deltas = {k: v.detach().double().cpu() for k, v in self.deltas.items()}

    @property
    def layers(self) -> list[str]:
        """The layers (modules) whose parameters change, in order."""
        return list(dict.fromkeys(name.rsplit(".", 1)[0] if "." in name else "" for name in self.deltas))

    def norm(self) -> float:
        """Frobenius norm of all deltas together."""
        return float(sum(float(t.pow(2).sum()) for t in self.deltas.values())) ** 0.5

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        out = {}
        for name, d in self.deltas.items():
            if name not in params:
                raise EditError(f"the model has no parameter {name!r}; this delta was made for another model")
            if tuple(params[name].shape) != tuple(d.shape):
                raise EditError(f"delta of {name!r} is {tuple(d.shape)} but the model's parameter is "
                                f"{tuple(params[name].shape)}; this delta was made for another model")
            out[name] = params[name]
        return out

    def apply(self, model: nn.Module) -> "AppliedDelta":
        """Add the deltas to ``model``'s in-memory parameters; ``undo()`` on the result restores them.

        Every parameter is checked before any changes, so a mismatch leaves the model untouched.
        """
        params = self._params(model)
        backup = {name: p.detach().clone() for name, p in params.items()}
        handle = AppliedDelta(params, backup)
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_((p.double() + self.deltas[name].to(p.device)).to(p.dtype))
        except BaseException:
            handle.undo()
            raise
        return handle

    def describe(self) -> dict[str, Any]:
        """The JSON description: the parameters, their shapes, and ``meta``."""
        return {"format": FORMAT,
                "parameters": {k: list(v.shape) for k, v in self.deltas.items()},
                "norm": self.norm(), "meta": self.meta}

    def save(self, path: str | Path, *, sidecar: bool = True) -> Path:
        """Write ``path`` (safetensors, JSON description in the header) and ``path.json`` beside it, atomically."""
        return save_described(path, dict(self.deltas), FORMAT, self.describe(), sidecar=sidecar)

    @classmethod
    def load(cls, path: str | Path) -> "WeightDelta":
        """Read a delta saved by :meth:`save`. Pickles are refused; nothing is executed."""
        tensors, desc = load_described(path, FORMAT, "a rulewriter weight delta")
        try:
            names = list(desc["parameters"])
            return cls({n: tensors[n] for n in names}, desc.get("meta", {}))
        except (KeyError, ValueError, TypeError) as e:
            raise EditError(f"{path}: malformed weight delta ({e})") from None


class AppliedDelta:
    """Handle returned by :meth:`WeightDelta.apply`; ``undo()`` restores the exact original parameters."""

    def __init__(self, params: dict[str, nn.Parameter], backup: dict[str, torch.Tensor]) -> None:
        self.params, self.backup, self.active = params, backup, True

    def undo(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.backup[name])
        self.active = False


# ------------------------------------------------------------------------------------------ training
def _as_batch(classifier, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    """Images as one preprocessed tensor: a tensor passes through; paths and PIL images are preprocessed."""
    if isinstance(images, torch.Tensor):
        return images
    from ..models.data import load_image

    pics = [im.convert("RGB") if isinstance(im, Image.Image) else load_image(im) for im in images]
    return classifier.preprocess.batch(pics)


def _labels(labels: Sequence[int] | torch.Tensor, n: int, num_classes: int | None) -> torch.Tensor:
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y.shape[0] != n:
        raise RulewriterError(f"{y.shape[0]} labels for {n} exemplars")
    if num_classes is not None and ((y < 0) | (y >= num_classes)).any():
        raise RulewriterError(f"labels must be class indices in 0..{num_classes - 1}, got {y.tolist()}")
    return y


def _train(
    params: dict[str, nn.Parameter],
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int | None,
    seed: int,
    stop_when_fitted: bool,
    progress: bool,
    desc: str,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """SGD on ``params`` only; returns the float64 deltas and the loss of each step taken. Restores ``params``."""
    from tqdm.auto import tqdm

    if steps < 1 or lr <= 0:
        raise RulewriterError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    original = {name: p.detach().clone() for name, p in params.items()}
    flags = {name: p.requires_grad for name, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    bs = n if batch_size is None else max(1, min(int(batch_size), n))
    losses: list[float] = []
    y = y.to(x.device)
    try:
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            idx = torch.randperm(n, generator=g)[:bs] if bs < n else torch.arange(n)
            opt.zero_grad(set_to_none=True)
            logits = forward(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            if not torch.isfinite(loss):
                raise RulewriterError(f"fine-tuning diverged (loss {float(loss)}); lower lr (got {lr})")
            if stop_when_fitted:
                # A full batch's logits are those of the current weights; a minibatch needs a look at all.
                with torch.no_grad():
                    top1 = (logits if bs == n else forward(x)).argmax(1)
                if bool((top1 == y).all()):
                    break
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        deltas = {name: p.detach().double().cpu() - original[name].double().cpu() for name, p in params.items()}
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(original[name])
                p.requires_grad_(flags[name])
                p.grad = None
    return deltas, losses


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient for any parameter inside; both restored on exit."""
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def _layer_params(model: nn.Module, layer: str) -> dict[str, nn.Parameter]:
    from ..core.trace import get_module

    module = get_module(model, layer)
    params = {f"{layer}.{n}" if layer else n: p for n, p in module.named_parameters(recurse=False)
              if n in ("weight", "bias")}
    if "weight" not in {n.rsplit(".", 1)[-1] for n in params}:
        raise LayerError(f"layer {layer!r} ({type(module).__name__}) has no weight to fine-tune")
    return params


def finetune_layer(
    classifier,
    layer: str,
    images: torch.Tensor | Sequence[Any],
    labels: Sequence[int] | torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_when_fitted: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> WeightDelta:
    """Fine-tune one layer alone with cross-entropy and SGD (thesis eq. 2.22); return the change as a delta.

    Only the layer's ``weight`` and ``bias`` (if any) are trained; every other parameter is frozen and the
    network stays in eval mode. The model is restored bit for bit before returning.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        layer: dotted name of the layer to train.
        images: the exemplars: a preprocessed (N, 3, H, W) tensor, or paths / PIL images.
        labels: the class each exemplar must get (e.g. what the unedited model said about its original).
        steps: SGD steps; each uses ``batch_size`` exemplars drawn at random (all of them by default).
        lr, momentum, weight_decay: SGD's settings.
        forward: maps ``images`` to logits (default: the model). Pass a cheaper function that gives the
            same logits, e.g. the network's tail run from cached activations, with ``images`` those activations.
        stop_when_fitted: stop as soon as every exemplar's top-1 is its label (early stopping on the
            training data: the least training that makes the exemplars right).
        seed: for the minibatch draws.
        progress: show a tqdm bar.

    Returns:
        a :class:`WeightDelta` whose ``meta`` records the settings and the loss before and after.

    Example::

        >>> delta = finetune_layer(clf, "_blocks.15._project_conv", ["wood1.jpg"], [817])   # doctest: +SKIP
        >>> delta.meta["loss_last"] < delta.meta["loss_first"]                              # doctest: +SKIP
        True
    """
    model = classifier.model
    params = _layer_params(model, layer)
    x = _as_batch(classifier, images) if forward is None else images
    if not isinstance(x, torch.Tensor):
        raise RulewriterError("with forward=..., images must be the tensor that forward takes")
    x = x.to(classifier.device)
    y = _labels(labels, x.shape[0], getattr(classifier, "num_classes", None))
    fwd = forward if forward is not None else model
    with _frozen(model):
        with torch.no_grad():
            first = float(nn.functional.cross_entropy(fwd(x), y.to(x.device)))
        deltas, losses = _train(params, fwd, x, y, steps=steps, lr=lr, momentum=momentum,
                                weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                                stop_when_fitted=stop_when_fitted, progress=progress, desc=f"fine-tune {layer}")
        with torch.no_grad():
            logits = _with(deltas, model, fwd, x)
            final = float(nn.functional.cross_entropy(logits, y.to(x.device)))
            fitted = bool((logits.argmax(1).cpu() == y).all())
    meta = {"method": "finetune", "equation": "2.22", "model": getattr(classifier, "name", None),
            "weights": getattr(classifier, "weights_id", None), "layer": layer, "parameters": list(params),
            "n_exemplars": int(x.shape[0]), "labels": y.tolist(), "steps": steps, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
            "stop_when_fitted": stop_when_fitted, "steps_run": len(losses), "fitted": fitted,
            "loss_first": first, "loss_last": final}
    return WeightDelta(deltas, meta)


def _with(deltas: dict[str, torch.Tensor], model: nn.Module, fwd: Callable, x: torch.Tensor) -> torch.Tensor:
    with WeightDelta(deltas).applied(model):
        return fwd(x)


def last_linear(model: nn.Module) -> str:
    """Dotted name of the model's last ``nn.Linear`` (the classifier head), in module order.

    Example::

        >>> last_linear(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        '2'
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise LayerError(f"{type(model).__name__} has no nn.Linear layer; name the layer to retrain")
    return names[-1]


def retrain_last_layer(
    classifier,
    images: torch.Tensor | Sequence[Any],
    labels: Sequence[int] | torch.Tensor,
    *,
    layer: str | None = None,
    steps: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    stop_when_fitted: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> WeightDelta:
    """Retrain the last layer (the final ``nn.Linear``, or ``layer``) on the exemplars; return the delta.

    The settings are :func:`finetune_layer`'s. The layer's inputs are read once; when the layer's output is the model's output (checked on the
    exemplars), training runs on them alone, which is exact and fast. Otherwise every step runs the whole
    model, as :func:`finetune_layer` does.

    Example::

        >>> delta = retrain_last_layer(clf, ["wood1.jpg", "wood2.jpg"], [817, 656])   # doctest: +SKIP
        >>> delta.layers                                                              # doctest: +SKIP
        ['_fc']
    """
    from ..core.trace import Trace, get_module

    model = classifier.model
    name = layer or last_linear(model)
    module = get_module(model, name)
    x = _as_batch(classifier, images).to(classifier.device)
    with torch.no_grad(), _frozen(model):
        logits = model(x)
        with Trace(model, name, stop=True) as tr:
            tr(x)
        feats = tr.input
        head_is_output = feats is not None and torch.allclose(module(feats), logits, rtol=1e-5, atol=1e-5)
    kw = dict(steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
              stop_when_fitted=stop_when_fitted, seed=seed, progress=progress)
    if head_is_output:
        delta = finetune_layer(classifier, name, feats, labels, forward=module, **kw)
    else:
        delta = finetune_layer(classifier, name, x, labels, **kw)
    delta.meta.update(method="retrain_last_layer", trained_on="cached layer inputs" if head_is_output
                      else "full forward passes")
    return delta


def smallest_fitting_lr(
    train: Callable[[float], WeightDelta],
    lrs: Sequence[float] = LEARNING_RATES,
    *,
    try_all: bool = False,
) -> tuple[WeightDelta, dict[float, WeightDelta]]:
    """The fair learning-rate rule for a baseline: the smallest of ``lrs`` whose training fits the exemplars.

    Every baseline (fine-tuning a layer, retraining the last layer) is trained with ``train(lr)`` at each
    learning rate, smallest first, and the first whose delta has ``meta["fitted"]`` (every exemplar gets its
    label) is chosen: the gentlest change that does what the exemplars ask, a choice made on the training
    data alone, never on held-out results. When none fits, the largest learning rate's delta is chosen
    (it came closest). The chosen delta's ``meta`` records the rule, the grid and what each rate did.

    Args:
        train: ``lr -> WeightDelta``, e.g. ``lambda lr: finetune_layer(clf, layer, x, y, lr=lr,
            stop_when_fitted=True)``.
        lrs: the grid (default :data:`LEARNING_RATES`), tried in increasing order.
        try_all: train at every rate even after one fits (for a sweep table); the choice is the same.

    Returns:
        ``(chosen, tried)``: the chosen delta and every delta trained, keyed by learning rate.

    Example::

        >>> delta, tried = smallest_fitting_lr(lambda lr: retrain_last_layer(clf, ims, ys, lr=lr,
        ...                                                                   stop_when_fitted=True))  # doctest: +SKIP
        >>> delta.meta["lr"], delta.meta["lr_rule"]                                               # doctest: +SKIP
        (0.001, 'smallest of 0.0001, 0.001, 0.01 that fits the exemplars')
    """
    grid = sorted({float(v) for v in lrs})
    if not grid or grid[0] <= 0:
        raise RulewriterError(f"learning rates must be positive, got {list(lrs)}")
    tried: dict[float, WeightDelta] = {}
    chosen: WeightDelta | None = None
    for lr in grid:
        tried[lr] = delta = train(lr)
        if chosen is None and delta.meta.get("fitted"):
            chosen = delta
            if not try_all:
                break
    if chosen is None:
        chosen = tried[grid[-1]]
    chosen.meta.update(lr_rule=f"smallest of {', '.join(f'{v:g}' for v in grid)} that fits the exemplars",
                       lr_tried={f"{lr:g}": {k: d.meta.get(k) for k in ("fitted", "steps_run", "loss_first",
                                                                         "loss_last")}
                                 for lr, d in tried.items()})
    return chosen, tried
