"""Editing in the inverse direction (thesis Chapter 3) on EfficientNet-Lite0: "wheels behave like wooden wheels".

The rule, from real photos: car-parts training photos (natural file order, the first four with a ``wheel``
annotation) and their COCO wheel masks; wood is the bowl of the wooden spoon in imagenet-samples
(``n04597913_wooden_spoon.jpg``, 256×369, crop ``WOOD_CROP`` chosen by looking at the photo: it lies inside
the bowl), pasted onto the wheels with ``paste_texture`` (shading kept). The forward edit is
``rule_from_images(cars, wooden cars, wheel masks)`` + ``rewrite``, with its defaults and with ``fit="mean"``:
wooden wheels → the wheel's output. The inverse edits use the same pairs with Algorithm 1's swap
(``inverse_rule_from_images``): the wheel's output is the key, the wooden wheel's input the value.

Solvers (``rulewriter.extensions.inverse``): ``transpose`` (Section 3.1), ``pinv`` (3.2), ``fourier`` (3.3), each with
``fit="mean"`` (the thesis's single constraint) and the default ridge; statistics come from the
imagenet-samples photos (the second moment of the view's keys, or the Fourier spectrum of the output maps).

Does the edit take hold? Checks, all on the rule's exemplars (cosines are per pixel, over channels):

* **layer**: the forward rule error ``‖W1 v̄ − k̄‖ / ‖W0 v̄ − k̄‖`` (``k̄`` the mean wheel output pixel, ``v̄``
  the mean wooden input patch; 1 = unchanged, 0 = wooden wheels now give the wheel's output) and the
  inverse recall error ``‖W1ᵀ k̄ − v̄‖ / ‖W0ᵀ k̄ − v̄‖`` (the thesis's own constraint, eq. 3.8); and the
  edit's *firing* ``√E‖ΔW x‖² / ‖ΔW v̄‖`` over the photos' inputs (how specific the change is to wood).
* **key** stage: from the wheel's output at the most-covered wheel pixel, reconstruct the input patch through
  the (edited) layer from a random start; takes hold when its cosine to the wooden patch exceeds its cosine to
  the wheel patch by more than ``COS_TOL`` (mean over exemplars; within ±``COS_TOL`` is a tie). The paired
  *shift* — the edited minus the unedited reconstruction from the same start, projected on wood − wheel —
  says how far the edit itself moved it.
* **feature-map** stage (eqs. 3.14–3.15): reconstruct the whole input map; mask-weighted mean per-pixel
  cosine over the wheel pixels; takes hold when closer to the wooden map.
* **image** stage (eqs. 3.9–3.10, default layer only): reconstruct the image through the edited network
  (Adam, random start); the distance inside the wheel mask is the classifier-feature distance of
  ``rulewriter.extensions.reconstruct.FeatureDistance`` (LPIPS form on EfficientNet-Lite0's own features, *not* LPIPS: the
  ``lpips`` package and its AlexNet weights are not available offline); takes hold when closer to the
  wooden-wheel photo by more than the unedited margin changes between two random starts.

Each stage runs with two targets: **held** — the *unedited* network's output for the wheel photo (what a
wheel used to produce; the edited layer's pre-images of it) — and **thesis** — the *edited* network's output
(Section 3.2.1 as written). With the thesis target the wheel input itself has zero loss, so only the null
space of the layer can move the reconstruction towards wood.

Collateral cost: top-1 on imagenet-samples (all 1000 photos for the default layer, through the network tail
from the cached input of block 15, checked once against the full model by ``_common.TailEvaluator``; a
subset with full forward passes for the stem) and the number of changed top-1 predictions.

The default layer ``_blocks.15._project_conv`` is a 1×1 conv (1152 → 320): views 3 and 4 coincide there
(both are ``W2ᵀ = W1ᵀ``; checked), and the Fourier solver's kernel support is one tap, so it equals the
transpose solver. EfficientNet-Lite0 has no groups=1 conv with a kernel larger than 1×1 except the stem
(``_conv_stem``, 3×3 stride 2, 3 → 32; the other k>1 convs are depthwise), so the stem is where views 3 and 4
differ and the Fourier solver is a convolution (stride 2: four input phases); it is far too early for a
wheel concept, so there it shows the solvers' mechanics, not a semantic edit. The stem's input is the image,
so its feature-map stage is its image stage.

Runs on one torch thread (see ``main``). Run: ``python benchmarks/inverse.py [--quick]`` (writes
``results/inverse.md``, ``.json`` and ``inverse.*.png`` figures; about 7–9 minutes, 1.5–2.5 with ``--quick``).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "inverse"
LAYER = "_blocks.15._project_conv"
STEM = "_conv_stem"
#: Inside the bowl of the wooden spoon (imagenet-samples n04597913, 256×369), checked by eye.
WOOD_CROP = (112, 262, 188, 328)
N_EXEMPLARS = 4
#: A cosine margin within ±0.01 is a tie (the image stage's tolerance is measured: see ``run_layer``).
COS_TOL = 0.01
#: View-4 keys of the stem are 288-dim on a 224×224 grid; every 4th key row is enough for their C.
STEM_V4_STRIDE = 4
#: Adam's learning rate for image reconstructions (normalised pixels span [-1, 1]); 0.1 lowered the loss most
#: in 100 steps among 0.02, 0.05 and 0.15 (measured once on the first exemplar).
IMAGE_LR = 0.1


@dataclass
class Settings:
    photos: int | None
    stem_photos: int
    stem_stats_photos: int
    key_steps: int
    feature_steps: int  # default layer: CG converges to ~1e-10 relative loss in ~20 steps (1×1, cond 4.5)
    stem_feature_steps: int  # stem: 80 CG steps bring the loss down 6 orders of magnitude
    stem_feature_exemplars: int  # a 3×224×224 inversion costs ~0.07 s per step on one core
    image_steps: int


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(photos=200, stem_photos=30, stem_stats_photos=16, key_steps=50, feature_steps=20,
                        stem_feature_steps=20, stem_feature_exemplars=1, image_steps=20)
    return Settings(photos=None, stem_photos=100, stem_stats_photos=100, key_steps=300, feature_steps=40,
                    stem_feature_steps=80, stem_feature_exemplars=2, image_steps=150)


# ------------------------------------------------------------------------------------------ data
@dataclass
class Exemplars:
    names: list[str]
    cars: list[Image.Image]
    masks: list[np.ndarray]
    wooden: list[Image.Image]


def exemplars(shared: Path) -> tuple[Exemplars, Image.Image]:
    from rulewriter.models.data import load_image
    from rulewriter.concepts.manipulate import paste_texture, texture_from

    paths, index = C.car_photos(shared, "trainingset")
    wheel = set(index.images("wheel"))
    chosen = [p for p in paths if p.name in wheel][:N_EXEMPLARS]
    spoon = C.find_one(shared / "data" / "imagenet-samples", "n04597913_*")
    wood = texture_from(spoon, crop_box=WOOD_CROP)
    cars = [load_image(p) for p in chosen]
    masks = [index.mask(p.name, "wheel") for p in chosen]
    wooden = [paste_texture(c, m, wood) for c, m in zip(cars, masks)]
    return Exemplars([p.name for p in chosen], cars, masks, wooden), wood


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ statistics
def project_stats(clf, cache: torch.Tensor, batch: int = 100):
    """Second moments (views 2 and 3) and the key spectrum of the default layer, from cached block inputs."""
    from rulewriter.extensions.fourier import KeySpectrum
    from rulewriter.core.memory import LayerMemory
    from rulewriter.core.stats import SecondMoment
    from rulewriter.core.trace import StopForward, Trace, get_module

    model = clf.model
    module = get_module(model, LAYER)
    m2, m3 = LayerMemory(module, 2), LayerMemory(module, 3)
    s2, s3, spec = SecondMoment("fp32"), SecondMoment(), KeySpectrum()
    block = model._blocks[int(LAYER.split(".")[1])]
    t0 = time.perf_counter()
    with torch.no_grad(), Trace(model, LAYER, stop=True) as tr:
        for i in range(0, cache.shape[0], batch):
            tr.reset()
            try:
                block(cache[i : i + batch])
            except StopForward:
                pass
            s2.add(m2.flat_keys(tr.input))
            s3.add(m3.flat_keys(tr.input, tr.output))
            spec.add(m3.keys(tr.input, tr.output))
    return {2: s2, 3: s3, "spectrum": spec}, time.perf_counter() - t0


def stem_stats(clf, images: torch.Tensor, batch: int = 8):
    from rulewriter.extensions.fourier import KeySpectrum
    from rulewriter.core.memory import LayerMemory
    from rulewriter.core.rules import layer_io
    from rulewriter.core.stats import SecondMoment
    from rulewriter.core.trace import get_module

    module = get_module(clf.model, STEM)
    mems = {v: LayerMemory(module, v) for v in (2, 3, 4)}
    stats = {v: SecondMoment("fp32") for v in (2, 3, 4)}
    spec = KeySpectrum()
    t0 = time.perf_counter()
    for i in range(0, images.shape[0], batch):
        x, y = layer_io(clf, STEM, images[i : i + batch])
        with torch.no_grad():
            stats[2].add(mems[2].flat_keys(x))
            stats[3].add(mems[3].flat_keys(x, y))
            stats[4].add(mems[4].flat_keys(x, y)[::STEM_V4_STRIDE])
            spec.add(mems[3].keys(x, y))
    return {**stats, "spectrum": spec}, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ edits
def build_edits(clf, layer: str, ex: Exemplars, stats: dict, variants: list[tuple[str, str, int]]):
    """``variants``: (state name, solver, view); solver "forward" is rules.rewrite on the view-2 rule."""
    from rulewriter.extensions.inverse import inverse_rewrite, inverse_rule_from_images
    from rulewriter.core.rules import rewrite, rule_from_images

    rules: dict[int, Any] = {}
    edits: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, solver, view in variants:
        if view not in rules:
            make = rule_from_images if view == 2 else inverse_rule_from_images
            rules[view] = make(clf, layer, ex.cars, ex.wooden, ex.masks, view=view)
        t0 = time.perf_counter()
        if solver == "forward":
            edits[name] = rewrite(clf, rules[view], stats[view])
        elif solver == "forward-mean":  # like for like with the inverse solvers' single constraint
            edits[name] = rewrite(clf, rules[view], stats[view], fit="mean")
        else:
            st = stats["spectrum"] if solver == "fourier" else stats[view]
            edits[name] = inverse_rewrite(clf, rules[view], st, solver=solver)
        seconds[name] = time.perf_counter() - t0
    return rules, edits, seconds


# ------------------------------------------------------------------------------------------ checks
@dataclass
class LayerData:
    """Inputs/outputs of the layer for the exemplars (unedited), and their masks on each grid."""

    x_car: torch.Tensor
    y_car: torch.Tensor
    x_wood: torch.Tensor
    g_out: torch.Tensor
    g_in: torch.Tensor
    images_car: torch.Tensor
    images_wood: torch.Tensor
    masks_s: torch.Tensor


def layer_data(clf, layer: str, ex: Exemplars) -> LayerData:
    from rulewriter.concepts.masks import mask_to_grid
    from rulewriter.core.rules import layer_io, prepare_mask

    pre = clf.preprocess
    xc, xw = pre.batch(ex.cars), pre.batch(ex.wooden)
    x_car, y_car = layer_io(clf, layer, xc)
    x_wood, _ = layer_io(clf, layer, xw)
    masks_s = torch.stack([prepare_mask(clf, m, c) for m, c in zip(ex.masks, ex.cars)])
    g_out = torch.stack([mask_to_grid(m, y_car.shape[2:]) for m in masks_s])
    g_in = torch.stack([mask_to_grid(m, x_car.shape[2:]) for m in masks_s])
    return LayerData(x_car, y_car, x_wood, g_out, g_in, xc, xw, masks_s)


def rule_errors(module, rule3, w0: torch.Tensor, c_in: torch.Tensor) -> dict[str, float]:
    """Forward rule error and inverse recall error in view-3 terms (see the module docstring), and how
    strongly typical inputs fire the edit: ``sqrt(E‖ΔW x‖²) / ‖ΔW v̄‖`` with ``E[x xᵀ] = c_in``."""
    from rulewriter.core.memory import LayerMemory

    w1 = LayerMemory(module, 2).matrix().double()
    k, v = rule3.key(), rule3.value()
    dw = w1 - w0
    typical = float(torch.trace(dw @ c_in @ dw.T).clamp_min(0).sqrt())
    firing = typical / float((dw @ v).norm()) if float(dw.norm()) > 0 else 0.0
    fwd = float((w1 @ v - k).norm() / (w0 @ v - k).norm())
    inv = float((w1.T @ k - v).norm() / (w0.T @ k - v).norm())
    needed = k - w0 @ v
    moved = (w1 - w0) @ v
    align = float(moved @ needed / (moved.norm() * needed.norm()).clamp_min(1e-300))
    return {"forward_rule_error": fwd, "inverse_recall_error": inv, "wood_shift_alignment": align,
            "wood_shift_fraction": float(moved.norm() / needed.norm()), "firing": firing}


def key_stage(module, d: LayerData, protocol: str, steps: int):
    from rulewriter.extensions.reconstruct import reconstruct_key
    from rulewriter.core.memory import LayerMemory

    mem2 = LayerMemory(module, 2)
    with torch.no_grad():
        keys_c, keys_w = mem2.keys(d.x_car), mem2.keys(d.x_wood)
        y_now = module(d.x_car) if protocol == "thesis" else d.y_car
    recs = []
    for e in range(d.x_car.shape[0]):
        i, j = divmod(int(torch.argmax(d.g_out[e])), d.g_out.shape[2])
        kc, kw = keys_c[e, :, i, j], keys_w[e, :, i, j]
        recs.append(reconstruct_key(module, y_now[e, :, i, j], {"wheel": kc, "wood": kw}, steps=steps, seed=e,
                                    init_scale=float(kc.pow(2).mean().sqrt())))
    return recs


def feature_stage(module, d: LayerData, protocol: str, steps: int, exemplars: int | None = None):
    from rulewriter.extensions.reconstruct import reconstruct_features

    with torch.no_grad():
        y_now = module(d.x_car) if protocol == "thesis" else d.y_car
    recs = []
    for e in range(d.x_car.shape[0] if exemplars is None else exemplars):
        recs.append(reconstruct_features(module, y_now[e : e + 1], {"wheel": d.x_car[e : e + 1],
                                                                   "wood": d.x_wood[e : e + 1]},
                                         input_shape=d.x_car[e : e + 1].shape, mask=d.g_in[e], steps=steps, seed=e,
                                         init_scale=float(d.x_car[e].pow(2).mean().sqrt())))
    return recs


def image_stage(clf, layer: str, module, d: LayerData, protocol: str, steps: int, distance, seed: int = 0):
    from rulewriter.extensions.reconstruct import reconstruct_image

    with torch.no_grad():
        y_now = module(d.x_car[:1]) if protocol == "thesis" else d.y_car[:1]
    return reconstruct_image(clf, layer, y_now, {"wheel": d.images_car[:1], "wood": d.images_wood[:1]},
                             steps=steps, lr=IMAGE_LR, seed=seed, distance=distance)


def shift_toward_wood(recs, recs0, wheel: list[torch.Tensor], wood: list[torch.Tensor],
                      weights: list[torch.Tensor] | None = None) -> list[float]:
    """How far the edit moved the reconstruction from wheel towards wood, as a fraction of the distance.

    Edited and unedited reconstructions start from the same random point, so ``Δ = rec − rec0`` is what the
    edit changed; its projection on ``wood − wheel`` (per pixel, mask-weighted for maps) over ``‖wood −
    wheel‖²`` is 1 when the reconstruction moved all the way to wood, 0 when it did not move towards it.
    """
    out = []
    for e, (r, r0) in enumerate(zip(recs, recs0)):
        delta = (r.result - r0.result).double().reshape(wheel[e].shape)
        u = (wood[e] - wheel[e]).double()
        if weights is None:
            out.append(float(delta.reshape(-1) @ u.reshape(-1) / (u.reshape(-1) @ u.reshape(-1))))
        else:
            g = weights[e].double()
            out.append(float(((delta * u).sum(0) * g).sum() / ((u * u).sum(0) * g).sum()))
    return out


def summarize(recs, tol: float) -> dict[str, Any]:
    """Mean final distance to each target, the margin towards wood, and the verdict.

    ``yes`` (took hold) when the margin exceeds ``tol``, ``no`` below ``-tol``, ``tie`` in between.
    """
    recs = recs if isinstance(recs, list) else [recs]
    hi = recs[0].higher_is_closer
    wheel = float(np.mean([r.final()["wheel"] for r in recs]))
    wood = float(np.mean([r.final()["wood"] for r in recs]))
    margin = (wood - wheel) if hi else (wheel - wood)  # > 0: closer to wood
    wins = sum(r.closest() == "wood" for r in recs)
    verdict = "yes" if margin > tol else ("no" if margin < -tol else "tie")
    return {"to_wheel": wheel, "to_wood": wood, "margin_to_wood": margin, "tolerance": tol, "verdict": verdict,
            "holds": verdict == "yes",
            "wood_wins": f"{wins}/{len(recs)}", "final_loss": float(np.mean([r.losses[-1] for r in recs])),
            "start_loss": float(np.mean([r.losses[0] for r in recs]))}


# ------------------------------------------------------------------------------------------ figures
def save_curves(stage: str, layer_tag: str, protocol: str, runs: dict, title: str) -> str:
    from rulewriter.extensions.reconstruct import plot_reconstructions

    path = C.RESULTS_DIR / f"{NAME}.curves.{layer_tag}.{stage}.{protocol}.png"
    plot_reconstructions(path, runs, title=title)
    return path.name


def save_heatmaps(layer_tag: str, clf, d: LayerData, recs: dict, car: Image.Image) -> str:
    """Dot-product similarity of the held feature-map reconstruction (exemplar 0) with the wheel and the wood
    maps (Figs. 3-4 and 3-5); each state's two panels share one colour scale, so wheel and wood compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rulewriter.concepts.heatmap import overlay
    from rulewriter.extensions.reconstruct import dot_similarity

    shown = clf.preprocess.denormalize(clf.preprocess.image(car))
    heats = {(s, t): dot_similarity(r.result, tgt) for s, r in recs.items()
             for t, tgt in (("wheel", d.x_car[:1]), ("wood", d.x_wood[:1]))}
    states = list(recs)
    fig, axes = plt.subplots(2, len(states), figsize=(2.3 * len(states), 5.6))
    for col, s in enumerate(states):
        top = max(float(heats[(s, t)].clamp_min(0).max()) for t in ("wheel", "wood")) or 1.0
        for row, t in enumerate(("wheel", "wood")):
            ax = axes[row, col]
            ax.imshow(overlay(shown, (heats[(s, t)] / top).clamp(0, 1), normalize="none"))
            ax.set_title(f"{s}\nrecon · {t}" if row == 0 else f"recon · {t}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"dot-product similarity of the feature-map reconstruction (held target) with the wheel and "
                 f"wood input maps, {layer_tag}; one colour scale per column", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = C.RESULTS_DIR / f"{NAME}.heatmaps.{layer_tag}.png"
    from rulewriter.atomic import atomic_bytes

    atomic_bytes(path, buf.getvalue())
    return path.name


def save_image_grid(clf, d: LayerData, recs: dict[str, Any]) -> str:
    from rulewriter.atomic import atomic_bytes

    pre = clf.preprocess
    tiles = [("wheel photo", pre.denormalize(d.images_car[0])), ("wooden photo", pre.denormalize(d.images_wood[0]))]
    tiles += [(name, pre.denormalize(r.result)) for name, r in recs.items()]
    s = pre.size
    grid = Image.new("RGB", (s * len(tiles), s + 16), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(grid)
    for i, (name, img) in enumerate(tiles):
        grid.paste(img, (i * s, 16))
        draw.text((i * s + 3, 2), name, fill="black")
    path = C.RESULTS_DIR / f"{NAME}.images.default.png"
    atomic_bytes(path, _png(grid))
    return path.name


# ------------------------------------------------------------------------------------------ one layer
def run_layer(clf, layer: str, tag: str, ex: Exemplars, stats: dict, variants, evaluate, st: Settings,
              log, image_stage_on: bool) -> dict[str, Any]:
    from rulewriter.extensions.reconstruct import perceptual_distance
    from rulewriter.core.memory import LayerMemory
    from rulewriter.core.trace import get_module

    module = get_module(clf.model, layer)
    rules, edits, solve_s = build_edits(clf, layer, ex, stats, variants)
    rule3 = rules.get(3)
    if rule3 is None:
        from rulewriter.extensions.inverse import inverse_rule_from_images

        rule3 = inverse_rule_from_images(clf, layer, ex.cars, ex.wooden, ex.masks, view=3)
    d = layer_data(clf, layer, ex)
    w0 = LayerMemory(module, 2).matrix().double()
    c_in = stats[2].moment()  # second moment of the inputs (view-2 keys) over the photos
    weight0 = module.weight.detach().double().clone()
    states: dict[str, Any] = {"unedited": None, **edits}
    distance = perceptual_distance(clf, d.masks_s[0]) if image_stage_on else None
    base_eval = evaluate(None)
    out_states: dict[str, Any] = {}
    curves: dict[tuple[str, str], dict] = {}
    base_recs: dict[str, list] = {}
    image_tol = 0.0
    mem2 = LayerMemory(module, 2)
    with torch.no_grad():
        kc_map, kw_map = mem2.keys(d.x_car), mem2.keys(d.x_wood)
    pix = [divmod(int(torch.argmax(d.g_out[e])), d.g_out.shape[2]) for e in range(d.x_car.shape[0])]
    key_wheel = [kc_map[e, :, i, j] for e, (i, j) in enumerate(pix)]
    key_wood = [kw_map[e, :, i, j] for e, (i, j) in enumerate(pix)]
    map_wheel = [d.x_car[e] for e in range(d.x_car.shape[0])]
    map_wood = [d.x_wood[e] for e in range(d.x_car.shape[0])]
    for name, edit in states.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = {"state": name}
        if edit is not None:
            u = edit.updates[0]
            row.update(solver=edit.meta.get("solver") if edit.meta.get("direction") == "inverse"
                       else f"rewrite (fit={edit.meta['fit']})",
                       view=u.view, rank=u.rank, solve_seconds=solve_s[name])
        handle = edit.apply(clf.model) if edit is not None else None
        try:
            dw = module.weight.detach().double() - weight0
            row["weight_change"] = float(dw.norm() / weight0.norm())
            row.update(rule_errors(module, rule3, w0, c_in))
            for protocol in (("held",) if edit is None else ("held", "thesis")):
                kr = key_stage(module, d, protocol, st.key_steps)
                fr = (feature_stage(module, d, protocol, st.stem_feature_steps, st.stem_feature_exemplars)
                      if tag == "stem" else feature_stage(module, d, protocol, st.feature_steps))
                row[f"key_{protocol}"] = summarize(kr, COS_TOL)
                row[f"features_{protocol}"] = summarize(fr, COS_TOL)
                if edit is None:
                    base_recs["key"], base_recs["features"] = kr, fr
                for stage, recs, wheel, wood, g in (("key", kr, key_wheel, key_wood, None),
                                                    ("features", fr, map_wheel, map_wood, list(d.g_in))):
                    shifts = shift_toward_wood(recs, base_recs[stage], wheel, wood, g)
                    row[f"{stage}_{protocol}"].update(shift_to_wood=float(np.mean(shifts)),
                                                      shift_per_exemplar=shifts)
                curves.setdefault(("key", protocol), {})[name] = kr[0]
                curves.setdefault(("features", protocol), {})[name] = fr[0]
                if image_stage_on:
                    ir = image_stage(clf, layer, module, d, protocol, st.image_steps, distance)
                    if edit is None:  # the same reconstruction from another random start: the margin's noise
                        other = summarize(image_stage(clf, layer, module, d, protocol, st.image_steps, distance, 1),
                                          0.0)
                        image_tol = abs(summarize(ir, 0.0)["margin_to_wood"] - other["margin_to_wood"])
                    row[f"image_{protocol}"] = summarize(ir, image_tol)
                    if edit is None:
                        row["image_held"]["seed1_margin_to_wood"] = other["margin_to_wood"]
                    curves.setdefault(("image", protocol), {})[name] = ir
                if tag == "stem":  # the stem's input is the image: score its feature-map reconstruction so too
                    from rulewriter.extensions.reconstruct import FeatureDistance

                    fd = FeatureDistance(clf, mask=d.masks_s[0])
                    rec = fr[0].result.float()
                    row[f"features_{protocol}"]["feature_distance"] = {
                        "to_wheel": fd(rec, fd.features(d.images_car[:1])),
                        "to_wood": fd(rec, fd.features(d.images_wood[:1]))}
            if protocol == "held" and edit is None:
                curves.setdefault(("key", "thesis"), {})[name] = curves[("key", "held")][name]
                curves.setdefault(("features", "thesis"), {})[name] = curves[("features", "held")][name]
                if image_stage_on:
                    curves.setdefault(("image", "thesis"), {})[name] = curves[("image", "held")][name]
            row["collateral"] = evaluate(edit) if edit is not None else base_eval
        finally:
            if handle is not None:
                handle.undo()
        assert torch.equal(module.weight.detach().double(), weight0)
        row["check_seconds"] = time.perf_counter() - t0
        out_states[name] = row
        log(f"  {tag} {name}: fwd err {row['forward_rule_error']:.3f}, recall err {row['inverse_recall_error']:.3f}, "
            f"key {row['key_held']['margin_to_wood']:+.3f}, features {row['features_held']['margin_to_wood']:+.3f}"
            + (f", image {row['image_held']['margin_to_wood']:+.4f}" if image_stage_on else "")
            + f", top-1 {row['collateral']['top1']:.1f}% ({row['check_seconds']:.0f}s)")
    figures = []
    for (stage, protocol), runs in curves.items():
        metric = next(iter(runs.values())).metric
        figures.append(save_curves(stage, tag, protocol, runs,
                                   f"{stage} reconstruction at {layer}, target: "
                                   f"{'unedited' if protocol == 'held' else 'edited'} network"
                                   + (f" ({metric})" if len(metric) < 40 else "")))
    figures.append(save_heatmaps(tag, clf, d, {s: curves[("features", "held")][s] for s in states}, ex.cars[0]))
    if image_stage_on:
        grid_recs = {f"{s} ({p})": curves[("image", p)][s] for s in states for p in ("held", "thesis")
                     if not (s == "unedited" and p == "thesis")}
        figures.append(save_image_grid(clf, d, grid_recs))
    return {"layer": layer, "rules": {str(v): {"pairs": int(r.keys.shape[0]), "key_dim": int(r.keys.shape[1]),
                                               "value_dim": int(r.values.shape[1])} for v, r in rules.items()},
            "states": out_states, "figures": figures,
            "image_distance": distance.label if distance is not None else None}


# ------------------------------------------------------------------------------------------ report
def fmt_stage(s: dict | None) -> str:
    if not s:
        return "—"
    shift = f", {s['shift_to_wood']:+.2f}" if "shift_to_wood" in s else ""
    word = {"yes": "**yes**", "no": "no", "tie": "≈"}[s["verdict"]]
    return f"{word} ({s['margin_to_wood']:+.3f}{shift})"


def table(res: dict, image: bool) -> str:
    heads = ["state", "view", "rank", "solve s", "‖ΔW‖/‖W‖", "firing", "fwd rule err", "Wᵀ recall err",
             "key (held)", "feat (held)"] + (["image (held)"] if image else []) + \
            ["key (thesis)", "feat (thesis)"] + (["image (thesis)"] if image else []) + ["top-1 %", "Δ pts", "changed"]
    rows = []
    base = res["states"]["unedited"]["collateral"]["top1"]
    for name, r in res["states"].items():
        col = r["collateral"]
        rows.append([name, r.get("view", "—"), r.get("rank", "—"),
                     f"{r['solve_seconds']:.2f}" if "solve_seconds" in r else "—",
                     f"{r['weight_change']:.2e}", f"{r['firing']:.2g}" if r["firing"] else "—",
                     f"{r['forward_rule_error']:.3f}", f"{r['inverse_recall_error']:.3f}",
                     fmt_stage(r.get("key_held")), fmt_stage(r.get("features_held"))]
                    + ([fmt_stage(r.get("image_held"))] if image else [])
                    + [fmt_stage(r.get("key_thesis")), fmt_stage(r.get("features_thesis"))]
                    + ([fmt_stage(r.get("image_thesis"))] if image else [])
                    + [f"{col['top1']:.1f}", f"{col['top1'] - base:+.1f}", col["changed"]])
    return C.markdown_table(heads, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer photos and iterations (a smoke run)")
    args = ap.parse_args()
    # One thread, not two: on the shared 2-core machine two OpenMP threads wait on each other (measured 4-30×
    # slower for these small inversions and single-image passes); one is also the more modest share.
    C.setup_torch(1)
    shared = C.require_shared("data/imagenet-samples", "data/car-parts/trainingset")
    st = settings(args.quick)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731

    from rulewriter.core.memory import LayerMemory
    from rulewriter.models.registry import load_classifier
    from rulewriter.core.trace import get_module

    clf = load_classifier("efficientnet-lite0")
    ex, wood = exemplars(shared)
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    from rulewriter.atomic import atomic_bytes

    atomic_bytes(C.RESULTS_DIR / f"{NAME}.wood.png", _png(wood))
    log(f"exemplars: {', '.join(ex.names)}; wood crop {WOOD_CROP} of the spoon photo")

    # ---- default layer: statistics and collateral through the cached block input
    paths, labels = C.imagenet_samples(shared, clf, st.photos)
    labels_t = torch.tensor(labels)
    t0 = time.perf_counter()
    ev = C.TailEvaluator(clf, [LAYER], paths, log=log)
    base_pass = time.perf_counter() - t0
    log(f"cached block inputs of {len(paths)} photos in {base_pass:.0f}s ({ev.method(LAYER)})")
    base_pred = ev.base_predictions()

    def evaluate_default(edit) -> dict[str, Any]:
        pred = base_pred if edit is None else ev.predictions(LAYER)
        return {"top1": C.top1_accuracy(pred, labels_t), "changed": int((pred != base_pred).sum()),
                "photos": len(paths), "method": ev.method(LAYER)}

    stats_d, stats_s = project_stats(clf, ev.cache[C._tail_start(clf.model, LAYER)])
    log(f"default-layer statistics (C for views 2, 3 and the key spectrum) in {stats_s:.1f}s")
    module = get_module(clf.model, LAYER)
    same_views = torch.equal(LayerMemory(module, 3).matrix(), LayerMemory(module, 4).matrix())
    variants_d = [("forward", "forward", 2), ("forward (mean)", "forward-mean", 2), ("transpose", "transpose", 3),
                  ("pinv", "pinv", 3), ("fourier", "fourier", 3)]
    res_d = run_layer(clf, LAYER, "default", ex, stats_d, variants_d, evaluate_default, st, log, image_stage_on=True)
    # The 1×1 identities the report states, checked on the real layer.
    from rulewriter.extensions.inverse import inverse_rewrite, inverse_rule_from_images

    r3 = inverse_rule_from_images(clf, LAYER, ex.cars, ex.wooden, ex.masks, view=3)
    r4 = inverse_rule_from_images(clf, LAYER, ex.cars, ex.wooden, ex.masks, view=4)
    e_t = inverse_rewrite(clf, r3, stats_d[3], solver="transpose")
    e_f = inverse_rewrite(clf, r3, stats_d["spectrum"], solver="fourier")
    identities = {
        "views_3_and_4_same_matrix": bool(same_views),
        "views_3_and_4_same_rule": bool(torch.equal(r3.keys, r4.keys) and torch.equal(r3.values, r4.values)),
        "fourier_minus_transpose_rel": float((e_f.updates[0].delta() - e_t.updates[0].delta()).norm()
                                             / e_t.updates[0].delta().norm()),
    }
    w = LayerMemory(module, 2).matrix().double()
    sv = torch.linalg.svdvals(w)
    k = r3.key()
    wt_k, wp_k = w.T @ k, torch.linalg.pinv(w) @ k
    identities["W_singular_values"] = {"max": float(sv[0]), "min": float(sv[-1]), "cond": float(sv[0] / sv[-1])}
    identities["cos(W0ᵀk*, W0†k*)"] = float(wt_k @ wp_k / (wt_k.norm() * wp_k.norm()))
    log(f"identities: {identities}")

    # ---- the stem
    spaths = paths[:: max(1, len(paths) // st.stem_photos)][: st.stem_photos]
    stem_x = C.load_tensors(spaths, clf.preprocess)
    stem_labels = labels_t[[paths.index(p) for p in spaths]]
    stem_base = C.top1(clf, stem_x)
    stats_paths = paths[1:: max(1, len(paths) // st.stem_stats_photos)][: st.stem_stats_photos]
    stats_st, stem_stats_s = stem_stats(clf, C.load_tensors(stats_paths, clf.preprocess))
    log(f"stem statistics from {len(stats_paths)} photos in {stem_stats_s:.1f}s")

    def evaluate_stem(edit) -> dict[str, Any]:
        pred = stem_base if edit is None else C.top1(clf, stem_x)
        return {"top1": C.top1_accuracy(pred, stem_labels), "changed": int((pred != stem_base).sum()),
                "photos": len(spaths), "method": "full forward"}

    variants_s = [("forward", "forward", 2), ("transpose v3", "transpose", 3), ("transpose v4", "transpose", 4),
                  ("pinv v3", "pinv", 3), ("pinv v4", "pinv", 4), ("fourier", "fourier", 4)]
    res_s = run_layer(clf, STEM, "stem", ex, stats_st, variants_s, evaluate_stem, st, log, image_stage_on=False)
    # The Fourier edit is one weight change; its rank depends on the layout it is written in.
    from rulewriter.extensions.inverse import factorize

    r4s = inverse_rule_from_images(clf, STEM, ex.cars, ex.wooden, ex.masks, view=4)
    f4 = inverse_rewrite(clf, r4s, stats_st["spectrum"], solver="fourier")
    stem_mod = get_module(clf.model, STEM)
    mem4 = LayerMemory(stem_mod, 4)
    dw = mem4.weight_from_matrix(mem4.matrix().double() + f4.updates[0].delta()) - stem_mod.weight.detach().double()
    atol = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(mem4.matrix().double(), ord=2))
    stem_identities = {f"fourier_rank_in_view_{v}": int(factorize(LayerMemory(stem_mod, v).matrix(weight=dw),
                                                                  atol=atol)[0].shape[1]) for v in (3, 4)}
    m3 = LayerMemory(stem_mod, 3).matrix().double()
    stem_identities["patch_matrix_singular_values"] = [float(x) for x in torch.linalg.svdvals(m3)[[0, -2, -1]]]
    total = time.perf_counter() - t_start
    payload = {
        "quick": args.quick, "settings": st.__dict__, "exemplars": ex.names, "wood_crop": list(WOOD_CROP),
        "timing_seconds": {"base_pass_and_cache": base_pass, "default_stats": stats_s, "stem_stats": stem_stats_s,
                           "total": total},
        "default": {**res_d, "identities": identities}, "stem": {**res_s, "identities": stem_identities},
    }
    md = report(payload, res_d, res_s, identities, stem_identities, st, len(paths), len(spaths), total)
    C.write_results(NAME, payload, md)
    print(md)


def _yes(stage: dict) -> str:
    return {"yes": "takes hold", "no": "does not take hold", "tie": "is a tie (within tolerance)"}[stage["verdict"]]


def explanation(res_d: dict, res_s: dict, ident: dict) -> list[str]:
    """The findings, with this run's numbers (the mathematical statements hold for any run)."""
    d, sd = res_d["states"], res_s["states"]
    u, t, p, fm, fo = (d[k] for k in ("unedited", "transpose", "pinv", "forward (mean)", "fourier"))
    top = lambda r: r["collateral"]["top1"]  # noqa: E731
    sv = ident["W_singular_values"]
    seed_spread = abs(u["image_held"]["margin_to_wood"] - u["image_held"]["seed1_margin_to_wood"])
    pv3 = sd["pinv v3"]
    mean_fit = 'rewrite(fit="mean")'
    return [
        "## What we find, and why",
        "",
        f"**Editing Wᵀ (Section 3.1) does not take hold — as the thesis found — and on this layer it also breaks "
        f"the classifier.** The transpose edit meets its own constraint exactly (Wᵀ recall error "
        f"{t['inverse_recall_error']:.3f}), yet wooden wheels move *away* from the wheel's output (forward rule "
        f"error {t['forward_rule_error']:.1f}; the change of W v̄ points at cosine {t['wood_shift_alignment']:+.2f} to "
        f"the change the rule needs), the weight changes by {t['weight_change']:.0%} and top-1 goes from "
        f"{top(u):.1f}% to {top(t):.1f}%. Its reconstructions move *away* from wood (paired shifts "
        f"{t['key_held']['shift_to_wood']:+.2f} at the key and {t['features_held']['shift_to_wood']:+.2f} at the "
        f"feature-map stage), though by less than the tolerance in cosine margin (key, feature-map, image verdicts: "
        f"{t['key_held']['verdict']}, {t['features_held']['verdict']}, {t['image_held']['verdict']}). Three facts "
        "explain it:",
        "",
        "1. *The network never computes Wᵀ.* The layer maps x ↦ W x; Wᵀ only appears in back-propagation "
        "(eqs. 3.3–3.5), which carries gradients, not features. A constraint W1ᵀk* = v* says nothing about W1 v* "
        "unless Wᵀ is a multiple of W†, i.e. unless all singular values of W are equal. Here they range over "
        f"[{sv['min']:.2f}, {sv['max']:.2f}] (condition {sv['cond']:.1f}) and cos(W0ᵀk̄, W0†k̄) = "
        f"{ident['cos(W0ᵀk*, W0†k*)']:.2f}.",
        "2. *Its least-change criterion sits on the wrong side.* The closed form minimises E‖ΔM y‖² over output "
        "keys y (the C of the outputs): how the transposed recall changes. The change it makes to the layer is "
        "ΔW x = D (Λᵀx) with D = C_y⁻¹k* and Λ = (v* − W0ᵀk*) / (k*ᵀC_y⁻¹k*): it fires for every input in "
        "proportion to Λᵀx, and Λ is an unwhitened input-space vector. The layer's inputs are ReLU6 outputs, all "
        "non-negative, sharing a large common component with Λ, so every pixel of every photo is pushed along D: "
        f"a typical input fires the change {t['firing']:.2f}× as strongly as the wooden key does. The forward "
        "solution whitens on the input side (D = C_x⁻¹k*), which is what leaves inputs that are C-orthogonal to k* "
        f"untouched: its firing is {fm['firing']:.2g}.",
        "3. *Reconstructions invert W1, not W1ᵀ.* Gradient descent on ‖W1 x − y‖² from x0 ends at "
        "W1⁺y + (I − W1⁺W1)x0, which depends on W1 alone, so a constraint on W1ᵀ can only show through the (here "
        "misdirected) change of W1.",
        "",
        f"**Editing W† (Section 3.2) takes hold at the layer.** W1 = P1†, and P1 (1152 × 320) has full column rank, "
        f"so W1 v̄ = P1†P1 k̄ = k̄: the inverse constraint becomes the forward rule *wooden wheels → wheels* "
        f"(forward rule error {p['forward_rule_error']:.3f}). The update has rank {p['rank']} (a rank-one change of "
        "P changes P† by rank ≤ 3). It costs more accuracy than the forward edit under the same single constraint "
        f"(Δ top-1 {top(p) - top(u):+.1f} points and {p['collateral']['changed']} changed predictions, against "
        f"{top(fm) - top(u):+.1f} and {fm['collateral']['changed']} for `{mean_fit}`), because its least change is "
        f"measured on P over output keys, not on W over input keys (firing {p['firing']:.2g} against "
        f"{fm['firing']:.2g}). It is also the one edit a key reconstruction "
        "reads directly: W1⁺ = P1, so the reconstruction is the edited pseudo-inverse's recall P1 y plus the "
        "random start's null-space part.",
        "",
        f"**The Fourier solver (Section 3.3) equals the transpose solver on a 1×1 layer** (relative difference "
        f"{ident['fourier_minus_transpose_rel']:.0e}): with a single tap, R_A(0) of eq. 3.54 is E[y yᵀ], the "
        "transpose solver's C, and the constant key of eq. 3.46 is the pixel key; it inherits the failure (top-1 "
        f"{top(fo):.1f}%). On the stem it is a true convolution (four input phases of a stride-2 3×3 kernel) and "
        f"still constrains only the adjoint map: forward rule error {sd['fourier']['forward_rule_error']:.1f}, "
        f"top-1 {top(sd['fourier']):.1f}% on the stem subset. In the thesis's closed form (eq. 3.57: a filter as "
        "large as the feature map) the constraint touches frequency 0 only, so the update is one constant over the "
        "whole grid (checked in `tests/test_inverse.py`), which a 3×3 kernel cannot hold; restricted to the "
        "kernel's support the normal equations (3.52) become the Toeplitz system solved here, and for a 1×1 kernel "
        "that system is Section 3.1's.",
        "",
        "**Reconstructions.** With the *thesis* target (the edited network's output) the wheel's own input has "
        "zero loss, so a reconstruction can differ from the unedited one only along directions the edited layer "
        "cannot see. With the *held* target (the unedited output) a successful inverse edit should make the "
        "wheel's old output come from wood. Two properties limit what either can show:",
        "",
        "* The default layer maps 1152 channels to 320: the random start keeps its part in an 832-dimensional "
        "null space, so cosines stay far from 1 "
        f"(unedited key stage {u['key_held']['to_wheel']:.2f} to the wheel, {u['key_held']['to_wood']:.2f} to "
        "wood). The pinv edit adds v̄ − P0k̄ (the part of the mean wooden input that W0† cannot recall) to W1's "
        f"row space, which raises the cosine to both targets alike ({p['key_held']['to_wheel']:.2f} and {p['key_held']['to_wood']:.2f}); its "
        "constraint holds for the *mean* wheel key, and at each exemplar's most-covered wheel pixel the "
        "reconstruction moves towards wood for some photos and away for others (key shifts "
        + ", ".join(f"{x:+.2f}" for x in p["key_held"]["shift_per_exemplar"]) + ").",
        "* An edit that makes W1 v̄ = k̄ while keeping W1 x_wheel ≈ W0 x_wheel (a good forward edit) makes "
        "wood − wheel a near-null direction of W1: the wheel's output then has both pre-images, and the "
        "reconstruction chooses between them by its random start and by norm, not by the rule.",
        "",
        "On the stem the patch map is 27 → 32, injective up to two near-null directions. There the pinv (view 3) "
        "edit's key "
        f"reconstruction {_yes(pv3['key_held'])} (shift {pv3['key_held']['shift_to_wood']:+.2f}, forward rule "
        f"error {pv3['forward_rule_error']:.3f}) and its feature-map reconstruction {_yes(pv3['features_held'])} "
        f"(shift {pv3['features_held']['shift_to_wood']:+.2f})"
        + (" — the pattern of the thesis's Section 3.2.2 (keys edited, feature maps not): a feature map is a field "
           "of overlapping patches, and a rank-one change aimed at the mean patch must also explain every "
           "neighbour that shares its pixels."
           if pv3["key_held"]["holds"] and not pv3["features_held"]["holds"] else ".")
        + " The image reconstructions of this classifier (not adversarially robust; the thesis leans on robust "
        "models' inversion property [7]) are noise-like (`inverse.images.default.png`): the loss falls from "
        f"{u['image_held']['start_loss']:.3g} to {u['image_held']['final_loss']:.3g}, yet inside the wheels the "
        f"feature distance stays at {u['image_held']['to_wheel']:.2f} to the wheel photo and "
        f"{u['image_held']['to_wood']:.2f} to the wooden one (0: identical features, 2: orthogonal). Between two "
        f"random starts the unedited margin moves by {seed_spread:.4f}; the image stage cannot show an edit here.",
        "",
        "Forward edits are reported with `rewrite`'s defaults (`fit=\"pairs\"`: every masked pair, so the mean rule "
        "holds only approximately) and with `fit=\"mean\"` (the same single constraint as the inverse solvers).",
    ]


def report(payload, res_d, res_s, ident, sident, st: Settings, n_photos: int, n_stem: int, total: float) -> str:
    base = res_d["states"]["unedited"]["collateral"]["top1"]
    lines = [
        "# Editing in the inverse direction (thesis Chapter 3): wheels behave like wooden wheels",
        "",
        f"EfficientNet-Lite0. Rule from {len(payload['exemplars'])} car-parts photos "
        f"({', '.join(payload['exemplars'])}) with their COCO wheel masks; wood = crop {tuple(payload['wood_crop'])} "
        "of the wooden-spoon photo (`inverse.wood.png`), pasted on the wheels. Statistics and collateral on "
        f"{n_photos} imagenet-samples photos (base top-1 {base:.1f}%). Inverse solvers use `fit=\"mean\"` (the "
        "thesis's single constraint) and the default ridge; the forward edits are `rule_from_images` + `rewrite` "
        "on the same pairs. "
        + ("**Quick mode** (fewer photos and iterations)." if payload["quick"] else ""),
        "",
        "Stage cells: takes hold? (margin, shift). Margin: cosine to wood − cosine to wheel for keys and feature "
        "maps (per pixel, mask-weighted over the wheels), feature distance to wheel − to wood for images; > 0 means "
        f"closer to wood. **yes** when the margin exceeds the tolerance, no below minus it, ≈ in between; the "
        f"tolerance is {COS_TOL} for cosines and, for images, the change of the unedited margin between two random "
        f"starts ({res_d['states']['unedited']['image_held']['tolerance']:.4f}). Shift: how far the edit moved the reconstruction from wheel towards wood (1 = all the "
        "way), against the unedited reconstruction from the same random start. *held*: invert the **unedited** "
        "network's output for the wheel photo through the edited network; *thesis*: invert the **edited** "
        "network's output (Section 3.2.1). fwd rule err = ‖W1 v̄ − k̄‖/‖W0 v̄ − k̄‖ (0: wooden wheels give the "
        "wheel's output); Wᵀ recall err = ‖W1ᵀk̄ − v̄‖/‖W0ᵀk̄ − v̄‖ (0: the thesis's constraint 3.8 holds); "
        "firing = √E‖ΔW x‖² / ‖ΔW v̄‖ over the photos' inputs x: how strongly a typical input triggers the "
        "change, relative to the wooden key (small = specific). Shifts far beyond ±1 mean the reconstruction "
        "left both targets. Key and feature-map stages average the 4 exemplars; the image stage uses the first.",
        "",
        f"## Default layer `{LAYER}` (1×1, 1152 → 320)",
        "",
        f"Views 3 and 4 are the same matrix here ({ident['views_3_and_4_same_matrix']}) and give the same rule "
        f"({ident['views_3_and_4_same_rule']}), so view 3 stands for both. Image distance: {res_d['image_distance']}.",
        "",
        table(res_d, image=True),
        "",
        *explanation(res_d, res_s, ident),
        "",
        f"## Stem `{STEM}` (3×3, stride 2, 3 → 32): the solvers' mechanics",
        "",
        f"Collateral on {n_stem} photos (full forward passes). The Fourier edit (from the view-4 rule: pixel key "
        "and value) is one weight change; written as a view-3 update it has rank "
        f"{sident['fourier_rank_in_view_3']}, as view 4 rank {sident['fourier_rank_in_view_4']} (one rank-one "
        "term per input phase, at most c = 3 together in view 4). The stem's input is the image, so its feature-map stage is its image stage "
        f"(computed on {st.stem_feature_exemplars} exemplar(s)). Its 27 × 32 patch matrix is nearly singular "
        f"(singular values {sident['patch_matrix_singular_values'][0]:.1f} … "
        f"{sident['patch_matrix_singular_values'][1]:.2g}, {sident['patch_matrix_singular_values'][2]:.1e}: two "
        "directions of the 3×3×3 patch are all but ignored), so W† is huge along them and the pinv edits are "
        "numerically delicate; reconstructions treat directions below 1e-6·σ_max as null space.",
        "",
        table(res_s, image=False),
        "",
        "## Timing",
        "",
        f"Base pass over {n_photos} photos caching block-15 inputs: {payload['timing_seconds']['base_pass_and_cache']:.0f} s; "
        f"default-layer statistics (C of views 2 and 3, key spectrum) from the cache: "
        f"{payload['timing_seconds']['default_stats']:.1f} s; stem statistics: {payload['timing_seconds']['stem_stats']:.1f} s. "
        "`solve s` is the edit alone given statistics. Total run time "
        f"{total / 60:.1f} min on one torch thread. Reconstruction: key {st.key_steps} and feature map "
        f"{st.feature_steps} (stem {st.stem_feature_steps}) conjugate-gradient steps, image {st.image_steps} Adam (lr {IMAGE_LR}) "
        "steps.",
        "",
        "Figures: " + ", ".join(f"`{f}`" for f in res_d["figures"] + res_s["figures"]) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
