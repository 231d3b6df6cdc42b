"""What the app server holds: sessions (one per browser tab) with their exemplars, and :class:`AppState` —
the classifier, the image folder addressed by opaque ids, the statistics ``C``, jobs and the one model lock.

Example::

    >>> state = AppState(load_classifier("efficientnet-lite0"), "photos/")   # doctest: +SKIP
    >>> s = state.new_session()                                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..core.locality import MIN_CALIBRATION_IMAGES
from ..errors import EditError, ImageLoadError, RulewriterError
from .jobs import Job, JobRunner

__all__ = ["AppState", "CheckedImages", "Exemplar", "MAX_SESSIONS", "ProgressDataset", "Session", "checked_path",
           "folder_images"]

#: Sessions kept at once; the least recently used one is dropped beyond this (its tab gets 404 and makes a new one).
MAX_SESSIONS = 64


@dataclass
class Exemplar:
    """One exemplar of the rule: the original image, its mask, and what the concept becomes there."""

    id: str
    image_id: str
    mask: np.ndarray  # (H, W) float32 at the image's size
    target: str  # texture | region | key
    spec: dict
    manipulated: Image.Image | None = None  # texture and region targets
    key_image_id: str | None = None  # key target: the region whose keys the concept should map from
    key_mask: np.ndarray | None = None
    before: dict = field(default_factory=dict)


@dataclass
class Session:
    """Per-tab state: uploads, exemplars, the current edit and its pictures."""

    id: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    uploads: dict[str, tuple[str, Image.Image]] = field(default_factory=dict)
    exemplars: dict[str, Exemplar] = field(default_factory=dict)
    edit: Any = None  # rulewriter.core.edit.Edit
    edit_source: str | None = None
    comparison: dict | None = None
    heatmaps: dict[str, bytes] = field(default_factory=dict)
    report_dir: Path | None = None
    touched: float = field(default_factory=time.time)


# ------------------------------------------------------------------------------------------ the folders
def folder_images(root: Path) -> list[Path]:
    """The image files inside ``root`` (already resolved), resolved, sorted by name, each once.

    The one listing the app uses, for browsing and for the statistics: a symlink that leads out of the
    folder (or to something that is not a file) would make a file outside it readable, so it is skipped.
    """
    from ..models.data import list_images

    out: dict[Path, None] = {}
    for p in list_images(root):
        real = p.resolve()
        if real.is_relative_to(root) and real.is_file():
            out[real] = None
    if not out:
        raise ImageLoadError(f"no images inside {root}")
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def checked_path(path: Path, root: Path) -> Path:
    """``path`` (resolved when the folder was listed) if it is still a plain file inside ``root``.

    A file swapped for a symlink (or a folder on its way swapped for one) after the listing resolves
    elsewhere now, and is refused with ImageLoadError instead of being opened.
    """
    real = Path(os.path.realpath(path))
    if real != path or not real.is_relative_to(root) or not real.is_file():
        raise ImageLoadError(f"{path.name} is no longer a file inside {root} (replaced by a link or removed); "
                             "refused")
    return path


class CheckedImages(torch.utils.data.Dataset):
    """An :class:`~rulewriter.models.data.ImageDataset` of listed files that re-checks each path as it reads it."""

    def __init__(self, paths: list[Path], root: Path, preprocess) -> None:
        from ..models.data import ImageDataset

        self.inner, self.root = ImageDataset(paths, preprocess), root

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        checked_path(self.inner.paths[i], self.root)
        return self.inner[i]

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


# ------------------------------------------------------------------------------------------ state
class ProgressDataset(torch.utils.data.Dataset):
    """Wraps a dataset to report how many items were read; keeps its fingerprint for the statistics cache."""

    def __init__(self, inner, report: Callable[[float, str], None], what: str) -> None:
        self.inner, self.report, self.what = inner, report, what
        self.seen = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.seen += 1
        if self.seen % 8 == 0 or self.seen == len(self.inner):
            self.report(self.seen / len(self.inner), f"{self.what}: {self.seen}/{len(self.inner)} images")
        return self.inner[i]

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


class AppState:
    """Everything the server holds: the classifier, the image folder, sessions, jobs, caches and the model lock.

    Example::

        >>> state = AppState(load_classifier("efficientnet-lite0"), "photos/")   # doctest: +SKIP
        >>> sorted(state.images)[:1]                                              # doctest: +SKIP
        ['3f1c9a0b2d4e']
    """

    def __init__(
        self,
        classifier,
        images_dir: str | os.PathLike[str],
        *,
        layer: str | None = None,
        stats_data: str | os.PathLike[str] | None = None,
        stats_samples: int | None = None,
        out_dir: str | os.PathLike[str] = "rulewriter-app",
        cache_dir: str | os.PathLike[str] | None = None,
        workers: int = 2,
    ) -> None:
        from ..core.locality import calibration_split
        from ..core.memory import LayerMemory
        from ..core.trace import get_module

        self.clf = classifier
        self.layer = layer or classifier.default_layer
        if not self.layer:
            raise RulewriterError(f"model {classifier.name!r} has no default layer; pass --layer")
        # The layers a validated edit is written at (as in `rulewriter edit`): --layer alone, else the
        # model's candidates with the default first. Keys, heatmaps and the statistics shown are self.layer's.
        self.layers = [self.layer] if layer or not classifier.candidate_layers else list(classifier.candidate_layers)
        # Each layer's weights as loaded: every solve checks it reads these, never another session's edit.
        self.original_weights = {at: LayerMemory(get_module(classifier.model, at), 2, name=at).weight.detach().clone()
                                 for at in self.layers}  # LayerError early
        self.root = Path(images_dir).expanduser().resolve()
        if not self.root.is_dir():
            raise ImageLoadError(f"--images {images_dir}: no such folder")
        self.images: dict[str, Path] = {}
        for real in folder_images(self.root):
            rel = real.relative_to(self.root).as_posix()
            self.images[hashlib.sha256(rel.encode()).hexdigest()[:12]] = real
        self.stats_data = Path(stats_data).expanduser().resolve() if stats_data else None
        # The statistics images: the same filtered listing (made now, so a bad folder fails at start).
        self.stats_paths = (folder_images(self.stats_data) if self.stats_data is not None
                            else sorted(self.images.values(), key=lambda p: p.relative_to(self.root).as_posix()))
        if stats_samples is not None and stats_samples < 1:
            raise RulewriterError(f"--stats-samples must be positive, got {stats_samples}")
        self.stats_samples = stats_samples
        # Calibration images for the locality budget of validated edits, never among C's images (as in
        # `rulewriter edit`): a tenth of the statistics images, or the ones --stats-samples leaves out.
        self.stats_paths, self.calibration_paths = calibration_split(self.stats_paths, stats_samples)
        self._calibration: dict[str, Any] = {}
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.model_lock = threading.RLock()
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.sessions_lock = threading.Lock()
        self.uploads_lock = threading.Lock()  # the total-size check and the insertion of an upload, as one step
        self.jobs = JobRunner(workers)
        self.predictions: dict[str, list[dict]] = {}
        self._stats: dict[tuple[str, int], Any] = {}
        self._stats_lock = threading.Lock()
        self._stats_images = 0
        self.topk = min(5, classifier.num_classes)

    # ---------------------------------------------------------------- sessions
    def new_session(self) -> Session:
        s = Session(secrets.token_urlsafe(16))
        with self.sessions_lock:
            self.sessions[s.id] = s
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return s

    def session(self, sid: str) -> Session | None:
        with self.sessions_lock:
            s = self.sessions.get(sid)
            if s is not None:
                self.sessions.move_to_end(sid)
                s.touched = time.time()
            return s

    def upload_bytes(self) -> int:
        """The memory every live session's decoded uploads take."""
        from .images import image_bytes

        with self.sessions_lock:
            sessions = list(self.sessions.values())
        return sum(image_bytes(img) for s in sessions for _, img in list(s.uploads.values()))

    # ---------------------------------------------------------------- images
    def image_name(self, image_id: str, session: Session | None = None) -> str | None:
        if image_id in self.images:
            return self.images[image_id].relative_to(self.root).as_posix()
        if session is not None and image_id in session.uploads:
            return session.uploads[image_id][0]
        return None

    def image(self, image_id: str, session: Session | None = None) -> Image.Image:
        """The RGB image behind an id (a folder image, or one of the session's uploads); KeyError if unknown."""
        from ..models.data import load_image

        if image_id in self.images:
            return load_image(checked_path(self.images[image_id], self.root))
        if session is not None and image_id in session.uploads:
            return session.uploads[image_id][1].convert("RGB")
        raise KeyError(image_id)

    def image_ids(self, session: Session | None = None) -> list[str]:
        ids = sorted(self.images, key=lambda i: self.images[i].relative_to(self.root).as_posix())
        return ids + (list(session.uploads) if session is not None else [])

    # ---------------------------------------------------------------- model use (always under the lock)
    def check_unedited(self) -> None:
        """Raise unless the edited layer holds its original weights (call it holding the model lock)."""
        from ..core.memory import LayerMemory
        from ..core.trace import get_module

        for at, w0 in self.original_weights.items():
            w = LayerMemory(get_module(self.clf.model, at), 2, name=at).weight
            if not torch.equal(w.detach(), w0.to(w.device)):
                raise RulewriterError(f"internal error: layer {at} does not hold its original weights; "
                                      "refusing to read a rule or solve against another edit")

    def solve(self, rule, stats, session: Session | None = None, exemplars: list[Exemplar] | None = None,
              job: Job | None = None, lo: float = 0.0, hi: float = 1.0):
        """The edit for ``rule``: :func:`~rulewriter.core.rules.rewrite` against the original weights, its
        strength and rank chosen by validation under the locality budget where the rule carries exemplar
        views (:meth:`build_rule`), as ``rulewriter edit`` does. Given the ``session`` and ``exemplars`` the
        rule was built from, a validated rule is also written at the app's other layers (:attr:`layers`,
        their statistics collected once, reported on ``job`` between ``lo`` and ``hi``) and the layer its
        own validation prefers is kept (:func:`~rulewriter.core.rules.rewrite_choosing_layer`).

        ``rewrite`` reads the layer's live weights, so it runs holding the model lock, where no other
        session's edit is applied (and :meth:`check_unedited` proves it).
        """
        from ..core.rules import rewrite, rewrite_choosing_layer

        if rule.views is None or len(self.layers) == 1 or session is None:
            with self.model_lock:
                self.check_unedited()
                cal = self.calibration() if rule.views is not None else None
                return rewrite(self.clf, rule, stats, calibration=cal)
        others = self.layers[1:]
        stats_by = {self.layer: stats, **self.stats_at(others, job, lo, hi)}  # one pass for the other layers
        with self.model_lock:
            self.check_unedited()
            rules = {self.layer: rule, **self.build_rules(session, exemplars, others)}
            return rewrite_choosing_layer(self.clf, self.layers, rules.__getitem__, stats_by.__getitem__,
                                          calibration_at=self.calibration)

    def calibration(self, layer: str | None = None):
        """The calibration images as a :class:`~rulewriter.core.generalise.Calibration` of ``layer`` (default
        :attr:`layer`; read once, with the original weights), or None where there are too few (then edits
        are the closed form)."""
        from ..core.locality import calibration_sets

        if not self.calibration_paths:
            return None
        layer = layer or self.layer
        with self.model_lock:
            if layer not in self._calibration:
                self.check_unedited()
                root = self.stats_data or self.root
                # Every candidate layer still missing from the same pass: the layer choice asks for each.
                todo = [layer] + [at for at in self.layers if at != layer and at not in self._calibration]
                self._calibration.update(calibration_sets(
                    self.clf, todo, CheckedImages(self.calibration_paths, root, self.clf.preprocess)))
            return self._calibration[layer]

    def predict(self, images: list[Image.Image], edit=None, source: str = "the edit") -> list[list[dict]]:
        """Top-k of each image, with ``edit`` applied (inside the lock, undone before it is released).

        Raises EditError when the outputs are NaN or inf (an edit with huge factors): never sent as JSON.
        """
        if not images:
            return []
        x = self.clf.preprocess.batch(images)
        with self.model_lock:
            ctx = edit.applied(self.clf.model) if edit is not None else contextlib.nullcontext()
            with ctx:
                preds = self.clf.predict(x, topk=self.topk)
        if not all(math.isfinite(float(p)) for row in preds for _, _, p in row):
            raise EditError(f"{source if edit is not None else 'the model'} makes the model's outputs NaN or inf; "
                            "refused")
        return [[{"index": int(i), "label": lab, "prob": round(float(p), 6)} for i, lab, p in row] for row in preds]

    def check_edit(self, edit, source: str = "the edit") -> None:
        """Refuse (RulewriterError) an edit made for another model or weights, or whose weights or outputs
        are not finite; the model is left as it was either way."""
        edit.check_model(self.clf, source)  # names the model and weights each was made for
        with self.model_lock:
            with edit.applied(self.clf.model):  # another layer shape or overflowing weights fail here, restored
                pass
        for i in self.image_ids(None):  # the outputs on one folder image (predict refuses NaN or inf)
            try:
                probe = self.image(i)
            except ImageLoadError:
                continue
            self.predict([probe], edit, source)
            break

    def cached_predictions(self, image_id: str, session: Session | None = None) -> list[dict]:
        if image_id not in self.predictions:
            top = self.predict([self.image(image_id, session)])[0]
            if image_id in self.images:  # uploads are per session: keep them out of the shared cache
                self.predictions[image_id] = top
            return top
        return self.predictions[image_id]

    def stats_source(self) -> dict:
        src = self.stats_data or self.root
        return {"source": str(src), "kind": "stats-data" if self.stats_data else "image folder",
                "samples": self.stats_samples, "layer": self.layer,
                "ready": (self.layer, 2) in self._stats,
                "warning": self.stats_warning(),
                "calibration_images": len(self.calibration_paths),
                "validation": (f"edits from pasted exemplars are validated (strength and rank) under the locality "
                               f"budget on {len(self.calibration_paths)} calibration images set aside from C's"
                               if self.calibration_paths else
                               f"too few statistics images to set {MIN_CALIBRATION_IMAGES} aside for calibration "
                               "(a tenth of them, or those --stats-samples leaves out), so edits are the closed "
                               "form"),
                "note": ("C comes from the browsed image folder; a few thousand images of the model's domain "
                         "(--stats-data DIR) give edits that generalise better") if not self.stats_data else
                        "C comes from --stats-data"}

    def stats_warning(self) -> str | None:
        """Why C is too small to trust, or None (also None before it is collected).

        The principle: C = E[k kᵀ] estimated from fewer keys than the key dimension is singular (its rank is
        at most the number of keys), so in the directions no key reached, the ridge, not the data, decides
        what C⁻¹ does: key-match scores and the update direction C⁻¹k* there say nothing about the images.
        """
        s = self._stats.get((self.layer, 2))
        if s is None or s.dim is None or s.count >= s.dim:
            return None
        return (f"C is too small to trust: it comes from {s.count} keys ({self._stats_images} images), fewer than "
                f"the {s.dim} key dimensions of {self.layer}, so it is singular and the ridge decides at least "
                f"{s.dim - s.count} of its directions. Collect it from more images (--stats-data DIR with a few "
                "thousand images of the model's domain).")

    def stats(self, job: Job | None = None, lo: float = 0.0, hi: float = 1.0, layer: str | None = None):
        """The second moment of ``layer`` (default :attr:`layer`), collected once (and cached on disk when a
        cache folder is set)."""
        layer = layer or self.layer
        return self.stats_at([layer], job, lo, hi)[layer]

    def stats_at(self, layers: list[str], job: Job | None = None, lo: float = 0.0, hi: float = 1.0) -> dict:
        """:meth:`stats` of each of ``layers``; those not collected yet from one pass over the images."""
        from ..models.data import subsample
        from ..core.stats import collect_second_moments

        with self._stats_lock:
            todo = [at for at in dict.fromkeys(layers) if (at, 2) not in self._stats]
            if todo:
                paths = self.stats_paths  # the filtered listing made at start, each file re-checked as it is read
                if self.stats_samples is not None:
                    paths = subsample(paths, self.stats_samples)
                ds = CheckedImages(paths, self.stats_data or self.root, self.clf.preprocess)

                def report(frac: float, msg: str) -> None:
                    if job is not None:
                        job.report(lo + (hi - lo) * frac, msg)

                if job is not None:
                    job.report(lo, f"statistics C of {', '.join(todo)}: {len(ds)} images")
                with self.model_lock:
                    got = collect_second_moments(self.clf, todo, ProgressDataset(ds, report, "statistics C"),
                                                 cache_dir=self.cache_dir, progress=False, batch_size=16,
                                                 device=self.clf.device)  # never move the model
                self._stats.update({(at, 2): got[at] for at in todo})
                if self.layer in todo:
                    self._stats_images = len(ds)
            return {at: self._stats[at, 2] for at in layers}

    def concept_rule(self, image: Image.Image, mask: np.ndarray):
        """The masked keys and values of an image itself (a rule from the image to itself)."""
        from ..core.rules import rule_from_images

        with self.model_lock:
            self.check_unedited()
            return rule_from_images(self.clf, self.layer, [image], [image], [mask], views=0)  # a key, not an edit

    def _validated(self, exemplars: list[Exemplar]) -> bool:
        """Exemplar views (validated strength and rank) where every exemplar is pasted and there are
        calibration images: a picked key region has no manipulated image to augment."""
        return bool(exemplars) and bool(self.calibration_paths) and all(
            e.target in ("texture", "region") for e in exemplars)

    def _described(self, r, session: Session, exemplars: list[Exemplar]):
        keep = ("views", "augmentation", "seed")
        r.description = {"method": "app", **{k: r.description[k] for k in keep if k in r.description},
                         "exemplars": [{"image": self.image_name(e.image_id, session), "target": e.target,
                                        **e.spec} for e in exemplars]}
        return r

    def build_rules(self, session: Session, exemplars: list[Exemplar], layers: list[str]) -> dict:
        """:meth:`build_rule` at each of ``layers``; a validated rule (every exemplar pasted, calibration
        images at hand) is read at all of them from one pass over the exemplars and their views."""
        from ..core.generalise import DEFAULT_VIEWS
        from ..core.rules import rules_from_images

        if not self._validated(exemplars):
            return {layer: self.build_rule(session, exemplars, layer) for layer in layers}
        originals = [self.image(e.image_id, session) for e in exemplars]
        with self.model_lock:
            self.check_unedited()  # the values are the layer's outputs: its original weights
            rules = rules_from_images(self.clf, layers, originals, [e.manipulated for e in exemplars],
                                      [e.mask for e in exemplars], views=DEFAULT_VIEWS)
        return {layer: self._described(r, session, exemplars) for layer, r in rules.items()}

    def build_rule(self, session: Session, exemplars: list[Exemplar], layer: str | None = None):
        """One rule at ``layer`` (default :attr:`layer`) from every exemplar: pasted targets pair keys and
        values per location; picked key regions pair the region's mean key with the exemplar's mean value."""
        from ..core.generalise import DEFAULT_VIEWS
        from ..core.rules import Rule, rule_from_images

        if not exemplars:
            raise EditError("add at least one exemplar (paint a mask, choose what to paste, press Add)")
        keys, values, weights, desc = [], [], [], []
        pasted = [e for e in exemplars if e.target in ("texture", "region")]
        views = DEFAULT_VIEWS if self._validated(exemplars) else 0
        if pasted:
            originals = [self.image(e.image_id, session) for e in pasted]
            with self.model_lock:
                self.check_unedited()  # the values are the layer's outputs: its original weights
                r = rule_from_images(self.clf, layer or self.layer, originals, [e.manipulated for e in pasted],
                                     [e.mask for e in pasted], views=views)
            if views:
                return self._described(r, session, exemplars)
            keys.append(r.keys), values.append(r.values), weights.append(r.weights)
        for e in exemplars:
            if e.target == "key":
                kr = self.concept_rule(self.image(e.key_image_id, session), e.key_mask)
                vr = self.concept_rule(self.image(e.image_id, session), e.mask)
                keys.append(kr.key()[None]), values.append(vr.value()[None])
                # Weighted like the locations it stands for, so it counts as much as a pasted exemplar of its size.
                weights.append(vr.weights.sum().reshape(1))
        for e in exemplars:
            desc.append({"image": self.image_name(e.image_id, session), "target": e.target, **e.spec})
        view = 2
        return Rule(self.layer, view, torch.cat(keys).double(), torch.cat(values).double(),
                    torch.cat(weights).double(), {"method": "app", "exemplars": desc})
