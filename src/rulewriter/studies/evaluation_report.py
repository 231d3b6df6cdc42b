"""An evaluation as files: ``evaluation.json``, the ROC and per-class-shift figures, and an HTML page.

Example::

    ev = evaluate_edit(clf, conf, edit, target={817, 511, 479})
    write_report("rulewriter-eval", clf, ev)            # rulewriter-eval/index.html
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import RulewriterError
from .evaluate import Evaluation
from .metrics import TEST_TITLES, ClassShift, Predictions, RocCurve, label_name
from .report import percent, pyplot
from .testsets import load_source

__all__ = ["plot_class_shifts", "plot_roc", "write_report"]


def plot_roc(curves: Mapping[str, RocCurve | None], title: str, *, positive: str = "target", ax=None):
    """One ROC plot with a curve (and its AUC in the legend) per named curve; missing curves are skipped.

    The title ends with how many positives and negatives the curves rest on (from the first curve), so a
    panel cannot hide that, say, three negatives make its curve. Draws into ``ax`` when given (for a panel
    of a larger figure); returns the figure.

    Example::

        >>> fig = plot_roc({"before": roc_b, "after": roc_a}, "confusing images")   # doctest: +SKIP
    """
    if ax is None:
        fig, ax = pyplot().subplots(figsize=(4.2, 4.0), dpi=110)
    fig = ax.figure
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--")
    styles = ["-", "--", "-.", ":"]
    for i, (name, c) in enumerate(curves.items()):
        if c is None:
            continue
        ax.plot(c.fpr, c.tpr, lw=1.8, ls=styles[i % len(styles)], label=f"{name} (AUC {c.auc:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive})")
    first = next((c for c in curves.values() if c is not None), None)
    if first is not None:
        title = f"{title}\n{first.n_positive} positive ({positive}), {first.n_negative} negative"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_class_shifts(shifts: Sequence[ClassShift], title: str, *, top: int = 15):
    """Bar chart of the classes whose accuracy (and confidence) moved most: hurt ones red, helped ones green.

    Example::

        >>> fig = plot_class_shifts(ev.class_shifts(), "imagenet-samples")   # doctest: +SKIP
    """
    plt = pyplot()
    moved = [s for s in shifts if s.shift != 0 or abs(s.confidence_post - s.confidence_pre) > 0.01]
    moved.sort(key=lambda s: (-abs(s.shift), -abs(s.confidence_post - s.confidence_pre)))
    moved = sorted(moved[:top], key=lambda s: (s.shift, s.confidence_post - s.confidence_pre))
    fig, ax = plt.subplots(figsize=(7.6, 1.3 + 0.28 * max(len(moved), 1)), dpi=110)
    if not moved:
        ax.text(0.5, 0.5, "no class changed", ha="center", va="center")
        ax.set_axis_off()
    else:
        y = np.arange(len(moved))
        acc = [100 * s.shift for s in moved]
        conf = [100 * (s.confidence_post - s.confidence_pre) for s in moved]
        ax.barh(y + 0.2, acc, height=0.4, color=["#c0392b" if v < 0 else "#1e8449" for v in acc],
                label="top-1 accuracy (points)")
        ax.barh(y - 0.2, conf, height=0.4, color="#7f8c8d", label="confidence (points)")
        ax.set_yticks(y, [f"{s.name} (n={s.n})" for s in moved], fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("after − before")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _top3(pred: Predictions, i: int, names: Sequence[str]) -> list[tuple[str, float]]:
    return [(names[int(c)], float(q)) for c, q in zip(pred.topk[i][:3], pred.topk_prob[i][:3])]


def write_report(out_dir: str | Path, classifier, evaluation: Evaluation, *, change_path: str | None = None,
                 examples: int = 12) -> dict[str, Path]:
    """Write ``evaluation.json``, the figures (``roc_*.png``, ``class_shifts*.png``) and ``index.html``.

    The page opens with the headline numbers, then the four tests (with a target), errors corrected, the
    ROC curves, the classes that moved most, and up to ``examples`` images whose top-1 the change flipped.
    Every file is written atomically. Returns the paths by name.

    Example::

        >>> paths = write_report("rulewriter-eval", clf, ev)     # doctest: +SKIP
        >>> paths["html"]                                        # doctest: +SKIP
        PosixPath('rulewriter-eval/index.html')
    """
    from ..atomic import atomic_bytes
    from .report import (card, data_table, figure, html_page, paragraph, prediction_table, save_figure,
                         section, write_html)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RulewriterError(f"{out} exists and is not a folder")
    names = classifier.labels
    ev = evaluation
    data = ev.to_dict(names)
    data["model"] = classifier.describe()
    data["change"] = change_path
    paths: dict[str, Path] = {}
    paths["json"] = atomic_bytes(out / "evaluation.json", (json.dumps(data, indent=1, default=str) + "\n").encode())

    # figures
    figs: list[tuple[str, Path]] = []
    positive = "target" if ev.target else "correct"
    for kind, curves in ev.rocs().items():
        if any(c is not None for c in curves.values()):
            what = ("positive: ground truth in the target classes; negative: the rest" if ev.target
                    else "positive: top-1 correct; negative: wrong; scored by top-1 probability")
            p = save_figure(out / f"roc_{kind}.png", plot_roc(curves, f"{ev.name}: {kind} images\n({what})",
                                                              positive=positive))
            paths[f"roc_{kind}"] = p
            figs.append((f"ROC, {kind} images", p))
    if ev.edited:
        for kind in ev.predictions:
            p = save_figure(out / f"class_shifts_{kind}.png",
                            plot_class_shifts(ev.class_shifts(kind, names), f"{ev.name}: {kind} images"))
            paths[f"class_shifts_{kind}"] = p
            figs.append((f"per-class shifts, {kind} images", p))

    # page
    sections = []
    head = []
    for kind in ev.predictions:
        s = ev.summary(kind)
        if ev.edited:
            rows = [[m, percent(s[m]["top1"]), percent(s[m]["top5"]), f"{s[m]['confidence']:.3f}"]
                    for m in ("before", "after")]
            sub = f"{s['n_images']} images; top-1 changed on {s['changed_top1']}"
        else:
            rows = [["model", percent(s["top1"]), percent(s["top5"]), f"{s['confidence']:.3f}"]]
            sub = f"{s['n_images']} images"
        head.append(card(f"{kind} images", [data_table(["", "top-1", "top-5", "confidence"], rows)], subtitle=sub))
    intro = [f"Model {classifier.name}; test set {ev.name}."]
    if change_path:
        intro.append(f"Change: {change_path} (applied in memory; no weights were written).")
    if ev.target:
        intro.append("Target: " + ", ".join(names[c] if c < len(names) else str(c) for c in sorted(ev.target)))
    sections.append(section("Summary", head, intro=intro))
    if ev.edited and ev.target:
        rows = [[TEST_TITLES[k], t.n, percent(t.accuracy_pre), percent(t.accuracy_post),
                 "—" if t.confidence_pre is None else f"{t.confidence_pre:.3f}",
                 "—" if t.confidence_post is None else f"{t.confidence_post:.3f}"]
                for k, t in ev.four_tests.items()]
        sections.append(section("The four tests (thesis Table 2.1)", [card("accuracy and confidence", [
            data_table(["test", "n", "accuracy pre", "accuracy post", "confidence pre", "confidence post"], rows)],
            wide=True)]))
    if ev.edited:
        rows = []
        for kind, e in ev.errors().items():
            for ref, v in (("ground truth", e["ground_truth"]), ("pre-edit prediction", e["pre_edit_prediction"])):
                rows.append([kind, ref, f"{v['corrected']}/{v['n_errors_before']}", percent(v["fraction"]),
                             f"{v['introduced']}/{v['n_right_before']}", percent(v["introduced_fraction"])])
        sections.append(section("Errors corrected and introduced", [card("per image kind and reference", [
            data_table(["images", "w.r.t.", "corrected", "share", "introduced", "share"], rows)], wide=True)],
            intro="Errors corrected: among images the unedited model gets wrong, the share the edited model gets "
                  "right. Introduced: among images it gets right, the share the edited model gets wrong."))
    sections.append(section("Figures", [card(t, [figure(p, t)]) for t, p in figs]))
    if ev.edited:
        shifts = ev.class_shifts("normal", names)
        worst = [s for s in shifts if s.shift < 0][:10]
        best = [s for s in reversed(shifts) if s.shift > 0][:10]
        rows = [[s.name, s.n, percent(s.accuracy_pre), percent(s.accuracy_post), f"{100 * s.shift:+.1f}"]
                for s in worst + best]
        if rows:
            sections.append(section("Classes that moved most", [card("most hurt, then most helped", [
                data_table(["class", "n", "accuracy pre", "accuracy post", "shift (points)"], rows)], wide=True)]))
        p = ev.predictions["normal"]
        flipped = np.flatnonzero(p["before"].top1 != p["after"].top1)[:examples]
        cards = []
        for i in flipped:
            src = ev.sources[i]
            parts = []
            if Path(src).is_file():
                img = load_source(src)
                parts.append(figure(classifier.preprocess.denormalize(classifier.preprocess.image(img)),
                                    Path(src).name, max_side=224))
            parts.append(prediction_table(_top3(p["before"], i, names), _top3(p["after"], i, names)))
            cards.append(card(label_name(ev.labels[i], names, ev.groups), parts, subtitle="ground truth"))
        sections.append(section("Images whose top-1 changed", cards,
                                intro=[f"{len(np.flatnonzero(p['before'].top1 != p['after'].top1))} images changed; "
                                       f"the first {len(cards)} are shown."] if cards else ["No top-1 changed."]))
    sections.append(section("Files", body=[paragraph(f"All numbers: {paths['json'].name}. Figures: "
                                                     + ", ".join(p.name for _, p in figs) + ".", cls="muted")]))
    paths["html"] = write_html(out / "index.html", html_page(f"rulewriter evaluation: {ev.name}", sections))
    return paths
