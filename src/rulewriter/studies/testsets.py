"""The thesis's test sets: images with their ground truth, optionally paired with manipulated copies.

*Random images* (:func:`random_set`) and *confusing images* (:func:`confusing_set`, Section 2.2.2): the top 1%
of a folder by how strongly a concept key context-matches
(:func:`concept_matcher`, :func:`concept_heatmaps`, :func:`match_threshold`, :func:`concept_scores`,
:func:`select_top`), each with a texture pasted where it matches (:class:`MatchedPaste`, :func:`heat_to_mask`).
An image is any :data:`ImageSource`: a path, a PIL image, or a callable that makes one lazily.

The thesis's third set, *mislabelled images* (every target-class image relabelled to "noise"), is not
here: with every label noise, nothing is a positive and nothing is right, so its ROC (Fig. 2-10) and its
accuracies are undefined before and after any edit. What it was meant to show, how the target class's own
images fare, is the same-class rows of :func:`rulewriter.studies.metrics.four_tests` on any set that holds
target-class images.

Example::

    ts = TestSet.from_folder(clf, "imagenet-samples/")
    conf = confusing_set(clf, layer, wheel_key, "imagenet-samples/", wood, C=stats.moment())
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageLoadError, MaskError, RulewriterError
from .metrics import Label, as_label_sets, target_set

__all__ = [
    "ImageSource",
    "MatchedPaste",
    "SourceDataset",
    "TestSet",
    "concept_heatmaps",
    "concept_matcher",
    "concept_scores",
    "confusing_set",
    "describe_source",
    "heat_to_mask",
    "load_source",
    "match_threshold",
    "random_set",
    "select_top",
]

ImageSource = Union[str, Path, Image.Image, Callable[[], Image.Image]]


# ------------------------------------------------------------------------------------------ streaming
class SourceDataset(torch.utils.data.Dataset):
    """Image sources (paths, PIL images, or callables that make one) → ``(preprocessed tensor, index)``.

    Example::

        >>> x, i = SourceDataset(["a.jpg", MatchedPaste(...)], clf.preprocess)[1]     # doctest: +SKIP
    """

    def __init__(self, sources: Sequence[ImageSource], preprocess) -> None:
        self.sources, self.preprocess = list(sources), preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess.image(load_source(self.sources[i])), i


def load_source(src: ImageSource) -> Image.Image:
    """A test-set image as RGB: read a path (clear errors for bad files), copy a PIL image, or call a maker."""
    from ..models.data import load_image

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (str, Path)):
        return load_image(src)
    if callable(src):
        return src().convert("RGB")
    raise ImageLoadError(f"not an image source: {type(src).__name__}")



# ------------------------------------------------------------------------------------------ test sets
@dataclass
class TestSet:
    """Images with their ground truth, optionally paired with manipulated copies (same order).

    Attributes:
        name: shown in reports.
        images: image sources (paths, PIL images, or callables that make one).
        labels: ground truth per image (class index, set of classes, or -1 / empty set for noise).
        manipulated: the manipulated copy of each image, or ``None``.
        groups: names for ground-truth sets, e.g. ``{frozenset(CARS): "car"}``.
        info: how the set was made (JSON-able), e.g. thresholds and selection sizes.

    Example::

        >>> ts = TestSet("cars", ["car1.jpg"], [{817, 511}], groups={frozenset({817, 511}): "car"})
        >>> len(ts)
        1
    """

    name: str
    images: list[ImageSource]
    labels: list[Label]
    manipulated: list[ImageSource] | None = None
    groups: dict[frozenset[int], str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    __test__ = False  # a pytest collection hint: this is not a test class

    def __post_init__(self) -> None:
        self.images, self.labels = list(self.images), list(self.labels)
        if len(self.images) != len(self.labels):
            raise RulewriterError(f"test set {self.name!r}: {len(self.images)} images, {len(self.labels)} labels")
        if self.manipulated is not None and len(self.manipulated) != len(self.images):
            raise RulewriterError(f"test set {self.name!r}: {len(self.manipulated)} manipulated copies for "
                                  f"{len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, classifier, root: str | Path, *, samples: int | None = None, seed: int = 0,
                    name: str | None = None) -> "TestSet":
        """Every labelled image under ``root`` (see :func:`rulewriter.models.data.labelled_images`), or a sample.

        Example::

            >>> TestSet.from_folder(clf, "imagenet-samples/", samples=100).info["n_in_folder"]  # doctest: +SKIP
            1000
        """
        from ..models.data import labelled_images, subsample

        pairs = labelled_images(root, classifier.labels, classifier.wnids)
        chosen = subsample(pairs, samples, seed=seed)
        return cls(name or str(root), [p for p, _ in chosen], [y for _, y in chosen],
                   info={"source": str(root), "n_in_folder": len(pairs), "samples": samples, "seed": seed})

    def subset(self, idx: Sequence[int], name: str | None = None, **info: Any) -> "TestSet":
        """The images ``idx`` (with their labels and manipulated copies)."""
        idx = [int(i) for i in idx]
        man = None if self.manipulated is None else [self.manipulated[i] for i in idx]
        return TestSet(name or self.name, [self.images[i] for i in idx], [self.labels[i] for i in idx], man,
                       dict(self.groups), {**self.info, **info})


def random_set(classifier, root: str | Path, n: int | None = None, *, seed: int = 0) -> TestSet:
    """The thesis's *random images*: ``n`` images of a labelled folder (a deterministic sample; all for None).

    Example::

        >>> rand = random_set(clf, "imagenet-val/", 5000)      # doctest: +SKIP
    """
    ts = TestSet.from_folder(classifier, root, samples=n, seed=seed, name="random images")
    ts.info["kind"] = "random"
    return ts


def concept_matcher(
    classifier,
    layer: str,
    key: torch.Tensor,
    *,
    C: torch.Tensor | None = None,
    ridge: float | None = None,
    view: int = 2,
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A function ``(layer input, layer output) → (B, h, w) heat`` that context-matches ``key`` at ``layer``.

    With the layer's second moment ``C`` the heat at a location is ``k · (C + εI)⁻¹ k*``: how strongly the
    rank-one edit along ``key`` fires there (see :func:`rulewriter.concepts.heatmap.key_match`), with ``ε`` the
    edit's ridge (default :data:`~rulewriter.core.edit.DEFAULT_RIDGE`). Without ``C`` it is ``k · k*``. The output
    is needed only for the inverse views (3, 4).

    Example::

        >>> match = concept_matcher(clf, layer, wheel_key, C=stats.moment())         # doctest: +SKIP
        >>> with Trace(clf.model, layer) as t:                                       # doctest: +SKIP
        ...     clf.model(x)
        >>> heat = match(t.input, t.output)                                          # doctest: +SKIP
    """
    from ..concepts.heatmap import key_match
    from ..core.edit import DEFAULT_RIDGE, update_direction
    from ..core.memory import LayerMemory
    from ..core.trace import get_module

    mem = LayerMemory(get_module(classifier.model, layer), view, name=layer)
    k = torch.as_tensor(key).double().reshape(-1)
    if k.shape[0] != mem.key_dim:
        raise MaskError(f"the concept key has {k.shape[0]} dims; layer {layer!r} view {view} has {mem.key_dim}")
    # C⁻¹k* once, with the same ridge as the edit, rather than one solve per batch.
    q = k if C is None else update_direction(C, k, DEFAULT_RIDGE if ridge is None else ridge)

    def match(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return key_match(mem.keys(x, y).double(), q.to(x.device)).float().cpu()  # q already is (C+εI)⁻¹k*

    match.forward_direction = mem.forward_direction  # type: ignore[attr-defined]
    return match


@torch.no_grad()
def concept_heatmaps(
    classifier,
    layer: str,
    key: torch.Tensor,
    images: Sequence[ImageSource],
    *,
    C: torch.Tensor | None = None,
    ridge: float | None = None,
    view: int = 2,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """Context-match a concept key over images: the heatmap of every image, (N, h, w) float32.

    See :func:`concept_matcher` for what the heat is. Streams the images up to the layer only and keeps
    only the small heatmaps.

    Example::

        >>> heat = concept_heatmaps(clf, layer, wheel_key, paths, C=stats.moment())   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..core.trace import Trace

    match = concept_matcher(classifier, layer, key, C=C, ridge=ridge, view=view)
    loader = torch.utils.data.DataLoader(SourceDataset(images, classifier.preprocess), batch_size=batch_size)
    out = []
    with Trace(classifier.model, layer, retain_output=not match.forward_direction, stop=True) as tr:
        for x, _ in tqdm(loader, desc=f"match {layer}", unit="batch", disable=not progress):
            tr(x.to(classifier.device, classifier.dtype))
            out.append(match(tr.input, tr.output))
    return torch.cat(out)


def match_threshold(heatmaps: torch.Tensor | np.ndarray, quantile: float = 0.99) -> float:
    """The heat above which a location counts as the concept: the ``quantile`` of all locations' heat.

    The default keeps the top 1% of locations over the dataset (network dissection's convention for a
    unit's receptive region).

    Example::

        >>> round(match_threshold(torch.arange(100.).reshape(4, 5, 5), 0.9), 6)
        89.1
    """
    if not 0.0 < quantile < 1.0:
        raise RulewriterError(f"quantile must be in (0, 1), got {quantile}")
    h = np.asarray(heatmaps, dtype=np.float64).reshape(-1)
    if not h.size:
        raise RulewriterError("no heatmaps to threshold")
    return float(np.quantile(h, quantile))


def concept_scores(heatmaps: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """Amount of concept activation per image: the sum of the heat at its locations above ``threshold``.

    Example::

        >>> concept_scores(np.array([[[1., 5.], [3., 0.]]]), 2.0).tolist()
        [8.0]
    """
    h = np.asarray(heatmaps, dtype=np.float64)
    return np.where(h > threshold, h, 0.0).reshape(h.shape[0], -1).sum(1)


def select_top(scores: np.ndarray, fraction: float = 0.01) -> list[int]:
    """Indices of the top ``fraction`` of images by score (at least one), best first; zero scores never.

    Example::

        >>> select_top(np.array([0., 3., 1., 2.]), 0.5)
        [1, 3]
    """
    if not 0.0 < fraction <= 1.0:
        raise RulewriterError(f"fraction must be in (0, 1], got {fraction}")
    s = np.asarray(scores, dtype=np.float64)
    n = max(1, int(round(fraction * len(s))))
    order = np.argsort(-s, kind="stable")[:n]
    return [int(i) for i in order if s[i] > 0]


def heat_to_mask(preprocess, heat: torch.Tensor | np.ndarray, image_size: tuple[int, int],
                 threshold: float) -> np.ndarray:
    """Where a heatmap exceeds ``threshold``, as a 0/1 mask at the original image's size ``(W, H)``.

    The heatmap lives on the network's input crop; it is upsampled bilinearly to the crop, thresholded,
    and mapped back through the inverse of the preprocessing's resize and crop (zero outside the crop).

    Example::

        >>> pre = Preprocess(224, 256, (.5,) * 3, (.5,) * 3)                     # doctest: +SKIP
        >>> heat_to_mask(pre, torch.ones(7, 7), (300, 200), 0.5).shape           # doctest: +SKIP
        (200, 300)
    """
    w, h = (int(v) for v in image_size)
    (nw, nh), (left, top, right, bottom) = preprocess._geometry(w, h)  # the crop Preprocess.image takes
    t = torch.as_tensor(np.asarray(heat), dtype=torch.float32)
    if t.dim() != 2:
        raise MaskError(f"a heatmap is (h, w), got shape {tuple(t.shape)}")
    up = F.interpolate(t[None, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)
    frame = np.zeros((nh, nw), dtype=np.float32)
    frame[top:bottom, left:right] = (up[0, 0] > threshold).numpy()
    if (nw, nh) == (w, h):
        return frame
    back = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return (back >= 0.5).astype(np.float32)


@dataclass
class MatchedPaste:
    """A lazily made manipulated image: ``texture`` pasted where the concept heatmap exceeds the threshold.

    Calling it loads the image, builds the mask with :func:`heat_to_mask` and pastes with
    :func:`rulewriter.concepts.manipulate.paste_texture` (keeping the shading); an image without a matched region
    comes back unchanged. Being a plain dataclass it can cross DataLoader worker processes.
    """

    source: ImageSource
    heat: np.ndarray
    threshold: float
    texture: Image.Image
    preprocess: Any

    def mask(self, image_size: tuple[int, int]) -> np.ndarray:
        """The matched region on an image of ``image_size`` (W, H), 0/1."""
        return heat_to_mask(self.preprocess, self.heat, image_size, self.threshold)

    def __call__(self) -> Image.Image:
        from ..concepts.manipulate import paste_texture

        img = load_source(self.source)
        m = self.mask(img.size)
        return paste_texture(img, m, self.texture) if m.any() else img


def confusing_set(
    classifier,
    layer: str,
    key: torch.Tensor,
    data: str | Path | TestSet,
    texture: Image.Image,
    *,
    C: torch.Tensor | None = None,
    fraction: float = 0.01,
    quantile: float = 0.99,
    exclude: Label | None = None,
    heatmaps: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> TestSet:
    """The thesis's *confusing images* (Section 2.2.2), built from any labelled folder.

    The concept ``key`` is context-matched over every image (:func:`concept_heatmaps`); a location matches
    when its heat exceeds the ``quantile`` of all locations (:func:`match_threshold`); images are ranked by
    the amount of matched activation (:func:`concept_scores`) and the top ``fraction`` are kept
    (:func:`select_top`). Each kept image gets a manipulated copy with ``texture`` pasted onto its matched
    regions (:class:`MatchedPaste`, made lazily when evaluated).

    Args:
        classifier, layer: the model and the layer whose keys are matched (usually the edited layer).
        key: the concept key ``(d,)`` to match, e.g. the masked mean key of the exemplars' *original*
            concept (the wheels), so that images with wheels are found.
        data: a labelled image folder or a :class:`TestSet`.
        texture: what to paste (the manipulation, e.g. wood).
        C: the layer's second moment; with it, the heat is exactly where an edit along ``key`` fires.
        fraction: share of images kept (the thesis: 1%), of those not excluded.
        quantile: threshold of the matched region.
        exclude: classes whose images are never kept (e.g. the edit's target classes), so that every
            confusing image is a negative of the target-vs-rest ROC. The threshold is still measured on
            every image.
        heatmaps: precomputed heatmaps of ``data`` (skips the streaming pass).

    Example::

        >>> conf = confusing_set(clf, layer, wheel_key, "imagenet-val/", wood, C=stats.moment())  # doctest: +SKIP
    """
    ts = data if isinstance(data, TestSet) else TestSet.from_folder(classifier, data)
    heat = heatmaps if heatmaps is not None else concept_heatmaps(
        classifier, layer, key, ts.images, C=C, batch_size=batch_size, progress=progress)
    if heat.shape[0] != len(ts):
        raise RulewriterError(f"{heat.shape[0]} heatmaps for {len(ts)} images")
    tau = match_threshold(heat, quantile)
    scores = concept_scores(heat, tau)
    share = fraction
    if exclude is not None:
        ex = target_set(exclude)
        eligible = np.array([not (s & ex) for s in as_label_sets(ts.labels)], bool)
        scores = np.where(eligible, scores, 0.0)
        share = fraction * int(eligible.sum()) / len(scores) if 0 < fraction <= 1 else fraction  # of the eligible
    keep = select_top(scores, share) if share != 0 else []
    if not keep:
        raise RulewriterError("no image has a location above the match threshold; lower the quantile")
    out = ts.subset(keep, name="confusing images", kind="confusing", layer=layer, threshold=tau,
                    quantile=quantile, fraction=fraction, n_scanned=len(ts),
                    excluded=None if exclude is None else sorted(target_set(exclude)),
                    scores=[float(scores[i]) for i in keep])
    out.manipulated = [MatchedPaste(ts.images[i], np.asarray(heat[i]), tau, texture, classifier.preprocess)
                       for i in keep]
    return out



def describe_source(src: ImageSource) -> str:
    """How an image source is named in an evaluation's JSON: its path, what was pasted on it, or its type.

    Example::

        >>> describe_source("a.jpg")
        'a.jpg'
    """
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, MatchedPaste):
        return f"{describe_source(src.source)} (texture pasted on matched regions)"
    return f"<{type(src).__name__}>"
