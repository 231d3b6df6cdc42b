"""``rulewriter demo``: the whole story on EfficientNet-Lite0 with photos that ship with scikit-image."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import DEFAULT_CACHE, add_command, add_json_arg


def cmd_demo(args) -> None:
    from ..studies.demo import run_demo

    # With --json the story goes to stderr so that stdout is one JSON document.
    summary = run_demo(out_dir=Path(args.out), stats_data=args.stats_data, samples=args.samples, quiet=args.quiet,
                       stream=sys.stderr if args.json else None, cache_dir=args.cache_dir, cache=not args.no_cache)
    if args.json:
        print(json.dumps(summary, indent=2))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    p = add_command(sub, "demo", "the whole story on EfficientNet-Lite0 with photos that ship with scikit-image",
                    example="rulewriter demo --out rulewriter-demo")
    p.add_argument("--out", default="rulewriter-demo", help="output folder (HTML page, edit, heatmaps)")
    p.add_argument("--stats-data", default=None, help="an image folder for statistics (default: augmented skimage photos)")
    p.add_argument("--samples", type=int, default=None, help="number of images for the statistics (default: all of --stats-data, or 400 augmentations)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_arg(p, "the summary (the story goes to stderr)")
    p.set_defaults(func=cmd_demo, out_kind="folder")
