"""Helpers shared by the benchmark scripts: data lookup, photos and masks, fast accuracy, result files.

The benchmarks measure the package on the real photos of the shared data folder (``$RULEWRITER_SHARED``
or ``../shared`` beside the project root). When it is missing, :func:`require_shared` says so and the
script exits with status 0, so a fresh checkout can run ``python benchmarks/<name>.py`` safely.

:class:`TailEvaluator` makes "accuracy on 1000 photos after an edit" cheap: one full forward pass caches
each photo's activation at the input of the block that holds the edited layer, and every later evaluation
runs only the network's tail from there, with whatever edit is applied at that moment. It checks once that
the tail reproduces the full model's logits and otherwise falls back to full forward passes.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"

#: The hand-drawn ellipse around the cup and saucer of ``skimage.data.coffee()`` (600×400).
COFFEE_ELLIPSE: tuple[int, int, int, int] = (78, 65, 478, 385)
#: Tolerance for the tail-from-cache shortcut against the full model's logits.
TAIL_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------ environment
def shared_dir() -> Path:
    """The shared data folder: ``$RULEWRITER_SHARED`` or ``shared/`` beside the repository root."""
    env = os.environ.get("RULEWRITER_SHARED")
    return Path(env) if env else BENCH_DIR.parent.parent / "shared"


def require_shared(*needed: str) -> Path:
    """The shared folder, or exit 0 with a clear message when it (or a needed sub-path) is missing."""
    root = shared_dir()
    missing = [p for p in ("", *needed) if not (root / p).exists()]
    if missing:
        where = root / missing[0] if missing[0] else root
        print(f"SKIPPED: shared benchmark data not found at {where} "
              "(set RULEWRITER_SHARED to the shared data folder). Nothing was measured.")
        sys.exit(0)
    # The segmenters look for their models under $RULEWRITER_SHARED (else ../shared from the cwd): point them
    # at the folder found here, so a benchmark run from benchmarks/ finds DeepLab too.
    os.environ.setdefault("RULEWRITER_SHARED", str(root))
    return root


def setup_torch(threads: int = 2) -> None:
    """Use a fixed, small number of CPU threads (the benchmark machine is shared; ``BENCH_THREADS`` overrides)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", threads)))
    torch.manual_seed(0)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


