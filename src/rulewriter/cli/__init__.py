"""The ``rulewriter`` command line: one module per command group, the only place that parses arguments.

::

    rulewriter models | layers | predict | stats | merge-stats | edit | heatmap | edits | export | demo
    rulewriter evaluate | inverse-edit | reconstruct | add-class | segment | probe | mitigate | app

Each group module has ``add_commands(subparsers)``; every command sets ``func``. Errors a user can cause
print one ``rulewriter: error:`` line and exit with status 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Sequence

from ..errors import RulewriterError

#: The command groups, in the order ``rulewriter --help`` lists them.
GROUPS = ("models", "predict", "stats", "edit", "edits", "demo", "evaluate", "inverse", "newclass", "segment", "spurious", "app")

__all__ = ["GROUPS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``rulewriter`` parser with every command group's subcommands."""
    from .common import Parser

    parser = Parser(prog="rulewriter", description="Rewrite the rules of an image classifier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status: 0, 2 on bad input (one ``rulewriter: error:`` line on stderr,
    nothing written), 130 on Ctrl-C (partial statistics stay in the cache, the next run resumes from them).
    Usage errors exit through ``SystemExit(2)`` as argparse does."""
    from ..core import distributed
    from .common import check_args

    args = build_parser().parse_args(argv)
    try:
        check_args(args)  # counts, the device and every output, before a model is loaded
    except RulewriterError as e:
        print(f"rulewriter: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "device", None) == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under torchrun every rank runs this same command on its shard; outside it this does nothing.
    joined = distributed.init_from_env(getattr(args, "device", "cpu"))
    if joined and hasattr(args, "device"):
        args.device = str(distributed.local_device(args.device))
    where = f" (rank {distributed.rank()})" if joined else ""
    try:
        with warnings.catch_warnings():
            # A warning is one line, as errors are (not the file, line and source that Python shows).
            warnings.showwarning = show_warning
            args.func(args)
    except RulewriterError as e:
        print(f"rulewriter: error: {e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rulewriter: error: interrupted (statistics collected so far stay in the cache; the same command "
              f"resumes from them){where}", file=sys.stderr)
        return 130
    except OSError as e:  # a disk that fills up or a folder that turns read-only during the work
        print(f"rulewriter: error: {e.strerror or e}: {e.filename or ''}{where}".rstrip(": "), file=sys.stderr)
        return 2
    finally:
        if joined:
            distributed.close()
    return 0




def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as one ``rulewriter: warning:`` line on stderr."""
    print(f"rulewriter: warning: {message}", file=file or sys.stderr)
