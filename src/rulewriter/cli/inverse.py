"""`rulewriter` commands of extensions/inverse.py."""
from __future__ import annotations

from ..errors import EditError
from ..core.memory import LayerMemory
from pathlib import Path
import argparse
from ..atomic import atomic_bytes
from ..core.trace import get_module
import io
import json
from ..core.rules import layer_io
from ..core.rules import prepare_mask
import torch
from ..extensions.fourier import KeySpectrum, collect_key_spectrum
from ..extensions.inverse import INVERSE_VIEWS, SOLVERS, inverse_rewrite, inverse_rule_from_images
from ..extensions.reconstruct import dot_similarity, reconstruct_features, reconstruct_image, reconstruct_key


# ------------------------------------------------------------------------------------------ CLI
def _stats_for(args, clf, layer: str):
    """Statistics for the chosen solver: a SecondMoment of the view's keys, or a KeySpectrum."""
    from .common import load_stats, say_cached

    if args.solver == "fourier":
        if args.stats:
            spec = KeySpectrum.load(args.stats)
            if not args.force:
                spec.check_model(clf, args.stats)
            return spec
        spec = collect_key_spectrum(clf, layer, args.stats_data, samples=args.stats_samples,
                                    batch_size=args.batch_size, device=args.device,
                                    cache_dir=None if args.no_cache else args.cache_dir, progress=not args.quiet)
        say_cached(spec)
        return spec
    return load_stats(args, clf, layer, args.stats_data, args.stats_samples)


def cmd_inverse_edit(args) -> None:
    from .common import emit, resolve_layer, load_model, check_rule_args

    out = check_rule_args(args)
    clf = load_model(args)
    layer = resolve_layer(args, clf)
    originals, manipulated = _pasted_pairs(args)
    rule = inverse_rule_from_images(clf, layer, originals, manipulated, args.mask, view=args.view)
    stats = _stats_for(args, clf, layer)
    edit = inverse_rewrite(clf, rule, stats, solver=args.solver, ridge=args.ridge, fit=args.fit)
    edit.save(out)
    info = {"out": str(out), "layer": layer, "view": args.view, "solver": args.solver,
            "rank": edit.updates[0].rank, "pairs": edit.meta["n_pairs"], "stats": stats.count}
    emit(info, args.json, f"wrote {out} ({args.solver}, layer {layer}, view {args.view}, rank {info['rank']})")


def _pasted_pairs(args) -> tuple[list, list]:
    from ..concepts.masks import load_mask
    from ..models.data import load_image
    from ..concepts.manipulate import paste_texture, texture_from
    from ..models.preprocess import mask_for_image

    originals = [load_image(p) for p in args.original]
    if args.manipulated:
        return originals, [load_image(p) for p in args.manipulated]
    tex = texture_from(args.texture)
    return originals, [paste_texture(im, mask_for_image(load_mask(m), im.size), tex)
                       for im, m in zip(originals, args.mask)]


