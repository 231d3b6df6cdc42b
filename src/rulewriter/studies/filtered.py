"""The filtered test set of a probe (thesis Table 2.2): originals, stylized copies, masks and labels.

:class:`FilteredSet` is what :meth:`rulewriter.studies.spurious.ProbeResult.filtered_set` returns and what
:func:`rulewriter.studies.spurious.mitigate` splits into exemplars and held-out test images;
:class:`FixedSplit` is one whose split is fixed in advance (exemplars from its first ``n_pool`` items,
the test split the rest), for experiments whose exemplars and test images come from different sources::

    from rulewriter.studies.filtered import FilteredSet, FixedSplit

    fs = FilteredSet.load("probe-out")            # or ProbeResult.filtered_set(k=5)
    train, test = fs.split(5)                     # 5 exemplars drawn deterministically, test = the rest
    fixed = FixedSplit(*parts, meta={"n_pool": 12})
    train, test = fixed.split(5)                  # the first 5 of items 0..11; test = items 12..
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import EditError, RulewriterError

__all__ = ["FORMAT", "MANIFEST", "FilteredSet", "FixedSplit"]

MANIFEST = "manifest.json"
FORMAT = "rulewriter.filtered_set/1"


@dataclass
class FilteredSet:
    """Images of the classes a stylization hurt most: originals, stylized copies, masks, labels.

    The thesis's filtered test set (Table 2.2). ``classes`` are ranked, most affected first (the first is
    the *target* class of Table 2.3). ``meta`` records how the set was made (model, segmenter, stylizer,
    texture). Masks are (H, W) uint8 at their image's size (255 = concept).

    Example::

        >>> fs = res.filtered_set(k=5)                       # doctest: +SKIP
        >>> train, test = fs.split(5)                         # doctest: +SKIP
        >>> fs.save("probe-out/filtered"); FilteredSet.load("probe-out/filtered")   # doctest: +SKIP
    """

    originals: list[Image.Image]
    stylized: list[Image.Image]
    masks: list[np.ndarray]
    labels: list[int]
    sources: list[str]
    classes: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.originals)
        if not (len(self.stylized) == len(self.masks) == len(self.labels) == len(self.sources) == n):
            raise RulewriterError("a filtered set needs one stylized copy, mask, label and source per original")
        for o, s, m in zip(self.originals, self.stylized, self.masks):
            if o.size != s.size or m.shape != (o.size[1], o.size[0]):
                raise RulewriterError(f"original {o.size}, stylized {s.size} and mask {m.shape} do not align")

    def __len__(self) -> int:
        return len(self.originals)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as float32 in [0, 1]."""
        return self.masks[i].astype(np.float32) / 255.0

    def subset(self, idx: Sequence[int], **meta: Any) -> "FilteredSet":
        idx = [int(i) for i in idx]
        return FilteredSet([self.originals[i] for i in idx], [self.stylized[i] for i in idx],
                           [self.masks[i] for i in idx], [self.labels[i] for i in idx],
                           [self.sources[i] for i in idx], list(self.classes), {**self.meta, **meta})

    def split(self, n_train: int, seed: int = 0,
              eligible: Sequence[int] | None = None) -> tuple["FilteredSet", "FilteredSet"]:
        """(train, test): ``n_train`` exemplars drawn deterministically (:func:`rulewriter.models.data.subsample`)
        and the disjoint rest. Exemplars never come from the test split. ``eligible`` restricts the
        exemplars to some indices (e.g. images whose concept the model's centre crop shows).

        Example::

            >>> train, test = fs.split(5)                     # doctest: +SKIP
            >>> set(train.sources) & set(test.sources)        # doctest: +SKIP
            set()
        """
        from ..models.data import subsample

        if n_train < 1:
            raise EditError(f"need at least one exemplar, got {n_train}")
        if n_train >= len(self):
            raise EditError(f"the filtered set has {len(self)} images; {n_train} exemplars would leave no test "
                            "images (probe more images or lower --exemplars)")
        pool = list(range(len(self))) if eligible is None else sorted({int(i) for i in eligible})
        if len(pool) < n_train:
            raise EditError(f"only {len(pool)} images of the filtered set can serve as exemplars; "
                            f"{n_train} asked (lower --exemplars)")
        train = subsample(pool, n_train, seed=seed)
        chosen = set(train)
        test = [i for i in range(len(self)) if i not in chosen]
        return (self.subset(train, split="train", seed=seed), self.subset(test, split="test", seed=seed))

    def testset(self, name: str = "filtered"):
        """The originals with their labels and stylized copies as an :class:`~rulewriter.studies.testsets.TestSet`."""
        from .testsets import TestSet

        return TestSet(name, list(self.originals), list(self.labels), list(self.stylized),
                       info={"kind": "filtered", **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))}})

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "n": len(self), "classes": self.classes, "meta": self.meta,
                "items": [{"source": s, "label": y} for s, y in zip(self.sources, self.labels)]}

    def save(self, folder: str | Path) -> Path:
        """Write ``originals/``, ``stylized/``, ``masks/`` (PNG, lossless) and ``manifest.json`` into ``folder``.

        Every file is written atomically and the manifest last, so a folder without a manifest is
        incomplete and :meth:`load` refuses it. Returns the manifest's path.
        """
        from ..atomic import atomic_bytes
        from .report import save_png

        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise RulewriterError(f"{out} exists and is not a folder")
        items = []
        for i, (o, s, m, y, src) in enumerate(zip(self.originals, self.stylized, self.masks, self.labels,
                                                  self.sources)):
            names = {k: f"{k}/{i:05d}.png" for k in ("originals", "stylized", "masks")}
            save_png(out / names["originals"], o.convert("RGB"))
            save_png(out / names["stylized"], s.convert("RGB"))
            save_png(out / names["masks"], Image.fromarray(m, "L"))
            items.append({"original": names["originals"], "stylized": names["stylized"], "mask": names["masks"],
                          "label": int(y), "source": src})
        manifest = {"format": FORMAT, "classes": self.classes, "meta": self.meta, "items": items}
        return atomic_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, default=str) + "\n").encode())

    @classmethod
    def load(cls, folder: str | Path) -> "FilteredSet":
        """Read a folder written by :meth:`save` (or a probe output folder holding ``filtered/``)."""
        from ..models.data import load_image

        root = Path(folder)
        if not (root / MANIFEST).is_file() and (root / "filtered" / MANIFEST).is_file():
            root = root / "filtered"
        path = root / MANIFEST
        if not path.is_file():
            raise RulewriterError(f"{folder} holds no filtered set ({MANIFEST} not found); run `rulewriter probe` first")
        try:
            man = json.loads(path.read_text())
            if man.get("format") != FORMAT:
                raise RulewriterError(f"{path} is not a rulewriter filtered set (format {man.get('format')!r})")
            items = man["items"]
            originals = [load_image(root / it["original"]) for it in items]
            stylized = [load_image(root / it["stylized"]) for it in items]
            masks = []
            for it in items:
                with Image.open(root / it["mask"]) as im:
                    masks.append(np.asarray(im.convert("L"), dtype=np.uint8).copy())
            return cls(originals, stylized, masks, [int(it["label"]) for it in items],
                       [str(it["source"]) for it in items], [int(c) for c in man["classes"]], dict(man.get("meta", {})))
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise RulewriterError(f"{path}: malformed filtered set ({e})") from None


