"""Images from disk: safe loading, folder listings, class labels from folder or file names, a Dataset.

Every way an image file can be bad (missing, a directory, not an image, corrupt, truncated) becomes an
:class:`~rulewriter.errors.ImageLoadError` naming the file and the reason, so a long statistics run fails
on its first bad file with a message a user can act on.

A tour::

    >>> from rulewriter.models.data import ImageDataset, labelled_images, list_images, load_image, subsample
    >>> img = load_image("photos/car.jpg")                      # RGB, fully read, file closed
    >>> paths = subsample(list_images("photos/"), 500)          # sorted, recursive, deterministic sample
    >>> pairs = labelled_images("imagenet-val/", clf.labels, clf.wnids)   # [(path, class index), ...]
    >>> ds = ImageDataset([p for p, _ in pairs], clf.preprocess, [y for _, y in pairs])
    >>> x, y = ds[0]                                            # (3, 224, 224) tensor, class index
    >>> ds.fingerprint()                                        # goes into statistics cache keys

Labelled folders come in two layouts: one subfolder per class, named by wnid (``n04285008/``) or by class
name (``sports car/``, ``Sports_Car/``), or flat files whose names start with the wnid
(``n04285008_123.jpg``).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import ImageLoadError
from .preprocess import Preprocess, load_image  # re-exported: reading a file is where every image starts
from .registry import find_class

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "labelled_images", "list_images", "load_image", "subsample"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_WNID_FILE = re.compile(r"^(n\d{8})(?=[_.\-]|$)")

T = TypeVar("T")


def _is_hidden(rel: Path) -> bool:
    # Skips .git, .DS_Store and macOS "._photo.jpg" resource forks, which carry image extensions.
    return any(part.startswith(".") for part in rel.parts)


def list_images(root: str | os.PathLike[str], exts: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, extensions case-insensitive, hidden files skipped).

    A path to a single image file gives a list of that one file.

    Raises:
        ImageLoadError: ``root`` does not exist or holds no images.

    Example::

        >>> list_images("photos/")[:2]
        [PosixPath('photos/a.jpg'), PosixPath('photos/sub/b.png')]
    """
    r = Path(root)
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts}
    if r.is_file():
        if r.suffix.lower() in wanted:
            return [r]
        raise ImageLoadError(f"{r} is not an image file (expected one of {', '.join(sorted(wanted))})")
    if not r.is_dir():
        raise ImageLoadError(f"no such directory: {r}")
    out = sorted(p for p in r.rglob("*") if p.suffix.lower() in wanted and p.is_file()
                 and not _is_hidden(p.relative_to(r)))
    if not out:
        raise ImageLoadError(f"no images found under {r} (extensions {', '.join(sorted(wanted))})")
    return out


