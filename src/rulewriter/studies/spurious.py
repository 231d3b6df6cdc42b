"""Find a spurious correlation by stylizing a concept, then compare ways to remove it (thesis Section 2.3).

Two steps, as in the thesis's bus experiment (Figs. 2-11 to 2-14, Tables 2.2-2.4):

1. :func:`probe`: segment a concept (buses, wheels) in labelled photos, repaint it (gravel paint) with a
   stylizer, and compare the model's predictions on the original and the stylized copy. Classes whose
   error rate rises are the ones that depend on the concept's *appearance*: a spurious correlation.
   :meth:`ProbeResult.filtered_set` keeps the most affected classes' images: the filtered test set of
   Table 2.2.
2. :func:`mitigate`: from a few exemplars of a disjoint train split of the filtered set, build a rewrite
   with features, a rewrite with images, a one-layer fine-tune and a last-layer retrain, and judge each on
   the held-out test split (Tables 2.3 and 2.4).

::

    from rulewriter.studies.spurious import probe, mitigate
    from rulewriter.studies.stylize import stylizer_from
    from rulewriter.studies.segment import load_segmenter

    res = probe(clf, TestSet.from_folder(clf, "imagenet-samples/"), load_segmenter("deeplab:bus"),
                stylizer_from("paste:skimage:gravel"))
    res.save("probe-out/")                                  # probe.json, probe.png, index.html
    filtered = res.filtered_set(k=5)
    filtered.save("probe-out/filtered")                     # images + masks + manifest.json
    table = mitigate(clf, filtered, 5, collect_second_moment(clf, clf.default_layer, "photos/"))
    print(table.to_markdown())

The same from the command line::

    rulewriter probe --data imagenet-samples/ --segmenter deeplab:bus --stylize paste:skimage:gravel --out probe-out
    rulewriter mitigate --probe probe-out --exemplars 5 --stats-data photos/ --accuracy-data imagenet-samples/ --out mit
"""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import EditError, ImageLoadError, MaskError, RulewriterError
from .filtered import FilteredSet, FixedSplit
from .report import percent

#: Below this many held-out images one image moves an accuracy by more than 10 points: mitigate warns.
MIN_TEST_IMAGES = 10

__all__ = ["ClassRow", "ProbeResult", "FilteredSet", "FixedSplit", "MitigationResult", "probe", "mitigate", "METHODS",
           "DEFAULT_MIN_AREA"]

#: Mitigations :func:`mitigate` knows, in the thesis's order.
METHODS = ("features", "images", "finetune", "last-layer")
_METHOD_TITLES = {"no edit": "pre (no edit)", "features": "rewriting using features",
                  "images": "rewriting using images", "finetune": "fine-tuning one layer",
                  "last-layer": "retraining the last layer"}
#: An image takes part in a probe when the concept covers at least this fraction of it: one cell of the
#: 7×7 grid that a 224-px ImageNet classifier ends with (1/49 ≈ 2%). A smaller concept barely reaches
#: the final features, so stylizing it says little about the model.
DEFAULT_MIN_AREA = 1 / 49

Segmenter = Callable[..., np.ndarray]


# ------------------------------------------------------------------------------------------ helpers
def _pairs(images) -> list[tuple[Any, int]]:
    """(source, label) pairs from a TestSet or a sequence of pairs; labels must be single class indices."""
    from .testsets import TestSet

    if isinstance(images, TestSet):
        pairs = list(zip(images.images, images.labels))
    else:
        try:
            pairs = [(src, lab) for src, lab in images]
        except (TypeError, ValueError) as e:
            raise RulewriterError("images must be a TestSet or a sequence of (image, class index) pairs") from e
    out = []
    for src, lab in pairs:
        if not isinstance(lab, (int, np.integer)) or isinstance(lab, bool) or int(lab) < 0:
            raise RulewriterError(f"a probe needs one class index per image, got label {lab!r} for {src}")
        out.append((src, int(lab)))
    if not out:
        raise ImageLoadError("no images to probe")
    return out


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def _segment(segmenter: Segmenter, image: Image.Image, src) -> np.ndarray:
    m = segmenter(image, source=src if isinstance(src, (str, Path)) else None)
    m = np.asarray(m, dtype=np.float32)
    W, H = image.size
    if m.shape != (H, W):
        raise MaskError(f"segmenter {getattr(segmenter, 'name', segmenter)!r} returned a {m.shape} mask for a "
                        f"{H}x{W} image {_describe(src)}; it must return (H, W) at the image's size")
    if not np.isfinite(m).all() or m.min(initial=0) < 0 or m.max(initial=0) > 1:
        raise MaskError(f"segmenter {getattr(segmenter, 'name', segmenter)!r} returned values outside [0, 1]")
    return m


