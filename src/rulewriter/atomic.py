"""Atomic file writes: a temp file in the destination's folder, then ``os.replace``.

Readers never see half a file, and a failed write leaves the old file as it was::

    atomic_write("edit.json", lambda fh: fh.write(b"{}"))
    atomic_files({"edit.safetensors": data, "edit.safetensors.json": text})   # both or neither

Temp files are named ``.NAME.PID.RANDOM.tmp``, so :func:`remove_stale_temps` can tell those of dead
processes (killed mid-write) from those of running ones.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

__all__ = ["atomic_write", "atomic_bytes", "atomic_files", "remove_stale_temps"]


def _temp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` (and its folder) through ``write(fh)`` on a temp file, then rename it into place."""
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the result; 0666 through the umask is what open() gives.
    tmp = _temp_name(dest)
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


def atomic_files(contents: Mapping[str | os.PathLike[str], bytes]) -> list[Path]:
    """Write several files as one: afterwards all of them hold the new bytes, or (on any error) all are as before.

    Every temp file is written first (a full disk or a blocked name fails here, before any file changes);
    then each is renamed into place, and a failed rename puts back the files already replaced. Used for an
    artefact and its JSON description, which must never be found apart.

    Example::

        >>> atomic_files({"a.bin": b"1", "a.bin.json": b"{}"})      # doctest: +SKIP
        [PosixPath('a.bin'), PosixPath('a.bin.json')]
    """
    items = [(Path(p).expanduser(), data) for p, data in contents.items()]
    temps: list[tuple[Path, Path]] = []
    try:
        for dest, data in items:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_name(dest)
            temps.append((tmp, dest))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    done: list[tuple[Path, Path | None]] = []  # (destination, its previous content kept aside)
    try:
        for tmp, dest in temps:
            backup = None
            if dest.is_file():  # a hard link keeps the old file in place until the rename replaces it
                backup = _temp_name(dest)
                try:
                    os.link(dest, backup)
                except OSError:
                    shutil.copy2(dest, backup)
            try:
                os.replace(tmp, dest)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            done.append((dest, backup))
    except BaseException:
        for dest, backup in reversed(done):
            if backup is not None:
                os.replace(backup, dest)
            else:
                dest.unlink(missing_ok=True)
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)
    return [dest for dest, _ in items]


_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")


def remove_stale_temps(folder: str | os.PathLike[str], min_age: float = 300.0) -> list[Path]:
    """Delete the temp files in ``folder`` left by processes that are no longer running (killed mid-write).

    A temp file of a live process (its pid is in the name) is kept: it is being written. So is one younger
    than ``min_age`` seconds, since a cache folder shared between machines holds other hosts' pids. Returns
    what was removed.

    Example::

        >>> remove_stale_temps("~/.cache/rulewriter")                # doctest: +SKIP
        [PosixPath('/home/me/.cache/rulewriter/.stats-….safetensors.4242.1f2e3d4c5b6a.tmp')]
    """
    removed = []
    d = Path(folder).expanduser()
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            try:
                if time.time() - p.stat().st_mtime < min_age:
                    continue
                p.unlink()
                removed.append(p)
            except OSError:
                pass  # another process cleaned it first, or the folder is read-only
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: assume it is writing
    return True