# ------------------------------------------------------------------------------------------ timing
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@contextmanager
def stopwatch(out: list[float]) -> Iterator[None]:
    """Append the wall time of the ``with`` block (seconds) to ``out``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out.append(time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ photos
def imagenet_samples(shared: Path, clf: Any, limit: int | None = None) -> tuple[list[Path], list[int]]:
    """The imagenet-samples photos in sorted order with their class indices (first ``limit`` only)."""
    from rulewriter.models.data import labelled_images

    pairs = labelled_images(shared / "data" / "imagenet-samples", clf.labels, clf.wnids)
    pairs = pairs[:limit] if limit is not None else pairs
    return [p for p, _ in pairs], [y for _, y in pairs]


def load_tensors(paths: Sequence[Path], preprocess: Any) -> torch.Tensor:
    """Decode and preprocess photos into one (N, 3, S, S) float32 tensor."""
    from rulewriter.models.data import load_image

    return preprocess.batch([load_image(p) for p in paths])


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def car_photos(shared: Path, split: str) -> tuple[list[Path], Any]:
    """Photos of one car-parts split (``trainingset``/``testset``) in sorted order, and its CocoIndex.

    "Sorted" is natural order of the file names (train1, train2, …, train10), so that the first N photos
    are the ones a person would call the first N.
    """
    from rulewriter.concepts.masks import coco_index

    root = shared / "data" / "car-parts" / split
    index = coco_index(root / "annotations.json")
    paths = sorted((root / "JPEGImages").glob("*.jpg"), key=_natural_key)
    return [p for p in paths if p.name in index], index


def whole_car_mask(index: Any, photo: Path) -> np.ndarray:
    """Union of every part annotation of one photo (all categories but the background): the whole car."""
    out: np.ndarray | None = None
    for name in index.categories:
        if name.strip("_").lower() == "background":
            continue
        m = index.mask(photo.name, name, allow_empty=True)
        out = m if out is None else np.maximum(out, m)
    if out is None:
        raise ValueError(f"{index.source} has no part categories")
    return out


def ellipse_mask(size_wh: tuple[int, int], box: Sequence[int]) -> np.ndarray:
    """A filled ellipse inside ``box`` (left, top, right, bottom) on an image of ``size_wh``, float32 0/1."""
    m = Image.new("L", size_wh, 0)
    ImageDraw.Draw(m).ellipse(list(box), fill=255)
    return np.asarray(m, np.float32) / 255.0


def coffee_photo() -> tuple[Image.Image, np.ndarray]:
    """``skimage.data.coffee()`` and the hand-drawn ellipse mask of its cup and saucer."""
    import skimage.data

    img = Image.fromarray(skimage.data.coffee())
    return img, ellipse_mask(img.size, COFFEE_ELLIPSE)


def find_one(folder: Path, pattern: str) -> Path:
    hits = sorted(folder.glob(pattern))
    if not hits:
        raise FileNotFoundError(f"no file matching {pattern} in {folder}")
    return hits[0]


# ------------------------------------------------------------------------------------------ accuracy
def top1_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((pred == labels).double().mean())


# The package's tail shortcut (EfficientNet from a block's cached input to the logits), under the names the
# benchmarks have always used.
from rulewriter.core.tail import run_tail as _run_tail, tail_start as _tail_start  # noqa: E402


class TailEvaluator:
    """Top-1 predictions on a fixed photo set for several edit layers, re-run cheaply under any edit.

    Args:
        clf: the classifier (its model must be in eval mode; edits are applied by the caller).
        layers: the layers that will be edited; one cached activation per distinct block.
        paths: the photos.
        batch_size: photos per forward pass.
    """

    def __init__(self, clf: Any, layers: Sequence[str], paths: Sequence[Path], batch_size: int = 50,
                 log: Callable[[str], None] = print) -> None:
        from rulewriter.models.data import ImageDataset
        from rulewriter.core.trace import Trace

        self.clf, self.paths, self.batch_size = clf, list(paths), batch_size
        model = clf.model
        self.start = {layer: _tail_start(model, layer) for layer in layers}
        starts = sorted({s for s in self.start.values() if s is not None})
        cached: dict[str, list[torch.Tensor]] = {s: [] for s in starts}
        logits: list[torch.Tensor] = []
        loader = torch.utils.data.DataLoader(ImageDataset(self.paths, clf.preprocess), batch_size=batch_size)
        t0 = time.perf_counter()
        with torch.no_grad(), ExitStack() as stack:
            traces = {s: stack.enter_context(Trace(model, s, retain_output=False)) for s in starts}
            for x, _ in loader:
                for tr in traces.values():
                    tr.reset()
                logits.append(model(x))
                for s, tr in traces.items():
                    cached[s].append(tr.input)
        self.full_seconds = time.perf_counter() - t0
        self.base_logits = torch.cat(logits)
        self.cache = {s: torch.cat(v) for s, v in cached.items()}
        # Trust the shortcut only where it reproduces the full model.
        self.tail_diff: dict[str, float] = {}
        for s in starts:
            diff = float((self._tail_logits(s) - self.base_logits).abs().max())
            self.tail_diff[s] = diff
            if diff >= TAIL_TOLERANCE:
                log(f"tail from {s} differs from the full model by {diff:.2e}; using full forward passes")
        for layer, s in self.start.items():
            if s is not None and self.tail_diff[s] >= TAIL_TOLERANCE:
                self.start[layer] = None

    @torch.no_grad()
    def _tail_logits(self, start: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        x = self.cache[start] if idx is None else self.cache[start][idx]
        return torch.cat([_run_tail(self.clf.model, start, x[i : i + self.batch_size])
                          for i in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def _full_logits(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        from rulewriter.models.data import ImageDataset

        paths = self.paths if idx is None else [self.paths[i] for i in idx.tolist()]
        loader = torch.utils.data.DataLoader(ImageDataset(paths, self.clf.preprocess), batch_size=self.batch_size)
        return torch.cat([self.clf.model(x) for x, _ in loader])

    def predictions(self, layer: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Top-1 class of each photo (or of the photos ``idx``) with the model as it is now."""
        start = self.start.get(layer)
        logits = self._tail_logits(start, idx) if start is not None else self._full_logits(idx)
        return logits.argmax(1)

    def base_predictions(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Top-1 of the unedited model, from the caching pass."""
        pred = self.base_logits.argmax(1)
        return pred if idx is None else pred[idx]

    def method(self, layer: str) -> str:
        s = self.start.get(layer)
        return f"tail from {s} input (max |Δlogit| {self.tail_diff[s]:.1e})" if s else "full forward"


@torch.no_grad()
def top1(clf: Any, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Top-1 class indices of preprocessed images with the model as it is now."""
    return torch.cat([clf.model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


# ------------------------------------------------------------------------------------------ results
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are expected to be formatted by the caller."""
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (payload plus machine info) and ``results/<name>.md`` atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    data = {"benchmark": name, "machine": machine, **payload}
    footer = (f"\n\n_Measured {machine['date']} on {machine['cpu_count']} CPUs "
              f"({machine['torch_threads']} torch threads), torch {machine['torch']}, "
              f"Python {machine['python']}._\n")
    paths = (RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md")
    texts = (json.dumps(data, indent=2, default=str) + "\n", markdown.rstrip() + footer)
    from rulewriter.atomic import atomic_files

    atomic_files({path: text.encode("utf-8") for path, text in zip(paths, texts)})  # both files or neither
    return paths


# ------------------------------------------------------------------------------------------ cached masks
def cached_segmenter(seg: Any, folder: Path | None = None) -> Any:
    """``seg`` whose masks of image *files* are kept under ``.cache/masks/`` (uint8 PNG), keyed by content.

    The key is the segmenter's name with the file's name, size and modification time, so a changed photo
    or another segmenter is recomputed. In-memory images (no ``source``) are not cached.
    """
    import hashlib

    from rulewriter.atomic import atomic_write
    from rulewriter.studies.segmenters import Segmenter

    root = folder or CACHE_DIR / "masks"

    class Cached(Segmenter):
        name = seg.name

        def _segment(self, image: Image.Image, source: Path | None) -> np.ndarray:
            if source is None:
                return seg(image)
            st = Path(source).stat()
            key = hashlib.sha256(f"{seg.name}|{Path(source).name}|{st.st_size}|{st.st_mtime_ns}|{image.size}"
                                 .encode()).hexdigest()[:24]
            path = root / f"{key}.png"
            if path.is_file():
                with Image.open(path) as im:
                    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            m = seg(image, source)
            # A temp name of this process's own: two benchmarks may segment the same photo at once.
            png = Image.fromarray(np.clip(np.rint(m * 255), 0, 255).astype(np.uint8), "L")
            atomic_write(path, lambda fh: png.save(fh, format="PNG"))
            return m

    return Cached()
