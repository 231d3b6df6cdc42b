"""Many rules in one layer: summed edits against sequential edits that preserve earlier rules, and one batch.

Rules (≥ 50, distinct photos): a texture (gravel, brick, grass, snow) pasted into a centred ellipse of
imagenet-samples photos of many classes, and onto the wheels of car-parts photos (their COCO wheel masks).
Each rule's exemplar is the manipulated photo; the rule asks the layer to give it the original photo's
values, so it "holds" on its exemplar when the edited model predicts the unedited model's class of the
original photo. Each rule's held-out variant is the mirrored photo with a *different* patch of the texture
pasted into the mirrored mask; it holds when the edited model predicts the unedited class of the mirrored
original. A candidate becomes a rule when the texture changes the unedited model's top-1 of the photo (so
there is something to restore) and the edit written alone restores it (selection on the exemplar only,
never on the variant or the evaluation photos).

Methods, all at the default layer with ``rewrite``'s defaults:
(a) summed: each rule solved alone, the edits summed (``Edit + Edit``, what ``predict --edit A --edit B`` did);
(b) sequential: ``rewrite(clf, rule, stats, on=edits_so_far)``: each keeps the earlier rules' keys;
(c) batch: all rules so far in one ``rewrite(clf, rules, stats)`` (rank = number of rules).

After every 10 rules: the fraction of rules so far holding on their exemplar and on their variant, Δ top-1
on the evaluation half of imagenet-samples (the odd photos; C comes from the even half, disjoint), locality
on the evaluation photos whose unedited top-2 probabilities are within 0.05 (fraction whose top-1 does not
change), and the time per edit (the solve; reading a rule from its photos is timed apart). The load average
of the shared machine is reported next to the timings. A second part times batch solves of 50 to 300 rules
(photo × texture combinations) and their peak memory.

Run: ``python benchmarks/sequential.py [--quick]``; writes ``results/sequential.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "sequential"
TEXTURES = ("skimage:gravel", "skimage:brick", "skimage:grass", "snow")
NEAR_TIE = 0.05
CHECK_EVERY = 10


def texture_variants(shared: Path) -> dict[str, tuple[Image.Image, Image.Image]]:
    """Each texture as two disjoint patches (left and right halves): one for the exemplar, one for the variant."""
    from rulewriter.concepts.manipulate import texture_from

    out = {}
    for name in TEXTURES:
        src = str(shared / "data" / "textures" / "snow_texture.jpg") if name == "snow" else name
        full = texture_from(src)
        w, h = full.size
        out[name] = (texture_from(full, crop_box=(0, 0, w // 2, h)), texture_from(full, crop_box=(w // 2, 0, w, h)))
    return out


def centre_mask(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return C.ellipse_mask(size, (w // 5, h // 5, w - w // 5, h - h // 5))


def candidates(shared: Path, clf: Any, stats_paths: list[Path], n_objects: int, n_cars: int):
    """(name, photo, mask, texture) of distinct photos: objects of many classes, then cars with their wheels."""
    from rulewriter.models.data import load_image

    step = max(1, len(stats_paths) // n_objects)
    out = []
    for i, p in enumerate(stats_paths[::step][:n_objects]):
        img = load_image(p)
        out.append((p.stem, img, centre_mask(img.size), TEXTURES[i % len(TEXTURES)]))
    cars, index = C.car_photos(shared, "trainingset")
    for i, p in enumerate(cars[:n_cars * 2]):
        m = index.mask(p.name, "wheel", allow_empty=True)
        if float(m.sum()) < 0.01 * m.size:
            continue
        out.append((f"car {p.stem}", load_image(p), m, TEXTURES[i % len(TEXTURES)]))
        if sum(1 for c in out if c[0].startswith("car")) >= n_cars:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 rules, 200 photos")
    ap.add_argument("--rules", type=int, default=None, help="rules to write (full 50, quick 20)")
    args = ap.parse_args(argv)
    shared = C.require_shared("data/imagenet-samples", "data/car-parts", "data/textures")
    if importlib.util.find_spec("skimage") is None:
        print("SKIPPED: scikit-image is needed for the textures (pip install 'rulewriter[demo]').")
        return 0
    C.setup_torch()
    from rulewriter.concepts.manipulate import paste_texture
    from rulewriter.core.rules import rewrite, rule_from_images
    from rulewriter.core.stats import collect_second_moment
    from rulewriter.models.registry import load_classifier

    n_rules = args.rules or (20 if args.quick else 50)
    clf = load_classifier("efficientnet-lite0")
    layer = clf.default_layer
    paths, labels = C.imagenet_samples(shared, clf)
    stats_paths, eval_paths = paths[0::2], paths[1::2]
    eval_labels = torch.tensor(labels[1::2])
    if args.quick:
        stats_paths, eval_paths, eval_labels = stats_paths[:200], eval_paths[:200], eval_labels[:200]
    t0 = time.perf_counter()
    stats = collect_second_moment(clf, layer, stats_paths, cache_dir=C.CACHE_DIR, progress=False)
    stats_s = time.perf_counter() - t0
    print(f"C of {layer} from {len(stats_paths)} photos in {stats_s:.1f}s")

    # ---- rules and their exemplar/variant images (written as PNG so one TailEvaluator covers them all)
    tex = texture_variants(shared)
    work = C.CACHE_DIR / "sequential"
    work.mkdir(parents=True, exist_ok=True)
    pool = candidates(shared, clf, stats_paths, n_objects=3 * n_rules, n_cars=max(6, n_rules // 5))
    # Cars first among equals: interleave them so that car-parts rules are among the first rules written.
    cars = [c for c in pool if c[0].startswith("car")]
    objs = [c for c in pool if not c[0].startswith("car")]
    step = max(1, len(objs) // max(1, len(cars)))
    order = []
    for j in range(max(len(objs), len(cars) * step)):
        if j % step == 0 and j // step < len(cars):
            order.append(cars[j // step])
        if j < len(objs):
            order.append(objs[j])
    rules, cases, alone, read_s, tried, flipped = [], [], [], [], [], 0
    for name, img, mask, tname in order:
        if len(rules) == n_rules:
            break
        tried.append((name, img, mask, tname))
        man = paste_texture(img, mask, tex[tname][0])
        flip, fmask = ImageOps.mirror(img), np.ascontiguousarray(mask[:, ::-1])
        var = paste_texture(flip, fmask, tex[tname][1])
        x = clf.preprocess.batch([img, man, flip, var])
        with torch.no_grad():
            top = clf.model(x).argmax(1).tolist()
        if top[1] == top[0]:
            continue  # the texture changes nothing: no rule to write
        flipped += 1
        t = time.perf_counter()
        rule = rule_from_images(clf, layer, [img], [man], [mask])
        read_s.append(time.perf_counter() - t)
        rule.description.update(name=name, texture=tname)
        # Selection on the exemplar only: the edit written alone must restore it.
        e = rewrite(clf, rule, stats)
        with e.applied(clf.model), torch.no_grad():
            if int(clf.model(x[1:2]).argmax(1)) != top[0]:
                continue
        tag = f"{len(cases):03d}"
        man.save(work / f"{tag}_exemplar.png")
        var.save(work / f"{tag}_variant.png")
        rules.append(rule)
        alone.append(e)
        cases.append({"name": name, "texture": tname, "target": top[0], "target_variant": top[2],
                      "unedited_exemplar": top[1], "unedited_variant": top[3]})
    print(f"{len(rules)} rules from {len(tried)} photos tried: the texture flips the class of {flipped}, "
          f"and the edit alone restores {len(rules)} of those")
    if len(rules) < n_rules:
        print(f"only {len(rules)} usable rules; continuing with them")
    chosen = list(range(len(rules)))
    ex_paths = [work / f"{i:03d}_exemplar.png" for i in range(len(cases))]
    var_paths = [work / f"{i:03d}_variant.png" for i in range(len(cases))]
    ev = C.TailEvaluator(clf, [layer], list(eval_paths) + ex_paths + var_paths)
    n_eval = len(eval_paths)
    idx_eval = torch.arange(n_eval)
    base_eval = ev.base_predictions(idx_eval)
    base_acc = C.top1_accuracy(base_eval, eval_labels)
    probs = ev.base_logits[:n_eval].softmax(1).topk(2, dim=1).values
    near = torch.nonzero(probs[:, 0] - probs[:, 1] < NEAR_TIE).flatten()

    def holding(ids: list[int]) -> tuple[list[bool], list[bool]]:
        ex = ev.predictions(layer, torch.tensor([n_eval + i for i in ids])).tolist()
        va = ev.predictions(layer, torch.tensor([n_eval + len(cases) + i for i in ids])).tolist()
        return ([p == cases[i]["target"] for p, i in zip(ex, ids)],
                [p == cases[i]["target_variant"] for p, i in zip(va, ids)])

    def measure(edit_sum, ids: list[int]) -> dict[str, float]:
        with edit_sum.applied(clf.model):
            ex, va = holding(ids)
            pred = ev.predictions(layer, idx_eval)
        return {"rules": len(ids), "exemplar_holding": float(np.mean(ex)), "variant_holding": float(np.mean(va)),
                "delta_top1": C.top1_accuracy(pred, eval_labels) - base_acc,
                "near_tie_locality": float((pred[near] == base_eval[near]).double().mean()) if len(near) else float("nan")}

    methods: dict[str, list[dict[str, Any]]] = {"summed": [], "sequential": [], "batch": []}
    seq: list = []
    seq_s: list[float] = []
    alone_s: list[float] = []
    for n, i in enumerate(chosen, 1):
        t = time.perf_counter()
        rewrite(clf, rules[i], stats)  # the same solve the summed baseline uses, timed here
        alone_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        seq.append(rewrite(clf, rules[i], stats, on=seq))
        seq_s.append(time.perf_counter() - t)
        if n % CHECK_EVERY and n != len(chosen):
            continue
        ids = chosen[:n]
        load = os.getloadavg()[0]
        summed = alone[ids[0]].compose(*[alone[j] for j in ids[1:]])
        row = measure(summed, ids)
        methods["summed"].append({**row, "seconds_per_edit": float(np.mean(alone_s[-CHECK_EVERY:])), "load": load})
        row = measure(seq[0].compose(*seq[1:]), ids)
        methods["sequential"].append({**row, "seconds_per_edit": float(np.mean(seq_s[-CHECK_EVERY:])),
                                      "max_seconds_per_edit": float(max(seq_s[-CHECK_EVERY:])), "load": load})
        t = time.perf_counter()
        batch = rewrite(clf, [rules[j] for j in ids], stats)
        bs = time.perf_counter() - t
        row = measure(batch, ids)
        methods["batch"].append({**row, "seconds_per_edit": bs / n, "seconds_total": bs, "load": load})
        print(f"{n} rules: " + "; ".join(f"{m} ex {v[-1]['exemplar_holding']:.2f} var {v[-1]['variant_holding']:.2f} "
                                         f"Δtop1 {v[-1]['delta_top1']:+.1f} loc {v[-1]['near_tie_locality']:.2f}"
                                         for m, v in methods.items()) + f" (load {load:.1f})")

    # ---- batch scale: rank 50 … 400 from photo × texture combinations
    scale = []
    sizes = [s for s in ((25, 50) if args.quick else (50, 100, 200, 300))]
    combos = [(p, t) for t in TEXTURES for p in tried]
    big = []
    for (_, img, mask, _), tname in combos[: sizes[-1]]:
        man = paste_texture(img, mask, tex[tname][0])
        big.append(rule_from_images(clf, layer, [img], [man], [mask]))
    for s in sizes:
        rs = big[:s]
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        e = rewrite(clf, rs, stats)
        secs = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pairs = int(sum(r.keys.shape[0] for r in rs))
        d, f = e.updates[0].direction.shape[0], e.updates[0].lam.shape[0]
        # The solve's own arrays in float64: C (d²), D (d·r), the pairs' keys and values (n·(d+f)), A (r·n).
        arrays = 8 * (d * d + d * s + pairs * (d + f) + s * pairs)
        scale.append({"rules": s, "pairs": pairs, "seconds": secs, "peak_rss_growth_mb": (rss1 - rss0) / 1024,
                      "solve_arrays_mb": arrays / 2**20, "load": os.getloadavg()[0]})
        print(f"batch of {s} rules ({pairs} pairs): {secs:.2f}s, arrays {arrays / 2**20:.0f} MB")

    payload = {"layer": layer, "stats_photos": len(stats_paths), "eval_photos": n_eval, "near_tie_photos": int(len(near)),
               "base_top1": base_acc, "photos_tried": len(tried), "texture_flips": flipped, "rules_used": len(chosen),
               "rule_read_seconds": float(np.median(read_s)) if read_s else None, "tail": ev.method(layer),
               "methods": methods, "batch_scale": scale, "rules": [cases[i] for i in chosen],
               "sequential_seconds": seq_s}
    rows = []
    for m, vals in methods.items():
        for v in vals:
            rows.append([m, v["rules"], f"{100 * v['exemplar_holding']:.0f}%", f"{100 * v['variant_holding']:.0f}%",
                         f"{v['delta_top1']:+.1f}", f"{100 * v['near_tie_locality']:.0f}%",
                         f"{v['seconds_per_edit']:.3f}", f"{v['load']:.1f}"])
    md = [f"# Many rules in one layer ({layer})", "",
          f"{len(chosen)} rules from {len(tried)} photos tried ({flipped} where the texture flips the class; a rule "
          f"is used when its edit alone restores its exemplar). Δ top-1 on {n_eval} imagenet-samples photos (unedited "
          f"{base_acc:.1f}%), C from the other {len(stats_paths)}; locality on the {len(near)} near-tie photos "
          f"(top-2 within {NEAR_TIE}).", "",
          C.markdown_table(["method", "rules", "exemplars holding", "variants holding", "Δ top-1 (points)",
                            "near-tie locality", "s per edit", "load avg"], rows), "",
          "Batch solve at scale:", "",
          C.markdown_table(["rules (rank)", "pairs", "seconds", "solve arrays (MB)", "peak RSS growth (MB)", "load avg"],
                           [[s["rules"], s["pairs"], f"{s['seconds']:.2f}", f"{s['solve_arrays_mb']:.0f}",
                             f"{s['peak_rss_growth_mb']:.0f}", f"{s['load']:.1f}"] for s in scale])]
    C.write_results(NAME, payload, "\n".join(md))
    plot(methods)
    print("\n".join(md))
    return 0


def plot(methods: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("exemplar_holding", "variant_holding"), ("exemplars", "held-out variants")):
        for m, vals in methods.items():
            ax.plot([v["rules"] for v in vals], [100 * v[key] for v in vals], marker="o", label=m)
        ax.set_xlabel("rules written")
        ax.set_title(f"rules holding on their {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of rules so far")
    axes[0].legend()
    fig.tight_layout()
    out = C.RESULTS_DIR / f"{NAME}.png"
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)


if __name__ == "__main__":
    raise SystemExit(main())
