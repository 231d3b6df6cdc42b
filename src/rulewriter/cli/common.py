"""What the command groups share: the model options, statistics options, output and the help format.

Every command is built with :func:`add_command`, so each one has a one-line description, an example and
option help that shows the default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import RulewriterError

DEFAULT_CACHE = Path(os.environ.get("RULEWRITER_CACHE", "~/.cache/rulewriter")).expanduser()
PRECISION_CHOICES = ["auto", "fp64", "fp32", "tf32x2", "tf32", "bf16"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Option help that ends with its default (when it has one), and descriptions and examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if isinstance(default, list) and not default:
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, *, example: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with a one-line ``summary`` (shown in ``rulewriter --help``), a description and an example.

    Example::

        p = add_command(sub, "models", "list the models rulewriter can load", example="rulewriter models --json")
    """
    text = summary[:1].upper() + summary[1:] + "." + (f"\n\n{description}" if description else "")
    return sub.add_parser(name, help=summary, description=text, epilog=f"example:\n  {example}",
                          formatter_class=HelpFormatter)


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as one JSON document on stdout instead of text."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights`` and ``--device``."""
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `rulewriter models`)")
    p.add_argument("--weights", default=None,
                   help="local weights file (safetensors or a torch state_dict), a torchvision weights name "
                        "(e.g. IMAGENET1K_V1), or none for random weights; default: the model's own weights "
                        "(see `rulewriter models`)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:1 (under torchrun: each rank's own GPU)")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    """The layer, view and statistics options shared by ``stats``, ``edit``, ``heatmap`` and the studies."""
    p.add_argument("--layer", default=None, help="dotted layer name (default: the model's default layer)")
    p.add_argument("--view", type=int, default=2, choices=[1, 2, 3, 4], help="memory view (thesis Fig. 2-3)")
    p.add_argument("--stats", default=None, help="precomputed statistics file (from `rulewriter stats --out`)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="how key products are formed; sums are float64 (auto: tf32x2 on CUDA, fp32 on CPU)")
    p.add_argument("--amp", default=None, choices=["bf16"], help="run the statistics forward pass under bf16 autocast")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes for the statistics pass (default: up to 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(args: argparse.Namespace):
    """The classifier named by ``--model``/``--weights`` on ``--device``."""
    from ..models.registry import load_classifier

    return load_classifier(args.model, weights=args.weights, device=args.device)


def resolve_layer(args: argparse.Namespace, clf) -> str:
    """``--layer``, or the model's default layer (said on stderr)."""
    if args.layer:
        return args.layer
    if not clf.default_layer:
        raise RulewriterError(f"model {clf.name!r} has no default layer; pass --layer (see `rulewriter layers`)")
    print(f"rulewriter: using default layer {clf.default_layer} for {clf.name}", file=sys.stderr)
    return clf.default_layer


def emit(obj: Any, as_json: bool, text: str) -> None:
    """Print ``obj`` as JSON with ``--json``, else the human-readable ``text``."""
    print(json.dumps(obj, indent=2) if as_json else text)


def load_stats(args: argparse.Namespace, clf, layer: str, data: str | None, samples: int | None):
    """The second moment for ``layer``: from ``--stats FILE`` (checked to match) or collected from ``data``."""
    from ..core.stats import SecondMoment, collect_second_moment

    if getattr(args, "stats", None):
        s = SecondMoment.load(args.stats)
        meta = s.meta
        if meta.get("layer") not in (None, layer) or int(meta.get("view", args.view)) != args.view:
            raise RulewriterError(f"{args.stats} holds statistics of {meta.get('layer')} view {meta.get('view')}")
        return s
    return collect_second_moment(
        clf, layer, data, view=args.view, samples=samples, batch_size=args.batch_size, device=args.device,
        precision=args.precision, amp=args.amp, num_workers=args.workers, shard=getattr(args, "shard", None),
        cache_dir=None if args.no_cache else args.cache_dir, progress=not args.quiet,
    )


def check_rule_args(args: argparse.Namespace) -> Path:
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


def add_exemplar_args(p: argparse.ArgumentParser) -> None:
    """The exemplar options of ``edit`` and ``inverse-edit``: originals, manipulated images or a texture, masks."""
    p.add_argument("--original", action="append", default=[], help="exemplar photo (repeat)")
    p.add_argument("--manipulated", action="append", default=[], help="the exemplar with the concept changed (repeat)")
    p.add_argument("--mask", action="append", default=[], help="mask PNG, white where the concept is (repeat)")
    p.add_argument("--texture", default=None,
                   help="instead of --manipulated: a texture (path or skimage:NAME) pasted into the masks")
