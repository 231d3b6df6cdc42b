"""One rule spread over a residual stage: MEMIT's split of one value change, carried to a CNN.

A *stage* is a run of convs that all write one residual stream (EfficientNet-Lite0's ``_blocks.11`` starts
stage 6's stream, ``_blocks.12``–``14`` add to it, and ``_blocks.15`` reads it). Editing one conv inside a
residual block alone fails (the identity path carries the unedited concept around it, see "Defaults" in the
README), but the stream itself can be rewritten: its target is the stream's output on the clean exemplars at
the masked places, ``z``, and each conv of the stage in turn, with the updates before it applied, closes its
share ``(z − h)/(convs left)`` of what is still missing (``h``: the stream's output on the manipulated
exemplars now), as MEMIT spreads one hidden-state change over a transformer's layers (Meng et al., 2023).
Each conv's update is the thesis's closed form at that conv (rank 1 along ``C_l⁻¹k̄_l``, Λ by least squares on
its masked pairs), the share carried into the conv's own output through the per-channel scale of the eval
BatchNorm that follows it. The edit is rank 1 at each of the stage's convs.

Measured (``benchmarks/stage_memit.py``): with the same strength rule, it fixes more held-out photos than
the closed form at one layer. :func:`rewrite_stage` validates and spends it exactly like
:func:`~rulewriter.core.rules.rewrite` does one layer's edit (its record is what
:func:`~rulewriter.core.generalise.choose_layer` compares); validated, it restores more exemplars than the
default and carries a little further with one exemplar, but as a candidate of the layer choice it lowers
the held-out share fixed with five exemplars and costs three more layers' statistics, so it is opt-in
(``rulewriter edit --stage``), not part of the default's layer choice.

Example::

    stage = stage_before(clf.model, clf.default_layer)      # EfficientNet-Lite0: blocks 11-14, then 15
    rule = rule_from_images(clf, stage.layers[0], originals, pasted, masks, views=DEFAULT_VIEWS)
    cs = collect_second_moments(clf, stage.convs, stats_paths)
    edit = rewrite_stage(clf, stage, rule, [cs[l] for l in stage.convs], calibration=cal_paths)
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import EditError, MaskError
from .edit import DEFAULT_RIDGE, Edit, LayerUpdate, solve_lambda, timestamp, update_direction
from .memory import LayerMemory
from .trace import Trace, get_module

__all__ = ["Stage", "fit_stage", "rewrite_stage", "stage_before"]


@dataclass(frozen=True)
class Stage:
    """Convs that each write a share of one residual stream, in forward order, and the stream's module.

    ``norms`` names, for each conv, the eval-mode norm between it and the stream (a per-channel affine map,
    e.g. an MBConv block's ``_bn2``), or None where the conv writes the stream directly.

    Example::

        >>> s = Stage(("_blocks.11._project_conv", "_blocks.12._project_conv"), "_blocks.12",
        ...           ("_blocks.11._bn2", "_blocks.12._bn2"))
        >>> s.name
        'stage _blocks.11._project_conv … _blocks.12._project_conv'
    """

    layers: tuple[str, ...]
    stream: str
    norms: tuple[str | None, ...]
    #: A conv after the stream that is fitted last, to its own clean values (the thesis's rule at that
    #: layer, on the model the stream's updates leave), counted as one more layer of the split; None: the
    #: stream's convs close the whole gap.
    final: str | None = None

    def __post_init__(self) -> None:
        if not self.layers or len(self.norms) != len(self.layers):
            raise EditError("a stage needs at least one conv and one norm (or None) per conv")

    @property
    def convs(self) -> tuple[str, ...]:
        """Every conv the stage's edit updates, in order (the stream's, then ``final``)."""
        return self.layers + ((self.final,) if self.final else ())

    @property
    def name(self) -> str:
        """How the layer choice names it."""
        return f"stage {self.layers[0]} … {self.convs[-1]}"


def stage_before(model: nn.Module, layer: str) -> Stage | None:
    """The residual stage whose stream ``layer``'s block reads, with ``layer`` as its final conv.

    For EfficientNet-style models (``_blocks`` of MBConv blocks) and ``layer`` a block's project conv: the
    blocks before it back to the first that adds no skip connection (it starts the stream; the others add to
    it), each block's project conv and its ``_bn2``. None for other models and layers.

    Example::

        >>> stage_before(clf.model, "_blocks.15._project_conv").layers   # EfficientNet-Lite0  # doctest: +SKIP
        ('_blocks.11._project_conv', '_blocks.12._project_conv', '_blocks.13._project_conv', '_blocks.14._project_conv')
    """
    from .tail import adds_skip

    blocks = getattr(model, "_blocks", None)
    m = re.fullmatch(r"_blocks\.(\d+)\._project_conv", layer)
    if blocks is None or m is None or int(m.group(1)) < 1:
        return None
    end = int(m.group(1)) - 1
    first = end
    while first > 0 and adds_skip(blocks[first]):
        first -= 1
    ids = range(first, end + 1)
    return Stage(tuple(f"_blocks.{i}._project_conv" for i in ids), f"_blocks.{end}",
                 tuple(f"_blocks.{i}._bn2" for i in ids), final=layer)


def _gain(model: nn.Module, norm: str | None, like: torch.Tensor) -> torch.Tensor:
    """The per-channel scale of an eval BatchNorm (``γ/√(var+ε)``), 1 without one; float64, (1, c, 1, 1)."""
    if norm is None:
        return torch.ones(1, like.shape[1], 1, 1, dtype=torch.float64, device=like.device)
    bn = get_module(model, norm)
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or bn.running_var is None:
        raise EditError(f"{norm!r} is not a BatchNorm with running statistics: the stage's share cannot be "
                        "carried into its conv's output")
    g = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return (g / torch.sqrt(bn.running_var + bn.eps)).double().reshape(1, -1, 1, 1).to(like.device)


@torch.no_grad()
def _read(model: nn.Module, start: str | None, x: torch.Tensor, stream: str, layer: str | None = None,
          batch: int = 64) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``layer``'s input (when named) and the stream's output for inputs ``x`` of module ``start`` (None:
    images through the whole model), the forward stopping after the stream."""
    from .tail import run_tail

    p = next(model.parameters())
    ins, outs = [], []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].to(p.device, p.dtype)
        with contextlib.ExitStack() as stack:
            at = stack.enter_context(Trace(model, layer, retain_output=False)) if layer else None
            with Trace(model, stream, retain_input=False, stop=True) as st:
                run_tail(model, start, xb) if start else model(xb)
            if at is not None:
                ins.append(at.input)
        outs.append(st.output)
    return (torch.cat(ins) if layer else None), torch.cat(outs).double()


