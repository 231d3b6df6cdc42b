"""The ``rulewriter`` command.

::

    rulewriter models
    rulewriter layers  --model efficientnet-lite0
    rulewriter predict --model efficientnet-lite0 [--edit EDIT.safetensors] --json IMG [IMG ...]
    rulewriter stats   --model efficientnet-lite0 --layer L --data DIR [--samples N] --out STATS.safetensors
    rulewriter merge-stats --out ALL.safetensors PART.safetensors [...]
    rulewriter edit    --model efficientnet-lite0 [--layer L] --original IMG --manipulated IMG --mask MASK.png
                       [... repeated] --stats-data DIR [--stats-samples N] --out EDIT.safetensors
    rulewriter heatmap --model efficientnet-lite0 --concept-image IMG --concept-mask MASK [...] --out-dir DIR IMG [...]
    rulewriter demo    [--out DIR]
    rulewriter evaluate --model efficientnet-lite0 [--edit EDIT.safetensors] --data DIR --json
    rulewriter add-class --image IMG --mask MASK.png --negatives DIR --name NAME --out CLASS.safetensors
    rulewriter inverse-edit ... | rulewriter reconstruct ...

Errors a user can cause print one line and exit with status 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import RulewriterError

#: Modules that contribute subcommands through ``add_cli(subparsers)``.
_EXTENSIONS = ("evaluate", "inverse", "newclass", "segment", "spurious", "app")

DEFAULT_CACHE = Path(os.environ.get("RULEWRITER_CACHE", "~/.cache/rulewriter")).expanduser()


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `rulewriter models`)")
    p.add_argument("--weights", default=None, help="local weights file (safetensors or a torch state_dict)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:1 (under torchrun: each rank's own GPU)")


def _load(args):
    from .models import load_classifier

    return load_classifier(args.model, weights=args.weights, device=args.device)


def _layer(args, clf) -> str:
    if args.layer:
        return args.layer
    if not clf.default_layer:
        raise RulewriterError(f"model {clf.name!r} has no default layer; pass --layer (see `rulewriter layers`)")
    print(f"rulewriter: using default layer {clf.default_layer} for {clf.name}", file=sys.stderr)
    return clf.default_layer


def _emit(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2) if as_json else text)


# ---------------------------------------------------------------------------------- commands
def cmd_models(args) -> None:
    from .models import DEFAULT_LAYERS, list_models

    names = list_models()
    rows = [{"name": n, "default_layer": DEFAULT_LAYERS.get(n)} for n in names]
    _emit(rows, args.json, "\n".join(f"{r['name']:<28} {r['default_layer'] or ''}" for r in rows))


def cmd_layers(args) -> None:
    from .memory import LayerMemory
    from .models import layer_names
    from .trace import get_module

    clf = _load(args)
    rows = []
    for name, desc in layer_names(clf.model):
        try:
            LayerMemory(get_module(clf.model, name))
            editable = True
        except RulewriterError:
            editable = False
        rows.append({"name": name, "layer": desc, "editable": editable, "default": name == clf.default_layer})
    text = "\n".join(
        f"{'*' if r['default'] else ' '} {r['name']:<36} {r['layer']}{'' if r['editable'] else '  (not editable)'}"
        for r in rows
    )
    _emit(rows, args.json, text)


def _predict(clf, paths: Sequence[str], topk: int = 5) -> list[dict]:
    from .data import load_image

    out = []
    images = [load_image(p) for p in paths]  # fail before any work on a bad file
    for i in range(0, len(images), 16):
        x = clf.preprocess.batch(images[i : i + 16])
        for p, preds in zip(paths[i : i + 16], clf.predict(x, topk=topk)):
            out.append({"path": str(p), "top5": [{"index": j, "label": lab, "prob": round(pr, 6)} for j, lab, pr in preds]})
    return out


def cmd_predict(args) -> None:
    clf = _load(args)
    # Each --edit is applied in memory, in order: rule edits change weights, added classes add a logit.
    # The weights file is never touched.
    from .edit import Edit

    for path in args.edit:
        if _is_new_class(path):
            from .newclass import NewClass

            clf = NewClass.load(path).apply(clf).classifier
        else:
            Edit.load(path).apply(clf.model)
    res = _predict(clf, args.images, args.topk)
    text = "\n".join(
        f"{r['path']}\n" + "\n".join(f"   {t['prob']:.3f}  {t['label']} ({t['index']})" for t in r["top5"]) for r in res
    )
    _emit(res, args.json, text)


def _is_new_class(path: str) -> bool:
    try:
        from .newclass import is_new_class_file
    except ModuleNotFoundError:
        return False
    return is_new_class_file(path)


def _stats(args, clf, layer: str, data: str, samples: int | None):
    from .stats import SecondMoment, collect_second_moment

    if getattr(args, "stats", None):
        s, meta = SecondMoment.load(args.stats)
        if meta.get("layer") not in (None, layer) or int(meta.get("view", args.view)) != args.view:
            raise RulewriterError(f"{args.stats} holds statistics of {meta.get('layer')} view {meta.get('view')}")
        return s
    return collect_second_moment(
        clf, layer, data, view=args.view, samples=samples, batch_size=args.batch_size, device=args.device,
        precision=args.precision, amp=args.amp, num_workers=args.workers, shard=getattr(args, "shard", None),
        cache_dir=None if args.no_cache else args.cache_dir, progress=not args.quiet,
    )


def cmd_stats(args) -> None:
    from . import distributed

    if args.out and not Path(args.out).expanduser().parent.is_dir():
        raise RulewriterError(f"output folder {Path(args.out).parent} does not exist")
    clf = _load(args)
    layer = _layer(args, clf)
    s = _stats(args, clf, layer, args.data, args.samples)
    info = {"layer": layer, "view": args.view, "key_dim": s.dim, "count": s.count, "precision": s.precision,
            "processes": distributed.world_size()}
    if not distributed.is_main():
        return  # every rank holds the same merged result; one writes and prints it
    if args.shard:
        info["shard"] = args.shard
    if args.out:
        meta = s.meta or {"model": clf.name, "weights": clf.weights_id, "layer": layer,
                                            "view": args.view, "key_dim": s.dim, "preprocess": clf.preprocess.describe()}
        s.save(args.out, {**meta, "data_path": str(args.data)})
        info["out"] = str(args.out)
    _emit(info, args.json, " ".join(f"{k}={v}" for k, v in info.items()))


def cmd_merge_stats(args) -> None:
    from .stats import merge_files

    s, meta = merge_files(args.parts)
    s.save(args.out, meta)
    info = {"out": args.out, "count": s.count, "parts": len(args.parts)}
    text = f"merged {len(args.parts)} files → {args.out}"
    if meta.get("missing_shards"):
        info["missing_shards"] = meta["missing_shards"]
        text += f" (missing shards: {', '.join(meta['missing_shards'])})"
    _emit(info, args.json, text)


def check_rule_args(args) -> Path:
    """Validate the exemplar options shared by ``edit`` and ``inverse-edit`` before any work; returns --out."""
    n = len(args.original)
    if not n:
        raise RulewriterError("give at least one --original IMG with its --mask MASK")
    if len(args.mask) != n:
        raise RulewriterError(f"got {n} --original and {len(args.mask)} --mask; give one mask per original")
    if args.manipulated and len(args.manipulated) != n:
        raise RulewriterError(f"got {n} --original and {len(args.manipulated)} --manipulated; they pair up in order")
    if not args.manipulated and not args.texture:
        raise RulewriterError("give --manipulated images, or a --texture to paste into the masks")
    if not args.stats and not args.stats_data:
        raise RulewriterError("give --stats-data DIR (images to collect key statistics from) or --stats FILE")
    out = Path(args.out)
    if not out.parent.exists():
        raise RulewriterError(f"output folder {out.parent} does not exist")
    return out


def cmd_edit(args) -> None:
    from .rules import rewrite, rule_from_features, rule_from_images

    out = check_rule_args(args)
    clf = _load(args)
    layer = _layer(args, clf)
    if args.manipulated:
        rule = rule_from_images(clf, layer, args.original, args.manipulated, args.mask, view=args.view)
    elif args.from_features:
        rule = rule_from_features(clf, layer, args.original, args.mask, _texture(args.texture), view=args.view)
    else:
        rule = _pasted_rule(clf, layer, args)
    stats = _stats(args, clf, layer, args.stats_data, args.stats_samples)
    edit = rewrite(clf, rule, stats, rank=args.rank, ridge=args.ridge, context=args.context,
                   solver=args.solver, fit=args.fit)
    edit.save(out)
    info = {"out": str(out), "layer": layer, "view": args.view, "rank": edit.updates[0].rank,
            "pairs": edit.meta["n_pairs"], "stats_keys": stats.count}
    _emit(info, args.json, f"wrote {out} (layer {layer}, rank {info['rank']}, {info['pairs']} key/value pairs)")


def _texture(src: str):
    from .manipulate import texture_from

    return texture_from(src)


def _pasted_rule(clf, layer, args):
    """Paste the texture into each mask to make the manipulated images, then read the rule from pixels."""
    from .concepts import load_mask
    from .data import load_image
    from .manipulate import paste_texture
    from .models import mask_for_image
    from .rules import rule_from_images

    tex = _texture(args.texture)
    originals = [load_image(p) for p in args.original]
    man = [paste_texture(im, mask_for_image(load_mask(m), im.size), tex) for im, m in zip(originals, args.mask)]
    rule = rule_from_images(clf, layer, originals, man, args.mask, view=args.view)
    rule.description.update(originals=list(args.original), texture=args.texture, manipulated="texture pasted")
    return rule


def cmd_heatmap(args) -> None:
    from .concepts import key_match, save_overlay
    from .data import load_image
    from .memory import LayerMemory
    from .rules import layer_io, rule_from_images
    from .trace import get_module

    if len(args.concept_image) != len(args.concept_mask) or not args.concept_image:
        raise RulewriterError("give one --concept-mask per --concept-image (at least one)")
    clf = _load(args)
    layer = _layer(args, clf)
    # The concept key is the masked mean of the exemplars' own keys (a rule from an image to itself).
    rule = rule_from_images(clf, layer, args.concept_image, args.concept_image, args.concept_mask, view=args.view)
    k = rule.key()
    c = _stats(args, clf, layer, args.stats_data, args.stats_samples).moment() if (args.stats or args.stats_data) else None
    mem = LayerMemory(get_module(clf.model, layer), args.view, name=layer)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in args.images:
        img = load_image(p)
        x, _ = layer_io(clf, layer, clf.preprocess.batch([img]))
        heat = key_match(mem.keys(x)[0].double(), k, c)
        shown = clf.preprocess.denormalize(clf.preprocess.image(img))
        dest = out_dir / f"{Path(p).stem}.heatmap.png"
        save_overlay(dest, shown, heat)
        rows.append({"image": str(p), "heatmap": str(dest), "max": float(heat.max()), "mean": float(heat.mean())})
    _emit(rows, args.json, "\n".join(f"{r['heatmap']}  max={r['max']:.3g}" for r in rows))


def cmd_demo(args) -> None:
    from .demo import run_demo

    # With --json the story goes to stderr so that stdout is one JSON document.
    summary = run_demo(out_dir=Path(args.out), stats_data=args.stats_data, samples=args.samples, quiet=args.quiet,
                       stream=sys.stderr if args.json else None)
    if args.json:
        print(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------- parser
def _common_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="dotted layer name (default: the model's default layer)")
    p.add_argument("--view", type=int, default=2, choices=[1, 2, 3, 4], help="memory view (thesis Fig. 2-3)")
    p.add_argument("--stats", default=None, help="precomputed statistics file (from `rulewriter stats --out`)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=["auto", "fp64", "fp32", "tf32x2", "tf32", "bf16"],
                   help="how key products are formed; sums are float64 (auto: tf32x2 on CUDA, fp32 on CPU)")
    p.add_argument("--amp", default=None, choices=["bf16"], help="run the statistics forward pass under bf16 autocast")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes for the statistics pass (default: up to 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rulewriter", description="Rewrite the rules of an image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models rulewriter can load")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list a model's conv and linear layers")
    _add_model(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("predict", help="top-5 predictions, optionally with an edit applied")
    _add_model(p)
    p.add_argument("--edit", action="append", default=[],
                   help="an edit or an added class (.safetensors) to apply in memory first (repeat to compose)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("stats", help="collect the second moment of a layer's keys")
    _add_model(p)
    _common_edit_args(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--samples", type=int, default=None, help="number of images (default: all)")
    p.add_argument("--out", default=None, help="also save the statistics to this safetensors file")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only the I-th of N shards of the images (for machines without a shared process group; "
                        "add the parts with merge-stats)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("merge-stats", help="add up statistics files from several processes or machines")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("parts", nargs="+")
    p.set_defaults(func=cmd_merge_stats)

    p = sub.add_parser("edit", help="rewrite one rule and save the edit")
    _add_model(p)
    _common_edit_args(p)
    p.add_argument("--original", action="append", default=[], help="exemplar photo (repeat)")
    p.add_argument("--manipulated", action="append", default=[], help="the exemplar with the concept changed (repeat)")
    p.add_argument("--mask", action="append", default=[], help="mask PNG, white where the concept is (repeat)")
    p.add_argument("--texture", default=None,
                   help="instead of --manipulated: a texture (path or skimage:NAME) pasted into the masks")
    p.add_argument("--from-features", action="store_true", help="paste the texture's features at the layer, not pixels")
    p.add_argument("--stats-data", default=None, help="image folder for the key statistics")
    p.add_argument("--stats-samples", type=int, default=None, help="number of images for statistics (default: all)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--ridge", type=float, default=None)
    p.add_argument("--context", default="mean", choices=["mean", "svd", "zca"])
    p.add_argument("--fit", default="pairs", choices=["pairs", "mean"])
    p.add_argument("--solver", default="closed-form", choices=["closed-form", "projected-gd"])
    p.add_argument("--out", required=True, help="where to write the edit (.safetensors, plus a .json beside it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("heatmap", help="overlay a concept's key-match heatmap on images")
    _add_model(p)
    _common_edit_args(p)
    p.add_argument("--concept-image", action="append", default=[], help="image showing the concept (repeat)")
    p.add_argument("--concept-mask", action="append", default=[], help="mask of the concept in it (repeat)")
    p.add_argument("--stats-data", default=None, help="with statistics, the heat is kᵀC⁻¹k*: where an edit would act")
    p.add_argument("--stats-samples", type=int, default=None)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("demo", help="the whole story on EfficientNet-Lite0 with photos that ship with scikit-image")
    p.add_argument("--out", default="rulewriter-demo", help="output folder (HTML page, edit, heatmaps)")
    p.add_argument("--stats-data", default=None, help="an image folder for statistics (default: augmented skimage photos)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    # Commands that live beside their concept: each module's add_cli(sub) adds its subcommand(s).
    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(f"rulewriter.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"rulewriter.{name}":
                raise
            continue
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from . import distributed

    args = build_parser().parse_args(argv)
    if getattr(args, "ridge", "unset") is None:
        from .edit import DEFAULT_RIDGE

        args.ridge = DEFAULT_RIDGE
    if getattr(args, "device", None) == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under torchrun every rank runs this same command on its shard; outside it this does nothing.
    joined = distributed.init_from_env(getattr(args, "device", "cpu"))
    if joined and hasattr(args, "device"):
        args.device = str(distributed.local_device(args.device))
    try:
        args.func(args)
    except RulewriterError as e:
        print(f"rulewriter: error: {e}" + (f" (rank {distributed.rank()})" if joined else ""), file=sys.stderr)
        return 2
    finally:
        if joined:
            distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
