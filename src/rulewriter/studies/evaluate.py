"""Judge an edit the way the thesis does: what it fixed, and what it broke (Sections 2.2.2–2.2.3, 2.3.3–2.3.4).

This module predicts test sets before and after a change (:func:`predict`, :func:`evaluate_edit`) and
gathers the measurements in an :class:`Evaluation`. The test sets live in :mod:`rulewriter.studies.testsets`,
the metrics and their definitions in :mod:`rulewriter.studies.metrics`, the figures and the HTML page in
:mod:`rulewriter.studies.evaluation_report`.

An edit is judged on *test sets*: images with their ground truth, each optionally paired with a
*manipulated* copy (the concept changed, e.g. wood pasted onto wheels). The *target* of an edit is the class,
or set of classes, whose images the edit should help (``"car wheel"``; or every car class). Everything
below works for any change that can be applied to a model and undone: an :class:`~rulewriter.core.edit.Edit`,
a :class:`~rulewriter.studies.finetune.WeightDelta` from a baseline, or ``None`` for the unedited model.

A tour::

    from rulewriter.studies.evaluate import evaluate_edit
    from rulewriter.studies.evaluation_report import write_report
    from rulewriter.studies.testsets import TestSet, confusing_set

    # 1. a test set from any labelled folder (wnid or class-name subfolders, or flat nXXXXXXXX_*.jpg)
    ts = TestSet.from_folder(clf, "imagenet-samples/")
    # 2. ... or the thesis's confusing images: the top 1% of a folder by how strongly the concept key
    #    matches, with the texture pasted where it matches (key from the exemplars' masked keys)
    conf = confusing_set(clf, layer, wheel_key, "imagenet-samples/", wood, C=stats.moment())
    # 3. predictions before and after, streamed in batches; the four tests, ROC/AUC, errors corrected,
    #    per-class accuracy shifts
    ev = evaluate_edit(clf, conf, edit, target={817, 511, 479})
    ev.four_tests["manipulated_same"].accuracy_post
    # 4. one JSON file, matplotlib figures and an HTML page
    write_report("rulewriter-eval", clf, ev)

The same from the command line::

    rulewriter evaluate --model efficientnet-lite0 --edit wood-wheel.safetensors --data imagenet-samples/ --json
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import EditError, ImageLoadError, RulewriterError
from .metrics import (ClassShift, Label, Predictions, RocCurve, TestScores, as_label_sets, class_shifts,
                      errors_corrected, four_tests, roc, summarize, target_set)
from .testsets import ImageSource, SourceDataset, TestSet, describe_source

__all__ = [
    "Applicable",
    "Evaluation",
    "evaluate_edit",
    "load_change",
    "predict",
]


class Applicable(Protocol):
    """Anything that changes a model temporarily: ``with change.applied(model): ...`` restores it on exit.

    :class:`~rulewriter.core.edit.Edit` and :class:`~rulewriter.studies.finetune.WeightDelta` both qualify.
    """

    def applied(self, model: nn.Module) -> ContextManager[nn.Module]: ...



# ------------------------------------------------------------------------------------------ streaming
def _change_context(change: Applicable | None, model: nn.Module) -> ContextManager[Any]:
    return contextlib.nullcontext(model) if change is None else change.applied(model)


@torch.no_grad()
def predict(
    classifier,
    images: Sequence[ImageSource],
    labels: Sequence[Label],
    variants: Mapping[str, Applicable | None] | None = None,
    *,
    target: Label | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, Predictions]:
    """Stream images through the model once, predicting under each variant (an edit, a baseline, or None).

    Each batch is decoded once and run under every variant in turn (each change is applied and undone
    around its forward pass, so the model is never left edited), so evaluating an edit costs one pass over
    the data. Only top-5 and two probabilities per image are kept, never activations.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier` (its model and device are used).
        images: paths, PIL images, or callables returning a PIL image (made lazily, e.g. a manipulation).
        labels: one ground truth per image (a class index, a set of them, or -1 for noise).
        variants: name → change; default ``{"before": None}``.
        target: the target class or set (for :attr:`Predictions.target_prob`).
        batch_size, num_workers: the DataLoader's knobs (lower the batch size to save memory).
        progress: show a tqdm bar.

    Example::

        >>> preds = predict(clf, ["a.jpg", "b.jpg"], [817, 479], {"before": None, "after": edit})  # doctest: +SKIP
        >>> summarize(preds["after"], [817, 479])["top1"]                                          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if len(images) != len(labels):
        raise RulewriterError(f"{len(images)} images but {len(labels)} labels")
    if not len(images):
        raise ImageLoadError("no images to evaluate")
    if batch_size < 1:
        raise RulewriterError(f"batch size must be at least 1, got {batch_size}")
    from ..core import distributed as D

    variants = dict(variants) if variants is not None else {"before": None}
    sets = as_label_sets(labels)
    model = classifier.model
    was_training = model.training
    model.eval()
    mine = D.shard_indices(len(images))  # all of them outside torchrun
    cuda = classifier.device.type == "cuda"
    loader = torch.utils.data.DataLoader(SourceDataset([images[i] for i in mine], classifier.preprocess),
                                         batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         pin_memory=cuda)
    parts: dict[str, list[Predictions]] = {name: [] for name in variants}
    # The bar counts images (this rank's), not batches: "2000 img" is what a user asked for with --samples.
    bar = tqdm(total=len(mine), desc=desc, unit="img", disable=not progress or not D.is_main())
    try:
        for x, idx in loader:
            x = x.to(classifier.device, classifier.dtype, non_blocking=cuda)
            lab = [sets[mine[int(i)]] for i in idx]
            for name, change in variants.items():
                with _change_context(change, model):
                    logits = model(x)
                parts[name].append(Predictions.from_logits(logits, lab, target))
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    out = {name: Predictions.concat(p) for name, p in parts.items()}
    if D.is_distributed():
        # Every rank gets every prediction, back in the order of ``images``.
        gathered = D.all_gather_objects((mine, out))
        order = np.argsort(np.concatenate([np.asarray(m, dtype=np.int64) for m, _ in gathered]), kind="stable")
        out = {name: Predictions.concat([o[name] for _, o in gathered]).subset(order) for name in variants}
    return out



# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """Everything :func:`evaluate_edit` measured on one test set (see the module docstring for definitions).

    ``predictions`` maps ``"normal"`` (and ``"manipulated"``) to ``{"before": …, "after": …}``
    (only ``"before"`` without an edit).
    """

    name: str
    labels: list[frozenset[int]]
    target: frozenset[int]
    predictions: dict[str, dict[str, Predictions]]
    sources: list[str]
    groups: dict[frozenset[int], str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def edited(self) -> bool:
        return "after" in self.predictions["normal"]

    def summary(self, kind: str = "normal") -> dict[str, Any]:
        """``{"n_images", "top1", "top5", "confidence"}`` (before only), or ``{"n_images", "before", "after"}``."""
        p = self.predictions[kind]
        if "after" not in p:
            return summarize(p["before"], self.labels)
        b, a = summarize(p["before"], self.labels), summarize(p["after"], self.labels)
        for d in (b, a):
            d.pop("n_images")
        return {"n_images": len(self.labels), "before": b, "after": a,
                "changed_top1": int((p["before"].top1 != p["after"].top1).sum())}

    @property
    def four_tests(self) -> dict[str, TestScores]:
        """The four tests (needs a target; the manipulated ones need manipulated copies)."""
        if not self.target or not self.edited:
            return {}
        p = self.predictions
        man = (p["manipulated"]["before"], p["manipulated"]["after"]) if "manipulated" in p else None
        return four_tests(self.labels, self.target, (p["normal"]["before"], p["normal"]["after"]), man)

    def errors(self) -> dict[str, Any]:
        """Errors corrected / introduced, w.r.t. the ground truth and the pre-edit prediction, per image kind."""
        if not self.edited:
            return {}
        ref = self.predictions["normal"]["before"].top1
        out = {}
        for kind, p in self.predictions.items():
            b, a = p["before"], p["after"]
            out[kind] = {
                "ground_truth": errors_corrected(b.correct(self.labels), a.correct(self.labels)),
                "pre_edit_prediction": errors_corrected(b.agrees(ref), a.agrees(ref)),
                "accuracy_wrt_pre_edit_prediction": {"pre": float(b.agrees(ref).mean()),
                                                     "post": float(a.agrees(ref).mean())},
            }
        return out

    def rocs(self) -> dict[str, dict[str, RocCurve | None]]:
        """ROC curves per image kind and model: target vs rest, or (no target) right vs wrong by confidence."""
        out: dict[str, dict[str, RocCurve | None]] = {}
        positive = np.array([bool(s & self.target) for s in self.labels])
        for kind, p in self.predictions.items():
            out[kind] = {}
            for model, pred in p.items():
                if self.target:
                    out[kind][model] = roc(pred.target_prob, positive)
                else:
                    out[kind][model] = roc(pred.top1_prob, pred.correct(self.labels))
        return out

    def class_shifts(self, kind: str = "normal", class_names: Sequence[str] | None = None) -> list[ClassShift]:
        """Per-class accuracy shifts of one image kind (empty without an edit)."""
        if not self.edited:
            return []
        p = self.predictions[kind]
        return class_shifts(self.labels, p["before"], p["after"], class_names, self.groups)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Everything as JSON-able data, including per-image top-1 before/after."""
        d: dict[str, Any] = {"name": self.name, "target": sorted(self.target), "info": self.info,
                             "normal": self.summary("normal")}
        if "manipulated" in self.predictions:
            d["manipulated"] = self.summary("manipulated")
        if self.edited:
            d["four_tests"] = {k: v.to_dict() for k, v in self.four_tests.items()}
            d["errors"] = self.errors()
            d["class_shifts"] = {k: [c.to_dict() for c in self.class_shifts(k, class_names)] for k in self.predictions}
        d["roc"] = {k: {m: (c.to_dict() if c is not None else None) for m, c in v.items()}
                    for k, v in self.rocs().items()}
        d["roc_kind"] = "target vs rest by target probability" if self.target else \
            "correct vs wrong by top-1 probability"
        rows = []
        for i, src in enumerate(self.sources):
            row: dict[str, Any] = {"image": src, "label": sorted(self.labels[i])}
            for kind, p in self.predictions.items():
                for model, pred in p.items():
                    row[f"{kind}_{model}"] = int(pred.top1[i])
            rows.append(row)
        d["images"] = rows
        return d


def evaluate_edit(
    classifier,
    testset: TestSet,
    change: Applicable | None = None,
    *,
    target: Label | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Predict a test set (and its manipulated copies) before and after a change, in one streamed pass each.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        testset: the images; its manipulated copies, if any, are evaluated too.
        change: an :class:`~rulewriter.core.edit.Edit`, a :class:`~rulewriter.studies.finetune.WeightDelta`, or
            ``None`` to evaluate the unedited model alone.
        target: the edit's target class or set of classes (for the four tests and the target ROC).
        batch_size, num_workers, progress: streaming knobs.

    Returns:
        an :class:`Evaluation`; ``.to_dict()`` is what ``rulewriter evaluate`` writes.

    Example::

        >>> ev = evaluate_edit(clf, TestSet.from_folder(clf, "val/"), edit, target=479)   # doctest: +SKIP
        >>> ev.summary()["after"]["top1"]                                                # doctest: +SKIP
    """
    variants: dict[str, Applicable | None] = {"before": None}
    if change is not None:
        variants["after"] = change
    kw = dict(target=target, batch_size=batch_size, num_workers=num_workers, progress=progress)
    preds = {"normal": predict(classifier, testset.images, testset.labels, variants, desc=testset.name, **kw)}
    if testset.manipulated is not None:
        preds["manipulated"] = predict(classifier, testset.manipulated, testset.labels, variants,
                                       desc=f"{testset.name} (manipulated)", **kw)
    return Evaluation(testset.name, as_label_sets(testset.labels), target_set(target), preds,
                      [describe_source(s) for s in testset.images], dict(testset.groups), dict(testset.info))


def load_change(path: str | Path) -> Applicable:
    """Load a saved change: a rulewriter :class:`~rulewriter.core.edit.Edit` or a :class:`~rulewriter.studies.finetune.WeightDelta`.

    Pickles are refused, as everywhere in rulewriter.

    Example::

        >>> change = load_change("wood-wheel.safetensors")     # doctest: +SKIP
    """
    from ..core.edit import FORMAT as EDIT_FORMAT
    from ..core.edit import Edit
    from .finetune import FORMAT as DELTA_FORMAT
    from .finetune import WeightDelta
    from ..core.artefacts import read_safetensors

    _, header = read_safetensors(Path(path), EditError)
    fmt = header.get("format")
    if fmt == EDIT_FORMAT:
        return Edit.load(path)
    if fmt == DELTA_FORMAT:
        return WeightDelta.load(path)
    raise EditError(f"{path} is safetensors but neither a rulewriter edit nor a weight delta (format {fmt!r})")
