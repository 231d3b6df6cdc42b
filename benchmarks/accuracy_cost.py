"""Accuracy cost of a single-rule edit (the issue's acceptance figure).

Claim under test: *a single-rule edit that restores the prediction of a texture-pasted photo costs at most
0.5 points of top-1 accuracy on the 1000 imagenet-samples photos.*

What is measured, per case (one object photo, one texture):

1. Paste the texture onto the object (``paste_texture``) and keep the case only if that flips the model's
   top-1 away from the unmanipulated photo's top-1 (otherwise it is listed as "not misclassified, skipped").
   Objects: car-parts training photos in natural file order with a whole-car mask (union of every part
   annotation of the photo) and ``skimage.data.coffee()`` with a hand-drawn ellipse around cup and saucer.
   Textures, in rotation: skimage gravel, brick, grass, the shared snow photo, and wood cropped from the
   wooden-spoon photo of imagenet-samples.
2. ``rule_from_images`` with that single exemplar and ``rewrite(clf, rule, stats)`` with its defaults.
3. Restored: the edited model's top-1 on the manipulated exemplar equals the original photo's top-1.
4. Top-1 accuracy on the imagenet-samples photos before and after the edit; pass = restored and
   Δ ≥ −0.5 points.
5. Generalisation (car cases): the same texture pasted onto car-parts *test* photos that the paste
   misclassifies; the fraction whose top-1 returns to their unmanipulated top-1 after the edit.

The statistics ``C`` normally come from all 1000 photos, which are also the evaluation photos, so every
case is also run with a disjoint split: ``C`` from the 500 even-indexed photos (sorted order) and accuracy on
the 500 odd-indexed ones. Layers can be ablated with ``--layers`` (the default layer is a block's whole
output; ``_blocks.10._project_conv`` sits inside a residual block).

Accuracy after an edit is computed from cached activations at the input of the edited block (see
``_common.TailEvaluator``), checked once against the full model.

Run: ``python benchmarks/accuracy_cost.py [--quick] [--layers L1,L2,...]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "accuracy_cost"
MAX_DROP = 0.5  # points of top-1 accuracy
ABLATION_LAYERS = ("_blocks.10._project_conv", "_blocks.11._project_conv", "_conv_head")
#: The wooden bowl of the spoon in imagenet-samples' n04597913 photo (256×369), chosen by eye.
WOOD_CROP: tuple[int, int, int, int] = (112, 262, 188, 328)
TEXTURE_ORDER = ("gravel", "brick", "grass", "snow", "wood")


@dataclass
class Case:
    """One object photo with one texture pasted into its mask."""

    name: str
    kind: str  # "car" or "coffee"
    obj: str
    texture: str
    original: Image.Image
    manipulated: Image.Image
    mask: np.ndarray
    orig_top1: int
    pasted_top1: int
    results: dict[str, Any] = field(default_factory=dict)

    def summary(self, labels: list[str]) -> dict[str, Any]:
        return {"case": self.name, "kind": self.kind, "object": self.obj, "texture": self.texture,
                "mask_fraction": round(float(self.mask.mean()), 4),
                "original_top1": labels[self.orig_top1], "pasted_top1": labels[self.pasted_top1],
                "layers": self.results}


def load_textures(shared: Path) -> dict[str, Image.Image]:
    from rulewriter.concepts.manipulate import texture_from

    spoon = C.find_one(shared / "data" / "imagenet-samples", "n04597913_*")
    return {
        "gravel": texture_from("skimage:gravel"),
        "brick": texture_from("skimage:brick"),
        "grass": texture_from("skimage:grass"),
        "snow": texture_from(shared / "data" / "textures" / "snow_texture.jpg"),
        "wood": texture_from(spoon, crop_box=WOOD_CROP),
    }


def candidate_objects(shared: Path) -> Iterator[tuple[str, str, Image.Image, np.ndarray]]:
    """(name, kind, photo, mask): the coffee photo, then car-parts training photos in natural order."""
    from rulewriter.models.data import load_image

    img, mask = C.coffee_photo()
    yield "coffee", "coffee", img, mask
    paths, index = C.car_photos(shared, "trainingset")
    for p in paths:
        m = C.whole_car_mask(index, p)
        if m.max() > 0:
            yield p.stem, "car", load_image(p), m


def select_cases(clf: Any, shared: Path, textures: dict[str, Image.Image], want: int,
                 budget: int) -> tuple[list[Case], list[dict[str, str]]]:
    """Candidate k pairs object k with texture k mod 5, until ``want`` pastes flip the top-1 (or ``budget``)."""
    from rulewriter.concepts.manipulate import paste_texture

    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    for k, (obj, kind, img, mask) in enumerate(candidate_objects(shared)):
        if len(cases) >= want or k >= budget:
            break
        tex = TEXTURE_ORDER[k % len(TEXTURE_ORDER)]
        man = paste_texture(img, mask, textures[tex])
        o, m = C.top1(clf, clf.preprocess.batch([img, man])).tolist()
        name = f"{obj}+{tex}"
        if o == m:
            skipped.append({"case": name, "top1": clf.labels[o]})
            print(f"  {name}: still {clf.labels[o]!r} after pasting, not misclassified, skipped")
            continue
        cases.append(Case(name, kind, obj, tex, img, man, mask, o, m))
        print(f"  {name}: {clf.labels[o]!r} -> {clf.labels[m]!r}")
    return cases, skipped


@dataclass
class HeldOut:
    """Car-parts test photos misclassified by one texture's paste."""

    names: list[str]
    manipulated: torch.Tensor  # (n, 3, S, S)
    orig_top1: torch.Tensor  # (n,)
    scanned: int