class FixedSplit(FilteredSet):
    """A filtered set whose split is fixed: exemplars only from the first ``meta["n_pool"]`` items, test = the rest.

    :meth:`split` takes the first ``n_train`` of the pool (in order, restricted to ``eligible``) and
    returns every item after the pool as the test split, whatever the seed: no test image can become an
    exemplar, and no pool item is ever tested. The pool size is kept in ``meta`` so it survives
    :meth:`save` and ``FixedSplit.load``.

    Example::

        >>> fs = FixedSplit(originals, stylized, masks, labels, sources, [817], {"n_pool": 3})  # doctest: +SKIP
        >>> train, test = fs.split(2)          # items 0, 1; test = items 3.. (item 2 is in neither)  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        pool = self.meta.get("n_pool")
        if isinstance(pool, bool) or not isinstance(pool, int) or not 0 <= pool <= len(self):
            raise RulewriterError(f"a fixed split needs meta['n_pool'], an int in 0..{len(self)}, got {pool!r}")

    @property
    def n_pool(self) -> int:
        """How many leading items are exemplar candidates."""
        return int(self.meta["n_pool"])

    def split(self, n_train: int, seed: int = 0,
              eligible: Sequence[int] | None = None) -> tuple[FilteredSet, FilteredSet]:
        """(train, test): the first ``n_train`` eligible pool items, and every item after the pool."""
        if n_train < 1:
            raise EditError(f"need at least one exemplar, got {n_train}")
        ok = set(range(self.n_pool)) if eligible is None else {int(i) for i in eligible}
        train = [i for i in range(self.n_pool) if i in ok][:n_train]
        if len(train) < n_train:
            raise EditError(f"only {len(train)} exemplar candidates; {n_train} asked")
        test = list(range(self.n_pool, len(self)))
        if not test:
            raise EditError("a fixed split with no items after its pool has no test images")
        return self.subset(train, split="train"), self.subset(test, split="test")
