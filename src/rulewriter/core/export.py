"""Export for deployment: the model's full state dict with edits applied, as one new safetensors file.

The file loads like any weights file, with ``load_classifier(name, weights=path)`` or ``--weights path``,
and gives the edited model's logits bit for bit (the same float32 numbers the in-memory edit produces).
The user's weights file and the edits are only read; the export is written atomically and is refused
when it would replace one of them::

    export_edited(clf, [Edit.load("a.safetensors"), Edit.load("b.safetensors")], "edited.safetensors",
                  inputs=["a.safetensors", "b.safetensors"])
    edited = load_classifier("efficientnet-lite0", weights="edited.safetensors")
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import EditError
from .edit import Edit, timestamp
from .artefacts import atomic_save

__all__ = ["FORMAT", "edited_state_dict", "export_edited", "same_file"]

FORMAT = "rulewriter.core.export/1"


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (after ``~``, symlinks and ``..``; hard links too when both exist).

    Example::

        >>> same_file("x/../a.safetensors", "a.safetensors")
        True
    """
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def edited_state_dict(classifier, edits: Sequence[Edit], sources: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict (on the CPU) with ``edits`` applied in turn; the model is left as it was.

    Each edit is first checked to be made for this model and weights (:meth:`Edit.check_model`);
    ``sources`` names the edits in that message.
    """
    sources = list(sources) if sources is not None else [f"edit {i + 1}" for i in range(len(edits))]
    for e, src in zip(edits, sources):
        e.check_model(classifier, src)
    # One after another, as ``predict --edit A --edit B`` applies them, so the float32 weights are the same
    # bits (a summed update rounds once, applying in turn rounds after each edit).
    with contextlib.ExitStack() as stack:
        for e in edits:
            stack.enter_context(e.applied(classifier.model))
        return {k: v.detach().cpu().clone() for k, v in classifier.model.state_dict().items()}


def export_edited(classifier, edits: Sequence[Edit], out: str | os.PathLike[str], *,
                  inputs: Sequence[str | os.PathLike[str]] = (), sources: Sequence[str] | None = None) -> Path:
    """Write the edited model's full state dict to ``out`` (safetensors, atomic); returns the path.

    Args:
        classifier: the unedited model the edits were made for.
        edits: the edits to apply, in order (as ``predict --edit A --edit B`` does).
        out: the new weights file. Refused (EditError, nothing written) when it is one of ``inputs`` or
            a ``.json`` beside one of them: the user's weights and edits are never overwritten.
        inputs: the files the export reads (the weights file, the edit files).
        sources: names of the edits for error messages (their paths).

    The safetensors header records the model, the weights it started from and each edit's fingerprint.
    """
    out = Path(out).expanduser()
    for p in inputs:
        for guarded in (Path(p), Path(str(p) + ".json")):
            if same_file(out, guarded):
                raise EditError(f"--out {out} is an input ({guarded}); write the export to a new file")
    if out.suffix != ".safetensors":
        raise EditError(f"the export is a safetensors file; name it *.safetensors (got {out.name})")
    if not out.parent.is_dir():
        raise EditError(f"output folder {out.parent} does not exist")
    sd = edited_state_dict(classifier, edits, sources)
    desc = {"format": FORMAT, "created": timestamp(), "model": classifier.name, "base_weights": classifier.weights_id,
            "edits": [{"fingerprint": e.fingerprint(), "source": s, "rules": len(e.meta.get("rules") or [])}
                      for e, s in zip(edits, sources or [None] * len(edits))]}
    return atomic_save(sd, out, {"format": FORMAT, "rulewriter": json.dumps(desc, sort_keys=True)})