def fit_stage(classifier, stage: Stage, stats: Sequence[Any], x_orig: torch.Tensor, x_man: torch.Tensor,
              masks: torch.Tensor, *, start: str | None = None, ridge: float = DEFAULT_RIDGE,
              final_context: tuple[str, int] = ("mean", 1), stream: Edit | None = None) -> Edit:
    """The stage's edit from clean and manipulated inputs of module ``start`` (None: preprocessed images)
    and their masks on the model's input grid (N, S, S).

    ``stats`` gives each conv's second moment (a :class:`~rulewriter.core.stats.SecondMoment` or ``C``), in
    the order of :attr:`Stage.convs`. The convs are fitted one after the other, each with the updates before it
    applied; the stream's last conv (without a ``final``) is asked for all that is still missing. The stream's
    convs update along their mean key; the final conv along ``final_context``: ``("mean", 1)``, ``("uniform",
    1)`` (the mean key through ``C + λΣ``, as ``rewrite(context="uniform")``) or ``("svd", r)`` (the top r
    directions of its masked keys), as :func:`~rulewriter.core.rules.rewrite` validates one layer's edit.
    ``stream``: the stream convs' updates of an earlier fit of the same inputs (they do not depend on the final
    conv's context), so only the final conv is fitted.
    """
    model = classifier.model
    if len(stats) != len(stage.convs):
        raise EditError(f"the stage has {len(stage.convs)} convs but {len(stats)} statistics were given")
    parts = len(stage.convs)
    if stream is not None:
        updates, pairs = list(stream.updates[:len(stage.layers)]), int(stream.meta["n_pairs"])
    else:
        updates, pairs = [], 0
        _, z = _read(model, start, x_orig, stage.stream)
        for i, (layer, st) in enumerate(zip(stage.layers, stats)):
            with _applied(model, updates):
                x_in, h = _read(model, start, x_man, stage.stream, layer)
            mem = LayerMemory(get_module(model, layer), 2, name=layer)
            values = mem.values(x_in).double()
            if h.shape[2:] != values.shape[2:]:
                raise EditError(f"{layer!r} writes a {tuple(values.shape[2:])} grid but the stream "
                                f"{stage.stream!r} is {tuple(h.shape[2:])}: not one stage")
            share = (z - h) / (parts - i) / _gain(model, stage.norms[i], values)
            update, n = _fit_conv(mem, x_in, values + share.to(values.device), masks, st, ridge)
            updates.append(update)
            pairs = pairs if i else n  # the pairs the rule was read from, at the stage's first conv
    if stage.final:  # fitted last, to its own clean values on the unedited model
        mem = LayerMemory(get_module(model, stage.final), 2, name=stage.final)
        clean = mem.values(_read(model, start, x_orig, stage.final, stage.final)[0]).double()
        with _applied(model, updates):
            x_in, _ = _read(model, start, x_man, stage.final, stage.final)
        updates.append(_fit_conv(mem, x_in, clean, masks, stats[-1], ridge, final_context)[0])
    return Edit(updates, {"stage": stage.name, "layers": list(stage.convs), "n_pairs": pairs})