def labelled_images(
    root: str | os.PathLike[str], classifier_labels: Sequence[str], wnids: Sequence[str] | None = None
) -> list[tuple[Path, int]]:
    """``(path, class index)`` for every image under ``root``, with classes read from names.

    Layouts:

    * one subfolder per class, named by wnid (``n04285008``) or by class label (exact, or ignoring case
      with ``_`` read as a space: ``sports_car``); images may sit deeper inside a class folder;
    * flat files named ``nXXXXXXXX_*.jpg`` (needs ``wnids``).

    Raises:
        ImageLoadError: no images; a folder or file name that names no class (all of them are listed).

    Example::

        >>> labelled_images("val/", clf.labels, clf.wnids)[:1]
        [(PosixPath('val/n04285008/1.jpg'), 817)]
    """
    r = Path(root)
    if not r.is_dir():
        raise ImageLoadError(f"no such directory: {r}")
    labels = list(classifier_labels)
    out: list[tuple[Path, int]] = []
    bad_dirs: list[str] = []
    bad_files: list[str] = []
    for entry in sorted(r.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            try:
                files = list_images(entry)
            except ImageLoadError:
                continue  # a folder without images holds nothing to label
            idx = find_class(entry.name, labels, wnids)
            if idx is None:
                bad_dirs.append(entry.name)
            else:
                out.extend((f, idx) for f in files)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            m = _WNID_FILE.match(entry.name)
            idx = find_class(m.group(1), [], wnids) if (m and wnids is not None) else None
            if idx is None:
                bad_files.append(entry.name)
            else:
                out.append((entry, idx))
    problems = []
    if bad_dirs:
        problems.append(f"folders that name no class (by wnid or label): {', '.join(bad_dirs[:10])}"
                        + (f" and {len(bad_dirs) - 10} more" if len(bad_dirs) > 10 else ""))
    if bad_files:
        need = "" if wnids is not None else " (flat files need a classifier with wnids)"
        problems.append(f"files not named nXXXXXXXX_*.ext with a known wnid{need}: {', '.join(bad_files[:10])}"
                        + (f" and {len(bad_files) - 10} more" if len(bad_files) > 10 else ""))
    if problems:
        raise ImageLoadError(f"cannot label the images under {r}: " + "; ".join(problems))
    if not out:
        raise ImageLoadError(f"no images found under {r}")
    return sorted(out)


class ImageDataset(torch.utils.data.Dataset):
    """Image files → preprocessed tensors, with labels (or -1) for a DataLoader.

    Example::

        >>> ds = ImageDataset(list_images("photos/"), clf.preprocess)
        >>> x, y = ds[0]
        >>> x.shape, y
        (torch.Size([3, 224, 224]), -1)
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        preprocess: Preprocess,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.preprocess = preprocess
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} images")
        self.labels = [int(y) for y in labels] if labels is not None else None

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        preprocess: Preprocess,
        classifier_labels: Sequence[str] | None = None,
        wnids: Sequence[str] | None = None,
    ) -> ImageDataset:
        """All images under ``root``; labelled via :func:`labelled_images` when class labels are given.

        Example::

            >>> ds = ImageDataset.from_folder("val/", clf.preprocess, clf.labels, clf.wnids)
        """
        if classifier_labels is None:
            return cls(list_images(root), preprocess)
        pairs = labelled_images(root, classifier_labels, wnids)
        return cls([p for p, _ in pairs], preprocess, [y for _, y in pairs])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.preprocess.image(load_image(self.paths[i]))
        return x, (self.labels[i] if self.labels is not None else -1)

    def fingerprint(self, content: bool = False) -> str:
        """sha256 over the sorted relative paths and file sizes: the same for the same files anywhere.

        Paths are taken relative to the images' common folder, and modification times are left out, so
        a copy of the data on another machine has the same fingerprint. Labels and preprocessing are not
        included (key those separately). ``content=True`` also hashes every file's bytes (slow, exact).

        Example::

            >>> ImageDataset(list_images("photos/"), clf.preprocess).fingerprint()[:8]
            '3f1c9a0b'
        """
        if not self.paths:
            return hashlib.sha256(b"empty").hexdigest()
        # abspath, not resolve(): a symlinked data folder keeps the names it is known by.
        resolved = [Path(os.path.abspath(p)) for p in self.paths]
        base = Path(os.path.commonpath([str(p.parent) for p in resolved]))
        h = hashlib.sha256()
        for p in sorted(resolved, key=lambda q: q.relative_to(base).as_posix()):
            try:
                size = p.stat().st_size
            except OSError as e:
                raise ImageLoadError(f"cannot fingerprint {p}: {e.strerror or e}") from e
            h.update(f"{p.relative_to(base).as_posix()}\0{size}\n".encode())
            if content:
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()


def subsample(paths: Sequence[T], n: int | None, seed: int = 0) -> list[T]:
    """A deterministic sample of ``n`` items, kept in their original order (all of them if ``n`` ≥ len).

    The choice depends only on ``seed`` and positions, so it is the same on every machine and Python
    version for the same sorted list.

    Example::

        >>> subsample(list(range(10)), 3, seed=1) == subsample(list(range(10)), 3, seed=1)
        True
    """
    items = list(paths)
    if n is None or n >= len(items):
        return items
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")

    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{seed}:{i}".encode()).digest()

    keep = sorted(sorted(range(len(items)), key=rank)[:n])
    return [items[i] for i in keep]