def held_out_sets(clf: Any, shared: Path, textures: dict[str, Image.Image], needed: set[str],
                  n: int) -> dict[str, HeldOut]:
    """For each texture, the first ``n`` test photos (natural order) whose top-1 the paste changes."""
    from rulewriter.models.data import load_image
    from rulewriter.concepts.manipulate import paste_texture

    paths, index = C.car_photos(shared, "testset")
    photos: list[tuple[str, Image.Image, np.ndarray, int]] = []  # loaded lazily, shared by textures
    out: dict[str, HeldOut] = {}
    for tex in sorted(needed):
        names: list[str] = []
        xs: list[torch.Tensor] = []
        tops: list[int] = []
        scanned = 0
        for i, p in enumerate(paths):
            if len(names) >= n:
                break
            if i >= len(photos):
                img = load_image(p)
                m = C.whole_car_mask(index, p)
                photos.append((p.name, img, m, int(C.top1(clf, clf.preprocess.batch([img]))[0])))
            name, img, m, o = photos[i]
            scanned += 1
            if m.max() <= 0:
                continue
            x = clf.preprocess.batch([paste_texture(img, m, textures[tex])])
            if int(C.top1(clf, x)[0]) != o:
                names.append(name)
                xs.append(x[0])
                tops.append(o)
        out[tex] = HeldOut(names, torch.stack(xs) if xs else torch.empty(0, 3, 224, 224),
                           torch.tensor(tops, dtype=torch.long), scanned)
        print(f"  held-out {tex}: {len(names)} misclassified of {scanned} test photos scanned")
    return out


def evaluate_edit(clf: Any, layer: str, case: Case, rule: Any, stats: Any, ev: C.TailEvaluator,
                  labels: torch.Tensor, idx: torch.Tensor | None, held: HeldOut | None) -> dict[str, Any]:
    """Rewrite with ``stats``, then measure the exemplar, the accuracy on photos ``idx`` and held-out photos."""
    from rulewriter.core.rules import rewrite

    t0 = time.perf_counter()
    edit = rewrite(clf, rule, stats)
    solve_s = time.perf_counter() - t0
    x_man = clf.preprocess.batch([case.manipulated])
    y = labels if idx is None else labels[idx]
    before = ev.base_predictions(idx)
    with edit.applied(clf.model):
        t0 = time.perf_counter()
        after = ev.predictions(layer, idx)
        eval_s = time.perf_counter() - t0
        edited_top1 = int(C.top1(clf, x_man)[0])
        held_pred = C.top1(clf, held.manipulated) if held is not None and len(held.names) else None
    acc_b, acc_a = C.top1_accuracy(before, y), C.top1_accuracy(after, y)
    restored = edited_top1 == case.orig_top1
    delta = acc_a - acc_b
    res: dict[str, Any] = {
        "restored": restored, "edited_top1": clf.labels[edited_top1],
        "acc_before": acc_b, "acc_after": acc_a, "delta_points": delta,
        "n_eval": int(y.numel()), "changed_predictions": int((before != after).sum()),
        "pass": bool(restored and delta >= -MAX_DROP - 1e-9),
        "solve_seconds": solve_s, "eval_seconds": eval_s, "n_pairs": int(rule.keys.shape[0]),
    }
    if held_pred is not None:
        res["held_out_restored"] = int((held_pred == held.orig_top1).sum())
        res["held_out_n"] = len(held.names)
    return res


def fmt_held(r: dict[str, Any]) -> str:
    return f"{r['held_out_restored']}/{r['held_out_n']}" if r.get("held_out_n") else "—"