def _applied(model: nn.Module, updates: Sequence[LayerUpdate]) -> contextlib.AbstractContextManager:
    return Edit(list(updates)).applied(model) if updates else contextlib.nullcontext()


def _fit_conv(mem: LayerMemory, x_in: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, st: Any,
              ridge: float, context: tuple[str, int] = ("mean", 1)) -> tuple[LayerUpdate, int]:
    """One conv's closed form: its masked keys (of input ``x_in``) → ``targets`` (a value map), along the
    ``context`` directions; and the number of pairs."""
    from ..concepts.keys import context as context_dirs
    from .rules import concept_spread, masked_pairs

    keys, values = mem.keys(x_in).double(), mem.values(x_in).double()
    e = values.shape[1]
    k, vr, w = masked_pairs(mem, keys, torch.cat([values, targets.to(values.device)], 1), masks)
    target = vr[:, e:]
    c = st.moment() if hasattr(st, "moment") else torch.as_tensor(st)
    if c.shape != (mem.key_dim, mem.key_dim):
        raise EditError(f"statistics for {mem.name!r} are {tuple(c.shape)}; its keys have {mem.key_dim} dims")
    u = (k * w[:, None]).sum(0) / w.sum()
    how, rank = context
    if how == "mean":
        d = update_direction(c, u, ridge)[:, None]
    elif how == "uniform":
        d = update_direction(c + concept_spread([(k, target, w)], c), u, ridge)[:, None]
    elif how == "svd":
        d = update_direction(c, context_dirs(k, rank, method="svd", C=c, weights=w, ridge=ridge), ridge)
    else:
        raise EditError(f"unknown context {how!r} for a stage's final conv; use mean, uniform or svd")
    lam = solve_lambda(mem.matrix().double(), k.T, target.T, d, w)
    v_star = (target * w[:, None]).sum(0) / w.sum()
    return LayerUpdate(mem.name, 2, lam, d, u[:, None], v_star[:, None]), int(k.shape[0])


