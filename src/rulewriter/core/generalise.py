"""Edits that carry to new photos: augmented exemplar views and a strength chosen by validation.

A rule read from a few exemplars is exact on their keys, but keys of the same concept in other photos differ
from them, and the closed-form update moves those only part of the way. Two defaults make an edit carry:

* **Joint augmentation.** :func:`exemplar_views` crops, flips and rescales each (original, manipulated,
  mask) triple *together* (one random box and flip for all three, so the mask stays on the concept), so the
  rule sees the concept at several scales and positions instead of one. ``rule_from_images`` reads its
  pairs from every view.
* **Strength chosen by validation.** The update ``Λ Dᵀ`` keeps its direction; its magnitude ``s`` (``s·Λ``)
  is chosen per edit by :func:`choose_strength`, from the exemplars alone. Each fold leaves out the views
  of one exemplar (with one exemplar: half of its augmented views), solves the rule on the rest, and counts
  for every candidate ``s`` the left-out manipulated views whose top-1 returns to the unedited model's top-1
  on their clean view, plus the clean views that keep it. The setting that restores the most exemplars
  themselves (fitted on all views), then has the most left-out views right, then the higher mean
  probability of the right class, then the smaller ``s``, wins, among the settings within the **locality
  budget** (:class:`LocalityBudget`): the full edit changes the top-1 of at most 0.5 % of the calibration
  images and 5 % of their near ties, and at most 1 % expected from their margins (:class:`Calibration`,
  images that are *not* among ``C``'s own, :func:`calibration_split`). The winner's candidate is then
  scaled to its strongest strength within that budget that restores as many exemplars: the views choose
  what to scale, the measured collateral how far.
  Without calibration images the budget is the output energy ``s² tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ) ≤ 1 %``
  (exact from ``C``, but on the scoreboard looser than top-1 locality, so it caps the strength and is not
  spent). No held-out photo takes part.

Example::

    rule = rule_from_images(clf, layer, originals, manipulated, masks, views=DEFAULT_VIEWS)
    stats_paths, cal_paths = calibration_split("photos/")                  # disjoint
    stats = collect_second_moment(clf, layer, stats_paths)
    edit = rewrite(clf, rule, stats, calibration=cal_paths)                 # strength="auto"
    edit.meta["strength"]["chosen"], edit.meta["strength"]["reason"]       # doctest: +SKIP

The network's tail after the edited layer is run from cached activations where the model allows it
(:mod:`rulewriter.core.tail`: EfficientNet's blocks, and past the last block's project conv or the head conv
an exact linear map), so validating ten strengths costs a few tail passes, not full forward passes. A
calibration measurement stops once its setting is ruled out (:meth:`LocalityBudget.rules_out`), and the
search over settings is best-first (:func:`choose_strength`): a setting that could not rank first is never
measured.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

# The locality budget and the views' activations have their own modules; their names stay importable here.
from .locality import (CALIBRATION_IMAGES, DEFAULT_COLLATERAL, MIN_CALIBRATION_IMAGES, NEAR_TIE, Calibration,
                       LocalityBudget, calibration_set, calibration_split, exact_map, relative_collateral)
from .tail import LinearTail, read_views, read_views_at, run_tail, trusting_checked_weights

__all__ = [
    "DEFAULT_VIEWS",
    "MIN_VIEWS",
    "STRENGTHS",
    "DEFAULT_COLLATERAL",
    "augment_exemplar",
    "exemplar_views",
    "view_groups",
    "ViewSet",
    "read_views",
    "read_views_at",
    "relative_collateral",
    "NEAR_TIE",
    "CALIBRATION_IMAGES",
    "MIN_CALIBRATION_IMAGES",
    "LocalityBudget",
    "Calibration",
    "calibration_set",
    "exact_map",
    "calibration_split",
    "StrengthChoice",
    "choose_strength",
    "chosen_row",
    "layer_score",
    "choose_layer",
]

#: Augmented views per exemplar, besides the exemplar itself, when a rule asks for views (opt-in).
DEFAULT_VIEWS = 4
#: At least this many augmented views in all (one exemplar gets 8), so every validation fold has views.
MIN_VIEWS = 8
#: Candidate magnitudes of the update along its direction (``s·Λ``); 1 is the closed form. A geometric
#: ladder (about ×1.4 a step) up to 8: the locality budget, not the ladder, is meant to stop the strength.
STRENGTHS: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Smallest crop (fraction of the photo's area) of an augmented view: a view keeps at least a third of the
#: photo, the range of framings a person photographs an object at, so the concept stays recognisable.
MIN_CROP_AREA = 0.35
VIEW_SIZE = 256


# ------------------------------------------------------------------------------------------ augmentation
def _box(size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random resized crop box (area ``MIN_CROP_AREA``–1, aspect 3/4–4/3), else the centre square."""
    w, h = size
    for _ in range(10):
        area = w * h * rng.uniform(MIN_CROP_AREA, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    c = min(w, h)
    return (w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c


def _mask_image(mask: np.ndarray | torch.Tensor) -> Image.Image:
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float32)
    if m.max() > 1.0:
        m = m / 255.0
    return Image.fromarray(np.clip(m, 0.0, 1.0).astype(np.float32), mode="F")


def augment_exemplar(original: Image.Image, manipulated: Image.Image, mask: np.ndarray | torch.Tensor,
                     rng: np.random.Generator, size: int = VIEW_SIZE,
                     ) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """One joint view of an exemplar: the same crop box, flip and resize for image, manipulated image and mask.

    ``mask`` is (H, W) at the images' size, values in [0, 1] (or 0–255). The crop is retried (up to ten
    boxes) until it keeps part of the mask. Brightness, contrast and colour change by the same factor in
    both images, so the rule sees the concept under a few lightings. Returns PIL images of ``size``² and the
    mask as an (size, size) float32 array.

    Example::

        >>> o, m, k = augment_exemplar(img, img_wood, wheel_mask, np.random.default_rng(0))  # doctest: +SKIP
        >>> o.size == m.size == (256, 256) and k.shape == (256, 256)                          # doctest: +SKIP
        True
    """
    from ..errors import EditError

    if original.size != manipulated.size:
        raise EditError(f"original {original.size} and manipulated {manipulated.size} must align")
    mimg = _mask_image(mask)
    if mimg.size != original.size:
        raise EditError(f"mask {mimg.size[::-1]} does not match its image {original.size[::-1]}")
    out = (size, size)
    for _ in range(10):
        box = _box(original.size, rng)
        mk = np.asarray(mimg.resize(out, Image.Resampling.BILINEAR, box=box), dtype=np.float32)
        if mk.max() > 0:
            break
    else:  # the concept is too small to survive a crop: keep the whole photo
        box = (0, 0, *original.size)
        mk = np.asarray(mimg.resize(out, Image.Resampling.BILINEAR, box=box), dtype=np.float32)
    o = original.convert("RGB").resize(out, Image.Resampling.BILINEAR, box=box)
    s = manipulated.convert("RGB").resize(out, Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        o, s, mk = ImageOps.mirror(o), ImageOps.mirror(s), mk[:, ::-1]
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        f = float(rng.uniform(0.8, 1.2))
        o, s = enhancer(o).enhance(f), enhancer(s).enhance(f)
    mk = np.clip(mk, 0.0, 1.0).copy()
    # Contrast pivots on each image's own mean grey, so recombine: outside the mask the two views must be
    # the same pixels, as they were before augmenting.
    mf = mk[..., None]
    s = Image.fromarray(np.clip(np.rint(np.asarray(o, np.float32) * (1 - mf) + np.asarray(s, np.float32) * mf),
                                0, 255).astype(np.uint8))
    return o, s, mk


def view_groups(n_exemplars: int, views_per: int) -> list[int]:
    """Validation fold of each view, exemplar-major (exemplar e: its own photo, then its ``views_per`` views).

    With two or more exemplars a fold is one exemplar (leave one exemplar out: its photo and views). With
    one exemplar its photo is never left out (group -1) and its views alternate between folds 0 and 1.
    """
    if n_exemplars >= 2:
        return [e for e in range(n_exemplars) for _ in range(views_per + 1)]
    return [-1] + [v % 2 for v in range(views_per)]


def exemplar_views(originals: Sequence[Image.Image], manipulated: Sequence[Image.Image],
                   masks: Sequence[np.ndarray | torch.Tensor], views: int = DEFAULT_VIEWS, *, seed: int = 0
                   ) -> tuple[list[Image.Image], list[Image.Image], list[np.ndarray], list[int]]:
    """Each exemplar followed by ``views`` joint augmentations (at least :data:`MIN_VIEWS` in all).

    Masks are at their image's size. Returns originals, manipulated images, masks (float32 at each view's
    size) and the validation fold of every view (:func:`view_groups`). Deterministic in ``seed``.
    """
    n = len(originals)
    per = 0 if views <= 0 else max(int(views), math.ceil(MIN_VIEWS / max(n, 1)))
    oo, mm, kk = [], [], []
    for e, (o, s, k) in enumerate(zip(originals, manipulated, masks)):
        oo.append(o)
        mm.append(s)
        kk.append(np.asarray(_mask_image(k), dtype=np.float32))
        rng = np.random.default_rng([seed, e])
        for _ in range(per):
            a, b, c = augment_exemplar(o, s, k, rng)
            oo.append(a)
            mm.append(b)
            kk.append(c)
    return oo, mm, kk, view_groups(n, per)


@dataclass
class ViewSet:
    """Exemplar views ready for validation: where the tail starts, its cached inputs, the targets, the folds.

    ``x_orig``/``x_man`` are the inputs of module ``start`` for the clean and manipulated views (the
    preprocessed images when ``start`` is None: full forward passes). ``target`` is the unedited model's
    top-1 on each clean view; ``group`` each view's validation fold (-1: never left out).
    """

    start: str | None
    x_orig: torch.Tensor
    x_man: torch.Tensor
    target: torch.Tensor
    group: torch.Tensor
    own: torch.Tensor | None = None  # (n,) bool: the view is an exemplar itself, not an augmentation
    batch_size: int = 64
    #: The exact linear maps of the clean and manipulated views (:class:`~rulewriter.core.tail.LinearTail`)
    #: where the layer has one: :meth:`logits_under` then costs a rank-r update, not a tail pass.
    linear_orig: LinearTail | None = None
    linear_man: LinearTail | None = None
    #: (n, S, S) each view's mask on the model's input grid, where the views were read from masks (a rule
    #: spread over a residual stage reads its pairs at every layer of the stage from them).
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @torch.no_grad()
    def logits(self, model: nn.Module, which: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the clean (``"orig"``) or manipulated (``"man"``) views with the model as it is now."""
        x = self.x_orig if which == "orig" else self.x_man
        x = x if idx is None else x[idx]
        p = next(model.parameters())
        x = x.to(p.device, p.dtype)
        run = (lambda z: run_tail(model, self.start, z)) if self.start else model
        if x.shape[0] == 0:
            return torch.empty(0, 0)
        return torch.cat([run(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    def logits_under(self, model: nn.Module, edit: Any, which: str, idx: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """:meth:`logits` with ``edit`` applied: through the exact linear map where it covers the edit,
        else the tail with the edit applied (and undone)."""
        lin = self.linear_orig if which == "orig" else self.linear_man
        if lin is not None and lin.covers(model, edit):
            return (lin if idx is None else lin.subset(idx)).logits(model, edit)
        with edit.applied(model):
            return self.logits(model, which, idx)


@dataclass
class StrengthChoice:
    """The strength picked for one edit and the evidence: one row per candidate strength."""

    chosen: float
    reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    budget: float | LocalityBudget = DEFAULT_COLLATERAL
    folds: int = 0
    n_validation: int = 0
    candidate: Any = None
    #: True where the validation stopped early (``to_beat``): this choice cannot win a layer.
    pruned: bool = False

    def to_dict(self) -> dict[str, Any]:
        budget = ({"changed": self.budget.changed, "near_tie": self.budget.near_tie,
                   "expected": self.budget.expected}
                  if isinstance(self.budget, LocalityBudget) else self.budget)
        out = {"chosen": self.chosen, "reason": self.reason, "budget": budget, "folds": self.folds,
               "n_validation": self.n_validation, "candidates": self.rows}
        if self.candidate is not None:
            out["candidate"] = self.candidate
        if self.pruned:
            out["pruned"] = True
        return out


def _admits(measured: Any, budget: float | LocalityBudget) -> bool:
    if isinstance(budget, LocalityBudget):
        return budget.admits(measured)
    return float(measured) <= budget


def _no_worse(measured: Any, ref: Any, budget: float | LocalityBudget) -> bool:
    """Collateral ``measured`` adds nothing to ``ref``'s (:meth:`LocalityBudget.adds_nothing`), or no more
    output energy."""
    if isinstance(budget, LocalityBudget):
        return budget.adds_nothing(measured, ref)
    return float(measured) <= float(ref)


def _describe(measured: Any, budget: float | LocalityBudget) -> str:
    if isinstance(budget, LocalityBudget):
        nt, ex = measured.get("changed_near_tie"), measured.get("expected")
        return (f"top-1 changed on {100 * measured['changed']:.1f}% of {measured['n']} calibration images"
                + ("" if nt is None else f" and {100 * nt:.0f}% of their {measured['n_near_tie']} near ties")
                + ("" if ex is None else f", {100 * ex:.2f}% expected from their margins")
                + f" (budget {100 * budget.changed:g}% / {100 * budget.near_tie:g}%"
                + ("" if ex is None else f" / {100 * budget.expected:g}%") + ")")
    return f"collateral on the statistics images {float(measured):.2g} of the layer's output energy (budget {budget:g})"


@trusting_checked_weights()  # only the search's own edits change the weights while it runs
def choose_strength(
    model: nn.Module,
    views: ViewSet,
    solve: Callable[..., Any],
    collateral: Callable[..., Any],
    *,
    strengths: Sequence[float] = STRENGTHS,
    budget: float | LocalityBudget = DEFAULT_COLLATERAL,
    candidates: Sequence[Any] | None = None,
    to_beat: Sequence[Any] | None = None,
    ties_win: bool = False,
    exhaustive: bool = False,
) -> StrengthChoice:
    """Pick the update's magnitude (and, given ``candidates``, its rank) by validation on left-out views.

    Args:
        model: the network (edits are applied to it and undone).
        views: the exemplar views and their folds.
        solve: ``solve(left_out)`` (or ``solve(left_out, candidate)``) returns an
            :class:`~rulewriter.edit.Edit` fitted without the views of fold ``left_out`` (None: all views).
        collateral: ``collateral(s)`` (or ``collateral(s, candidate)``): the full edit's collateral at
            strength ``s``: with a :class:`LocalityBudget`, the dict of :meth:`Calibration.changed`; with a
            number, the relative output energy on the statistics images (:func:`relative_collateral`). A
            ``collateral`` that takes a ``stop`` keyword gets, for every setting but the closed form, the
            predicate :meth:`LocalityBudget.rules_out` against the closed form's measurement, to pass on to
            :meth:`Calibration.changed` (a setting it rules out is measured on only some of the images).
        strengths: the candidate strengths; 1 (the closed form) is always among them.
        budget: a :class:`LocalityBudget` or the largest relative output energy; strength 1 of the first
            candidate is always admissible (the thesis's edit is the fallback), and where it is over the
            budget itself, so is every setting that changes only calibration images it changes too.
        candidates: other knobs to choose with the strength (e.g. ``(context, rank)`` pairs), simplest
            first; None: the strength alone.
        to_beat: the :func:`layer_score` of another layer's edit of the same rule (in
            :func:`rewrite_choosing_layer <rulewriter.core.rules.rewrite_choosing_layer>`); ``ties_win``:
            whether an equal score would win (this layer comes first in :func:`choose_layer`'s order). Once
            no setting that is still possible could score enough, the choice could not win the layer, so
            it stops there: the closed form, with ``pruned`` set and no rows. Exact: it prunes only what
            could not win.
        exhaustive: measure and validate every admissible setting (a complete table of rows) instead of
            only what the choice needs; the choice is the same.

    Strengths are measured against the budget in increasing order; once one is over it, the larger ones of
    that candidate are not measured (collateral grows with the strength: exactly so for the output energy,
    ``∝ s²``; for top-1 changes as a rule) and count as over. Among the admissible settings, those are ranked
    first by the exemplars themselves (``views.own``) that the edit fitted on all views restores (what the
    user showed must be fixed first), then by being within the budget or the fallback (a setting admitted
    only for adding no calibration change to the closed form's wins only by restoring more exemplars), then
    by the number of left-out views right (manipulated view back to the clean view's unedited top-1, plus
    clean views keeping it), then by the higher mean probability of that class, then the simpler candidate
    and the smaller ``s``. With a :class:`LocalityBudget` the winner's candidate is then spent up to the
    budget: its strongest strength within the budget that restores as many exemplars (the validation
    views choose what to scale, the measured collateral how far).

    The search is best-first: every setting's rank is bounded above by what is known of it (its exemplars
    restored, cheap to count; its validation, a fold's manipulated or clean views at a time, every view not
    yet scored counted right; its admission, a calibration measurement, the dear part), and the setting
    with the highest bound is refined, cheapest step first, until the best bound belongs to a setting known
    in full; that one has the highest rank of all admissible settings.
    Each row's ``admitted`` says why it was admissible (``"budget"``, ``"fallback"``, ``"no new change"``;
    None: it was not, or it was not measured: ``within_budget`` None).
    """
    strengths = sorted({float(s) for s in strengths} | {1.0})
    single = candidates is None
    cands = [None] if single else list(candidates)
    folds = sorted({int(g) for g in views.group.tolist() if g >= 0})
    if not folds:
        return StrengthChoice(1.0, "no validation views: the closed form (strength 1)", budget=budget)
    own = views.own if views.own is not None else torch.zeros(len(views), dtype=torch.bool)
    own_idx = torch.nonzero(own).flatten()
    n_own = int(own_idx.numel())
    fold_idx = [torch.nonzero(views.group == f).flatten() for f in folds]
    n_val = sum(int(i.numel()) for i in fold_idx)
    keys = [(ci, s) for ci in range(len(cands)) for s in strengths]
    order = {key: k for k, key in enumerate(keys)}
    # Collateral first: only settings within the budget are worth validating. The closed form (strength 1
    # of the first candidate) is the fallback, so it is always admissible; where it is over the budget
    # itself, a setting that changes only calibration images the closed form changes too is admissible: it
    # adds no collateral that the fallback would not have.
    measured: dict[tuple[int, float], Any] = {}
    admitted: dict[tuple[int, float], str] = {}  # why a setting is admissible: "budget", "fallback", "no new change"
    # A measurement may stop once it rules its setting out (over the budget and changing an image the
    # closed form leaves alone): that is all the admission below asks of it. The closed form's own
    # measurement, the reference, is always complete.
    kw = ({"stop": lambda m: budget.rules_out(m, measured[0, 1.0])} if isinstance(budget, LocalityBudget)
          and "stop" in inspect.signature(collateral).parameters else {})

    def admit(ci: int, s: float) -> str | None:
        """Measure setting (ci, s) once and say why it is admissible on its own measurement (None: not)."""
        if (0, 1.0) not in measured:
            measured[0, 1.0] = collateral(1.0) if single else collateral(1.0, cands[0])
        ref = measured[0, 1.0]
        if (ci, s) not in measured:
            measured[ci, s] = collateral(s, **kw) if single else collateral(s, cands[ci], **kw)
        if ci == 0 and s == 1.0:
            return "fallback" if not _admits(ref, budget) else "budget"
        if _admits(measured[ci, s], budget):
            return "budget"
        return "no new change" if _no_worse(measured[ci, s], ref, budget) else None

    settled = [0] * len(cands)  # candidate ci's first settled[ci] strengths are settled
    over = [False] * len(cands)

    def settle(ci: int, upto: int = len(strengths) - 1) -> None:
        """Settle candidate ci's strengths up to index ``upto`` in increasing order: past its first strength
        over the budget, the rest count as over unmeasured (but the fallback is admissible whatever a
        smaller strength measured)."""
        while settled[ci] < len(strengths) and (settled[ci] <= upto or over[ci]):
            s = strengths[settled[ci]]
            if over[ci] and (ci, s) != (0, 1.0):
                measured[ci, s] = None
            elif settled[ci] > upto:  # the fallback past an over strength: settled when asked for
                break
            else:
                why = admit(ci, s)
                if why is not None:
                    admitted[ci, s] = why
                over[ci] = why is None
            settled[ci] += 1

    def alive(key: tuple[int, float]) -> bool:
        """Still possibly admissible: admitted, or not settled yet."""
        return key in admitted or strengths.index(key[1]) >= settled[key[0]]

    def view_logits(edit: Any, which: str, idx: torch.Tensor) -> torch.Tensor:
        under = getattr(views, "logits_under", None)  # a ViewSet may skip the tail (exact linear map)
        if under is not None:
            return under(model, edit, which, idx)
        with edit.applied(model):
            return views.logits(model, which, idx)

    full_edits: dict[int, Any] = {}
    restored_at: dict[tuple[int, float], int] = {}

    def restores(ci: int, s: float) -> int:
        """How many of the exemplars themselves the edit fitted on all views restores at (ci, s)."""
        if (ci, s) not in restored_at:
            if ci not in full_edits:
                full_edits[ci] = solve(None) if single else solve(None, cands[ci])
            top = view_logits(full_edits[ci].scaled(s), "man", own_idx).argmax(1).cpu()
            restored_at[ci, s] = int((top == views.target[own_idx]).sum())
        return restored_at[ci, s]

    fold_edits: dict[tuple[int, int], Any] = {}
    validated: dict[tuple[int, float], tuple[int, int, int, float]] = {}  # right, fixed, kept, probability
    # Validation goes one fold's manipulated or clean views at a time; a setting part way through has
    # [parts done, fixed, kept, probability, views still to score], so its bound tightens as it goes.
    parts = [(f, idx, which) for f, idx in zip(folds, fold_idx) for which in ("man", "orig")]
    partial: dict[tuple[int, float], list] = {}

    def validate_part(ci: int, s: float) -> None:
        """Score setting (ci, s) on the next part of the left-out views (each fold's edit solved once)."""
        st = partial.setdefault((ci, s), [0, 0, 0, 0.0, 2 * n_val])
        f, idx, which = parts[st[0]]
        if (f, ci) not in fold_edits:
            fold_edits[f, ci] = solve(f) if single else solve(f, cands[ci])
        tgt = views.target[idx]
        p = view_logits(fold_edits[f, ci].scaled(s), which, idx).softmax(1)
        st[1 if which == "man" else 2] += int((p.argmax(1).cpu() == tgt).sum())
        st[3] += float(p.gather(1, tgt[:, None].to(p.device)).sum())
        st[0] += 1
        st[4] -= int(idx.numel())
        if st[0] == len(parts):
            validated[ci, s] = (st[1] + st[2], st[1], st[2], st[3])
            del partial[ci, s]

    def validate(ci: int, s: float) -> None:
        """Score setting (ci, s) on every fold's left-out views."""
        while (ci, s) not in validated:
            validate_part(ci, s)

    def views_bound(key: tuple[int, float]) -> tuple[float, float] | None:
        """(views right, summed right-class probability) of ``key``, or their upper bounds part way
        through its validation (every view still to score right, with probability 1); None: not begun."""
        v = validated.get(key)
        if v is not None:
            return v[0], v[3]
        st = partial.get(key)
        return None if st is None else (st[1] + st[2] + st[4], st[3] + st[4])

    def rank(key: tuple[int, float]) -> tuple:
        """``key``'s rank among the settings, or its upper bound from what is known of it."""
        v = views_bound(key)
        return (restores(*key) if n_own else 0, admitted.get(key) != "no new change",
                v[0] if v else math.inf, round(v[1] / (2 * n_val), 6) if v else math.inf, -order[key])

    def score_bound(key: tuple[int, float]) -> tuple:
        """The highest :func:`layer_score` that ``key``, or its candidate spent, could reach."""
        v = views_bound(key)
        within = admitted.get(key, "budget") == "budget"  # not settled yet: it may be within
        over = 0.0 if within else _over_by({"admitted": admitted[key], "collateral": measured.get(key)})
        return (restores(*key) / n_own if n_own else 0.0, within, over,
                v[0] / (2 * n_val) if v else 1.0, round(v[1] / (2 * n_val), 6) if v else 1.0)

    def cannot_win(keys_left: Sequence[tuple[int, float]]) -> bool:
        """No setting of ``keys_left`` could score enough to beat ``to_beat``."""
        if to_beat is None:
            return False
        best = max(score_bound(k) for k in keys_left)
        return best < tuple(to_beat) or (best == tuple(to_beat) and not ties_win)

    def pruned() -> StrengthChoice:
        out = StrengthChoice(1.0, "not validated in full: no setting within the budget could score above "
                             "another layer's edit (the closed form, strength 1)", budget=budget)
        out.pruned = True
        out.candidate = None if single else cands[0]
        return out

    if exhaustive:
        for ci in range(len(cands)):
            settle(ci)
        for key in keys:
            if key in admitted:
                validate(*key)
        best_key = max(admitted, key=rank)
    else:
        while True:
            # The winner ranks at least as high as any admissible setting known in full, and its candidate
            # spent scores no higher than it: only the settings that could still outrank those can matter.
            known = [rank(k) for k in admitted if k in validated]
            floor = max(known) if known else None
            if cannot_win([k for k in keys if alive(k) and (floor is None or rank(k) >= floor)]):
                return pruned()
            top = max((k for k in keys if alive(k)), key=rank)
            if top in admitted and top in validated:
                break
            if top not in validated:  # the views first, a part at a time: a few against a calibration pass
                validate_part(*top)
            else:
                settle(top[0], strengths.index(top[1]))
        best_key = top
    spent = best_key
    if isinstance(budget, LocalityBudget) and admitted[best_key] == "budget":
        # The validation views choose the candidate; the budget, measured in the top-1 changes the user
        # cares about, sets how far it goes: the strongest setting of that candidate within it that restores
        # as many exemplars. Views of a few exemplars cannot tell a held-out photo's key from theirs, so their
        # preference among strengths is noise the budget need not pay for (an energy budget is only a proxy
        # for top-1 changes and is not spent this way).
        ci = best_key[0]
        settle(ci)
        spent = max((k for k in keys if k[0] == ci and admitted.get(k) == "budget"
                     and restores(*k) >= restores(*best_key)), key=lambda k: k[1])
        if spent not in validated:
            validate(*spent)
    if cannot_win([spent]):  # its score is now known exactly
        return pruned()
    settle(0, strengths.index(1.0))  # the closed form's row: the reference, measured already
    rows = []
    for key in keys:
        ci, s = key
        v = validated.get(key)
        done = strengths.index(s) < settled[ci]
        row = {"strength": s, "exemplars_restored": restored_at.get(key), "exemplars": n_own,
               "right": v[0] if v else None, "of": 2 * n_val, "fixed": v[1] if v else None,
               "kept": v[2] if v else None, "mean_prob": v[3] / (2 * n_val) if v else None,
               "collateral": measured.get(key), "within_budget": (key in admitted) if done else None,
               "admitted": admitted.get(key)}
        rows.append(row if single else {"candidate": cands[ci], **row})
    best, picked = rows[order[spent]], rows[order[best_key]]
    base = rows[order[0, 1.0]]  # the closed form: strength 1 of the first candidate
    what = f"strength {best['strength']:g}" + ("" if single else f", {best['candidate']}")
    reason = (f"{what}: restores {best['exemplars_restored']}/{best['exemplars']} exemplars, "
              f"{best['right']}/{best['of']} left-out exemplar views right"
              + ("" if base["right"] is None else f" (closed form {base['right']}/{base['of']})")
              + f", mean right-class probability {best['mean_prob']:.2f}, over {len(folds)} fold(s); "
              f"{_describe(best['collateral'], budget)}")
    if best is not picked:
        reason += (f"; the strongest within the budget of the validated choice (strength {picked['strength']:g}, "
                   f"{picked['right']}/{picked['of']} views right)")
    capped = sum(r["within_budget"] is False for r in rows)
    unsettled = sum(r["within_budget"] is None for r in rows)
    if capped:
        reason += f"; {capped} setting(s) over the budget were not considered"
    if unsettled:
        reason += f"; {unsettled} setting(s) that could not rank higher were not measured"
    if not _admits(base["collateral"], budget):
        reason += "; even the closed form is over the budget (it is the fallback)"
        if best["admitted"] == "no new change":
            reason += (", and this setting restores more exemplars than any within the budget while it changes "
                       "only calibration images the closed form changes, within the expected share or no more "
                       "than it")
    out = StrengthChoice(best["strength"], reason, rows, budget, len(folds), n_val)
    out.candidate = best.get("candidate")
    return out


# ------------------------------------------------------------------------------------------ the layer
def chosen_row(choice: dict[str, Any]) -> dict[str, Any] | None:
    """The row of a strength record (``edit.meta["strength"]``, :meth:`StrengthChoice.to_dict`) that won."""
    def plain(c: Any) -> Any:  # a candidate tuple reads back from JSON as a list
        return list(c) if isinstance(c, (tuple, list)) else c

    cand = choice.get("candidate")
    for r in choice.get("candidates", []):
        if r["strength"] == choice["chosen"] and (cand is None or plain(r.get("candidate")) == plain(cand)):
            return r
    return None


def _over_by(row: dict[str, Any]) -> float:
    """How far a winning row outside the budget is over it: minus its expected share of top-1 changes
    (0 within the budget, or without an estimate), so that less collateral ranks higher."""
    if row.get("admitted") == "budget":
        return 0.0
    c = row.get("collateral")
    ex = c.get("expected") if isinstance(c, dict) else None
    return 0.0 if ex is None else -round(float(ex), 6)


def layer_score(row: dict[str, Any] | None) -> tuple[float, bool, float, float, float] | None:
    """How :func:`choose_layer` ranks a layer's winning row (:func:`chosen_row`): the share of exemplars it
    restores, whether it is within the locality budget, for one outside it the smaller expected share of
    top-1 changes (every layer's fallback may be over the budget: the least over it is the nearest to what
    the user accepts), the share of left-out views right, the mean right-class probability (rounded to 6
    places); a tuple, compared in that order. None for no row or one without validation: it scores
    nothing."""
    if row is None or row.get("right") is None or not row.get("of"):
        return None
    restored = row["exemplars_restored"] / row["exemplars"] if row.get("exemplars") else 0.0
    return (restored, row.get("admitted") == "budget", _over_by(row), row["right"] / row["of"],
            round(float(row["mean_prob"]), 6))


def choose_layer(layers: Sequence[str], choices: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pick the layer of an edit among the same rule's edits at several layers, by their own validation.

    ``choices[i]`` is the strength record (``edit.meta["strength"]``) of the edit written at ``layers[i]``;
    the first layer is the model's default. Each edit's winning setting is scored as
    :func:`choose_strength` scores settings within one layer, in the same order: the share of the user's
    exemplars it restores, then being within the locality budget (not the fallback or a setting admitted for
    adding no calibration change to it), then, among edits outside it, the smaller expected share of top-1
    changes, then the share of left-out exemplar views right, then the mean probability of the right
    class; ties go to the earlier layer. A record without validation rows (no
    views, an energy budget's run without folds, a validation pruned because it could not restore as many
    exemplars as an earlier layer's) scores nothing, so the default layer is kept unless another layer was
    validated. Returns a JSON-ready dict: ``chosen`` (the layer), ``index``, ``reason``
    and one score row per layer.

    Example:
        >>> rec = lambda restored, right: {"chosen": 1.0, "candidates": [{"strength": 1.0, "exemplars": 2,
        ...     "exemplars_restored": restored, "admitted": "budget", "right": right, "of": 10, "mean_prob": 0.5}]}
        >>> choose_layer(["b15", "b11"], [rec(1, 6), rec(2, 4)])["chosen"]
        'b11'
    """
    if not layers or len(layers) != len(choices):
        raise ValueError("choose_layer needs one strength record per layer")
    rows = []
    for layer, ch in zip(layers, choices):
        r = chosen_row(ch)
        score = layer_score(r)
        if score is None:
            rows.append({"layer": layer, "score": None, "strength": ch.get("chosen"),
                         **({"pruned": ch["reason"]} if ch.get("pruned") else {})})
            continue
        rows.append({"layer": layer, "score": list(score), "strength": ch.get("chosen"),
                     "candidate": ch.get("candidate"), "exemplars_restored": r["exemplars_restored"],
                     "exemplars": r["exemplars"], "within_budget": r.get("admitted") == "budget",
                     "right": r["right"], "of": r["of"], "mean_prob": r["mean_prob"]})
    scored = [i for i, r in enumerate(rows) if r["score"] is not None]
    if not scored:
        return {"chosen": layers[0], "index": 0, "layers": rows,
                "reason": f"no layer's edit was validated: the default layer {layers[0]}"}
    best = max(scored, key=lambda i: (tuple(rows[i]["score"]), -i))
    b = rows[best]
    reason = (f"layer {b['layer']}: restores {b['exemplars_restored']}/{b['exemplars']} exemplars, "
              f"{b['right']}/{b['of']} left-out views right, "
              + ("within the budget" if b["within_budget"] else "the fallback"
                 + ("" if not b["score"][2] else f", {-100 * b['score'][2]:.2f}% expected top-1 changes")) + "; "
              + ", ".join(f"{r['layer']} {r['exemplars_restored']}/{r['exemplars']} and {r['right']}/{r['of']}"
                          if r["score"] is not None else f"{r['layer']} {r['pruned']}"
                          for i, r in enumerate(rows) if i != best and (r["score"] is not None or "pruned" in r)))
    return {"chosen": b["layer"], "index": best, "reason": reason.rstrip("; "), "layers": rows}