def yes(b: bool) -> str:
    return "yes" if b else "**no**"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 200 photos, 3 cases, default layer")
    ap.add_argument("--layers", default=None,
                    help="comma-separated layers; 'default' names the model's default layer "
                         "(full: default + all ablation layers; quick: default)")
    ap.add_argument("--cases", type=int, default=None, help="flipped cases wanted (full 10, quick 3)")
    ap.add_argument("--budget", type=int, default=40, help="candidate (object, texture) pairs to try at most")
    ap.add_argument("--held-out", type=int, default=None, help="misclassified test photos per texture (20/5)")
    args = ap.parse_args(argv)

    shared = C.require_shared("data/imagenet-samples", "data/car-parts", "data/textures/snow_texture.jpg")
    if importlib.util.find_spec("skimage") is None:
        print("SKIPPED: scikit-image is needed for the gravel/brick/grass/coffee photos "
              "(pip install 'rulewriter[demo]').")
        return 0
    C.setup_torch()
    from rulewriter.models.registry import load_classifier
    from rulewriter.core.rules import rule_from_images
    from rulewriter.core.stats import collect_second_moment

    t_start = time.perf_counter()
    clf = load_classifier("efficientnet-lite0")
    n_photos = 200 if args.quick else None
    want = args.cases or (3 if args.quick else 10)
    n_held = args.held_out or (5 if args.quick else 20)
    if args.layers:
        layers = [clf.default_layer if s.strip() == "default" else s.strip() for s in args.layers.split(",")]
    else:
        layers = [clf.default_layer] + ([] if args.quick else list(ABLATION_LAYERS))

    paths, ys = C.imagenet_samples(shared, clf, n_photos)
    labels = torch.tensor(ys)
    odd = torch.arange(1, len(paths), 2)
    even_paths = paths[0::2]

    print(f"[1/4] selecting {want} cases whose paste flips the top-1 ...")
    textures = load_textures(shared)
    cases, skipped = select_cases(clf, shared, textures, want, args.budget)
    if not cases:
        print("no candidate was misclassified by its paste; nothing to measure")
        return 1
    print(f"[2/4] held-out car test photos ({n_held} per texture) ...")
    held = held_out_sets(clf, shared, textures, {c.texture for c in cases if c.kind == "car"}, n_held)
    print(f"[3/4] caching activations of {len(paths)} photos for {len(layers)} layer(s) ...")
    ev = C.TailEvaluator(clf, layers, paths)
    base_all = C.top1_accuracy(ev.base_predictions(), labels)
    base_odd = C.top1_accuracy(ev.base_predictions(odd), labels[odd])
    print(f"  base top-1: {base_all:.2f}% on {len(paths)}, {base_odd:.2f}% on the {len(odd)} odd-indexed "
          f"({ev.full_seconds:.0f} s)")

    print("[4/4] edits ...")
    layer_info: dict[str, Any] = {}
    for layer in layers:
        t0 = time.perf_counter()
        stats_all = collect_second_moment(clf, layer, paths, cache_dir=C.CACHE_DIR, progress=False)
        stats_even = collect_second_moment(clf, layer, even_paths, cache_dir=C.CACHE_DIR, progress=False)
        layer_info[layer] = {"stats_seconds": time.perf_counter() - t0, "eval_method": ev.method(layer),
                             "key_dim": int(stats_all.dim or 0)}
        print(f"  {layer}: statistics ready ({layer_info[layer]['stats_seconds']:.0f} s; {ev.method(layer)})")
        for case in cases:
            rule = rule_from_images(clf, layer, [case.original], [case.manipulated], [case.mask])
            h = held.get(case.texture) if case.kind == "car" else None
            r_all = evaluate_edit(clf, layer, case, rule, stats_all, ev, labels, None, h)
            r_dis = evaluate_edit(clf, layer, case, rule, stats_even, ev, labels, odd, h)
            case.results[layer] = {"C_all": r_all, "C_even_eval_odd": r_dis}
            print(f"    {case.name:22s} restored={r_all['restored']!s:5} Δ={r_all['delta_points']:+.2f} "
                  f"held={fmt_held(r_all)} | disjoint restored={r_dis['restored']!s:5} "
                  f"Δ={r_dis['delta_points']:+.2f}")

    # ---------------------------------------------------------------- report
    md: list[str] = [
        "# Accuracy cost of single-rule edits (efficientnet-lite0)", "",
        f"Claim: an edit that restores a texture-pasted photo costs ≤ {MAX_DROP} points of top-1 accuracy on "
        f"the imagenet-samples photos. {len(paths)} photos; base top-1 {base_all:.2f}% (all), "
        f"{base_odd:.2f}% (the {len(odd)} odd-indexed). One exemplar per edit, `rewrite` defaults "
        "(context mean, fit pairs, closed form, ridge 1e-3).", "",
        f"Candidates tried: {len(cases) + len(skipped)}; misclassified by the paste (cases): {len(cases)}; "
        f"**not misclassified, skipped: {len(skipped)}**"
        + (f" ({', '.join(s['case'] for s in skipped)})" if skipped else "") + ".", "",
        "## Cases", "",
        C.markdown_table(
            ["case", "mask cover", "original top-1", "pasted top-1", "held-out photos (misclassified/scanned)"],
            [[c.name, f"{c.mask.mean():.1%}", clf.labels[c.orig_top1], clf.labels[c.pasted_top1],
              (f"{len(held[c.texture].names)}/{held[c.texture].scanned}" if c.kind == "car" else "—")]
             for c in cases]),
    ]
    summary_rows: list[list[str]] = []
    summary: dict[str, Any] = {}
    for layer in layers:
        md += ["", f"## Layer `{layer}` ({layer_info[layer]['key_dim']}-d keys; "
                   f"accuracy by {layer_info[layer]['eval_method']})", "",
               f"Left: C from all {len(paths)} photos, accuracy on all {len(paths)}. "
               f"Right (disjoint): C from the {len(even_paths)} even-indexed, accuracy on the {len(odd)} "
               "odd-indexed. Held-out: test photos back to their original top-1 after the edit.", ""]
        rows = []
        for c in cases:
            a, d = c.results[layer]["C_all"], c.results[layer]["C_even_eval_odd"]
            rows.append([c.name, yes(a["restored"]), f"{a['acc_before']:.1f} → {a['acc_after']:.1f}",
                         f"{a['delta_points']:+.1f}", a["changed_predictions"], fmt_held(a), yes(a["pass"]),
                         yes(d["restored"]), f"{d['acc_before']:.1f} → {d['acc_after']:.1f}",
                         f"{d['delta_points']:+.1f}", fmt_held(d), yes(d["pass"])])
        md.append(C.markdown_table(
            ["case", "restored", "top-1 %", "Δ pts", "changed", "held-out", "pass",
             "restored (disj.)", "top-1 % (odd)", "Δ pts (disj.)", "held-out (disj.)", "pass (disj.)"], rows))
        for variant, label in (("C_all", "C all / eval all"), ("C_even_eval_odd", "C even / eval odd")):
            rs = [c.results[layer][variant] for c in cases]
            deltas = [r["delta_points"] for r in rs]
            n_pass = sum(r["pass"] for r in rs)
            hs = [r for r in rs if r.get("held_out_n")]
            held_frac = (sum(r["held_out_restored"] for r in hs) / sum(r["held_out_n"] for r in hs)) if hs else None
            line = (f"{n_pass} of {len(rs)} edits restore the exemplar and cost ≤ {MAX_DROP} points")
            summary.setdefault(layer, {})[variant] = {
                "n_cases": len(rs), "n_pass": n_pass, "n_restored": sum(r["restored"] for r in rs),
                "mean_delta": float(np.mean(deltas)), "worst_delta": float(min(deltas)),
                "held_out_restored_fraction": held_frac, "line": line}
            summary_rows.append([f"`{layer}`", label, f"{sum(r['restored'] for r in rs)}/{len(rs)}",
                                 f"{np.mean(deltas):+.2f}", f"{min(deltas):+.2f}",
                                 "—" if held_frac is None else f"{held_frac:.0%}", f"**{n_pass}/{len(rs)}**"])
    md += ["", "## Summary", "",
           C.markdown_table(["layer", "variant", "restored", "mean Δ pts", "worst Δ pts",
                             "held-out restored", f"pass (restored & Δ ≥ −{MAX_DROP})"], summary_rows), ""]
    main_line = summary[layers[0]]["C_all"]["line"]
    md.append(f"**{main_line}** (layer `{layers[0]}`, C from all photos; disjoint split: "
              f"{summary[layers[0]]['C_even_eval_odd']['line']}).")
    total = time.perf_counter() - t_start
    md.append(f"\nTotal run time {total / 60:.1f} min ({'quick' if args.quick else 'full'} mode).")
    text = "\n".join(md)
    print("\n" + text)
    C.write_results(NAME, {
        "mode": "quick" if args.quick else "full", "n_photos": len(paths), "layers": layers,
        "max_drop_points": MAX_DROP, "base_top1_all": base_all, "base_top1_odd": base_odd,
        "wood_crop_box": list(WOOD_CROP), "coffee_ellipse": list(C.COFFEE_ELLIPSE),
        "skipped_not_misclassified": skipped, "layer_info": layer_info,
        "held_out": {t: {"names": h.names, "scanned": h.scanned} for t, h in held.items()},
        "cases": [c.summary(clf.labels) for c in cases], "summary": summary,
        "total_seconds": total,
    }, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