def rewrite_stage(classifier, stage: Stage, rule: Any, stats: Sequence[Any], *, calibration: Any,
                  budget: Any = None, ridge: float = DEFAULT_RIDGE, to_beat: Sequence[Any] | None = None,
                  ties_win: bool = False) -> Edit:
    """The stage's edit of ``rule``'s exemplars, its strength and pairs chosen as :func:`~rulewriter.core.rules.rewrite`
    chooses one layer's (:func:`~rulewriter.core.generalise.choose_strength`).

    ``rule`` is the rule read at the stage's first conv with exemplar views (``rule_from_images(...,
    views=DEFAULT_VIEWS)``): its views give the inputs, masks and folds. Candidates: the stage fitted on the
    exemplars' own pairs or on all views, and with a ``final`` conv its directions as one layer's edit has them
    (the mean key, the uniform one, the top ``SEARCH_RANKS`` SVD directions; the stream's convs always follow
    their mean keys); each at the strengths ``STRENGTHS`` (every conv's Λ times ``s``),
    validated leave one exemplar out under the locality budget on ``calibration`` (a
    :class:`~rulewriter.core.locality.Calibration` of the first conv, or images for one). The edit's
    ``meta["strength"]`` is the choice's record, so :func:`~rulewriter.core.generalise.choose_layer` can
    weigh it against single layers; ``to_beat``/``ties_win`` prune as in ``rewrite``.
    """
    from .generalise import choose_strength
    from .locality import Calibration, LocalityBudget, calibration_set

    views = getattr(rule, "views", None)
    if views is None or views.masks is None or rule.layer != stage.layers[0]:
        raise EditError(f"a stage is rewritten from a rule read at its first conv {stage.layers[0]!r} with "
                        "exemplar views (rule_from_images(..., views=DEFAULT_VIEWS))")
    if len(stats) != len(stage.convs):
        raise EditError(f"the stage has {len(stage.convs)} convs but {len(stats)} statistics were given")
    if calibration is None:
        raise EditError("a stage's edit is validated on calibration images: pass calibration=")
    if not isinstance(calibration, Calibration):
        calibration = calibration_set(classifier, stage.layers[0], calibration)
    budget = LocalityBudget() if budget is None else budget
    if not isinstance(budget, LocalityBudget):
        raise EditError("a stage's edit is measured against a LocalityBudget on calibration images")
    masks = views.masks
    has_pairs = masks.flatten(1).amax(1) > 0
    fits: dict[tuple, Edit] = {}

    def fit(left_out: int | None, cand: tuple) -> Edit:
        if (left_out, cand) not in fits:
            keep = has_pairs.clone() if left_out is None else has_pairs & (views.group != left_out)
            if not cand[2]:  # without augmentation: the exemplars' own pairs only
                keep &= views.own
            idx = torch.nonzero(keep).flatten()
            if idx.numel() == 0:
                raise EditError("a validation fold leaves no pair to fit")
            # The stream's updates do not depend on the final conv's context: fitted once per fold and pairs.
            stream = next((e for (lo, c), e in fits.items() if lo == left_out and c[2] == cand[2]), None)
            fits[left_out, cand] = fit_stage(classifier, stage, stats, views.x_orig[idx], views.x_man[idx],
                                             masks[idx], start=views.start, ridge=ridge, final_context=cand[:2],
                                             stream=stream)
        return fits[left_out, cand]

    def safe_fold(left_out: int | None, cand: tuple) -> Edit:
        try:
            return fit(left_out, cand)
        except (EditError, MaskError):  # nothing to fit in this fold: it scores as no edit
            return Edit([])

    def collateral(s: float, cand: tuple, stop=None) -> Any:
        return calibration.changed(classifier.model, fit(None, cand).scaled(s), stop=stop)

    # The final conv's directions are validated as rewrite validates one layer's (simplest first); the
    # stream's convs always follow their mean key. A context the masked keys cannot support is no candidate.
    from .rules import SEARCH_RANKS

    contexts = [("mean", 1), ("uniform", 1)] + [("svd", r) for r in SEARCH_RANKS] if stage.final else [("mean", 1)]
    cands = []
    for ctx in contexts:
        for aug in (False, True):
            try:
                fit(None, (*ctx, aug))
            except (EditError, MaskError):
                continue
            cands.append((*ctx, aug))
    if not cands:
        raise EditError("the exemplars' masks give the stage no pair to fit")
    choice = choose_strength(classifier.model, views, safe_fold, collateral, budget=budget, candidates=cands,
                             to_beat=to_beat, ties_win=ties_win)
    cand = tuple(choice.candidate) if choice.candidate is not None else cands[0]
    record = {**choice.to_dict(), "augmented": bool(cand[2])}
    edit = fit(None, cand).scaled(choice.chosen)
    edit.meta = {"created": timestamp(), "model": classifier.name, "weights": classifier.weights_id,
                 "layer": stage.name, "layers": list(stage.convs), "stream": stage.stream, "view": 2,
                 "rank": sum(u.rank for u in edit.updates), "ridge": ridge, "context": "stage",
                 "final_context": list(cand[:2]) if stage.final else None, "fit": "pairs",
                 "n_pairs": fit(None, cand).meta["n_pairs"],
                 "solver": "closed-form", "strength": record, "rules": [rule.description]}
    return edit