def _to_u8(m: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)


def _name(names: Sequence[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


# ------------------------------------------------------------------------------------------ probe
@dataclass
class ClassRow:
    """How stylizing the concept changed one ground-truth class's predictions (one bar of Fig. 2-12).

    ``top1_prob_*`` is the mean probability of the top-1 prediction, whatever class it is (the thesis's
    "change in mean top-1 probability"); ``true_prob_*`` the mean probability of the true class.
    ``flipped`` counts images right on the original and wrong once stylized. ``confusions`` lists the
    wrong classes the stylized images went to, most frequent first: ``(class index, name, count)``.
    ``changed_after`` is the share whose top-1 differs from the one on the original (the error rate with
    respect to the pre-edit model's prediction, Table 2.2).
    """

    label: int
    name: str
    n: int
    error_before: float
    error_after: float
    top1_prob_before: float
    top1_prob_after: float
    true_prob_before: float
    true_prob_after: float
    flipped: int
    changed_after: float
    confusions: list[tuple[int, str, int]] = field(default_factory=list)

    @property
    def error_change(self) -> float:
        """Error rate after minus before (positive: stylizing hurt the class)."""
        return self.error_after - self.error_before

    @property
    def top1_prob_change(self) -> float:
        return self.top1_prob_after - self.top1_prob_before

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["confusions"] = [list(c) for c in self.confusions]
        d["error_change"] = self.error_change
        d["top1_prob_change"] = self.top1_prob_change
        d["true_prob_change"] = self.true_prob_after - self.true_prob_before
        return d


@dataclass
class ProbeResult:
    """What stylizing a concept did to a classifier, per image and per ground-truth class.

    ``classes`` are ranked by error increase (then by the drop of mean top-1 probability). The images are
    kept in memory (``originals``, ``stylized``, ``masks``), aligned with ``items``, for
    :meth:`filtered_set`; they are not part of :meth:`to_dict`.
    """

    meta: dict[str, Any]
    items: list[dict[str, Any]]
    classes: list[ClassRow]
    class_names: list[str]
    originals: list[Image.Image] = field(default_factory=list, repr=False)
    stylized: list[Image.Image] = field(default_factory=list, repr=False)
    masks: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: settings and counts, ranked classes, and every probed image's predictions."""
        return {"format": "rulewriter.probe/1", "meta": self.meta, "classes": [c.to_dict() for c in self.classes],
                "items": self.items}

    def affected(self, k: int | None = None, threshold: float | None = None) -> list[ClassRow]:
        """The most affected classes: the top ``k`` whose error rate rose, or all whose rise ≥ ``threshold``."""
        rows = [c for c in self.classes if c.error_change > 0]
        if threshold is not None:
            rows = [c for c in rows if c.error_change >= threshold]
        if k is not None:
            if k < 1:
                raise RulewriterError(f"k must be at least 1, got {k}")
            rows = rows[:k]
        return rows

    def filtered_set(self, k: int | None = 5, threshold: float | None = None) -> FilteredSet:
        """Every probed image of the most affected classes (see :meth:`affected`): Table 2.2's test set.

        Raises RulewriterError when no class got worse or the images are not in memory.

        Example::

            >>> fs = res.filtered_set(k=5)                     # doctest: +SKIP
            >>> fs.classes[0] == res.classes[0].label          # doctest: +SKIP
            True
        """
        if len(self.originals) != len(self.items):
            raise RulewriterError("this probe result holds no images (loaded from JSON?); run probe() again")
        rows = self.affected(k, threshold)
        if not rows:
            raise RulewriterError("stylizing the concept made no class worse; there is nothing to mitigate")
        keep = [r.label for r in rows]
        idx = [i for i, it in enumerate(self.items) if it["label"] in set(keep)]
        meta = {k2: self.meta.get(k2) for k2 in ("model", "weights", "segmenter", "stylizer", "texture")}
        meta.update(selection={"k": k, "threshold": threshold},
                    class_rows=[r.to_dict() for r in rows])
        return FilteredSet([self.originals[i] for i in idx], [self.stylized[i] for i in idx],
                           [self.masks[i] for i in idx], [self.items[i]["label"] for i in idx],
                           [self.items[i]["source"] for i in idx], keep, meta)

    def figure(self, top: int = 20):
        """Fig. 2-12: per class (most affected first), change in error rate and in mean top-1 probability."""
        from .report import pyplot

        plt = pyplot()
        rows = self.classes[:top]
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 1.4 + 0.28 * max(len(rows), 1)), dpi=110, sharey=True)
        if not rows:
            for ax in axes:
                ax.set_axis_off()
            axes[0].text(0.5, 0.5, "no image had the concept", ha="center", va="center")
            return fig
        y = np.arange(len(rows))[::-1]
        err = [100 * r.error_change for r in rows]
        prob = [100 * r.top1_prob_change for r in rows]
        axes[0].barh(y, err, color=["#c0392b" if v > 0 else "#1e8449" for v in err])
        axes[0].set_yticks(y, [f"{r.name} (n={r.n})" for r in rows], fontsize=7)
        axes[0].set_xlabel("change in error rate (points)")
        axes[1].barh(y, prob, color="#7f8c8d")
        axes[1].set_xlabel("change in mean top-1 probability (points)")
        for ax in axes:
            ax.axvline(0, color="black", lw=0.8)
        fig.suptitle(f"{self.meta.get('stylizer')} on {self.meta.get('segmenter')}: "
                     f"{self.meta.get('n_probed')} images", fontsize=10)
        fig.tight_layout()
        return fig

    def html_section(self, figure_path: str | Path | None = None, *, top: int = 20, examples: int = 8) -> str:
        """An HTML section: summary, the Fig. 2-12 chart, the ranked table, and flipped examples (Fig. 2-13)."""
        from .report import card, data_table, figure, prediction_table, section

        m = self.meta
        intro = [f"Model {m.get('model')}; segmenter {m.get('segmenter')}; stylizer {m.get('stylizer')}.",
                 f"{m.get('n_images')} images scanned; the concept covered at least {100 * m.get('min_area', 0):.1f}% of the centre crop "
                 f"of {m.get('n_probed')} of them. Error rate before: {percent(m.get('error_before'))}, "
                 f"after stylizing: {percent(m.get('error_after'))}."]
        items = []
        if figure_path is not None:
            items.append(card("Change per class (Fig. 2-12)", [figure(figure_path, "ranked by error increase")],
                              wide=True))
        rows = [[r.name, r.n, percent(r.error_before), percent(r.error_after), f"{100 * r.error_change:+.1f}",
                 f"{100 * r.top1_prob_change:+.1f}", r.flipped,
                 ", ".join(f"{n} ({c})" for _, n, c in r.confusions[:3])] for r in self.classes[:top]]
        items.append(card("Classes ranked by error increase", [data_table(
            ["class", "n", "error before", "error after", "change (points)", "top-1 prob change (points)",
             "flipped", "stylized images went to"], rows)], wide=True))
        if len(self.originals) == len(self.items):
            shown = 0
            for i, it in enumerate(self.items):
                if shown >= examples:
                    break
                if it["before"]["top1"] == it["label"] and it["after"]["top1"] != it["label"]:
                    shown += 1
                    b = [(_name(self.class_names, c), p) for c, p in zip(it["before"]["top5"][:3], it["before"]["prob5"][:3])]
                    a = [(_name(self.class_names, c), p) for c, p in zip(it["after"]["top5"][:3], it["after"]["prob5"][:3])]
                    items.append(card(_name(self.class_names, it["label"]), [
                        figure(self.originals[i], "original", max_side=256),
                        figure(self.stylized[i], "stylized", max_side=256),
                        prediction_table(b, a, headers=("original", "stylized"))], subtitle=Path(it["source"]).name))
        return section("Probe: does the model depend on the concept's appearance?", items, intro=intro)

    def save(self, folder: str | Path, *, top: int = 20) -> dict[str, Path]:
        """Write ``probe.json``, ``probe.png`` (Fig. 2-12) and a standalone ``index.html``, atomically."""
        from ..atomic import atomic_bytes
        from .report import html_page, save_figure, write_html

        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise RulewriterError(f"{out} exists and is not a folder")
        paths = {"json": atomic_bytes(out / "probe.json",
                                      (json.dumps(self.to_dict(), indent=1, default=str) + "\n").encode())}
        paths["figure"] = save_figure(out / "probe.png", self.figure(top))
        page = html_page("rulewriter probe", [self.html_section(paths["figure"], top=top)])
        paths["html"] = write_html(out / "index.html", page)
        return paths


