"""Bus paint → gravel (thesis Section 2.3, Figs. 2-11 to 2-14, Tables 2.2-2.4) on the real imagenet-samples.

The experiment, step by step (EfficientNet-Lite0, CPU, package defaults everywhere):

1. **Segment.** DeepLabV3-MobileNetV2 (``deeplab:bus``, the shared TFLite model) runs on all 1000
   imagenet-samples photos (masks cached under ``benchmarks/.cache/masks``). A photo takes part where the
   bus covers at least 1/49 of the centre crop (``spurious.DEFAULT_MIN_AREA``); the report lists which classes those are.
2. **Stylize and probe** (:func:`rulewriter.studies.spurious.probe`, true ImageNet labels): the bus is painted with
   ``paste:skimage:gravel`` (:class:`TexturePaste`, keeps the shading); the same photos are also stylized
   with ``gram:skimage:gravel`` (:class:`GramStyle`, 100 steps) for a second probe. Figure
   ``bus_gravel_probe.png`` is Fig. 2-12 for the paste probe.
3. **Mitigation sets, honestly built from few photos.** imagenet-samples has one photo per class, so the
   probe finds only a handful of bus photos. Each bus photo is turned into :data:`AUGMENTATIONS`
   deterministic augmentations, the recipe of :class:`rulewriter.studies.demo.AugmentedPhotos` (random resized crop
   15–100% of the area, aspect 3/4–4/3, flip with probability 1/2, ±20% brightness/contrast/saturation,
   256×256) applied jointly to the photo, its gravel copy and its mask (the gravel copy is the jittered
   gravel inside the mask and the jittered photo outside it). **The split is by source photo**: the bus
   photos (sorted by file name) are dealt alternately into two folds; exemplars come from one fold's
   augmentations, the test set is the other fold's augmentations *and* its un-augmented photos; then the
   folds swap (2-fold cross-validation; both directions are reported and summed).
4. **Exemplars**: the first 5 augmentations (interleaved over the fold's photos, so they span photos) on
   which gravel changes the top-1 and whose bus shows in the centre crop: exemplars of the failure.
5. **Mitigation** (:func:`rulewriter.studies.spurious.mitigate`, default layer, view 2, rank 1; baselines stop
   once the exemplars are right, each at the fair learning rate of
   :func:`rulewriter.studies.finetune.smallest_fitting_lr`: the smallest of 1e-4, 1e-3, 1e-2 that fits its
   exemplars): rewriting with images, rewriting with features (the gravel texture's features pasted at the
   layer), fine-tuning the layer, retraining the last layer. ``C`` from the 1000 photos (cached).
   **Gravel error**: the gravel copy's top-1 differs from the unedited model's top-1 on the original
   (augmentations have no trustworthy label: a crop may cut the bus away); **fixed**: the edited model's
   top-1 on the gravel copy equals it again. Cost: top-1 on the 1000 photos. Those photos also built ``C``
   and hold the bus photos themselves, so a **disjoint variant** rewrites with ``C`` from the even-indexed
   photos that are not bus photos and measures the cost on the odd-indexed ones that are not either.
   Each baseline's training (learning rate, steps, cross-entropy on its exemplars before → after) is
   reported, and so is each baseline trained for all its steps at that rate (no early stop).
6. **Paste vs Gram**: per bus photo, the top-1 after each stylizer. The Gram stylizer optimises against
   the classifier under test, so its errors may be partly adversarial; with no second network here, the
   check is fragility: each stylized copy is JPEG re-encoded (quality 75) after a 1-px Gaussian blur and
   predicted again; an error that an adversarial pixel pattern carries tends not to survive that.

Small n caveat: every number rests on a few source photos; the augmentations of one photo are strongly
correlated, so the effective sample size is the number of photos, not of augmentations.

Run: ``python benchmarks/bus_gravel.py [--quick] [--no-gram]``. Writes
``benchmarks/results/bus_gravel.{json,md}`` and ``bus_gravel_probe.png``.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import snow as S  # noqa: E402
from wheels import TailCache  # noqa: E402

NAME = "bus_gravel"
STYLE = "paste:skimage:gravel"
GRAM = "gram:skimage:gravel"
SEGMENTER = "deeplab:bus"
#: Augmentations per source photo.
AUGMENTATIONS = 24
EXEMPLARS = 5
AUG_SIZE = 256
log = S.log


def augment_triplet(orig: Image.Image, sty: Image.Image, mask: np.ndarray, seed: int, i: int
                    ) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """AugmentedPhotos' recipe (crop, flip, jitter) applied jointly; gravel only inside the moved mask."""
    from rulewriter.studies.demo import random_resized_box

    rng = np.random.default_rng([seed, i])
    box = random_resized_box(orig.size, rng)
    size = (AUG_SIZE, AUG_SIZE)
    o = orig.resize(size, Image.Resampling.BILINEAR, box=box)
    s = sty.resize(size, Image.Resampling.BILINEAR, box=box)
    m = Image.fromarray(mask).resize(size, Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        o, s, m = ImageOps.mirror(o), ImageOps.mirror(s), ImageOps.mirror(m)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        f = float(rng.uniform(0.8, 1.2))
        o, s = enhancer(o).enhance(f), enhancer(s).enhance(f)
    mf = np.asarray(m, np.float32)[..., None] / 255.0
    s = Image.fromarray(np.clip(np.rint(np.asarray(o, np.float32) * (1 - mf) + np.asarray(s, np.float32) * mf),
                                0, 255).astype(np.uint8))
    return o, s, np.asarray(m, np.uint8).copy()


def fold_set(clf: Any, res: Any, train_src: Sequence[int], test_src: Sequence[int], n_aug: int) -> Any:
    """A fixed-split FilteredSet: exemplar candidates from ``train_src`` photos, test from ``test_src``."""
    from rulewriter.studies.filtered import FixedSplit

    def augs(src: Sequence[int]) -> list[tuple[Image.Image, Image.Image, np.ndarray, int, str]]:
        out = []
        for a in range(n_aug):  # interleaved over photos: the first few exemplars span photos
            for i in src:
                o, s, m = augment_triplet(res.originals[i], res.stylized[i], res.masks[i], 0, 1000 * i + a)
                out.append((o, s, m, res.items[i]["label"], f"{res.items[i]['source']}#aug{a}"))
        return out

    train = augs(train_src)
    # Candidates: augmentations on which gravel changes the top-1 (one batch through the model).
    from rulewriter.studies.evaluate import predict

    p = predict(clf, [t[0] for t in train] + [t[1] for t in train], [t[3] for t in train] * 2,
                progress=False)["before"].top1
    n = len(train)
    cand = [t for k, t in enumerate(train) if p[k] != p[n + k]]
    test = augs(test_src) + [(res.originals[i], res.stylized[i], res.masks[i], res.items[i]["label"],
                              res.items[i]["source"]) for i in test_src]
    items = cand + test
    return FixedSplit([t[0] for t in items], [t[1] for t in items], [t[2] for t in items], [t[3] for t in items],
                      [t[4] for t in items], [res.classes[0].label],
                      {"n_pool": len(cand), "segmenter": res.meta["segmenter"], "stylizer": res.meta["stylizer"],
                       "texture": "skimage:gravel", "model": clf.name,
                       "train_augmentations": n, "train_changed": len(cand)})


def degrade(im: Image.Image) -> Image.Image:
    """A 1-px Gaussian blur and a JPEG round trip at quality 75: what a fragile (adversarial) pattern rarely survives."""
    buf = io.BytesIO()
    im.convert("RGB").filter(ImageFilter.GaussianBlur(1)).save(buf, "JPEG", quality=75)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def paste_vs_gram(clf: Any, paste: Any, gram: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    """Per bus photo: top-1 of the original, the paste and the Gram copy, each also after :func:`degrade`."""
    from rulewriter.studies.evaluate import predict

    names = list(clf.labels)
    by_src = {it["source"]: k for k, it in enumerate(gram.items)}
    pairs = [(i, by_src[it["source"]]) for i, it in enumerate(paste.items) if it["source"] in by_src]
    ims = ([paste.originals[i] for i, _ in pairs] + [paste.stylized[i] for i, _ in pairs]
           + [gram.stylized[g] for _, g in pairs])
    n = len(pairs)
    top = predict(clf, ims + [degrade(im) for im in ims], [0] * (2 * len(ims)), progress=False)["before"].top1
    orig, pst, grm, orig_d, pst_d, grm_d = (top[k * n:(k + 1) * n] for k in range(6))
    rows = [[Path(paste.items[i]["source"]).name, names[orig[k]], names[pst[k]], names[pst_d[k]], names[grm[k]],
             names[grm_d[k]]] for k, (i, _) in enumerate(pairs)]
    err = {"paste": pst != orig, "gram": grm != orig}
    summary = {"n": n, "degraded_original_changed": int((orig_d != orig).sum())}
    for k, e in err.items():
        after = (pst_d if k == "paste" else grm_d)
        summary[k] = {"errors": int(e.sum()), "errors_surviving_degradation": int((e & (after != orig)).sum())}
    return rows, summary


def bus_group(source: str) -> str:
    return "augmented" if "#aug" in source else "source photo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 300 photos scanned, 6 augmentations, 200 for cost")
    ap.add_argument("--no-gram", action="store_true", help="skip the gram:skimage:gravel probe")
    args = ap.parse_args(argv)
    shared = C.require_shared("data/imagenet-samples", "models/deeplabv3_mnv2_pascal_quant.tflite")
    C.setup_torch()
    from rulewriter.models.data import subsample
    from rulewriter.models.registry import load_classifier
    from rulewriter.studies.report import save_figure
    from rulewriter.studies.segment import load_segmenter
    from rulewriter.studies.spurious import METHODS, mitigate, probe
    from rulewriter.core.stats import collect_second_moment
    from rulewriter.studies.stylize import stylizer_from

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    clf = load_classifier("efficientnet-lite0")
    layer = clf.default_layer
    names = list(clf.labels)
    paths, labels = C.imagenet_samples(shared, clf)
    scan = list(range(len(paths)))
    if args.quick:
        scan = subsample(scan, 300)
    n_aug = 6 if args.quick else AUGMENTATIONS

    log(f"[1/5] {SEGMENTER} on {len(scan)} imagenet-samples photos, then {STYLE} and probe")
    t0 = time.perf_counter()
    seg = C.cached_segmenter(load_segmenter(SEGMENTER, num_threads=1))
    res = probe(clf, [(paths[i], labels[i]) for i in scan], seg, stylizer_from(STYLE), progress=False)
    times["probe"] = time.perf_counter() - t0
    found = [(Path(it["source"]).name, names[it["label"]], round(100 * it["area"], 1),
              names[it["before"]["top1"]], names[it["after"]["top1"]]) for it in res.items]
    log(f"  {res.meta['n_probed']} photos with a bus ≥ 1/49 ({times['probe']:.0f} s): " +
        "; ".join(f"{f[1]} ({f[2]}%) {f[3]} → {f[4]}" for f in found))
    out_dir = C.CACHE_DIR / "quick" if args.quick else C.RESULTS_DIR
    fig = save_figure(out_dir / "bus_gravel_probe.png", res.figure(top=20))

    gram_rows: list[list[Any]] = []
    gram_meta: dict[str, Any] | None = None
    side_rows: list[list[Any]] = []
    side: dict[str, Any] | None = None
    if not args.no_gram:
        log(f"[2/5] {GRAM} (100 steps) on the same photos")
        t0 = time.perf_counter()
        gram = probe(clf, [(Path(it["source"]), it["label"]) for it in res.items], seg, stylizer_from(GRAM, clf),
                     progress=False)
        times["gram_probe"] = time.perf_counter() - t0
        gram_meta = gram.meta
        for it in gram.items:
            gram_rows.append([Path(it["source"]).name, names[it["label"]], names[it["before"]["top1"]],
                              names[it["after"]["top1"]], f"{it['before']['true_prob']:.2f} → {it['after']['true_prob']:.2f}"])
        log(f"  error {100 * gram.meta['error_before']:.0f}% → {100 * gram.meta['error_after']:.0f}% "
            f"({times['gram_probe']:.0f} s)")
        side_rows, side = paste_vs_gram(clf, res, gram)
        log(f"  paste vs gram: {side}")

    log("[3/5] statistics and the cost evaluator (1000 photos)")
    t0 = time.perf_counter()
    stats = collect_second_moment(clf, layer, paths, cache_dir=C.CACHE_DIR, progress=False)
    acc_paths, acc_labels = (C.imagenet_samples(shared, clf, 200) if args.quick else (paths, labels))
    photo_eval = C.TailEvaluator(clf, [layer], acc_paths, log=log)
    # The disjoint variant: C from even-indexed photos that are not bus photos, cost on the odd ones that are not.
    bus_sources = {str(Path(it["source"])) for it in res.items}
    stats_disjoint = collect_second_moment(clf, layer, [p for k, p in enumerate(paths)
                                                        if k % 2 == 0 and str(p) not in bus_sources],
                                           cache_dir=C.CACHE_DIR, progress=False)
    odd_clean = [k for k in range(1, len(acc_paths), 2) if str(acc_paths[k]) not in bus_sources]
    times["stats_and_cost_cache"] = time.perf_counter() - t0

    order = sorted(range(len(res.items)), key=lambda i: Path(res.items[i]["source"]).name)
    folds = {"A": ([i for k, i in enumerate(order) if k % 2 == 0], [i for k, i in enumerate(order) if k % 2 == 1])}
    folds["B"] = folds["A"][::-1]
    log(f"[4/5] mitigation, 2 folds by source photo, {n_aug} augmentations per photo")
    fold_out: dict[str, Any] = {}
    totals: dict[str, dict[str, dict[str, int]]] = {}
    results_any: dict[str, Any] = {}
    for fname, (tr, te) in folds.items():
        t0 = time.perf_counter()
        fs = fold_set(clf, res, tr, te, n_aug)
        pool = int(fs.meta["n_pool"])
        visible = sum(float(clf.preprocess.mask(fs.mask(i)).max()) > 0 for i in range(pool))
        if visible < 1 or not te:
            log(f"  fold {fname}: no exemplar candidate or no test photo; nothing to measure")
            fold_out[fname] = {"skipped": "no exemplar candidates" if te else "no test photos"}
            continue
        n_ex = min(EXEMPLARS, visible)
        mit = mitigate(clf, fs, n_ex, stats, methods=METHODS, progress=False)
        test = fs.subset(range(pool, len(fs)))
        cache = TailCache(clf, list(test.originals) + list(test.stylized), list(test.labels) * 2,
                          [C._tail_start(clf.model, layer)], None, desc=f"fold {fname}")
        sc = S.Scenario(clf, layer, res, fs, fs.subset(range(pool)), test, cache, acc_paths, acc_labels,
                        photo_eval, {}, {})
        rows = {"no edit": S.evaluate_change(sc, layer, None, group=bus_group)}
        for m, ch in mit.changes.items():
            rows[m] = S.evaluate_change(sc, layer, ch, group=bus_group)
            mit.overall[m] = rows[m]["top1"] / 100
        mit.overall["no edit"] = rows["no edit"]["top1"] / 100
        training = {m: {k: mit.meta["change_meta"][m].get(k) for k in ("lr", "steps_run", "fitted", "loss_first",
                                                                       "loss_last", "lr_tried")}
                    for m in ("finetune", "last-layer") if m in mit.changes}
        # The same baselines trained for all their steps at the chosen rate: is stopping early under-training?
        full = mitigate(clf, fs, n_ex, None, methods=list(training), finetune_lr=training["finetune"]["lr"],
                        retrain_lr=training["last-layer"]["lr"], stop_when_fitted=False, progress=False)
        for m, ch in full.changes.items():
            rows[f"{m}, all {ch.meta['steps']} steps"] = S.evaluate_change(sc, layer, ch, group=bus_group)
            training[f"{m}, all {ch.meta['steps']} steps"] = {k: ch.meta.get(k) for k in (
                "lr", "steps_run", "fitted", "loss_first", "loss_last")}
        dis = mitigate(clf, fs, n_ex, stats_disjoint, methods=["images", "features"], progress=False)
        rows["no edit, odd photos"] = S.evaluate_change(sc, layer, None, odd_clean, group=bus_group)
        for m, ch in dis.changes.items():
            rows[f"{m}, disjoint C"] = S.evaluate_change(sc, layer, ch, odd_clean, group=bus_group)
        for m, r in rows.items():
            for g, v in r["groups"].items():
                tot = totals.setdefault(m, {}).setdefault(g, {k: 0 for k in v})
                for k in v:
                    tot[k] += v[k]
            results_any.setdefault(m, []).append(r)
        fold_out[fname] = {"train_photos": [Path(res.items[i]["source"]).name for i in tr],
                           "test_photos": [Path(res.items[i]["source"]).name for i in te],
                           "exemplars": mit.meta["exemplars"], "n_exemplars": n_ex,
                           "train_augmentations": fs.meta["train_augmentations"], "candidates": pool,
                           "n_test": len(test), "results": rows, "mitigation": mit.to_dict(), "training": training,
                           "markdown": mit.to_markdown(), "seconds": time.perf_counter() - t0}
        log(f"  fold {fname}: {n_ex} exemplars from {pool} candidates; {len(test)} test images "
            f"({fold_out[fname]['seconds']:.0f} s)")
        for m, r in rows.items():
            log(f"    {m:<12} fixed {S.frac(r['groups']['all'])}, originals changed "
                f"{S.frac(r['groups']['all'], 'introduced', 'n')}, top-1 {r['top1']:.1f}%")

    log("[5/5] results")
    md = ["# Bus paint → gravel (thesis Section 2.3)\n",
          f"EfficientNet-Lite0, layer `{layer}` (package default). `{SEGMENTER}` on {len(scan)} imagenet-samples "
          f"photos: {res.meta['n_probed']} have a bus covering ≥ 1/49 of the centre crop. Stylizer `{STYLE}`; figure `{fig.name}`.\n",
          "## Probe (paste)\n",
          C.markdown_table(["photo", "class", "bus area %", "top-1 original", "top-1 gravel"], found), "",
          f"Error rate on these photos: {100 * res.meta['error_before']:.0f}% → {100 * res.meta['error_after']:.0f}%.\n"]
    if gram_meta is not None:
        md += ["## Probe (gram, 100 steps)\n",
               C.markdown_table(["photo", "class", "top-1 original", "top-1 gram gravel", "true-class prob"],
                                gram_rows), "",
               f"Error rate: {100 * gram_meta['error_before']:.0f}% → {100 * gram_meta['error_after']:.0f}%.\n",
               "## Paste vs Gram, side by side (is the Gram stylizer partly adversarial?)\n",
               "Top-1 per bus photo; *degraded* = 1-px Gaussian blur then JPEG quality 75. Gram gravel is optimised "
               "against this very classifier's features; an error that does not survive the degradation is "
               "likely carried by a fragile pixel pattern rather than by the look of gravel.\n",
               C.markdown_table(["photo", "original", "paste", "paste, degraded", "gram", "gram, degraded"],
                                side_rows), "",
               f"Errors (top-1 differs from the original's): paste {side['paste']['errors']}/{side['n']}, of which "
               f"{side['paste']['errors_surviving_degradation']} survive degradation; gram {side['gram']['errors']}/"
               f"{side['n']}, of which {side['gram']['errors_surviving_degradation']} survive. Degrading the "
               f"originals changes {side['degraded_original_changed']} of their top-1s.\n"]
    md += [f"## Mitigation, 2 folds by source photo ({n_aug} augmentations per photo)\n",
           "**Gravel error**: the gravel copy's top-1 differs from the unedited model's top-1 on the original. "
           "**Fixed**: the edited model's top-1 on the gravel copy equals it. **Originals changed**: test originals "
           "whose top-1 the change moves. Test = the other fold's augmentations and its un-augmented photos.\n"]
    for fname, fo in fold_out.items():
        if "skipped" in fo:
            md.append(f"Fold {fname}: skipped ({fo['skipped']}).\n")
            continue
        md.append(f"### Fold {fname}: exemplars from {', '.join(fo['train_photos'])}; test on "
                  f"{', '.join(fo['test_photos'])}\n")
        md.append(f"{fo['n_exemplars']} exemplars ({', '.join(Path(s).name for s in fo['exemplars'])}) from "
                  f"{fo['candidates']} of {fo['train_augmentations']} training augmentations that gravel changes.\n")
        head = [h.replace("snow", "gravel").replace("by source", "by kind") for h in S.ROW_HEAD[:-1]]
        md.append(C.markdown_table(head, [S.result_row(m, r)[:-1] for m, r in fo["results"].items()]))
        md.append("")
        md.append("Baselines' training (learning rate by the fair rule; cross-entropy on the exemplars):\n")
        md.append(C.markdown_table(["baseline", "lr", "steps", "fits exemplars", "CE before → after"],
                                   [[m, f"{t['lr']:g}", t["steps_run"], t["fitted"],
                                     f"{t['loss_first']:.3f} → {t['loss_last']:.3f}"]
                                    for m, t in fo["training"].items()]))
        md.append("")
    if totals:
        md.append("### Both folds together (held-out gravel errors)\n")
        trows = []
        for m, g in totals.items():
            cost = np.mean([r["cost"] for r in results_any[m]])
            trows.append([m, S.frac(g["all"]), "; ".join(f"{k}: {S.frac(v)}" for k, v in g.items() if k != "all"),
                          S.frac(g["all"], "introduced", "n"), f"{-cost + 0.0:+.1f}"])
        md.append(C.markdown_table(["method", "gravel errors fixed", "by kind", "originals changed",
                                    "Δ top-1 on photos (mean of folds)"], trows))
        md.append("")
    md.append(f"Small n: {res.meta['n_probed']} source photos in all; augmentations of one photo are strongly "
              "correlated, so read the fractions as a handful of independent cases.\n")
    for fname, fo in fold_out.items():
        if "markdown" in fo:
            md += [f"## Fold {fname} in the Table 2.3/2.4 layout (spurious.mitigate; labels: the photo's true class)\n",
                   fo["markdown"]]
    text = "\n".join(md)
    print(text)
    times["total"] = time.perf_counter() - t_start
    payload = {"quick": args.quick, "layer": layer, "segmenter": SEGMENTER, "stylizer": STYLE,
               "augmentations": n_aug, "probe": {"meta": res.meta, "found": found,
                                                 "classes": [c.to_dict() for c in res.classes]},
               "gram_probe": gram_meta, "gram_rows": gram_rows, "paste_vs_gram": {"rows": side_rows,
                                                                                   "summary": side},
               "disjoint": {"stats_count": stats_disjoint.count, "cost_photos": len(odd_clean)},
               "folds": {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in fold_out.items()},
               "totals": totals, "seconds": times}
    if not args.quick:
        C.write_results(NAME, payload, text)
    log(f"done in {times['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
