"""The ``rulewriter`` command line: one module per command group, the only place that parses arguments.

::

    rulewriter models | layers | predict | stats | merge-stats | edit | heatmap | demo
    rulewriter evaluate | inverse-edit | reconstruct | add-class | segment | probe | mitigate | app

Each group module has ``add_commands(subparsers)``; every command sets ``func``. Errors a user can cause
print one ``rulewriter: error:`` line and exit with status 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import RulewriterError

#: The command groups, in the order ``rulewriter --help`` lists them.
GROUPS = ("models", "predict", "stats", "edit", "demo", "evaluate", "inverse", "newclass", "segment", "spurious", "app")

__all__ = ["GROUPS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``rulewriter`` parser with every command group's subcommands."""
    parser = argparse.ArgumentParser(prog="rulewriter", description="Rewrite the rules of an image classifier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..core import distributed

    args = build_parser().parse_args(argv)
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