def probe(
    classifier,
    images,
    segmenter: Segmenter,
    stylizer,
    *,
    min_area: float = DEFAULT_MIN_AREA,
    batch_size: int = 32,
    progress: bool = True,
) -> ProbeResult:
    """Stylize a concept wherever a segmenter finds it and measure, per class, what the model gets wrong.

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        images: a :class:`~rulewriter.studies.testsets.TestSet` or ``(image, class index)`` pairs
            (e.g. :func:`rulewriter.models.data.labelled_images`); an image is a path or a PIL image.
        segmenter: ``segmenter(image, source=path) -> (H, W) float mask in [0, 1]`` with a ``name``
            (:func:`rulewriter.studies.segment.load_segmenter`).
        stylizer: a :class:`~rulewriter.studies.stylize.Stylizer` (``stylizer_from("paste:skimage:gravel")``).
        min_area: images where the concept's share of the model's centre crop (the mean of the mask as
            :meth:`Preprocess.mask` crops it) is below this are skipped; default :data:`DEFAULT_MIN_AREA`
            (1/49, one cell of a 7×7 final grid). A concept outside the crop counts for nothing.
        batch_size: images per forward pass.
        progress: tqdm bars.

    Returns:
        a :class:`ProbeResult`; raises RulewriterError when no image has the concept.

    Example::

        >>> res = probe(clf, [("bus1.jpg", 779)], load_segmenter("deeplab:bus"), TexturePaste("skimage:gravel"))  # doctest: +SKIP
        >>> res.classes[0].error_change                                                                            # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .evaluate import predict
    from .testsets import load_source

    if not 0 <= min_area < 1:
        raise RulewriterError(f"min_area must be in [0, 1), got {min_area}")
    pairs = _pairs(images)
    seg_name = str(getattr(segmenter, "name", type(segmenter).__name__))
    sty_name = str(getattr(stylizer, "name", type(stylizer).__name__))
    from .segmenters import MissingMaskError

    originals, stylized, masks, kept = [], [], [], []
    no_mask_file = 0
    t0 = time.perf_counter()
    for src, lab in tqdm(pairs, desc="segment + stylize", unit="img", disable=not progress):
        img = load_source(src)
        try:
            m = _segment(segmenter, img, src)
        except MissingMaskError:
            no_mask_file += 1  # a user's mask folder covers only the images that show the concept
            continue
        # The share of what the model sees: its centre crop, not the whole photo.
        area = float(classifier.preprocess.mask(m).mean())
        if area < min_area or not (m > 0).any():
            continue
        originals.append(img)
        stylized.append(stylizer(img, m))
        masks.append(_to_u8(m))
        kept.append((src, lab, area))
    t_style = time.perf_counter() - t0
    if not kept:
        raise RulewriterError(f"segmenter {seg_name!r} found the concept (area ≥ {min_area:.3f}) in none of "
                              f"{len(pairs)} images; nothing to probe")
    labels = [lab for _, lab, _ in kept]
    preds = predict(classifier, originals + stylized, labels + labels, batch_size=batch_size,
                    progress=progress, desc="predict")["before"]
    n = len(kept)
    before, after = preds.subset(np.arange(n)), preds.subset(np.arange(n, 2 * n))
    names = list(classifier.labels)
    items = []
    for i, (src, lab, area) in enumerate(kept):
        items.append({
            "source": _describe(src), "label": lab, "area": area,
            "before": {"top1": int(before.top1[i]), "top1_prob": float(before.top1_prob[i]),
                       "true_prob": float(before.label_prob[i]), "top5": before.topk[i].tolist(),
                       "prob5": [float(p) for p in before.topk_prob[i]]},
            "after": {"top1": int(after.top1[i]), "top1_prob": float(after.top1_prob[i]),
                      "true_prob": float(after.label_prob[i]), "top5": after.topk[i].tolist(),
                      "prob5": [float(p) for p in after.topk_prob[i]]},
        })
    ok_b = before.top1 == np.asarray(labels)
    ok_a = after.top1 == np.asarray(labels)
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    rows = []
    for lab, idx in by_class.items():
        ii = np.asarray(idx)
        conf = Counter(int(after.top1[i]) for i in idx if not ok_a[i])
        rows.append(ClassRow(lab, _name(names, lab), len(idx), float(1 - ok_b[ii].mean()), float(1 - ok_a[ii].mean()),
                             float(before.top1_prob[ii].mean()), float(after.top1_prob[ii].mean()),
                             float(before.label_prob[ii].mean()), float(after.label_prob[ii].mean()),
                             int((ok_b[ii] & ~ok_a[ii]).sum()), float((after.top1[ii] != before.top1[ii]).mean()),
                             [(c, _name(names, c), k) for c, k in sorted(conf.items(), key=lambda t: (-t[1], t[0]))[:5]]))
    rows.sort(key=lambda r: (-r.error_change, r.top1_prob_change, -r.n, r.name))
    # Rewriting with features needs the texture itself; a stylizer that names one by path says so.
    texture = getattr(stylizer, "texture_spec", None)
    meta = {"model": classifier.name, "weights": classifier.weights_id, "segmenter": seg_name, "stylizer": sty_name,
            "texture": texture, "min_area": min_area, "n_images": len(pairs), "n_probed": n, "n_without_mask_file": no_mask_file,
            "n_without_concept": len(pairs) - n, "error_before": float(1 - ok_b.mean()),
            "error_after": float(1 - ok_a.mean()), "flipped": int((ok_b & ~ok_a).sum()),
            "seconds_stylizing": round(t_style, 3)}
    return ProbeResult(meta, items, rows, names, originals, stylized, masks)


# ------------------------------------------------------------------------------------------ mitigate
@dataclass
class MitigationResult:
    """Tables 2.3 and 2.4: one row per method (and "no edit"), one table per group of test images.

    ``rows[method][group]`` holds, on the held-out test split: ``n``; ``accuracy_gt`` (top-1 on the
    stylized images vs the ground truth) and ``corrected_gt`` (errors corrected w.r.t. the ground truth,
    :func:`rulewriter.studies.metrics.errors_corrected`); ``accuracy_pred`` and ``corrected_pred`` (the same
    against the unedited model's top-1 on the original image); ``accuracy_original`` (top-1 on the
    originals vs the ground truth: what the change costs the unstylized images). ``overall[method]`` is
    top-1 on the accuracy set (``None`` without one). Groups: ``"target"`` (the most affected class),
    ``"other"`` (the other filtered classes) and ``"all"``.
    """

    rows: dict[str, dict[str, dict[str, Any]]]
    overall: dict[str, float | None]
    meta: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict, repr=False)

    COLUMNS = (("accuracy_gt", "Accuracy w.r.t. ground truth"),
               ("corrected_gt", "Errors corrected w.r.t. ground truth"),
               ("accuracy_pred", "Accuracy w.r.t. pre-edit model pred"),
               ("corrected_pred", "Errors corrected w.r.t. pre-edit model pred"),
               ("accuracy_original", "Accuracy on originals"))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "rulewriter.mitigation/1", "meta": self.meta, "rows": self.rows, "overall": self.overall}

    def _table(self, group: str) -> tuple[list[str], list[list[str]]]:
        head = ["method", "n"] + [t for _, t in self.COLUMNS] + ["Overall accuracy"]
        body = []
        for method, groups in self.rows.items():
            g = groups.get(group)
            if g is None:
                continue
            cells = [_METHOD_TITLES.get(method, method), str(g["n"])]
            for key, _ in self.COLUMNS:
                v = g[key]
                if key.startswith("corrected"):
                    cells.append("–" if method == "no edit" else percent(v["fraction"]))
                else:
                    cells.append(percent(v))
            cells.append(percent(self.overall.get(method)))
            body.append(cells)
        return head, body

    def groups(self) -> list[str]:
        first = next(iter(self.rows.values()))
        return [g for g in ("target", "other", "all") if g in first]

    def choices(self) -> list[str]:
        """What each method chose on its exemplars, in words: the rewrite's strength and why, the baselines'
        learning rate."""
        out = []
        for name, meta in (self.meta.get("change_meta") or {}).items():
            st = (meta or {}).get("strength")
            if isinstance(st, dict) and st.get("chosen") is not None:
                out.append(f"{_METHOD_TITLES.get(name, name)}: strength {st['chosen']:g} — {st.get('reason')}")
            elif (meta or {}).get("lr") is not None:
                out.append(f"{_METHOD_TITLES.get(name, name)}: learning rate {meta['lr']:g}")
        return out

    def to_markdown(self) -> str:
        """The tables as GitHub markdown, one per group (target class, other classes, all), then what each
        method chose."""
        out = []
        for group in self.groups():
            head, body = self._table(group)
            title = {"target": f"Target class: {self.meta.get('target_name')}",
                     "other": "Other classes", "all": "All filtered classes"}[group]
            out.append(f"### {title}\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            out.extend("| " + " | ".join(r) + " |" for r in body)
            out.append("")
        out += [f"- {c}" for c in self.choices()]
        return "\n".join(out) + ("\n" if self.choices() else "")

    def html_section(self) -> str:
        from .report import card, data_table, section

        cards = []
        for group in self.groups():
            head, body = self._table(group)
            title = {"target": f"Target class: {self.meta.get('target_name')}",
                     "other": "Other filtered classes", "all": "All filtered classes"}[group]
            cards.append(card(title, [data_table(head, body)], wide=True))
        m = self.meta
        intro = [f"Model {m.get('model')}, layer {m.get('layer')}; {m.get('n_exemplars')} exemplars from the "
                 f"train split, {m.get('n_test')} held-out test images (stylized copies evaluated).",
                 "Errors corrected: among the stylized test images the unedited model gets wrong, the share the "
                 "changed model gets right; w.r.t. the pre-edit prediction, 'right' means the unedited model's "
                 "top-1 on the original image.", *self.choices()]
        return section("Mitigation (Tables 2.3 and 2.4)", cards, intro=intro)

    def save(self, folder: str | Path, *, save_changes: bool = True) -> dict[str, Path]:
        """Write ``mitigation.json``, ``mitigation.md``, ``index.html`` and each change as safetensors."""
        from ..atomic import atomic_bytes
        from .report import html_page, write_html

        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise RulewriterError(f"{out} exists and is not a folder")
        paths = {}
        if save_changes:
            for name, change in self.changes.items():
                if change is not None:
                    paths[f"change_{name}"] = change.save(out / "changes" / f"{name}.safetensors")
        paths["json"] = atomic_bytes(out / "mitigation.json",
                                     (json.dumps(self.to_dict(), indent=1, default=str) + "\n").encode())
        paths["markdown"] = atomic_bytes(out / "mitigation.md", self.to_markdown().encode())
        paths["html"] = write_html(out / "index.html", html_page("rulewriter mitigation", [self.html_section()]))
        return paths


def _group_scores(idx: np.ndarray, labels: np.ndarray, ref: np.ndarray, base_sty: np.ndarray,
                  sty: np.ndarray, orig: np.ndarray) -> dict[str, Any]:
    """Scores of one method on the images ``idx``: top-1 arrays of stylized/original under the method."""
    from .metrics import errors_corrected

    y, r = labels[idx], ref[idx]
    right_gt, right_pred = sty[idx] == y, sty[idx] == r
    return {"n": int(len(idx)),
            "accuracy_gt": float(right_gt.mean()) if len(idx) else None,
            "corrected_gt": errors_corrected(base_sty[idx] == y, right_gt),
            "accuracy_pred": float(right_pred.mean()) if len(idx) else None,
            "corrected_pred": errors_corrected(base_sty[idx] == r, right_pred),
            "accuracy_original": float((orig[idx] == y).mean()) if len(idx) else None}


def mitigate(
    classifier,
    filtered: FilteredSet,
    exemplars: int = 5,
    stats=None,
    *,
    layer: str | None = None,
    methods: Sequence[str] = METHODS,
    texture=None,
    target: int | None = None,
    accuracy_set=None,
    view: int = 2,
    seed: int = 0,
    finetune_steps: int = 100,
    finetune_lr: float | None = None,
    retrain_lr: float | None = None,
    learning_rates: Sequence[float] | None = None,
    stop_when_fitted: bool = True,
    batch_size: int = 32,
    progress: bool = True,
    calibration=None,
) -> MitigationResult:
    """Build each mitigation from a few exemplars and judge it on the held-out filtered images.

    The filtered set is split (:meth:`FilteredSet.split`) into ``exemplars`` training images and a
    disjoint test split. From the exemplars:

    * ``"features"``: :func:`rules.rule_from_features` (the texture's features pasted into the concept
      mask at the layer) then :func:`rules.rewrite`;
    * ``"images"``: :func:`rules.rule_from_images` (keys of the stylized concept → values of the original)
      then :func:`rules.rewrite`; with ``calibration`` images, as ``rulewriter edit`` does by default: the
      rule carries :data:`~rulewriter.core.generalise.DEFAULT_VIEWS` joint augmentations of each exemplar
      and the strength, rank and augmentation are chosen by validation on them under the locality budget
      measured on the calibration images (the choice is in ``meta["change_meta"]["images"]``);
    * ``"finetune"``: :func:`finetune.finetune_layer` of the same layer on the stylized exemplars with
      their true labels (eq. 2.22);
    * ``"last-layer"``: :func:`finetune.retrain_last_layer` likewise.

    Every change is applied only inside :func:`rulewriter.studies.evaluate.predict` (a context manager per
    batch) and undone; the model's weights are never left changed.

    Args:
        classifier: the model.
        filtered: from :meth:`ProbeResult.filtered_set` or :meth:`FilteredSet.load`.
        exemplars: training images (the thesis rewrites from a handful; 5 by default).
        stats: a :class:`~rulewriter.core.stats.SecondMoment` or the matrix C of the layer's keys; needed by
            the two rewriting methods. A mapping ``{layer: stats}`` of several layers (with ``calibration``):
            the ``"images"`` rewrite is written at each and the layer its own validation prefers is kept
            (:func:`~rulewriter.core.rules.rewrite_choosing_layer`; ``meta["layer_choice"]``); the other
            methods use ``layer``.
        layer: the layer to rewrite and fine-tune (default: the first of a ``stats`` mapping, else the
            classifier's default layer).
        methods: a subset of :data:`METHODS`.
        texture: for ``"features"``; defaults to the texture the filtered set was stylized with.
        target: the class of Table 2.3 (default: the filtered set's most affected class).
        accuracy_set: a TestSet or (image, label) pairs for "overall accuracy" (e.g. imagenet-samples).
        view: memory view of the rewrite.
        seed: for the split.
        finetune_steps: the most SGD steps either baseline takes.
        finetune_lr, retrain_lr: the learning rates of fine-tuning the layer and of retraining the last
            layer. ``None`` (the default) applies the fair rule to each,
            :func:`rulewriter.studies.finetune.smallest_fitting_lr`: the smallest of ``learning_rates``
            (default :data:`~rulewriter.studies.finetune.LEARNING_RATES`, 1e-4, 1e-3, 1e-2) that fits the
            exemplars, chosen on the exemplars alone. The chosen rate is in ``meta["change_meta"]``.
        calibration: images the ``"images"`` rewrite's locality budget is measured on (a folder, paths, a
            Dataset: see :func:`rulewriter.core.generalise.calibration_set`), disjoint from the statistics
            images and from the filtered set. None: the closed form (strength 1, the thesis's rule).
        stop_when_fitted: stop each baseline's training as soon as every exemplar is classified right:
            the least training that makes the exemplars right, as a rewrite makes exactly its exemplars'
            rule hold. Training on to a near-zero loss over a few images overfits: measured on
            EfficientNet-Lite0 (2 exemplars, 100 steps, lr 0.01), fine-tuning ``_blocks.15._project_conv``
            that way dropped top-1 on 100 imagenet-samples from 87% to 0%.

    Example::

        >>> res = mitigate(clf, FilteredSet.load("probe-out"), 5, stats)        # doctest: +SKIP
        >>> print(res.to_markdown())                                           # doctest: +SKIP
    """
    from .evaluate import predict
    from .testsets import TestSet
    from .finetune import LEARNING_RATES, finetune_layer, retrain_last_layer, smallest_fitting_lr
    from ..core.generalise import DEFAULT_VIEWS
    from ..core.locality import Calibration, calibration_set
    from ..core.rules import rewrite, rewrite_choosing_layer, rule_from_features, rules_from_images

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RulewriterError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    stats_by = dict(stats) if isinstance(stats, Mapping) else None
    layer = layer or (next(iter(stats_by)) if stats_by else None) or classifier.default_layer
    if not layer:
        raise RulewriterError(f"model {classifier.name!r} has no default layer; pass layer=")
    if stats_by is not None:
        if layer not in stats_by:
            raise EditError(f"stats holds the layers {list(stats_by)}, not {layer}")
        stats = stats_by[layer]
    # Statistics of several layers: a validated images rewrite is written at each, the layer first.
    layers = [layer] + [k for k in (stats_by or {}) if k != layer] if calibration is not None else [layer]
    rewriting = [m for m in methods if m in ("features", "images")]
    if rewriting and stats is None:
        raise EditError(f"methods {rewriting} rewrite with the second moment of the layer's keys; pass stats")
    if calibration is not None and "images" in methods and len(layers) == 1 \
            and not isinstance(calibration, Calibration):
        calibration = calibration_set(classifier, layer, calibration)  # read once, before any method runs
    if "features" in methods:
        texture = texture if texture is not None else filtered.meta.get("texture")
        if texture is None:
            raise EditError("rewriting using features needs the texture; pass texture=")
    # An exemplar's concept must be visible in the model's centre crop, or its rule has no key.
    visible = [i for i in range(len(filtered))
               if float(classifier.preprocess.mask(filtered.mask(i)).max()) > 0]
    train, test = filtered.split(exemplars, seed, eligible=visible)
    if len(test) < MIN_TEST_IMAGES:
        warnings.warn(f"the held-out test split has {len(test)} image(s): each one moves an accuracy by "
                      f"{100 / len(test):.0f} points, so the methods' differences are mostly noise; probe more "
                      f"images (or use fewer exemplars) for a test split of at least {MIN_TEST_IMAGES}",
                      stacklevel=2)
    ex_masks = [train.mask(i) for i in range(len(train))]
    changes: dict[str, Any] = {"no edit": None}
    seconds: dict[str, float] = {}
    for m in methods:
        t0 = time.perf_counter()
        if m == "features":
            from ..concepts.manipulate import texture_from

            rule = rule_from_features(classifier, layer, train.originals, ex_masks, texture_from(texture), view=view)
            rule.description.update(originals=train.sources, texture=str(texture))
            changes[m] = rewrite(classifier, rule, stats)
        elif m == "images":
            rules = rules_from_images(classifier, layers, train.originals, train.stylized, ex_masks, view=view,
                                      views=0 if calibration is None else DEFAULT_VIEWS, seed=seed)  # one pass
            for r in rules.values():
                r.description.update(originals=train.sources, manipulated="stylized copies")
            changes[m] = rewrite(classifier, rules[layer], stats, calibration=calibration) if len(layers) == 1 \
                else rewrite_choosing_layer(classifier, layers, rules.__getitem__, stats_by.__getitem__,
                                            calibration=calibration)
        else:
            fit = finetune_layer if m == "finetune" else retrain_last_layer
            args = (classifier, layer) if m == "finetune" else (classifier,)
            x = classifier.preprocess.batch(list(train.stylized))  # preprocessed once for every rate tried

            def train_at(lr: float, fit=fit, args=args, x=x):
                return fit(*args, x, train.labels, steps=finetune_steps, lr=lr,
                           stop_when_fitted=stop_when_fitted, progress=progress)

            lr = finetune_lr if m == "finetune" else retrain_lr
            changes[m] = train_at(lr) if lr is not None else \
                smallest_fitting_lr(train_at, LEARNING_RATES if learning_rates is None else learning_rates)[0]
        seconds[m] = round(time.perf_counter() - t0, 3)

    n = len(test)
    preds = predict(classifier, list(test.originals) + list(test.stylized), list(test.labels) * 2, changes,
                    batch_size=batch_size, progress=progress, desc="evaluate changes")
    labels = np.asarray(test.labels)
    ref = preds["no edit"].top1[:n]
    base_sty = preds["no edit"].top1[n:]
    tgt = int(target) if target is not None else int(filtered.classes[0])
    groups = {"all": np.arange(n)}
    in_tgt = labels == tgt
    if in_tgt.any() and (~in_tgt).any():
        groups = {"target": np.flatnonzero(in_tgt), "other": np.flatnonzero(~in_tgt), **groups}
    elif in_tgt.any():
        groups = {"target": np.flatnonzero(in_tgt), **groups}
    rows = {}
    for name, p in preds.items():
        orig, sty = p.top1[:n], p.top1[n:]
        rows[name] = {g: _group_scores(idx, labels, ref, base_sty, sty, orig) for g, idx in groups.items()}
    overall: dict[str, float | None] = {name: None for name in changes}
    n_acc = None
    if accuracy_set is not None:
        pairs = list(zip(accuracy_set.images, accuracy_set.labels)) if isinstance(accuracy_set, TestSet) \
            else [(s, y) for s, y in accuracy_set]
        n_acc = len(pairs)
        acc = predict(classifier, [s for s, _ in pairs], [y for _, y in pairs], changes, batch_size=batch_size,
                      progress=progress, desc="overall accuracy")
        for name, p in acc.items():
            overall[name] = float(p.correct([y for _, y in pairs]).mean())
    meta = {"model": classifier.name, "weights": classifier.weights_id, "layer": layer, "view": view,
            "methods": methods, "stop_when_fitted": stop_when_fitted, "n_exemplars": len(train),
            "exemplars": train.sources, "n_test": n, "seed": seed, "target": tgt,
            "target_name": _name(classifier.labels, tgt), "texture": None if texture is None else str(texture),
            "stats_count": getattr(stats, "count", None),
            "n_calibration": len(calibration) if isinstance(calibration, Calibration) else None,
            "n_accuracy": n_acc, "seconds_building": seconds,
            "filtered": {k: filtered.meta.get(k) for k in ("segmenter", "stylizer", "model")},
            "change_meta": {k: getattr(v, "meta", None) for k, v in changes.items() if v is not None}}
    return MitigationResult(rows, overall, meta, {k: v for k, v in changes.items() if v is not None})
