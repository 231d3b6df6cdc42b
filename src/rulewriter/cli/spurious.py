"""`rulewriter` commands of studies/spurious.py."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..errors import ImageLoadError, RulewriterError
from ..studies.finetune import LEARNING_RATES
from ..studies.report import percent
from ..studies.spurious import DEFAULT_MIN_AREA, METHODS, FilteredSet, mitigate, probe
from .common import CHOSEN_LAYER_HELP, add_command, add_edit_args, add_json_arg, add_model_args


# ------------------------------------------------------------------------------------------ command line
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``rulewriter probe`` and ``rulewriter mitigate``."""
    p = add_command(sub, "probe", "stylize a concept in labelled photos and rank the classes it hurts",
                    description="Segment a concept, repaint it with a texture, and measure per class how the "
                                "model's errors change (thesis Fig. 2-12). Writes probe.json, probe.png, "
                                "index.html and the filtered set (filtered/) of the most affected classes.",
                    example="rulewriter probe --data ~/imagenet/val --segmenter deeplab:car "
                            "--stylize paste:skimage:gravel --samples 2000 --out probe-car-gravel")
    add_model_args(p)
    p.add_argument("--data", required=True, help="labelled image folder (wnid/class subfolders or nXXXXXXXX_*.jpg)")
    p.add_argument("--segmenter", required=True, help="deeplab:CLASS, coco:ANN.json:CATEGORY or masks:DIR")
    p.add_argument("--stylize", required=True, help="paste:TEXTURE or gram:TEXTURE (a path or skimage:NAME)")
    p.add_argument("--samples", type=int, default=None, help="probe a deterministic sample of N images")
    p.add_argument("--top", type=int, default=5, help="keep the K most affected classes in the filtered set")
    p.add_argument("--threshold", type=float, default=None,
                   help="instead of --top: keep every class whose error rate rose by at least this fraction")
    p.add_argument("--min-area", type=float, default=DEFAULT_MIN_AREA,
                   help="smallest share of an image the concept must cover (1/49: one cell of a 7×7 grid)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps of a gram: stylizer")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_arg(p, "the summary")
    p.set_defaults(func=cmd_probe, out_kind="folder")

    p = add_command(sub, "mitigate", "compare rewriting, fine-tuning and last-layer retraining on a probe's "
                                     "filtered set (Tables 2.3-2.4)",
                    description="Split the probe's filtered set into a few training exemplars and the rest, fix "
                                "the model with each method on the exemplars, and measure the errors on the rest "
                                "(and overall accuracy on --accuracy-data). Writes a JSON, Markdown and HTML report.",
                    example="rulewriter mitigate --probe probe-car-gravel --stats-data ~/imagenet/val "
                            "--stats-samples 5000 --out mitigate-car-gravel")
    add_model_args(p)
    add_edit_args(p, CHOSEN_LAYER_HELP)
    p.add_argument("--probe", required=True, help="a probe output folder (or its filtered/ folder)")
    p.add_argument("--exemplars", type=int, default=5, help="training images taken from the filtered set")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--texture", default=None, help="texture for rewriting with features (default: the probe's)")
    p.add_argument("--target", default=None, help="target class (default: the most affected class)")
    p.add_argument("--stats-data", default=None, help="image folder for the key statistics")
    p.add_argument("--stats-samples", type=int, default=None, help="number of images for statistics (default: all)")
    p.add_argument("--calibration-data", default=None, metavar="DIR",
                   help="images (not statistics images, not the probe's) on which the images rewrite's locality "
                        "budget is measured; default: a tenth of --stats-data set aside (at least 50). Without "
                        "calibration images the images rewrite is the closed form")
    p.add_argument("--accuracy-data", default=None, help="labelled folder for overall top-1 accuracy")
    p.add_argument("--accuracy-samples", type=int, default=None,
                   help="a deterministic sample of N --accuracy-data images (default: all)")
    p.add_argument("--finetune-steps", type=int, default=100, help="most SGD steps of the two baselines")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="SGD learning rate of fine-tuning the layer (default: the smallest of "
                        f"{', '.join(f'{v:g}' for v in LEARNING_RATES)} that fits the exemplars)")
    p.add_argument("--retrain-lr", type=float, default=None,
                   help="SGD learning rate of retraining the last layer (default: the smallest of "
                        f"{', '.join(f'{v:g}' for v in LEARNING_RATES)} that fits the exemplars)")
    p.add_argument("--train-to-convergence", action="store_true",
                   help="train the baselines for all --finetune-steps instead of stopping once the exemplars are right")
    p.add_argument("--seed", type=int, default=0, help="for the train/test split")
    p.add_argument("--out", required=True, help="output folder")
    add_json_arg(p, "the summary")
    p.set_defaults(func=cmd_mitigate, out_kind="folder")


def _check_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RulewriterError(f"--out {out} exists and is not a folder")
    return out


