"""Atomic file writes: a temp file in the destination's folder, then ``os.replace``.

Readers never see half a file, and a failed write leaves the old file as it was::

    atomic_write("edit.json", lambda fh: fh.write(b"{}"))
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_bytes"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` (and its folder) through ``write(fh)`` on a temp file, then rename it into place."""
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the result; 0666 through the umask is what open() gives.
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def atomic_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))
