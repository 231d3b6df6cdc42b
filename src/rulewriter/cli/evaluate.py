"""``rulewriter evaluate``: accuracy on a labelled folder before and after an edit (studies/evaluate.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ImageLoadError
from ..studies.evaluate import evaluate_edit, load_change
from ..studies.evaluation_report import write_report
from ..studies.report import percent
from ..studies.testsets import TestSet
from .common import add_command, add_json_arg, add_model_args, check_finite_outputs, load_model


# ------------------------------------------------------------------------------------------ command line
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``rulewriter evaluate`` to the ``rulewriter`` command's subparsers."""
    p = add_command(sub, "evaluate", "accuracy of a model on a labelled image folder, before and after an edit",
                    description="Evaluate a model on a labelled folder (wnid or class-name subfolders, or flat "
                                "nXXXXXXXX_*.jpg files), optionally before and after an edit or a baseline's "
                                "weight delta; writes evaluation.json, figures and index.html to --out.",
                    example="rulewriter evaluate --data ~/imagenet/val --edit gravel-wheel.safetensors "
                            "--target 'car wheel' --samples 2000 --out eval-gravel")
    add_model_args(p)
    p.add_argument("--data", required=True, help="labelled image folder")
    p.add_argument("--edit", default=None, help="an edit or weight delta (.safetensors) to apply in memory")
    p.add_argument("--target", action="append", default=[],
                   help="the edit's target class (index, wnid or name; repeat for a set): four tests and ROC")
    p.add_argument("--samples", type=int, default=None, help="evaluate a deterministic sample of N images")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default="rulewriter-eval", help="report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_arg(p, "the summary")
    p.set_defaults(func=cmd_evaluate, out_kind="folder")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """The ``evaluate`` subcommand: every input is checked before any image is read or file written."""
    from ..studies.testsets import load_source

    out = Path(args.out)  # the counts, the device and --out were checked by check_args
    data = Path(args.data)
    if not data.is_dir():
        raise ImageLoadError(f"--data {data}: no such folder")
    clf = load_model(args)
    testset = TestSet.from_folder(clf, data, samples=args.samples)
    target = frozenset(clf.class_index(t) for t in args.target)
    change = None
    if args.edit:
        change = load_change(args.edit)
        if hasattr(change, "check_model") and not args.force:
            change.check_model(clf, source=args.edit)  # an edit made for another model names that model
        # A mismatched or overflowing edit fails here, on the first image, before the test set is read.
        x = clf.preprocess.batch([load_source(testset.images[0])]).to(clf.device, clf.dtype)
        with change.applied(clf.model):
            check_finite_outputs(clf.model, args.edit, x)
    ev = evaluate_edit(clf, testset, change, target=target or None, batch_size=args.batch_size,
                       num_workers=args.workers, progress=not args.quiet)
    from ..core.distributed import is_main

    if not is_main():
        return  # under torchrun every rank holds every prediction; rank 0 alone writes and prints
    paths = write_report(out, clf, ev, change_path=args.edit)
    summary = ev.summary()
    summary.update({"model": clf.name, "data": str(data), "edit": args.edit, "out": str(paths["json"]),
                    "report": str(paths["html"])})
    if change is not None:
        e = ev.errors()["normal"]["ground_truth"]
        summary["errors_corrected"] = {k: e[k] for k in ("corrected", "n_errors_before", "fraction")}
        summary["errors_introduced"] = {k: e[k] for k in ("introduced", "n_right_before", "introduced_fraction")}
    if ev.target:
        summary["target"] = sorted(ev.target)
        summary["auc"] = {m: (c.auc if c is not None else None) for m, c in ev.rocs()["normal"].items()}
    print(f"rulewriter: report written to {paths['html']}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    if change is None:
        print(f"{summary['n_images']} images: top-1 {percent(summary['top1'])}, top-5 {percent(summary['top5'])}, "
              f"confidence {summary['confidence']:.3f}")
    else:
        b, a = summary["before"], summary["after"]
        print(f"{summary['n_images']} images, top-1 changed on {summary['changed_top1']}\n"
              f"  before: top-1 {percent(b['top1'])}, top-5 {percent(b['top5'])}, confidence {b['confidence']:.3f}\n"
              f"  after:  top-1 {percent(a['top1'])}, top-5 {percent(a['top5'])}, confidence {a['confidence']:.3f}")