def cmd_probe(args: argparse.Namespace) -> None:
    """``rulewriter probe``: every input is checked before any file is written."""
    from .common import emit, load_model
    from ..studies.testsets import TestSet
    from ..studies.stylize import stylizer_from

    out = _check_out(args.out)
    if not Path(args.data).is_dir():
        raise ImageLoadError(f"--data {args.data}: no such folder")
    if args.samples is not None and args.samples < 1:
        raise RulewriterError(f"--samples must be at least 1, got {args.samples}")
    if args.top < 1 or args.batch_size < 1:
        raise RulewriterError("--top and --batch-size must be at least 1")
    if not 0 <= args.min_area < 1:
        raise RulewriterError(f"--min-area must be in [0, 1), got {args.min_area}")
    try:
        from ..studies.segment import load_segmenter
    except ModuleNotFoundError as e:
        raise RulewriterError(f"segmenters need rulewriter.studies.segment, which is not available ({e})") from e
    clf = load_model(args)
    kw = {"steps": args.steps, "progress": False} if args.stylize.lower().startswith("gram:") and args.steps else {}
    stylizer = stylizer_from(args.stylize, clf, **kw)
    segmenter = load_segmenter(args.segmenter)
    testset = TestSet.from_folder(clf, args.data, samples=args.samples)
    res = probe(clf, testset, segmenter, stylizer, min_area=args.min_area, batch_size=args.batch_size,
                progress=not args.quiet)
    filtered = None
    if res.affected(args.top if args.threshold is None else None, args.threshold):
        filtered = res.filtered_set(args.top if args.threshold is None else None, args.threshold)
    paths = res.save(out)
    if filtered is not None:
        paths["filtered"] = filtered.save(out / "filtered")
    summary = {k: res.meta[k] for k in ("model", "segmenter", "stylizer", "n_images", "n_probed", "error_before",
                                         "error_after", "flipped")}
    summary["classes"] = [{"class": r.name, "index": r.label, "n": r.n, "error_before": r.error_before,
                           "error_after": r.error_after, "error_change": r.error_change,
                           "top1_prob_change": r.top1_prob_change} for r in res.classes[:args.top]]
    summary["filtered"] = None if filtered is None else {"n": len(filtered), "classes": filtered.classes,
                                                         "path": str(paths["filtered"].parent)}
    summary.update(out=str(paths["json"]), report=str(paths["html"]))
    print(f"rulewriter: report written to {paths['html']}", file=sys.stderr)
    text = [f"{res.meta['n_probed']} of {res.meta['n_images']} images have the concept; error rate "
            f"{percent(res.meta['error_before'])} → {percent(res.meta['error_after'])} after {res.meta['stylizer']}"]
    text += [f"  {r.name:<28} n={r.n:<4} error {percent(r.error_before)} → {percent(r.error_after)}"
             for r in res.classes[:args.top]]
    text.append("no class got worse: no filtered set written" if filtered is None
                else f"filtered set: {len(filtered)} images of {len(filtered.classes)} classes in {out / 'filtered'}")
    emit(summary, args.json, "\n".join(text))


def cmd_mitigate(args: argparse.Namespace) -> None:
    """``rulewriter mitigate``: every input is checked before any file is written."""
    from .common import calibration_images, edit_layers, emit, resolve_layer, load_model, load_stats_at
    from ..studies.testsets import TestSet

    out = _check_out(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise RulewriterError(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(METHODS)}")
    if args.exemplars < 1:
        raise RulewriterError(f"--exemplars must be at least 1, got {args.exemplars}")
    for opt, v in (("--finetune-lr", args.finetune_lr), ("--retrain-lr", args.retrain_lr)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise RulewriterError(f"{opt} must be a positive number, got {v}")
    if args.finetune_steps < 1:
        raise RulewriterError(f"--finetune-steps must be at least 1, got {args.finetune_steps}")
    needs_stats = any(m in ("features", "images") for m in methods)
    if needs_stats and not args.stats and not args.stats_data:
        raise RulewriterError("rewriting needs key statistics: give --stats-data DIR or --stats FILE")
    if args.stats_data and not Path(args.stats_data).is_dir():
        raise ImageLoadError(f"--stats-data {args.stats_data}: no such folder")
    if args.accuracy_data and not Path(args.accuracy_data).is_dir():
        raise ImageLoadError(f"--accuracy-data {args.accuracy_data}: no such folder")
    stats_data, stats_samples, calibration, note = calibration_images(args) if "images" in methods else \
        (args.stats_data, args.stats_samples, None, None)
    filtered = FilteredSet.load(args.probe)
    filtered.split(args.exemplars, args.seed)  # too few images fails here, before the model loads
    if note:
        print(f"rulewriter: {note}", file=sys.stderr)
    clf = load_model(args)
    layers = edit_layers(args, clf, calibration) if needs_stats else [resolve_layer(args, clf)]
    layer = layers[0]
    target = clf.class_index(args.target) if args.target is not None else None
    acc = TestSet.from_folder(clf, args.accuracy_data, samples=args.accuracy_samples) if args.accuracy_data else None
    stats = None
    if needs_stats:  # several layers: the images rewrite chooses among them (mitigate's stats mapping)
        stats = load_stats_at(args, clf, layers, stats_data, stats_samples)  # one pass for every layer
        stats = stats if len(layers) > 1 else stats[layer]
    res = mitigate(clf, filtered, args.exemplars, stats, layer=layer, methods=methods, texture=args.texture,
                   target=target, accuracy_set=acc, view=args.view, seed=args.seed,
                   finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, retrain_lr=args.retrain_lr,
                   stop_when_fitted=not args.train_to_convergence,
                   batch_size=args.batch_size, progress=not args.quiet, calibration=calibration)
    paths = res.save(out)
    print(f"rulewriter: report written to {paths['html']}", file=sys.stderr)
    summary = {"out": str(paths["json"]), "report": str(paths["html"]), "markdown": str(paths["markdown"]),
               **res.to_dict()}
    emit(summary, args.json, res.to_markdown())
