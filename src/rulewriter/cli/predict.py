"""``rulewriter predict``: top-k predictions, with edits and added classes applied in memory."""
from __future__ import annotations

import argparse
from typing import Sequence

from ..errors import EditError
from .common import add_command, add_json_arg, add_model_args, emit, load_edit, load_model


def predict_paths(clf, paths: Sequence[str], topk: int = 5) -> list[dict]:
    """Each image's top-k; a NaN or inf probability (an edit that overflows the activations) is an EditError,
    never a ``NaN`` in the output (which is not JSON)."""
    import math

    from ..models.data import load_image

    out = []
    images = [load_image(p) for p in paths]  # fail before any work on a bad file
    for i in range(0, len(images), 16):
        x = clf.preprocess.batch(images[i : i + 16])
        for p, preds in zip(paths[i : i + 16], clf.predict(x, topk=topk)):
            if not all(math.isfinite(pr) for _, _, pr in preds):
                raise EditError(f"the model's outputs on {p} are NaN or inf: an edit applied makes it overflow "
                                "(its factors are too large)")
            out.append({"path": str(p), "top5": [{"index": j, "label": lab, "prob": round(pr, 6)} for j, lab, pr in preds]})
    return out


def cmd_predict(args) -> None:
    clf = load_model(args)
    # Each --edit is applied in memory, in order: rule edits change weights, added classes add a logit.
    # The weights file is never touched.
    for path in args.edit:
        if is_new_class(path):
            from ..extensions.newclass import NewClass

            clf = NewClass.load(path).apply(clf).classifier
        else:
            load_edit(args, clf, path).apply(clf.model)
    res = predict_paths(clf, args.images, args.topk)
    text = "\n".join(
        f"{r['path']}\n" + "\n".join(f"   {t['prob']:.3f}  {t['label']} ({t['index']})" for t in r["top5"]) for r in res
    )
    emit(res, args.json, text)


def is_new_class(path: str) -> bool:
    try:
        from ..extensions.newclass import is_new_class_file
    except ModuleNotFoundError:
        return False
    return is_new_class_file(path)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``predict``."""
    p = add_command(sub, "predict", "top-k predictions, optionally with edits applied",
                    description="Each --edit (a rule edit or an added class) is applied in memory, in order; "
                                "the model's weights file is never written.",
                    example="rulewriter predict --edit gravel-wheel.safetensors --topk 3 car.jpg")
    add_model_args(p)
    p.add_argument("--edit", action="append", default=[],
                   help="an edit or an added class (.safetensors) to apply in memory first (repeat to compose)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to show per image")
    add_json_arg(p, "each image's top-k (index, label, probability)")
    p.add_argument("images", nargs="+", help="the photos to classify")
    p.set_defaults(func=cmd_predict)
