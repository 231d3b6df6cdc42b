"""``rulewriter add-class``: a new class from one image and its silhouette (extensions/newclass.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ImageLoadError, RulewriterError
from ..extensions.class_filter import DEFAULT_FPR, POOLS
from ..extensions.newclass import add_class
from .common import add_command, add_json_arg, add_model_args, emit, load_model, resolve_layer


def cmd_add_class(args: argparse.Namespace) -> None:
    """The ``add-class`` subcommand: the output path and negatives are checked before the model loads."""
    out = Path(args.out)
    if not out.parent.exists():
        raise RulewriterError(f"output folder {out.parent} does not exist")
    if out.suffix != ".safetensors":
        raise RulewriterError(f"--out must end in .safetensors, got {out.name}")
    if not Path(args.negatives).exists():
        raise ImageLoadError(f"no such negatives folder: {args.negatives}")
    clf = load_model(args)
    layer = resolve_layer(args, clf)
    new = add_class(clf, args.image, args.mask, args.negatives, name=args.name, layer=layer, lam=args.lam,
                    negatives_mode=args.negatives_mode, n_negatives=args.n_negatives, rounds=args.rounds,
                    pool=args.pool, fpr=args.fpr, max_negatives=args.max_negatives, seed=args.seed,
                    batch_size=args.batch_size, progress=not args.quiet)
    new.save(out)
    m = new.meta
    info = {"out": str(out), "name": new.name, "layer": layer, "pool": new.pool, "lambda": m["lambda"],
            "negatives_mode": m["negatives_mode"], "negatives": m["negatives"],
            "calibration": m["calibration"], "exemplar": m["exemplar"], "final_loss": m["final_loss"]["total"]}
    # Mined negatives are listed for a person to check: a photo labelled as something else may still show
    # the new class (a car behind a tow truck), and eq. 4.4 would then teach the filter to ignore it.
    emit(info, args.json, (f"wrote {out}: class {new.name!r} at {layer} ({len(m['negatives'])} "
                            f"{m['negatives_mode']} negatives, λ={m['lambda']:.3g}, pool {new.pool}); "
                            f"exemplar top-1: {m['exemplar']['top1']}"
                            + "".join(f"\n  negative: {n}" for n in m["negatives"])))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``rulewriter add-class``. (``rulewriter predict --edit`` accepts added classes too.)"""
    p = add_command(sub, "add-class", "add a new class from one image and its silhouette (Chapter 4)",
                    description="Train one new filter at --layer so that the masked object in --image scores "
                                "high and photos without the class (--negatives) score low (eq. 4.4), then "
                                "calibrate its logit on held-out negatives. Apply the result with "
                                "`rulewriter predict --edit CLASS.safetensors`.",
                    example="rulewriter add-class --image teapot.jpg --mask teapot-mask.png --negatives photos/ "
                            "--name teapot --out teapot.safetensors")
    add_model_args(p)
    p.add_argument("--layer", default=None, help="groups=1 conv layer for the new filter (default: the model's)")
    p.add_argument("--image", required=True, help="the one example photo of the new class")
    p.add_argument("--mask", required=True, help="its silhouette: a PNG, white on the object")
    p.add_argument("--negatives", required=True, help="folder of photos without the class")
    p.add_argument("--name", required=True, help="the new class's label")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="weight λ of the negatives in eq. 4.4 (default 1/N: all negatives weigh as much as the positive)")
    p.add_argument("--negatives-mode", default="mined", choices=["mined", "random", "none"],
                   help="mined: the top-scoring false positives, over --rounds rounds; random: a random sample; "
                        "none: the positive alone")
    p.add_argument("--n-negatives", type=int, default=15, help="negatives that train the filter")
    p.add_argument("--rounds", type=int, default=3, help="mining rounds")
    p.add_argument("--pool", default="max", choices=list(POOLS), help="how the filter's map becomes the logit")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help="fraction of negative photos the new class may win (sets the calibration)")
    p.add_argument("--max-negatives", type=int, default=500, help="use at most this many negatives")
    p.add_argument("--seed", type=int, default=0, help="random seed for the negatives sample and random mode")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--out", required=True, help="where to write the class (.safetensors, plus a .json beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_add_class, out_kind="file+json")

