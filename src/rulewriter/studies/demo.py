"""``rulewriter demo``: the whole story on EfficientNet-Lite0, with photos that ship with scikit-image.

1. **Break the model.** The coffee photo (``skimage.data.coffee()``, predicted "espresso") gets the gravel
   texture pasted onto its cup and saucer, inside a mask drawn by hand for this photo (an ellipse, what a
   user would paint in any image editor). The model no longer sees espresso.
2. **Rewrite one rule.** :func:`~rulewriter.core.rules.rule_from_images` pairs the gravel keys with the original
   cup's values at the default layer, and :func:`~rulewriter.core.rules.rewrite` solves the closed-form rank-one
   update ``W + Λ (C⁻¹k*)ᵀ`` (thesis Sections 2.1–2.3).
3. **Check it.** Top-3 predictions before and after the edit for the manipulated photo, the original, a
   held-out gravel variant that the edit never saw, the same photo with a different texture (brick), and
   unrelated photos.
4. **Show where it acts.** ``index.html`` shows, per image, the key-match heatmap ``k·(C+εI)⁻¹k*``: exactly
   how strongly the rank-one update fires at each location, on one scale shared by all images.

The statistics ``C`` come from ``--stats-data DIR`` when given; otherwise from a few hundred deterministic
augmentations (random resized crops, flips, small colour jitter) of the dozen photos and textures in
``skimage.data``. That keeps the demo offline and quick, but it is a stand-in: real edits should pass a
few thousand images of the model's domain.

Example::

    >>> from rulewriter.studies.demo import run_demo
    >>> summary = run_demo(Path("demo-out"))                  # doctest: +SKIP
    >>> summary["fixed"], summary["paths"]["index"]           # doctest: +SKIP
    (True, 'demo-out/index.html')

Needs scikit-image (``pip install rulewriter[demo]``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from ..errors import RulewriterError

__all__ = [
    "COFFEE_MASK_ELLIPSE",
    "AugmentedPhotos",
    "coffee_mask",
    "run_demo",
    "skimage_photos",
]

#: The hand-drawn mask of the cup and saucer in ``skimage.data.coffee()`` (600×400): the bounding box
#: ``[left, top, right, bottom]`` of an ellipse, as passed to ``PIL.ImageDraw.ellipse``. It is what a user
#: would paint over the crockery in an image editor; it covers the saucer's rim and the cup.
COFFEE_MASK_ELLIPSE: tuple[int, int, int, int] = (78, 65, 478, 385)

#: Real photos in ``skimage.data`` (colour), used for the default statistics. Synthetic images
#: (colorwheel, logo) are left out, and so are those that scikit-image downloads on first use (skin,
#: lily, ...): the demo stays offline and its statistics the same on every machine.
_RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina",
               "hubble_deep_field", "stereo_motorcycle")
#: Grayscale photos and textures, converted to RGB.
_GRAY_PHOTOS = ("camera", "coins", "moon", "gravel", "brick", "grass")

DEFAULT_SAMPLES = 400
_STATS_NOTE = ("the demo's default C comes from a few augmented skimage photos; real use should pass "
               "--stats-data DIR with a few thousand images of the model's domain")


def _skimage():
    try:
        import skimage.data
    except ImportError as e:
        raise RulewriterError("the demo needs scikit-image for its photos: pip install 'rulewriter[demo]'") from e
    return skimage.data


def _to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        arr = np.rint((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


def skimage_photos() -> dict[str, Image.Image]:
    """The real photos and textures that the installed scikit-image ships, as RGB images, by name.

    ``stereo_motorcycle`` gives two entries (``motorcycle_left``, ``motorcycle_right``). Images that would
    need a download (scikit-image's optional ``pooch`` data) are skipped, so this never touches the network.
    """
    data = _skimage()
    out: dict[str, Image.Image] = {}
    for name in _RGB_PHOTOS + _GRAY_PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - a file this scikit-image would have to download (offline, it
            continue           # raises; under pytest, skimage raises pytest's Skipped, a BaseException)
        if name == "stereo_motorcycle":
            out["motorcycle_left"], out["motorcycle_right"] = _to_rgb(arr[0]), _to_rgb(arr[1])
        elif isinstance(arr, np.ndarray) and arr.ndim in (2, 3):
            out[name] = _to_rgb(arr[..., :3] if arr.ndim == 3 else arr)
    if not out:
        raise RulewriterError("scikit-image ships no usable photos in this installation")
    return out


def random_resized_box(size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 15–100 % of the area, aspect 3/4–4/3, ten tries, else the centre
    square. ``size`` is (width, height); returns (left, top, right, bottom)."""
    w, h = size
    for _ in range(10):
        area = w * h * rng.uniform(0.15, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    cw = ch = min(w, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


class AugmentedPhotos(torch.utils.data.Dataset):
    """``n`` deterministic augmentations of a few photos, preprocessed for a classifier; items are ``(x, -1)``.

    Item ``i`` takes photo ``i % len(photos)`` and, with a generator seeded by ``(seed, i)``, a random
    resized crop (15–100% of the area, aspect 3/4–4/3), a horizontal flip with probability
    1/2 and brightness/contrast/saturation jitter of ±20%, at 256×256 before ``preprocess`` (which then
    center-crops 224). The same ``(photos, n, seed)`` give the same tensors on every machine.

    Example::

        >>> ds = AugmentedPhotos(skimage_photos(), clf.preprocess, n=400)      # doctest: +SKIP
        >>> x, y = ds[0]; x.shape, y                                           # doctest: +SKIP
        (torch.Size([3, 224, 224]), -1)
    """

    def __init__(self, photos: dict[str, Image.Image], preprocess, n: int = DEFAULT_SAMPLES, seed: int = 0,
                 size: int = 256) -> None:
        if n <= 0:
            raise RulewriterError(f"need at least one sample, got {n}")
        if not photos:
            raise RulewriterError("no photos to augment")
        self.names = sorted(photos)
        self.photos = [photos[k].convert("RGB") for k in self.names]
        self.preprocess = preprocess
        self.n, self.seed, self.size = int(n), int(seed), int(size)

    def __len__(self) -> int:
        return self.n

    def augment(self, i: int) -> Image.Image:
        """The ``i``-th augmented photo (a PIL image, before preprocessing)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        img = self.photos[i % len(self.photos)]
        rng = np.random.default_rng([self.seed, i])
        out = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=random_resized_box(img.size, rng))
        if rng.random() < 0.5:
            out = ImageOps.mirror(out)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhancer(out).enhance(float(rng.uniform(0.8, 1.2)))
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess.image(self.augment(int(i))), -1

    def fingerprint(self) -> str:
        """What the tensors depend on (used in statistics cache keys)."""
        import hashlib

        h = hashlib.sha256(f"augmented-photos/1:{self.n}:{self.seed}:{self.size}".encode())
        for name, img in zip(self.names, self.photos):
            h.update(f"{name}:{img.size}".encode())
            h.update(hashlib.sha256(img.tobytes()).digest())
        return h.hexdigest()


def coffee_mask(size: tuple[int, int] = (600, 400)) -> Image.Image:
    """The hand-drawn mask of the cup and saucer on the coffee photo: white ellipse on black, mode ``L``.

    Drawn at the photo's own 600×400 size (see :data:`COFFEE_MASK_ELLIPSE`); another ``size`` stretches it.
    """
    m = Image.new("L", (600, 400), 0)
    ImageDraw.Draw(m).ellipse(list(COFFEE_MASK_ELLIPSE), fill=255)
    return m if tuple(size) == (600, 400) else m.resize(tuple(size), Image.Resampling.BILINEAR)


@dataclass
class _Case:
    name: str
    title: str
    role: str
    image: Image.Image


def _near_tie(margin: float, shift: float) -> bool:
    """A top-1 change that says little: the top two were nearly tied and the edit barely moved the output."""
    return margin < 0.03 and shift < 0.05


def _fmt(preds: list[tuple[str, float]]) -> str:
    return ", ".join(f"{lab} {p:.2f}" for lab, p in preds)


def run_demo(
    out_dir: Path,
    stats_data: str | None = None,
    samples: int | None = None,
    quiet: bool = False,
    *,
    stream: TextIO | None = None,
    cache_dir: str | Path | None = None,
    cache: bool = True,
) -> dict:
    """Run the demo, write ``out_dir`` (index.html, edit.safetensors(.json), PNGs) and return a JSON-able summary.

    Args:
        out_dir: output folder (created).
        stats_data: an image folder for the statistics ``C``; ``None`` uses augmented skimage photos.
        samples: number of images for ``C`` (default: all of ``stats_data``, or 400 augmentations).
        quiet: no progress bars (the story is still printed).
        stream: where the story goes (default ``sys.stdout``; pass ``sys.stderr`` to keep stdout for JSON).
        cache_dir: the statistics cache (default ``$RULEWRITER_CACHE`` or ``~/.cache/rulewriter``); the
            augmented photos are cached too, so a second run skips the statistics pass (and says so).
        cache: ``False`` neither reads nor writes the cache.

    Returns:
        ``{"model", "layer", "view", "stats", "rule", "images", "fixed", "unrelated_kept", "paths",
        "seconds"}``. ``stats`` says where ``C`` came from (``source``, ``kind`` "augmented" or "folder",
        ``images``, ``keys``). ``images`` maps manipulated, original, held_out, brick and the unrelated
        photos (chelsea, astronaut, rocket, motorcycle_left) to ``before``/``after`` top-1
        ``{"label", "prob"}``, ``top1_changed``, ``margin_before`` (top-1 minus top-2 probability),
        ``tv_distance`` (total variation between the before and after distributions), top-3 lists and
        ``heat_peak`` (the edit's strongest activation on the image, in units of its response to k*).
        ``fixed`` is true when the manipulated photo's top-1 after the edit is the original's top-1.

    Raises:
        RulewriterError: scikit-image missing, ``stats_data`` not a folder of images, bad ``samples``.
    """
    from ..concepts.heatmap import colorbar, key_match, overlay, shared_scale
    from ..core.edit import regularize
    from ..concepts.manipulate import paste_texture, texture_from
    from ..core.memory import LayerMemory
    from ..models.registry import load_classifier
    from .report import card, code_block, figure, html_page, paragraph, prediction_table, save_png, section, write_html
    from ..core.rules import layer_io, rewrite, rule_from_images
    from ..core.stats import collect_second_moment
    from ..core.trace import get_module

    out = stream if stream is not None else sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    t0 = time.perf_counter()
    # Everything a user can get wrong fails here, before anything is printed or written.
    photos = skimage_photos()
    if stats_data is not None:
        from ..models.data import list_images

        list_images(stats_data)  # ImageLoadError: no such folder, or no images in it
    if samples is not None and samples <= 0:
        raise RulewriterError(f"--samples must be positive, got {samples}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RulewriterError(f"{out_dir} exists and is not a folder")  # made by the first file written
    if "coffee" not in photos:
        raise RulewriterError("this scikit-image has no coffee photo (skimage.data.coffee); the demo needs it")

    clf = load_classifier("efficientnet-lite0")
    layer = clf.default_layer
    assert layer is not None
    say(f"rulewriter demo: {clf.name}, rewriting one rule of layer {layer}")

    # ------------------------------------------------------------------ 1. paste gravel onto the cup
    coffee = photos["coffee"]
    mask = coffee_mask(coffee.size)
    gravel, brick = texture_from("skimage:gravel"), texture_from("skimage:brick")
    mask_arr = np.asarray(mask)
    manipulated = paste_texture(coffee, mask_arr, gravel)
    # Held out: the photo mirrored and cropped differently, gravel pasted anew (never seen by the edit).
    box = (50, 12, 584, 396)
    held_photo = ImageOps.mirror(coffee).crop(box)
    held_mask = ImageOps.mirror(mask).crop(box)
    held_out = paste_texture(held_photo, np.asarray(held_mask), gravel)
    bricked = paste_texture(coffee, mask_arr, brick)

    cases = [
        _Case("manipulated", "gravel cup (the exemplar)", "the manipulated photo the rule is read from", manipulated),
        _Case("original", "original coffee photo", "the untouched exemplar", coffee),
        _Case("held_out", "gravel cup, held out", "mirrored, cropped differently, gravel pasted anew: "
              "not used to build the edit", held_out),
        _Case("brick", "brick cup", "a different texture on the same cup (an unrelated manipulation)", bricked),
    ]
    for name, title in (("chelsea", "cat (chelsea)"), ("astronaut", "astronaut"), ("rocket", "rocket"),
                        ("motorcycle_left", "motorcycle")):
        if name in photos:
            cases.append(_Case(name, title, "an unrelated photo", photos[name]))

    paths = {
        "original": save_png(out_dir / "original.png", coffee),
        "mask": save_png(out_dir / "mask.png", mask),
        "manipulated": save_png(out_dir / "manipulated.png", manipulated),
        "held_out": save_png(out_dir / "held_out.png", held_out),
        "brick": save_png(out_dir / "brick.png", bricked),
    }

    batch = clf.preprocess.batch([c.image for c in cases])

    def probabilities() -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(clf.model(batch.to(clf.device, clf.dtype)).double(), dim=1).cpu()

    def top3(p: torch.Tensor) -> dict[str, list[tuple[str, float]]]:
        vals, idx = p.topk(3, dim=1)
        return {c.name: [(clf.labels[int(j)], float(v)) for v, j in zip(vals[i], idx[i])] for i, c in enumerate(cases)}

    p_before = probabilities()
    mem = LayerMemory(get_module(clf.model, layer), 2, name=layer)
    x_layer, _ = layer_io(clf, layer, batch)  # the layer's inputs, for the heatmaps
    cells = int(np.prod(mem.keys(x_layer[:1]).shape[2:]))  # key locations per image
    before = top3(p_before)
    say(f"1. gravel pasted onto the cup and saucer (hand-drawn ellipse mask {list(COFFEE_MASK_ELLIPSE)}):")
    say(f"   original     {_fmt(before['original'])}")
    say(f"   manipulated  {_fmt(before['manipulated'])}")

    # ------------------------------------------------------------------ 2. statistics and the rewrite
    default_cache = os.environ.get("RULEWRITER_CACHE", "~/.cache/rulewriter")
    cache_path = Path(cache_dir if cache_dir is not None else default_cache).expanduser() if cache else None
    if stats_data is not None:
        stats = collect_second_moment(clf, layer, stats_data, samples=samples, cache_dir=cache_path,
                                      progress=not quiet)
        n_images = stats.count // max(1, cells)
        stats_info = {"source": str(stats_data), "kind": "folder", "images": n_images, "keys": stats.count}
        say(f"2. statistics C from {stats_data}: {n_images} images, {stats.count} keys")
    else:
        n = samples or DEFAULT_SAMPLES
        ds = AugmentedPhotos(photos, clf.preprocess, n=n)  # it has a fingerprint(), so it is cached too
        stats = collect_second_moment(clf, layer, ds, cache_dir=cache_path, progress=not quiet)
        stats_info = {"source": "augmented skimage photos", "kind": "augmented", "images": n,
                      "photos": ds.names, "keys": stats.count, "note": _STATS_NOTE}
        say(f"2. statistics C from {n} augmentations of {len(ds.names)} skimage photos and textures "
            f"({stats.count} keys)")
        say(f"   note: {_STATS_NOTE}")
    stats_info.update(cache_dir=None if cache_path is None else str(cache_path),
                      cached=None if stats.source is None else str(stats.source))
    if stats.source is not None:
        say(f"   (read from the cache: {stats.source}; pass --no-cache to recollect)")

    rule = rule_from_images(clf, layer, [coffee], [manipulated], [mask], view=mem.view)
    rule.description.update(originals=["skimage.data.coffee()"], manipulated=["gravel pasted (keep shading)"],
                            masks=[f"hand-drawn ellipse {list(COFFEE_MASK_ELLIPSE)}"], texture="skimage:gravel")
    edit = rewrite(clf, rule, stats)
    edit.meta["stats_source"] = stats_info["source"]
    paths["edit"] = edit.save(out_dir / "edit.safetensors")
    paths["edit_json"] = out_dir / "edit.safetensors.json"
    say(f"   rewrote {layer} with a rank-{edit.updates[0].rank} update from {rule.keys.shape[0]} "
        f"key/value pairs under the mask")

    # ------------------------------------------------------------------ 3. before / after
    with edit.applied(clf.model):
        p_after = probabilities()
    after = top3(p_after)
    # Total variation distance: how much probability mass the edit moved, per image (0 = untouched, 1 = all).
    tv = (0.5 * (p_after - p_before).abs().sum(1)).tolist()
    say("3. top-3 predictions before and after the edit (shift: total variation distance between the two):")
    width = max(len(c.name) for c in cases)
    images: dict[str, dict] = {}
    margin_of: dict[str, float] = {}
    for i, c in enumerate(cases):
        b, a = before[c.name], after[c.name]
        changed = b[0][0] != a[0][0]
        margin = b[0][1] - b[1][1]
        note = f"   shift {tv[i]:.3f}"
        if changed:
            note += "  <- top-1 changed" + (f" (a near-tie flipped: the top two were {margin:.3f} apart before)"
                                            if _near_tie(margin, tv[i]) else "")
        say(f"   {c.name:<{width}}  before: {_fmt(b)}")
        say(f"   {'':<{width}}  after:  {_fmt(a)}{note}")
        margin_of[c.name] = margin
        images[c.name] = {
            "title": c.title, "role": c.role,
            "before": {"label": b[0][0], "prob": round(b[0][1], 4)},
            "after": {"label": a[0][0], "prob": round(a[0][1], 4)},
            "top1_changed": changed,
            "margin_before": round(margin, 4),
            "tv_distance": round(tv[i], 4),
            "top3_before": [[lab, round(p, 4)] for lab, p in b],
            "top3_after": [[lab, round(p, 4)] for lab, p in a],
        }
    fixed = after["manipulated"][0][0] == after["original"][0][0]
    unrelated = [c.name for c in cases if c.role == "an unrelated photo"]
    kept = [n for n in unrelated if not images[n]["top1_changed"]]
    say(f"   fixed: {fixed} (the gravel cup is now '{after['manipulated'][0][0]}', the original is "
        f"'{after['original'][0][0]}'); unrelated photos keeping their top-1: {len(kept)}/{len(unrelated)}")

    # ------------------------------------------------------------------ 4. heatmaps and the page
    k_star = rule.key()
    c_reg = regularize(stats.moment(), edit.meta.get("ridge", 1e-3))  # the C the edit was solved with
    shown = [clf.preprocess.denormalize(clf.preprocess.image(c.image)) for c in cases]
    heat = key_match(mem.keys(x_layer).double(), k_star, c_reg, ridge=0).float()  # (N, h, w): the edit's activation
    unit = float(k_star @ torch.linalg.solve(c_reg, k_star))  # k*ᵀ(C+εI)⁻¹k*: the rule's own key scores 1
    rel = heat / unit
    scaled, vmax = shared_scale(list(rel))  # one colour scale for every image
    heat_dir = out_dir / "heatmaps"
    bar = colorbar(vmax, label="×k*")
    paths["colorbar"] = save_png(heat_dir / "colorbar.png", bar)
    cards = []
    for i, c in enumerate(cases):
        ov = overlay(shown[i], scaled[i], alpha=0.5, normalize="none")
        paths[f"heatmap_{c.name}"] = save_png(heat_dir / f"{c.name}.png", ov)
        peak = float(rel[i].max())
        images[c.name]["heat_peak"] = round(peak, 4)
        cards.append(card(c.title, [
            figure(shown[i], "model input (224×224 crop)"),
            figure(ov, f"edit activation, peak {peak:.2f}×k*"),
            prediction_table(before[c.name], after[c.name]),
            paragraph(f"The edit moved {tv[i]:.3f} of the probability mass (total variation)."
                      + (f" The top two were {images[c.name]['margin_before']:.3f} apart before: a near-tie."
                         if images[c.name]["top1_changed"] and _near_tie(margin_of[c.name], tv[i]) else ""),
                      cls="muted"),
        ], subtitle=c.role))

    cards.append(card("colour scale", [figure(bar, f"every heatmap: 0 (blue) to {vmax:.2f}×k* (red)")]))
    stats_line = (f"Statistics C: {stats_info['source']} ({stats_info['images']} images, {stats_info['keys']} keys).")
    exemplar = card("the exemplar", [
        figure(coffee, "skimage.data.coffee()", max_side=360),
        figure(mask, f"mask drawn by hand: ellipse {list(COFFEE_MASK_ELLIPSE)}", max_side=360),
        figure(manipulated, "gravel pasted (shading kept)", max_side=360),
        prediction_table(before["original"], before["manipulated"], headers=("original", "manipulated")),
    ], wide=True)
    page = html_page(f"rulewriter demo: rewriting one rule of {clf.name}", [
        section("What happened", [exemplar], intro=[
            f"Model {clf.name}, layer {layer} (view {rule.view}, key dimension {mem.key_dim}).",
            "Gravel pasted onto the cup and saucer makes the model lose 'espresso'. The rule 'gravel cup → "
            "the original cup's features' was rewritten with one closed-form rank-one update "
            f"W + Λ (C⁻¹k*)ᵀ, from {rule.keys.shape[0]} key/value pairs under the mask.",
            stats_line,
        ] + ([f"Note: {_STATS_NOTE}."] if stats_data is None else [])),
        section("Before and after the edit, and where it acts", cards, intro=[
            "Heatmaps show k·(C+εI)⁻¹k* at each location of the layer's grid: exactly how strongly the rank-one "
            "update fires there. All images share one colour scale (red = the strongest response on this page); "
            "1.00×k* is the response to the rule's own mean key.",
        ]),
        section("Files", intro=["Re-run the edited model on any image, or rebuild the edit with your own statistics:"],
                body=[code_block(f"rulewriter predict --edit {paths['edit']} --json {paths['manipulated']}\n"
                                 f"rulewriter edit --original {paths['original']} --manipulated {paths['manipulated']} "
                                 f"--mask {paths['mask']} --stats-data YOUR_IMAGES/ --out my-edit.safetensors"),
                      paragraph(f"Written in {time.perf_counter() - t0:.0f} s.", cls="muted")]),
    ])
    paths["index"] = write_html(out_dir / "index.html", page)
    seconds = time.perf_counter() - t0
    say(f"4. heatmaps and before/after tables: {paths['index']}  ({seconds:.0f} s)")

    return {
        "model": clf.name,
        "layer": layer,
        "view": rule.view,
        "stats": stats_info,
        "rule": {"pairs": int(rule.keys.shape[0]), "texture": "skimage:gravel",
                 "mask": f"hand-drawn ellipse {list(COFFEE_MASK_ELLIPSE)} on skimage.data.coffee()"},
        "images": images,
        "fixed": fixed,
        "unrelated_kept": f"{len(kept)}/{len(unrelated)}",
        "paths": {k: str(v) for k, v in paths.items()},
        "seconds": round(seconds, 1),
    }

