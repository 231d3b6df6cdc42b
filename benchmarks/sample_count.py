"""How many images does ``C`` need? (issue 8) The snow → road edit with ``C`` from 100 to 5000 images.

The experiment, step by step (EfficientNet-Lite0, default layer, CPU):

1. **Scenario**: the snow benchmark's (``benchmarks/snow.py``, imported: same photos, ground masks, snow,
   exemplars and held-out test images; its probe is cached under ``benchmarks/.cache``). One edit
   throughout: rewriting with images from the same 5 exemplars (``rule_from_images`` + ``rewrite`` with
   the package defaults); only ``C`` changes.
2. **C from**: (a) 100 imagenet-samples photos (``rulewriter.models.data.subsample``, seed 0), (b) those 100 plus
   900 deterministic augmentations of them (:class:`rulewriter.studies.demo.AugmentedPhotos`: random resized crop,
   flip, colour jitter) = 1000 images from 100 photos, (c) all 1000 photos, (d) the 1000 photos plus 4000
   augmentations of them = 5000, and (e) the 500 even-indexed photos (for the disjoint check).
   ``C`` is the second moment of the layer's keys (49 locations per image), cached by content.
3. **Measured** for each: held-out snow errors fixed (as in snow.py), held-out originals whose top-1 the
   edit changes, top-1 on the 1000 photos, and ``‖ΔW − ΔW₅₀₀₀‖ / ‖ΔW₅₀₀₀‖``, the relative difference of
   the weight change to the 5000-image edit's.
4. **Overlap caveat**: (a)–(d) build ``C`` from the same photos whose top-1 measures the cost. The honest
   variant uses ``C`` from the 500 even-indexed photos, (a') 100 of the even ones, and measures top-1 on
   the 500 odd-indexed photos only.

Run: ``python benchmarks/sample_count.py [--quick]``. Writes ``benchmarks/results/sample_count.{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import snow as S  # noqa: E402

NAME = "sample_count"
log = S.log


def delta_w(edit: Any) -> torch.Tensor:
    """The edit's weight change, all its layer updates stacked (one update for a default rewrite)."""
    return torch.cat([u.delta().flatten() for u in edit.updates])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: the snow scenario's quick mode, 200 photos")
    args = ap.parse_args(argv)
    shared = C.require_shared("data/imagenet-samples", "data/car-parts", S.ADE_DIR, S.SNOW)
    C.setup_torch()
    from rulewriter.models.data import load_image, subsample
    from rulewriter.studies.demo import AugmentedPhotos
    from rulewriter.core.rules import rewrite, rule_from_images
    from rulewriter.core.stats import SecondMoment, collect_second_moment

    t_start = time.perf_counter()
    log("[1/3] the snow scenario (probe cached by snow.py)")
    sc = S.build_scenario(shared, quick=args.quick)
    clf, layer = sc.clf, sc.layer
    o, s, m = sc.rule_inputs(S.DEFAULT_EXEMPLARS)
    rule = rule_from_images(clf, layer, o, s, m)
    photos = sc.photos
    idx_all = list(range(len(photos)))
    even, odd = idx_all[0::2], idx_all[1::2]
    n_small = 20 if args.quick else 100
    small = subsample(idx_all, n_small)
    small_even = subsample(even, n_small)
    t_scenario = time.perf_counter() - t_start

    log("[2/3] second moments (cached by content)")
    t0 = time.perf_counter()

    def moment(data: Any) -> Any:
        return collect_second_moment(clf, layer, data, cache_dir=C.CACHE_DIR, progress=False)

    def merged(*parts: Any) -> Any:
        out = SecondMoment()
        for p in parts:  # merge() adds in place; start from an empty one to keep the cached objects intact
            out.merge(p)
        return out

    def augmented(idx: list[int], n: int) -> Any:
        imgs = {photos[i].name: load_image(photos[i]) for i in idx}
        return AugmentedPhotos(imgs, clf.preprocess, n=n, seed=0)

    n_all = len(photos)
    stats: dict[str, tuple[Any, str]] = {}
    stats[f"{n_small} photos"] = (moment([photos[i] for i in small]), "all")
    stats[f"{n_small} photos + {9 * n_small} augmentations of them"] = (
        merged(stats[f"{n_small} photos"][0], moment(augmented(small, 9 * n_small))), "all")
    full = moment(photos)
    stats[f"{n_all} photos"] = (full, "all")
    stats[f"{n_all} photos + {4 * n_all} augmentations of them"] = (merged(full, moment(augmented(idx_all, 4 * n_all))),
                                                                     "all")
    stats[f"{n_small} even-indexed photos (disjoint)"] = (moment([photos[i] for i in small_even]), "odd")
    stats[f"{len(even)} even-indexed photos (disjoint)"] = (moment([photos[i] for i in even]), "odd")
    t_stats = time.perf_counter() - t0
    ref_name = f"{n_all} photos + {4 * n_all} augmentations of them"

    log("[3/3] one rewrite per C, evaluated on the held-out snow images and the photos")
    t0 = time.perf_counter()
    edits = {k: rewrite(clf, rule, st) for k, (st, _) in stats.items()}
    ref = delta_w(edits[ref_name])
    results: dict[str, dict[str, Any]] = {}
    base = {"all": S.evaluate_change(sc, layer, None), "odd": S.evaluate_change(sc, layer, None, odd)}
    for k, edit in edits.items():
        where = stats[k][1]
        r = S.evaluate_change(sc, layer, edit, odd if where == "odd" else None)
        r["keys_in_C"] = int(stats[k][0].count)
        r["rel_dw_to_5000"] = float((delta_w(edit) - ref).norm() / ref.norm())
        r["dw_norm"] = float(delta_w(edit).norm())
        r["accuracy_on"] = "1000 photos (overlap with C)" if where == "all" else "500 odd-indexed photos (disjoint)"
        results[k] = r
        log(f"  {k:<45} fixed {S.frac(r['groups']['all'])}, top-1 {r['top1']:.1f}% ({r['top1'] - r['top1_base']:+.1f}), "
            f"|ΔW−ΔW5000|/|ΔW5000| {r['rel_dw_to_5000']:.3f}")
    t_eval = time.perf_counter() - t0

    head = ["C from", "keys in C", "snow errors fixed (held-out)", "originals changed",
            "top-1 on", "top-1", "Δ top-1 (points)", "‖ΔW − ΔW₅₀₀₀‖ / ‖ΔW₅₀₀₀‖"]
    rows = []
    for k, r in results.items():
        a = r["groups"]["all"]
        rows.append([k, r["keys_in_C"], S.frac(a), S.frac(a, "introduced", "n"), r["accuracy_on"],
                     f"{r['top1']:.1f}%", f"{r['top1'] - r['top1_base'] + 0.0:+.1f}", f"{r['rel_dw_to_5000']:.3f}"])
    nb = base["all"]["groups"]["all"]
    md = ["# How many images behind C? (issue 8)\n",
          f"The snow → road rewrite (benchmarks/snow.py: rewriting with images, {S.DEFAULT_EXEMPLARS} car-parts "
          f"training exemplars, layer `{layer}`, package defaults), with `C` from different image sets. "
          f"Held-out: {len(sc.test)} images with {nb['errors']} snow errors. Unedited top-1: "
          f"{base['all']['top1']:.1f}% on the {n_all} photos, {base['odd']['top1']:.1f}% on the odd half.\n",
          C.markdown_table(head, rows), "",
          "The first four rows build `C` from the photos whose top-1 measures the cost (overlap); the last two "
          "use even-indexed photos only and measure top-1 on the odd-indexed ones. Augmentations: "
          "`rulewriter.studies.demo.AugmentedPhotos` (seed 0).\n"]
    text = "\n".join(md)
    print(text)
    seconds = {"scenario": t_scenario, "stats": t_stats, "evaluate": t_eval, "total": time.perf_counter() - t_start}
    payload = {"quick": args.quick, "layer": layer, "exemplars": list(sc.exemplars.sources[:S.DEFAULT_EXEMPLARS]),
               "n_test": len(sc.test), "base": base, "results": results, "reference": ref_name, "seconds": seconds}
    if not args.quick:
        C.write_results(NAME, payload, text)
    log(f"done in {seconds['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
