"""``rulewriter models`` and ``rulewriter layers``: what can be loaded and edited."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import RulewriterError
from .common import (DEFAULT_CACHE, add_command, add_edit_args, add_exemplar_args, add_model_args, check_rule_args,
                     emit, load_model, load_stats, resolve_layer)


def cmd_models(args) -> None:
    from ..models.registry import DEFAULT_LAYERS, list_models

    names = list_models()
    rows = [{"name": n, "default_layer": DEFAULT_LAYERS.get(n)} for n in names]
    emit(rows, args.json, "\n".join(f"{r['name']:<28} {r['default_layer'] or ''}" for r in rows))


def cmd_layers(args) -> None:
    from ..core.memory import LayerMemory
    from ..models.registry import layer_names
    from ..core.trace import get_module

    clf = load_model(args)
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
    emit(rows, args.json, text)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``models``, ``layers``."""
    p = add_command(sub, "models", "list the models rulewriter can load",
                    example="rulewriter models --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = add_command(sub, "layers", "list a model's conv and linear layers; * marks the default",
                    example="rulewriter layers --model resnet50 --weights none")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)