def cmd_reconstruct(args) -> None:
    from .common import emit, load_edit, load_model, resolve_layer
    from ..concepts.heatmap import save_overlay
    from ..concepts.masks import load_mask, mask_to_grid
    from ..models.data import load_image

    clf = load_model(args)
    layer = resolve_layer(args, clf)
    module = get_module(clf.model, layer)
    mem2 = LayerMemory(module, 2, name=layer)  # checks the layer (groups=1 conv or linear) up front
    if args.steps < 1:
        raise EditError(f"--steps must be at least 1, got {args.steps}")
    compares: dict[str, str] = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EditError(f"--compare takes NAME=IMAGE, got {item!r}")
        compares[name] = path
    edit = load_edit(args, clf, args.edit) if args.edit else None
    pre = clf.preprocess
    img = load_image(args.image)
    shown = pre.denormalize(pre.image(img))
    mask_s = prepare_mask(clf, load_mask(args.mask), img) if args.mask else None
    names = {"image": args.image, **compares}
    xs = {n: pre.batch([load_image(p)]) for n, p in names.items()}
    ins = {n: layer_io(clf, layer, x)[0] for n, x in xs.items()}
    out_dir = Path(args.out_dir)  # made only now: every input has been read
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = edit.apply(clf.model) if (edit is not None and args.target == "edited") else None
    try:
        x_in, y_out = layer_io(clf, layer, xs["image"])
    finally:
        if handle is not None:
            handle.undo()
    handle = edit.apply(clf.model) if edit is not None else None
    heat_paths: dict[str, str] = {}
    try:
        if args.stage == "key":
            grid = tuple(y_out.shape[2:])
            g = mask_to_grid(mask_s, grid) if mask_s is not None else torch.ones(grid)
            i, j = divmod(int(torch.argmax(g)), grid[1])
            keys = {n: mem2.keys(v)[0] for n, v in ins.items()}
            rec = reconstruct_key(module, y_out[0, :, i, j], {n: k[:, i, j] for n, k in keys.items()},
                                  steps=args.steps, seed=args.seed, init_scale=float(keys["image"].std()))
            rec.info["pixel"] = [i, j]
            for n, k in keys.items():
                p = out_dir / f"key.{n}.heatmap.png"
                save_overlay(p, shown, dot_similarity(k, rec.result.to(k.dtype)))
                heat_paths[n] = str(p)
        elif args.stage == "features":
            g = mask_to_grid(mask_s, tuple(x_in.shape[2:])) if mask_s is not None else None
            rec = reconstruct_features(module, y_out, ins, input_shape=x_in.shape, mask=g, steps=args.steps,
                                       seed=args.seed, init_scale=float(x_in.std()))
            for n, t in ins.items():
                p = out_dir / f"features.{n}.heatmap.png"
                save_overlay(p, shown, dot_similarity(rec.result, t))
                heat_paths[n] = str(p)
        else:
            rec = reconstruct_image(clf, layer, y_out, xs, mask=mask_s, steps=args.steps, seed=args.seed)
            p = out_dir / "image.reconstruction.png"
            buf = io.BytesIO()
            pre.denormalize(rec.result).save(buf, format="PNG")
            atomic_bytes(p, buf.getvalue())
            heat_paths["reconstruction"] = str(p)
    finally:
        if handle is not None:
            handle.undo()
    curves = rec.plot(out_dir / f"{args.stage}.curves.png",
                      title=f"{args.stage} reconstruction at {layer} (target: {args.target} network)")
    summary = {**rec.to_dict(every=max(1, args.steps // 100)), "layer": layer, "edit": args.edit,
               "target": args.target, "curves": str(curves), "images": heat_paths}
    atomic_bytes(out_dir / f"{args.stage}.json", (json.dumps(summary, indent=2) + "\n").encode())
    fin = rec.final()
    text = (f"{args.stage} reconstruction: loss {rec.losses[0]:.3g} → {rec.losses[-1]:.3g}; {rec.metric}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in fin.items()) + f"; closest: {rec.closest()}\nwrote {out_dir}")
    emit(summary, args.json, text)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``inverse-edit`` and ``reconstruct`` to the ``rulewriter`` command."""
    from ..core.edit import DEFAULT_RIDGE
    from .common import DEFAULT_CACHE, add_command, add_exemplar_args, add_json_arg, add_model_args

    p = add_command(sub, "inverse-edit", "rewrite one rule in the inverse direction (thesis Chapter 3)",
                    description="Like `rulewriter edit`, but the rule is read through the layer's inverse "
                                "memory: Wᵀ (transpose), W† (pinv) or the layer as a convolution (fourier, "
                                "with a KeySpectrum as statistics).",
                    example="rulewriter inverse-edit --original car.jpg --mask wheels.png --texture skimage:gravel "
                            "--stats-data photos/ --out gravel-wheel.inverse.safetensors")
    add_model_args(p)
    p.add_argument("--solver", default="transpose", choices=list(SOLVERS),
                   help="transpose: edit Wᵀ (3.1); pinv: edit W† (3.2); fourier: the layer as a convolution (3.3)")
    p.add_argument("--view", type=int, default=3, choices=list(INVERSE_VIEWS), help="inverse memory view")
    p.add_argument("--layer", default=None, help="dotted layer name (default: the model's default layer)")
    add_exemplar_args(p)
    p.add_argument("--stats", default=None, help="precomputed statistics (SecondMoment, or KeySpectrum for fourier)")
    p.add_argument("--stats-data", default=None, help="image folder for the statistics")
    p.add_argument("--stats-samples", type=int, default=None, help="number of images for statistics (default: all)")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="C + εI with ε = ridge · tr(C)/d")
    p.add_argument("--fit", default="mean", choices=["mean", "pairs"],
                   help="mean: map each k* exactly to its v*; pairs: least squares over every masked pair")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="where to write the edit (.safetensors, plus a .json beside it)")
    add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_inverse_edit, out_kind="file+json")

    p = add_command(sub, "reconstruct", "invert a layer's output by gradient descent (keys, features, image)",
                    description="Find the key, input features or image whose layer output matches the photo's "
                                "(Section 3.2), optionally through an edited network, and measure how close "
                                "the reconstruction is to the photo and to each --compare photo. Writes curves, "
                                "heatmaps and <stage>.json into --out-dir.",
                    example="rulewriter reconstruct --stage key --image car.jpg --mask wheels.png "
                            "--compare gravel=gravel.jpg --out-dir recon/")
    add_model_args(p)
    p.add_argument("--stage", default="features", choices=["key", "features", "image"],
                   help="what to reconstruct: one key pixel, the layer's input features, or the image")
    p.add_argument("--layer", default=None, help="dotted layer name (default: the model's default layer)")
    p.add_argument("--image", required=True, help="the photo whose output is inverted")
    p.add_argument("--mask", default=None, help="where to look (the key pixel is the most covered one)")
    p.add_argument("--compare", action="append", default=[],
                   help="NAME=IMAGE: also measure the distance to this photo's representation (repeat)")
    p.add_argument("--edit", default=None, help="an edit to apply to the network being inverted")
    p.add_argument("--target", default="original", choices=["original", "edited"],
                   help="invert the unedited network's output (original) or the edited one's (Section 3.2)")
    p.add_argument("--steps", type=int, default=300, help="gradient descent steps")
    p.add_argument("--seed", type=int, default=0, help="random seed of the starting point")
    p.add_argument("--out-dir", required=True, help="folder for the curves, images and summary")
    add_json_arg(p, "the summary")
    p.set_defaults(func=cmd_reconstruct)
