"""Locality: what an edit may change elsewhere, measured on calibration images.

An edit is local when the photos it was not written for keep their top-1. :class:`LocalityBudget` is how
much may change (the field's LR targets, the counted share halved for sampling error), :class:`Calibration`
counts the top-1 changes of a candidate edit on calibration images from cached activations
(:func:`calibration_set`, which must not be ``C``'s own images: :func:`calibration_split`) and estimates
the share it would change from every image's margin loss, stopping once a setting is ruled out; without
calibration images the budget is the layer's output energy on the statistics keys
(:func:`relative_collateral`). :func:`rulewriter.core.generalise.choose_strength` spends the budget.

Example::

    stats_paths, cal_paths = calibration_split("photos/")               # disjoint
    cal = calibration_set(clf, layer, cal_paths)
    cal.changed(clf.model, edit)      # {'changed': 0.002, 'changed_near_tie': 0.0, 'expected': 0.004, ...}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .tail import LinearTail, read_views_at, run_tail, tail_start

__all__ = ["DEFAULT_COLLATERAL", "NEAR_TIE", "EXPECTED_CHANGED", "CALIBRATION_IMAGES", "MIN_CALIBRATION_IMAGES",
           "relative_collateral", "margin_loss", "LocalityBudget", "Calibration", "exact_map", "calibration_set",
           "calibration_sets", "calibration_split"]

#: Collateral budget without calibration images: the edit may change the layer's output on the statistics
#: images by at most 1% of the output's mean square (an RMS change of 10%), measured exactly from ``C``.
#: Measured on the scoreboard this never binds before top-1 changes start, so with calibration images
#: (the default wherever the statistics images are at hand) the :class:`LocalityBudget` decides instead.
DEFAULT_COLLATERAL = 0.01
#: A calibration photo is a near tie when its unedited top-2 probabilities are within this (they flip first).
NEAR_TIE = 0.05
#: The largest *expected* share of top-1 changes (:meth:`Calibration.changed`'s ``expected``): the field's
#: LR target itself (LR ≥ 99 %), not halved like the counted share, because the estimate uses every
#: calibration image's margin change rather than the few images that happen to flip.
EXPECTED_CHANGED = 0.01
#: At most this many images are calibration images (a subsample, deterministic).
CALIBRATION_IMAGES = 500
#: Fewer calibration images than this cannot measure a 0.5 % budget (one change is already over 2 %).
MIN_CALIBRATION_IMAGES = 50


def relative_collateral(w0: torch.Tensor, delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                        c: torch.Tensor, *, reference: float | None = None) -> float:
    """``tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ)``: mean-square output change over the statistics keys, relative.

    ``C = E[k kᵀ]`` over the statistics images' keys, so ``tr(ΔW C ΔWᵀ) = E‖ΔW k‖²`` exactly; scaling the
    update by ``s`` scales this by ``s²``. ``delta`` is ``ΔW`` or its factors ``(Λ, D)`` (``ΔW = Λ Dᵀ``;
    then ``tr((DᵀCD)(ΛᵀΛ))``, without forming ``ΔW``); ``reference`` is ``tr(W0 C W0ᵀ)`` when already known.

    Example:
        >>> round(relative_collateral(torch.eye(2), 0.1 * torch.eye(2), torch.eye(2)), 6)
        0.01
    """
    c = c.double().to(w0.device)
    if isinstance(delta, tuple):
        lam, d = (t.double().to(w0.device) for t in delta)
        num = float(((d.T @ c @ d) * (lam.T @ lam)).sum())
    else:
        d = delta.double()
        num = float(((d @ c) * d).sum())
    if reference is None:
        w0 = w0.double()
        reference = float(((w0 @ c) * w0).sum())
    return num / reference if reference > 0 else math.inf


@dataclass(frozen=True)
class LocalityBudget:
    """How much an edit may change on the calibration images: the share whose top-1 changes, overall and
    among near ties (unedited top-2 probabilities within :data:`NEAR_TIE`), and the expected share of
    top-1 changes estimated from every image's margin (:meth:`Calibration.changed`).

    The counted shares are the field's locality targets (LR ≥ 99 % of unrelated photos unchanged, ≥ 95 %
    of the near ties) with the overall rate halved (0.5 %), a margin for the sampling error of a few
    hundred calibration photos: a budget met on the calibration photos should still hold on new ones. The
    expected share may reach the target itself (:data:`EXPECTED_CHANGED`). Counts alone are blind below
    one image in a few hundred, and a search over dozens of settings keeps the ones whose count happened to
    be low; the estimate sees how far every image moved.

    Example:
        >>> b = LocalityBudget()
        >>> b.admits({"changed": 0.004, "changed_near_tie": 0.0, "expected": 0.02})
        False
    """

    changed: float = 0.005
    near_tie: float = 0.05
    expected: float = EXPECTED_CHANGED

    def admits(self, measured: dict[str, Any]) -> bool:
        """True when ``measured`` (from :meth:`Calibration.changed`) is within both counted shares and,
        where it has one, the expected share."""
        nt, ex = measured.get("changed_near_tie"), measured.get("expected")
        return (measured["changed"] <= self.changed + 1e-12 and (nt is None or nt <= self.near_tie + 1e-12)
                and (ex is None or ex <= self.expected + 1e-12))

    def adds_nothing(self, measured: dict[str, Any], ref: dict[str, Any]) -> bool:
        """True when ``measured`` adds no collateral to ``ref`` (the closed form's, the fallback): it changes
        only calibration images ``ref`` changes (``which``; without it, no larger shares) and its expected
        share is within the budget or no larger than ``ref``'s."""
        if "which" in measured and "which" in ref:
            same = set(measured["which"]) <= set(ref["which"])
        else:
            nt, ref_nt = measured.get("changed_near_tie"), ref.get("changed_near_tie")
            same = measured["changed"] <= ref["changed"] and (nt is None or ref_nt is None or nt <= ref_nt)
        ex, ref_ex = measured.get("expected"), ref.get("expected")
        return same and (ex is None or ex <= max(self.expected, ref_ex if ref_ex is not None else 0.0) + 1e-12)

    def rules_out(self, measured: dict[str, Any], ref: dict[str, Any] | None = None) -> bool:
        """True when ``measured``, possibly from only some of the calibration images, already settles that
        a setting is inadmissible: over the budget, and (given the closed form's measurement ``ref``)
        adding collateral to it (:meth:`adds_nothing`). The counts, the changed images and the expected
        share only grow as images are added, so :meth:`Calibration.changed` may stop measuring once this
        holds."""
        if self.admits(measured):
            return False
        return ref is None or not self.adds_nothing(measured, ref)

    def describe(self) -> str:
        return (f"top-1 changes on at most {100 * self.changed:g}% of the calibration images and "
                f"{100 * self.near_tie:g}% of their near ties, and at most {100 * self.expected:g}% expected "
                f"from their margins")


def margin_loss(logits: torch.Tensor, top: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """How much of each image's unedited ``margin`` (its ``top`` logit minus the largest other) an edit
    took, given the edited ``logits``: the margin before minus the same class's margin after. The top-1
    changes exactly where this exceeds ``margin``.

    Example:
        >>> margin_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([0]), torch.tensor([0.5])).tolist()
        [1.5]
    """
    logits = logits.double()
    own = logits.gather(1, top[:, None]).squeeze(1)
    others = logits.scatter(1, top[:, None], -math.inf).max(1).values
    return margin.double() - (own - others)


@dataclass
class Calibration:
    """Calibration images for the locality budget: where their tail starts, its cached inputs, the unedited
    top-1 and which are near ties. Built once per layer with :func:`calibration_set`.

    Example::

        cal = calibration_set(clf, layer, "photos/")              # the statistics images, up to 500
        cal.changed(clf.model, edit)          # {'changed': 0.002, 'changed_near_tie': 0.0, 'expected': 0.004, ...}
    """

    start: str | None
    x: torch.Tensor
    base: torch.Tensor
    near_tie: torch.Tensor
    #: Images per tail pass: 32 keeps a late block's activations within a CPU's caches (measured on
    #: EfficientNet-Lite0 from block 11, one thread: 250 images in 1.05 s at 32 against 1.3 s at 100).
    batch_size: int = 32
    #: The exact shortcut for edits of the last block's project conv or the head conv
    #: (:class:`~rulewriter.core.tail.LinearTail`), where the model has one: a candidate then costs ~1/30 of a
    #: tail pass.
    linear: LinearTail | None = None
    #: The unedited top-1 minus top-2 probability of each image: a measurement that may stop early
    #: (``changed(stop=...)``) takes the smallest margins first. None: the images' own order.
    margin: torch.Tensor | None = None
    #: The unedited top-1 logit minus the largest other logit of each image: what an edit must take from
    #: an image to change its top-1 (the expected share in :meth:`changed`). None: no estimate.
    logit_margin: torch.Tensor | None = None
    #: ``logit_margin`` sorted, the reference distribution of the expected share (derived, not passed).
    _sorted: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.logit_margin is not None:
            self._sorted = self.logit_margin.double().sort().values.contiguous()

    @classmethod
    def of(cls, start: str | None, x: torch.Tensor, logits: torch.Tensor, *, linear: LinearTail | None = None,
           batch_size: int = 32) -> "Calibration":
        """The calibration set of images whose tail inputs (from ``start``; None: whole images) are ``x``
        and whose unedited logits are ``logits``: top-1, near ties and both margins follow from them."""
        prob = logits.detach().softmax(1).topk(2, 1).values.cpu()
        margin = prob[:, 0] - prob[:, 1]
        top2 = logits.detach().double().topk(2, 1).values.cpu()
        return cls(start, x.cpu(), logits.argmax(1).cpu(), margin <= NEAR_TIE, batch_size=batch_size,
                   linear=linear, margin=margin, logit_margin=top2[:, 0] - top2[:, 1])

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def changed(self, model: nn.Module, edit: Any, *,
                stop: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Share of calibration images (and of their near ties) whose top-1 ``edit`` changes, and the
        expected share of photos whose top-1 it would change (``expected``, where ``logit_margin`` is set).

        The estimate: an image's top-1 changes when the edit takes more than its margin from it (its
        top-1 logit minus the largest other). Each image's margin loss ``δᵢ`` is set against the unedited
        margins of all the calibration images: ``F(δᵢ)``, the share of them with a margin below it, is the
        share of photos that a change like this one would flip. ``expected`` is the mean of ``F(δᵢ)``: it
        counts every image's change, not only the few that flip (one flip in 250 images is already
        0.4 %), and it does not drop to zero for a setting whose count happened to miss.

        With ``stop`` (e.g. ``lambda m: budget.rules_out(m, ref)``), the images are measured a chunk at a
        time, the most fragile first (smallest unedited top-1 margin: they flip first), and the measurement
        ends as soon as ``stop`` holds for what has been counted; the shares then count the changes found
        so far against *all* the images (lower bounds: ``F ≥ 0``) and ``complete`` is False. The decision
        ``stop`` expresses is exact; only the reported shares of a setting it rules out are partial.
        """
        n, nt = len(self), int(self.near_tie.sum())
        diff = torch.zeros(n, dtype=torch.bool)
        flips = torch.zeros(n, dtype=torch.float64)  # F(δᵢ) of each measured image
        if stop is None or (self.linear is not None and self.linear.covers(model, edit)):
            self._count(self.logits(model, edit), torch.arange(n), diff, flips)
            done = n
        else:
            order = torch.argsort(self.margin, stable=True) if self.margin is not None else torch.arange(n)
            done = 0
            with edit.applied(model):
                while done < n:
                    # A half batch first: a setting that flips a near tie (they come first) stops sooner.
                    idx = order[done:done + (self.batch_size // 2 if done == 0 else self.batch_size)]
                    self._count(self._logits_of(model, idx), idx, diff, flips)
                    done += int(idx.numel())
                    if done < n and stop(self._shares(diff, flips, n, nt, done)):
                        break
        return self._shares(diff, flips, n, nt, done)

    @torch.no_grad()
    def logits(self, model: nn.Module, edit: Any) -> torch.Tensor:
        """Every calibration image's logits with ``edit`` applied: through the exact linear map where it
        covers the edit, else tail passes with the edit applied (and undone)."""
        if self.linear is not None and self.linear.covers(model, edit):
            return self.linear.logits(model, edit)
        n = len(self)
        with edit.applied(model):
            return torch.cat([self._logits_of(model, torch.arange(i, min(i + self.batch_size, n)))
                              for i in range(0, n, self.batch_size)])

    def _count(self, logits: torch.Tensor, idx: torch.Tensor, diff: torch.Tensor, flips: torch.Tensor) -> None:
        """Record images ``idx``'s edited ``logits``: whether their top-1 changed, and ``F(δᵢ)``."""
        logits = logits.double().cpu()
        diff[idx] = logits.argmax(1) != self.base[idx]
        if self._sorted is not None:
            loss = margin_loss(logits, self.base[idx], self.logit_margin[idx])
            flips[idx] = torch.searchsorted(self._sorted, loss).double() / len(self._sorted)  # margins below δᵢ

    def _shares(self, diff: torch.Tensor, flips: torch.Tensor, n: int, nt: int, done: int) -> dict[str, Any]:
        out = {"changed": float(diff.double().sum()) / n, "n": n,
               "changed_near_tie": float(diff[self.near_tie].double().sum()) / nt if nt else None, "n_near_tie": nt,
               "which": torch.nonzero(diff).flatten().tolist()}
        if self._sorted is not None:
            out["expected"] = float(flips.sum()) / n
        if done < n:
            out.update(complete=False, measured=done)
        return out

    @torch.no_grad()
    def _logits_of(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        p = next(model.parameters())
        z = self.x[idx].to(p.device, p.dtype)
        return (run_tail(model, self.start, z) if self.start else model(z)).cpu()


def exact_map(model: nn.Module, layer: str, layer_input: torch.Tensor, logits: torch.Tensor) -> LinearTail | None:
    """The exact linear map of images whose input to ``layer`` is ``layer_input`` and whose unedited logits
    are ``logits`` (:class:`~rulewriter.core.tail.LinearTail`); None where the layer has none, or where the
    map's top-1 differs from the model's on any image (a rounding the map would count as a change)."""
    linear = LinearTail.build(model, layer, layer_input)
    if linear is not None and not torch.equal(linear.logits(model).argmax(1), logits.argmax(1).cpu()):
        return None
    return linear


def calibration_set(classifier, layer: str, data: Any, *, limit: int = CALIBRATION_IMAGES, seed: int = 0,
                    batch_size: int = 32) -> Calibration:
    """Calibration images for ``layer``: ``data`` is a folder, a list of paths, a Dataset (as for the
    statistics) or a batch of preprocessed images; at most ``limit`` of them, subsampled deterministically.

    One forward pass caches each image's input to the network's tail after ``layer`` (the whole image when
    the model has no shortcut), so counting the top-1 changes of a candidate edit costs a tail pass only;
    for the last block's project conv it also caches the layer's keys and the head's pre-activations
    (:class:`~rulewriter.core.tail.LinearTail`, about 0.5 MB an image), and a candidate costs the head alone.
    """
    return calibration_sets(classifier, [layer], data, limit=limit, seed=seed, batch_size=batch_size)[layer]


def calibration_sets(classifier, layers: Sequence[str], data: Any, *, limit: int = CALIBRATION_IMAGES,
                     seed: int = 0, batch_size: int = 32) -> dict[str, Calibration]:
    """:func:`calibration_set` of each of ``layers`` from one forward pass over the same images (the layer
    choice validates at several layers: one pass instead of one per layer).

    Example::

        cals = calibration_sets(clf, clf.candidate_layers, "photos/")   # {layer: Calibration}
    """
    from ..errors import EditError
    from .stats import statistics_dataset

    if isinstance(data, torch.Tensor):
        images = data if data.shape[0] <= limit else data[torch.randperm(
            data.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].sort().values]
    else:
        ds = statistics_dataset(classifier, data, limit, seed)
        if len(ds) > limit:
            ds = statistics_dataset(classifier, ds, limit, seed)
        items = [ds[i] for i in range(len(ds))]
        if not items:
            raise EditError("no calibration images")
        images = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    at, logits = read_views_at(classifier, list(dict.fromkeys(layers)), images, batch_size=batch_size)
    out = {}
    for layer, (keys, tail) in at.items():
        start = tail_start(classifier.model, layer) if tail is not None else None
        out[layer] = Calibration.of(start, (tail if tail is not None else images), logits,
                                    linear=exact_map(classifier.model, layer, keys, logits))
    return out


def calibration_split(data: Any, samples: int | None = None, *, seed: int = 0, limit: int = CALIBRATION_IMAGES
                      ) -> tuple[list[Path], list[Path]]:
    """Split an image folder (or list of paths) into statistics images and calibration images, disjoint.

    Calibration images must not be among ``C``'s images: the update's directions ``C⁻¹u`` are chosen to
    disturb exactly those keys least, so they understate what the edit changes elsewhere. With ``samples``
    (fewer than the images), ``C`` takes that deterministic subsample and calibration up to ``limit`` of the
    rest; otherwise a tenth of the images (at most ``limit``) is set aside for calibration and ``C`` takes
    the others. Fewer than :data:`MIN_CALIBRATION_IMAGES` possible: no calibration images (``[]``).

    Example::

        >>> stats_paths, cal_paths = calibration_split("photos/", 2000)   # doctest: +SKIP
    """
    from ..models.data import list_images, subsample

    paths = list_images(data) if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if samples is not None and samples < len(paths):
        used = subsample(paths, samples, seed=seed)
        chosen = set(used)
        rest = [p for p in paths if p not in chosen]
        cal = subsample(rest, limit, seed=seed)
        return used, (cal if len(cal) >= MIN_CALIBRATION_IMAGES else [])
    n_cal = min(limit, len(paths) // 10)
    if n_cal < MIN_CALIBRATION_IMAGES:
        return paths, []
    cal = subsample(paths, n_cal, seed=seed + 1)
    held = set(cal)
    return [p for p in paths if p not in held], cal
