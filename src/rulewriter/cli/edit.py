"""``rulewriter edit`` and ``rulewriter heatmap``: write a rule into a layer; see where a concept matches."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.edit import DEFAULT_RIDGE
from ..core.generalise import DEFAULT_VIEWS
from ..errors import RulewriterError
from .common import (CHOSEN_LAYER_HELP, add_command, add_edit_args, add_exemplar_args, add_json_arg, add_model_args,
                     check_rule_args, edit_layers, emit, load_model, load_stats, load_stats_at,
                     resolve_layer)


def cmd_edit(args) -> None:
    from ..core.rules import rewrite, rewrite_choosing_layer, rule_from_features, rules_from_images
    from ..models.data import load_image

    out = check_rule_args(args)
    check_stage_args(args)
    save_dir = check_save_exemplars(args)
    earlier = after_edits(args, out)
    stats_data, stats_samples, calibration, note = calibration_images(args)  # checked before any work
    clf = load_model(args)
    for path, e in zip(args.after, earlier):
        e.check_model(clf, path)
    stage = model_stage(args, clf, calibration) if args.stage else None
    layers = [stage.layers[0]] if stage else edit_layers(args, clf, calibration)
    shown = None  # the exemplars as the model sees them: (name, image)
    pasted = None

    def rules_at(at: list[str]) -> dict:
        nonlocal shown, pasted
        if args.manipulated:
            shown = shown or [(str(p), load_image(p)) for p in args.manipulated]
            return rules_from_images(clf, at, args.original, args.manipulated, args.mask, view=args.view,
                                     views=args.views)
        if args.from_features:
            return {layer: rule_from_features(clf, layer, args.original, args.mask, texture(args.texture),
                                              view=args.view) for layer in at}
        rules, pasted = pasted_rules(clf, at, args, pasted)
        shown = [(str(p), im) for p, im in zip(args.original, pasted)]
        return rules

    # Every candidate layer's rule from one pass over the exemplars; a bad exemplar's error comes before
    # any statistics work.
    rules = rules_at(layers)
    if note:  # after the exemplars were read, so a bad exemplar's error is the first line
        print(f"rulewriter: {note}", file=sys.stderr)
    stats_by = {}

    def stats_at(layer: str):
        if layer not in stats_by:  # every layer's statistics from one pass over the statistics images
            stats_by.update(load_stats_at(args, clf, layers, stats_data, stats_samples))
        return stats_by[layer]

    kw = dict(rank=args.rank, ridge=args.ridge, context=args.context, solver=args.solver, fit=args.fit, on=earlier,
              calibration=calibration)
    if stage:
        from ..core.stage import rewrite_stage

        layers = list(stage.convs)  # every conv's statistics from one pass
        edit = rewrite_stage(clf, stage, rules[stage.layers[0]], [stats_at(c) for c in stage.convs],
                             calibration=calibration, ridge=args.ridge)
    elif len(layers) > 1:
        edit = rewrite_choosing_layer(clf, layers, rules.__getitem__, stats_at, **kw)
    else:
        edit = rewrite(clf, rules[layers[0]], stats_at(layers[0]), **kw)
    layer = edit.meta["layer"] if stage else edit.updates[0].layer
    stats = stats_by[edit.updates[0].layer]
    top3 = before_after(clf, edit, shown, earlier) if shown else []
    saved = save_pasted(save_dir, shown) if save_dir is not None and not args.manipulated and shown else []
    edit.save(out)
    st = edit.meta.get("strength", {})
    lc = edit.meta.get("layer_choice")
    info = {"out": str(out), "layer": layer, "view": args.view, "rank": sum(u.rank for u in edit.updates),
            "pairs": edit.meta["n_pairs"], "stats_keys": stats.count, "context": edit.meta["context"],
            "strength": st.get("chosen"), "why": st.get("reason"), "exemplars": top3,
            "saved_exemplars": [str(p) for p in saved], "after": list(args.after),
            "preserved_keys": edit.meta.get("preserved_keys", 0)}
    if lc is not None:
        info["layer_why"] = lc["reason"]
    kept = f", keeping {info['preserved_keys']} earlier rule keys" if args.after else ""
    lines = [f"wrote {out} (layer {layer}, rank {info['rank']}, {info['pairs']} key/value pairs{kept})"]
    if lc is not None:
        lines.append(f"chose: {lc['reason']}")
    lines.append(f"chose: context {info['context']}, rank {info['rank']}, strength {info['strength']:g} — "
                 f"{info['why']}")
    for e in top3:
        fmt = lambda t: ", ".join(f"{lab} {p:.2f}" for lab, p in t)  # noqa: E731
        lines.append(f"  {e['image']}\n    before: {fmt(e['before'])}\n    after:  {fmt(e['after'])}")
    lines += [f"saved {p}" for p in saved]
    emit(info, args.json, "\n".join(lines))


def check_stage_args(args) -> None:
    """``--stage`` is a validated edit of its own: it takes none of the options it could not honour."""
    if not args.stage:
        return
    clash = [opt for opt, on in (("--stats FILE (one layer's statistics; use --stats-data)", args.stats),
                                 ("--after", args.after), ("--from-features", args.from_features),
                                 ("--solver projected-gd", args.solver != "closed-form"),
                                 ("--rank", args.rank is not None), ("--context", args.context != "auto"),
                                 ("--fit mean", args.fit != "pairs"), ("--views 0", args.views <= 0),
                                 ("--view 1", args.view != 2)) if on]
    if clash:
        raise RulewriterError(f"--stage chooses its own fit by validation and cannot take {', '.join(clash)}")


def model_stage(args, clf, calibration):
    """The residual stage ``--stage`` spreads the rule over (:func:`rulewriter.core.stage.stage_before`)."""
    from ..core.stage import stage_before

    if calibration is None:
        raise RulewriterError("--stage is validated on calibration images: give --calibration-data DIR or a "
                              "--stats-data folder to set some aside")
    layer = resolve_layer(args, clf)
    stage = stage_before(clf.model, layer)
    if stage is None:
        raise RulewriterError(f"--stage needs a layer whose block reads a residual stage (an EfficientNet block's "
                              f"project conv, e.g. {clf.default_layer}); {layer!r} is not one")
    print(f"rulewriter: spreading the rule over {', '.join(stage.convs)}", file=sys.stderr)
    return stage


def calibration_images(args) -> tuple:
    """:func:`rulewriter.cli.common.calibration_images` for ``edit``; sets ``args.views`` to 0 where the
    strength cannot be validated (then the edit is the thesis's closed form; the note says why)."""
    from .common import calibration_images as split

    if args.views <= 0:
        return args.stats_data, args.stats_samples, None, None
    why = "--after, --from-features and --solver projected-gd edits are not validated" \
        if args.after or args.from_features or args.solver != "closed-form" else None
    data, samples, cal, note = split(args, why_not=why)
    if cal is None:
        args.views = 0
    return data, samples, cal, note


def after_edits(args, out: Path) -> list:
    """The ``--after`` edits, read before any work; ``--out`` may not replace one of them."""
    from ..core.edit import Edit
    from ..core.export import same_file

    for p in args.after:
        if same_file(out, p) or same_file(out, str(p) + ".json"):
            raise RulewriterError(f"--out {out} is one of the --after edits; write the new edit to a new file")
    return [Edit.load(p) for p in args.after]


def check_save_exemplars(args) -> Path | None:
    """--save-exemplars DIR: only with --texture, and DIR must be a folder (it is created if missing)."""
    d = getattr(args, "save_exemplars", None)
    if d is None:
        return None
    if not args.texture or args.manipulated or args.from_features:
        raise RulewriterError("--save-exemplars saves the pasted images, so it needs --texture (without "
                              "--manipulated or --from-features)")
    path = Path(d)
    if path.exists() and not path.is_dir():
        raise RulewriterError(f"--save-exemplars {d} exists and is not a folder")
    return path


def save_pasted(folder: Path, shown) -> list[Path]:
    """Write each pasted exemplar as ``<original stem>.pasted.png`` (atomic; never over an input file)."""
    import io

    from ..atomic import atomic_bytes

    out = []
    inputs = {Path(n).resolve() for n, _ in shown}
    for name, im in shown:
        dest = folder / f"{Path(name).stem}.pasted.png"
        if dest.resolve() in inputs:
            raise RulewriterError(f"refusing to overwrite the input {dest}")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(atomic_bytes(dest, buf.getvalue()))
    return out


def before_after(clf, edit, shown, earlier=()) -> list[dict]:
    """Top-3 (label, probability) of each exemplar before and after the edit (on top of ``earlier`` edits)."""
    import contextlib

    import torch

    x = clf.preprocess.batch([im for _, im in shown])
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for e in earlier:  # "before" is the model as the earlier edits left it
            stack.enter_context(e.applied(clf.model))
        before = clf.predict(x, topk=3)
        with edit.applied(clf.model):
            after = clf.predict(x, topk=3)
    return [{"image": n, "before": [[lab, round(p, 4)] for _, lab, p in b],
             "after": [[lab, round(p, 4)] for _, lab, p in a]} for (n, _), b, a in zip(shown, before, after)]


def texture(src: str):
    from ..concepts.manipulate import texture_from

    return texture_from(src)


def pasted_rules(clf, layers, args, pasted=None):
    """Paste the texture into each mask to make the manipulated images, then read each layer's rule from
    pixels (one pass for every layer).

    ``pasted``: the images an earlier call made (the paste does not depend on the layer). Returns the rules
    (``{layer: Rule}``) and the pasted images."""
    from ..concepts.masks import load_mask
    from ..models.data import load_image
    from ..concepts.manipulate import paste_texture
    from ..models.preprocess import mask_for_image
    from ..core.rules import rules_from_images

    originals = [load_image(p) for p in args.original]
    if pasted is not None:
        man = pasted
    else:
        tex = texture(args.texture)
        man = [paste_texture(im, mask_for_image(load_mask(m), im.size), tex) for im, m in zip(originals, args.mask)]
    rules = rules_from_images(clf, layers, originals, man, args.mask, view=args.view, views=getattr(args, "views", 0))
    for rule in rules.values():
        rule.description.update(originals=list(args.original), texture=args.texture, manipulated="texture pasted")
    return rules, man


def cmd_heatmap(args) -> None:
    """``rulewriter heatmap``: every image is read and every heatmap computed before anything is written, so a
    bad file leaves no output; all images share one colour scale, drawn in colorbar.png."""
    import torch

    from ..concepts.heatmap import colorbar, key_match, save_overlay, shared_scale
    from ..core.edit import regularize
    from ..core.memory import LayerMemory
    from ..core.rules import layer_io, rule_from_images
    from ..core.trace import get_module
    from ..models.data import load_image
    from ..studies.report import save_png

    if len(args.concept_image) != len(args.concept_mask) or not args.concept_image:
        raise RulewriterError("give one --concept-mask per --concept-image (at least one)")
    stems: dict[str, str] = {}
    for p in args.images:
        if stems.setdefault(Path(p).stem, p) != p:
            raise RulewriterError(f"{stems[Path(p).stem]} and {p} would both write {Path(p).stem}.heatmap.png")
    images = [load_image(p) for p in args.images]  # a bad file fails here, before any output
    clf = load_model(args)
    layer = resolve_layer(args, clf)
    # The concept key is the masked mean of the exemplars' own keys (a rule from an image to itself).
    rule = rule_from_images(clf, layer, args.concept_image, args.concept_image, args.concept_mask, view=args.view,
                            views=0)  # a concept key, not an edit: the exemplars alone
    k = rule.key().double()
    c = c_raw = None
    if args.stats or args.stats_data:
        # The same C + εI that `edit` solves with (--ridge): a few key channels of a real model are always zero.
        c_raw = load_stats(args, clf, layer, args.stats_data, args.stats_samples).moment()
        c = regularize(c_raw, args.ridge)
    mem = LayerMemory(get_module(clf.model, layer), args.view, name=layer)
    # In units of the concept's own response (k*ᵀk*, or k*ᵀ(C+εI)⁻¹k*): 1 is "as strongly as the exemplars".
    unit = float(k @ (k if c is None else torch.linalg.solve(c, k.to(c)).to(k)))
    heats = []
    for img in images:
        x, _ = layer_io(clf, layer, clf.preprocess.batch([img]))
        heats.append(key_match(mem.keys(x)[0].double(), k, c_raw, ridge=args.ridge).cpu() / unit)
    scaled, vmax = shared_scale(heats)
    out_dir = Path(args.out_dir)
    rows = []
    for p, img, heat, h in zip(args.images, images, heats, scaled):
        shown = clf.preprocess.denormalize(clf.preprocess.image(img))
        dest = save_overlay(out_dir / f"{Path(p).stem}.heatmap.png", shown, h, normalize="none")
        rows.append({"image": str(p), "heatmap": str(dest), "max": float(heat.max()), "mean": float(heat.mean())})
    bar = save_png(out_dir / "colorbar.png", colorbar(vmax, label="×k*"))
    for r in rows:
        r.update(scale_max=vmax, colorbar=str(bar))
    emit(rows, args.json, "\n".join(f"{r['heatmap']}  max={r['max']:.3g}" for r in rows)
         + f"\n{bar}  one colour scale for all: red = {vmax:.3g}×k*")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``edit``, ``heatmap``."""
    p = add_command(sub, "edit", "rewrite one rule and save the edit",
                    description="Read a rule k* → v* from exemplars (each photo, its concept's mask, and the photo "
                                "with the concept changed, or a texture pasted into the mask), then solve the "
                                "rank-r update W1 = W0 + Λ (C⁻¹k*)ᵀ with the statistics C of the layer's keys. "
                                "The model's weights file is never written; apply the edit with "
                                "`rulewriter predict --edit` or `rulewriter evaluate --edit`.",
                    example="rulewriter edit --original car.jpg --mask wheels.png --texture skimage:gravel "
                            "--stats-data photos/ --out gravel-wheel.safetensors")
    add_model_args(p)
    add_edit_args(p, CHOSEN_LAYER_HELP)
    add_exemplar_args(p)
    p.add_argument("--from-features", action="store_true", help="paste the texture's features at the layer, not pixels")
    p.add_argument("--stats-data", default=None, help="image folder for the key statistics")
    p.add_argument("--stats-samples", type=int, default=None, help="number of images for statistics (default: all)")
    p.add_argument("--rank", type=int, default=None,
                   help="update directions: with --context mean, one per rule (always); with svd/zca, the top N "
                        "directions of the masked keys (default 1)")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="C + εI with ε = ridge · tr(C)/d")
    p.add_argument("--context", default="auto", choices=["auto", "mean", "uniform", "svd", "zca"],
                   help="where the update directions come from: each rule's mean key k*, the same through "
                        "(C + λΣ)⁻¹ so that all the concept's keys move alike (uniform), or the top directions of "
                        "all masked keys (svd, or zca: whitened by C); auto: the mean key, the uniform one or "
                        "the top 4 SVD directions, chosen with the strength by validation on the exemplars")
    p.add_argument("--views", type=int, default=DEFAULT_VIEWS, metavar="N",
                   help="N joint augmented views per exemplar; the strength, rank and augmentation are chosen per "
                        "edit by leave-one-exemplar-out validation, under a locality budget on calibration images "
                        "(top-1 changes on at most 0.5%% of them, 5%% of their near ties, 1%% expected from their "
                        "margins); 0 is the thesis's closed "
                        "form. Without calibration images the edit is the closed form")
    p.add_argument("--calibration-data", default=None, metavar="DIR",
                   help="images the locality budget is measured on, none of them statistics images (default: a "
                        "tenth of --stats-data, at most 500, set aside; or the images --stats-samples leaves out)")
    p.add_argument("--save-exemplars", default=None, metavar="DIR",
                   help="with --texture: save the pasted exemplars there (<photo>.pasted.png), to see what the "
                        "rule was read from")
    p.add_argument("--fit", default="pairs", choices=["pairs", "mean"],
                   help="pairs: least squares over every masked key/value pair; mean: map each k* exactly to "
                        "its v* (needs --context mean)")
    p.add_argument("--solver", default="closed-form", choices=["closed-form", "projected-gd"],
                   help="closed-form solve, or projected gradient descent (eq. 2.20)")
    p.add_argument("--after", action="append", default=[],
                   help="an earlier edit this one is written on (repeat): the new update keeps every earlier rule's "
                        "key mapping to its value; apply them together (predict --edit A --edit B)")
    p.add_argument("--stage", action="store_true",
                   help="spread the rule over the residual stage that --layer (default: the model's default layer) "
                        "reads, then that layer, as MEMIT splits one change over layers; validated like one "
                        "layer's edit. Opt-in: on our scoreboard it restores more exemplars, but with five it fixes "
                        "fewer held-out photos than the default's layer choice (README, \"One rule over a "
                        "residual stage\")")
    p.add_argument("--out", required=True, help="where to write the edit (.safetensors, plus a .json beside it)")
    add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_edit, out_kind="file+json")
    p = add_command(sub, "heatmap", "overlay a concept's key-match heatmap on images",
                    description="The concept's key k* is the masked mean of its exemplars' keys; each image's "
                                "heat is kᵀk* per location (kᵀ(C+εI)⁻¹k* with statistics: where an edit would "
                                "act), in units of k*'s own response. Writes <stem>.heatmap.png per image into "
                                "--out-dir, all on one colour scale, and colorbar.png showing it.",
                    example="rulewriter heatmap --concept-image car.jpg --concept-mask wheels.png --out-dir heat/ "
                            "photo1.jpg photo2.jpg")
    add_model_args(p)
    add_edit_args(p)
    p.add_argument("--concept-image", action="append", default=[], help="image showing the concept (repeat)")
    p.add_argument("--concept-mask", action="append", default=[], help="mask of the concept in it (repeat)")
    p.add_argument("--stats-data", default=None, help="with statistics, the heat is kᵀC⁻¹k*: where an edit would act")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help="with statistics, C + εI with ε = ridge · tr(C)/d, as in edit")
    p.add_argument("--stats-samples", type=int, default=None, help="number of images for statistics (default: all)")
    p.add_argument("--out-dir", required=True, help="folder for the heatmap PNGs")
    add_json_arg(p, "per-image heatmap file, peak and mean (in units of k*'s own response), the shared scale and "
                    "the colour bar")
    p.add_argument("images", nargs="+", help="the photos to overlay the heatmap on")
    p.set_defaults(func=cmd_heatmap)
