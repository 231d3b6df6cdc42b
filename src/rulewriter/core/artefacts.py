"""Saved artefacts: safetensors files with a JSON description, written atomically and checked on load.

Edits, weight deltas, added classes, exports and statistics are all safetensors (never pickles): the tensors,
and in the header a ``format`` and what the file holds. :func:`save_described` writes the tensors with their
JSON description (and ``path.json`` beside them) as one atomic pair; :func:`load_described` reads them back
checked; :func:`read_safetensors` refuses pickles with a clear message; :func:`tensors_checksum` is the
checksum a statistics file keeps in its header.

Example::

    save_described("wood.safetensors", {"lam": lam}, "rulewriter.edit/1", {"layer": "features.28"})
    tensors, description = load_described("wood.safetensors", "rulewriter.edit/1", "a rulewriter edit")
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..atomic import atomic_bytes, atomic_files
from ..errors import EditError

__all__ = ["tensors_checksum", "atomic_save", "save_described", "load_described", "read_safetensors"]


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order): stored in a statistics
    file's header and checked on load, so flipped bits after an intact header are found.

    Example:
        >>> tensors_checksum({"a": torch.zeros(2)})[:12]
        '925e06eb784b'
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> Path:
    """Save safetensors atomically, so readers never see half a file."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
    return atomic_bytes(path, data)


def save_described(path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, description: dict,
                   *, sidecar: bool = True) -> Path:
    """Save an artefact: safetensors with its JSON ``description`` in the header, and ``path.json`` beside it.

    Both are written atomically as a pair (:func:`~rulewriter.atomic.atomic_files`). Edits, weight deltas
    and added classes all use this layout.
    """
    path = Path(path)
    text = json.dumps(description, indent=2, sort_keys=True, default=str)
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={"format": fmt, "rulewriter": text})
    files = {path: data}
    if sidecar:  # the file and its description are written as a pair: one is never found without the other
        files[path.with_name(path.name + ".json")] = (text + "\n").encode()
    atomic_files(files)
    return path


def load_described(path: str | Path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artefact written by :func:`save_described`: its tensors and its JSON description.

    ``what`` names the artefact in errors ("a rulewriter edit"); a pickle, another format or a broken
    description is an :class:`~rulewriter.errors.EditError`.
    """
    tensors, header = read_safetensors(Path(path), EditError)
    if header.get("format") != fmt or "rulewriter" not in header:
        raise EditError(f"{path} is safetensors but not {what} (format {header.get('format')!r})")
    try:
        desc = json.loads(header["rulewriter"])
    except ValueError as e:
        raise EditError(f"{path}: malformed description of {what} ({e})") from None
    except RecursionError:  # JSON nested thousands deep
        raise EditError(f"{path}: malformed description of {what} (nested too deeply)") from None
    if not isinstance(desc, dict):
        raise EditError(f"{path}: malformed description of {what} (not a JSON object)")
    return tensors, desc


def read_safetensors(path: Path, error: type[Exception]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file, refusing pickles with a clear message. Never unpickles anything."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"no such file: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        return load_file(str(path)), header
    except Exception as e:  # safetensors raises its own error types, and others on truncated files
        reason = e
    # Only a file that safetensors cannot parse is sniffed: a valid header's length may start with any byte.
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80" or head == b"PK":
        raise error(
            f"{path} is a pickle or a torch.save zip archive, not safetensors; rulewriter never unpickles "
            "files (they can run arbitrary code). Re-save it with safetensors."
        )
    raise error(f"{path} is not a valid safetensors file: {reason}") from None
