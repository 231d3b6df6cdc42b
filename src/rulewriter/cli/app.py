"""``rulewriter app``: the interactive editor in the browser (see :mod:`rulewriter.app.server`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ImageLoadError, RulewriterError
from .common import CHOSEN_LAYER_HELP, DEFAULT_CACHE, add_command, add_model_args, load_model


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``rulewriter app`` to the ``rulewriter`` command's subparsers."""
    from ..app.server import DEFAULT_PORT

    p = add_command(sub, "app", "an interactive editor in the browser",
                    description="Serve a local web app to browse a folder's images, paint a concept, rewrite a "
                                "rule and compare predictions before and after. Only --images is ever read; "
                                "saved edits and reports go to --out. Needs the app extra: "
                                "pip install 'rulewriter[app]'.",
                    example="rulewriter app --images photos/ --stats-data ~/imagenet/val --stats-samples 2000")
    add_model_args(p)
    p.add_argument("--images", required=True, help="the image folder to browse (the only folder the app reads)")
    p.add_argument("--layer", default=None, help=CHOSEN_LAYER_HELP)
    p.add_argument("--stats-data", default=None, help="image folder for the statistics C (default: --images)")
    p.add_argument("--stats-samples", type=int, default=None, help="use N images for the statistics (default: all)")
    p.add_argument("--out", default="rulewriter-app",
                   help="folder for saved edits (its edits/) and exported reports (its reports/); git-ignored in a clone")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback lets other machines reach the unauthenticated app")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to serve on")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name the app answers to (repeatable); requests naming any other host are "
                        "refused against DNS rebinding (default: loopback names and the bound address)")
    p.set_defaults(func=cmd_app, out_kind="folder")


def cmd_app(args: argparse.Namespace) -> None:
    """The ``app`` subcommand: check every input, load the model, serve."""
    from ..app.server import create_app, serve

    if not 0 < args.port < 65536:
        raise RulewriterError(f"--port must be in 1..65535, got {args.port}")
    if not Path(args.images).is_dir():
        raise ImageLoadError(f"--images {args.images}: no such folder")
    clf = load_model(args)  # its errors name --weights, not the library's weights=
    app = create_app(clf, args.images, layer=args.layer, stats_data=args.stats_data,
                     stats_samples=args.stats_samples, out_dir=args.out,
                     cache_dir=None if args.no_cache else args.cache_dir, allowed_hosts=args.allow_host)
    print(f"rulewriter app: {clf.name}, layer {app.state.rulewriter.layer}, "
          f"{len(app.state.rulewriter.images)} images; open http://{args.host}:{args.port}/", file=sys.stderr)
    serve(app, args.host, args.port)
