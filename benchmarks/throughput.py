"""Throughput of statistics and evaluation, side by side with the plain forward pass, and their precision.

For each model/layer, on the same preprocessed batches (decoding excluded), in one run, with the order of
the variants rotated on every batch and medians over repeats:

* ``forward``: the model up to the layer (``Trace(stop=True)``), in float32 — the 1.0× reference;
* ``forward bf16``: the same under bf16 autocast (channels_last on CUDA);
* ``+ <mode>``: the forward pass plus ``SecondMoment(<mode>).add(keys)`` for every product mode of
  :data:`rulewriter.core.stats.PRECISIONS`. On a CPU, ``tf32``, ``tf32x2`` and ``bf16`` *emulate* the input
  rounding of those formats (their numerics, not their speed: CPUs have no TF32);
* ``+ default, bf16 fwd``: bf16 autocast forward with the device's default product mode;
* evaluation: ``evaluate.predict`` on the image files against a DataLoader + full forward on the same files
  (decoding in both), in images per second.

Precision: the relative error ‖C_mode − C_fp64‖/‖C_fp64‖ over all the images, and the effect on a real edit
(the coffee cup with gravel pasted, rewritten to espresso at the default layer): relative change of ΔW
against the fp64 edit, and the edited model's espresso probability on the gravel cup.

Memory: peak resident memory (CPU) or peak allocated memory (CUDA) of a statistics run and of an
evaluation run, each in a fresh subprocess (VmHWM); 4× more images must not need more memory.

Models: EfficientNet-Lite0 at its default layer (1152-d keys) and VGG16 conv5_3 (``features.28``) in the
unfolded 3×3 view (4608-d keys, random weights: the cost does not depend on the values).

Run: ``python benchmarks/throughput.py [--quick] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "throughput"
MODES = ("fp64", "fp32", "tf32x2", "tf32", "bf16")
BF16_FORWARD = ("forward bf16", "+ default, bf16 fwd")  # the variants run under bf16 autocast
TOLERANCE = 1e-4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_variants(clf: Any, layer: str, x: torch.Tensor, batch: int, repeats: int, device: torch.device,
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds per image for every variant (median over repeats), and the statistics of the last repeat."""
    from rulewriter.core.memory import LayerMemory
    from rulewriter.models.registry import get_module
    from rulewriter.core.stats import SecondMoment, default_precision
    from rulewriter.core.trace import Trace

    mem = LayerMemory(get_module(clf.model, layer), 2, name=layer)
    default = default_precision(device)
    variants = ["forward", "forward bf16", *(f"+ {m}" for m in MODES), "+ default, bf16 fwd"]
    totals: dict[str, list[float]] = {v: [] for v in variants}
    stats: dict[str, Any] = {}
    channels_last = device.type == "cuda"
    model = clf.model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for r in range(repeats + 1):  # repeat 0 warms up
        stats = {v: SecondMoment(v[2:] if v != "+ default, bf16 fwd" else default) for v in variants if v[0] == "+"}
        spent = {v: 0.0 for v in variants}
        with torch.no_grad(), Trace(model, layer, retain_output=False, stop=True) as tr:
            for b, i in enumerate(range(0, x.shape[0], batch)):
                xb = x[i: i + batch].to(device)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                k = (r + b) % len(variants)
                for v in variants[k:] + variants[:k]:
                    amp = torch.autocast(device.type, dtype=torch.bfloat16) if v in BF16_FORWARD else nullcontext()
                    sync(device)
                    t0 = time.perf_counter()
                    with amp:
                        tr(xb)
                    if v in stats:
                        stats[v].add(mem.flat_keys(tr.input.float()))
                    sync(device)
                    spent[v] += time.perf_counter() - t0
        if r:
            for v in variants:
                totals[v].append(spent[v] / x.shape[0])
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return {v: C.median(t) for v, t in totals.items()}, stats


def coffee_edit_effect(clf: Any, layer: str, stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Build the gravel-cup → espresso edit with C from each mode; compare with the fp64 edit."""
    from rulewriter.concepts.manipulate import paste_texture
    from rulewriter.core.rules import rewrite, rule_from_images

    photo, mask = C.coffee_photo()
    gravel = paste_texture(photo, mask, "skimage:gravel")
    rule = rule_from_images(clf, layer, [photo], [gravel], [mask])
    espresso = clf.class_index("espresso")
    x = clf.preprocess.batch([gravel])
    out: dict[str, dict[str, float]] = {}
    ref = None
    for name, s in stats.items():
        edit = rewrite(clf, rule, s)
        dw = edit.updates[0].delta()
        with torch.no_grad(), edit.applied(clf.model):
            p = float(torch.softmax(clf.model(x.to(clf.device)).double(), 1)[0, espresso])
        if ref is None:
            ref = dw
        out[name] = {"delta_w_rel_change": float((dw - ref).norm() / ref.norm()), "espresso_prob": p}
    with torch.no_grad():
        base = float(torch.softmax(clf.model(x.to(clf.device)).double(), 1)[0, espresso])
    for name in out:
        out[name]["espresso_prob_before_edit"] = base
    return out


def peak_rss() -> int:
    """Peak resident memory of this process in bytes. Not ``ru_maxrss``: Linux carries that over from the
    parent across fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(kind: str, model: str, layer: str, n: int, batch: int, device: str) -> None:
    """Run in a subprocess: one statistics or evaluation run, then print its peak memory as JSON."""
    from rulewriter.studies.evaluate import predict
    from rulewriter.models.registry import load_classifier
    from rulewriter.core.stats import collect_second_moment

    shared = C.shared_dir()
    clf = load_classifier(model, weights="none" if model == "vgg16" else None, device=device)
    paths, labels = C.imagenet_samples(shared, clf)
    reps = -(-n // len(paths))
    paths, labels = (paths * reps)[:n], (labels * reps)[:n]
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if kind == "stats":
        s = collect_second_moment(clf, layer, paths, batch_size=batch, device=dev, progress=False)
        extra = {"key_dim": s.dim, "keys": s.count}
    else:
        preds = predict(clf, paths, labels, batch_size=batch, progress=False)["before"]
        extra = {"predictions": len(preds)}
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    print(json.dumps({"kind": kind, "model": model, "images": n, "batch": batch, "seconds": time.perf_counter() - t0,
                      "peak_bytes": peak, "memory": "cuda allocated" if dev.type == "cuda" else "max RSS", **extra}))


def run_probe(kind: str, model: str, layer: str, n: int, batch: int, device: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", kind, "--probe-model", model, "--probe-layer", layer,
           "--probe-images", str(n), "--batch", str(batch), "--device", device]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode:
        raise RuntimeError(f"probe {kind} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def eval_throughput(clf: Any, paths: list[Path], labels: list[int], batch: int, repeats: int) -> dict[str, float]:
    """Images per second: predict() on files against a DataLoader + full forward on the same files."""
    from rulewriter.models.data import ImageDataset
    from rulewriter.studies.evaluate import predict

    def plain() -> None:
        loader = torch.utils.data.DataLoader(ImageDataset(paths, clf.preprocess), batch_size=batch)
        with torch.no_grad():
            for xb, _ in loader:
                clf.model(xb.to(clf.device))
        sync(clf.device)

    def ours() -> None:
        predict(clf, paths, labels, batch_size=batch, progress=False)
        sync(clf.device)

    t: dict[str, list[float]] = {"plain": [], "predict": []}
    for r in range(repeats):
        for name, fn in ((("plain", plain), ("predict", ours)) if r % 2 == 0 else (("predict", ours), ("plain", plain))):
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    return {k: len(paths) / C.median(v) for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: few images, 1 repeat, no memory probes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-layer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-images", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    C.require_shared("data/imagenet-samples")
    if args.probe:
        C.setup_torch()
        probe(args.probe, args.probe_model, args.probe_layer, args.probe_images, args.batch, args.device)
        return 0
    C.setup_torch()
    from rulewriter.models.data import subsample
    from rulewriter.models.registry import load_classifier
    from rulewriter.core.stats import default_precision

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shared = C.shared_dir()
    t_start = time.perf_counter()
    cases = [  # (model, layer, images, batch, repeats)
        ("efficientnet-lite0", "_blocks.15._project_conv", 512 if gpu else 128, 128 if gpu else 32, 5 if gpu else 3),
        ("vgg16", "features.28", 512 if gpu else 24, 128 if gpu else 8, 5 if gpu else 2),
    ]
    if args.quick:
        cases = [(m, l, 16, 8, 1) for m, l, *_ in cases]
    header = ["model / layer", "key dim", "forward img/s", "fwd bf16", *(f"+{m}" for m in MODES), "+default bf16 fwd"]
    rows, err_rows, results = [], [], []
    for model_name, layer, n, batch, repeats in cases:
        clf = load_classifier(model_name, weights="none" if model_name == "vgg16" else None, device=device)
        paths_all, labels_all = C.imagenet_samples(shared, clf)
        paths = subsample(paths_all, n, seed=0)
        x = C.load_tensors(paths, clf.preprocess)
        per_img, stats = timed_variants(clf, layer, x, args.batch or batch, repeats, device)
        fwd = per_img["forward"]
        ref = stats["+ fp64"].moment()
        errors = {v: float((s.moment() - ref).norm() / ref.norm()) for v, s in stats.items()}
        dim = stats["+ fp64"].dim
        r: dict[str, Any] = {"model": model_name, "layer": layer, "key_dim": dim, "images": n,
                             "batch": args.batch or batch, "repeats": repeats,
                             "images_per_s": {v: 1.0 / t for v, t in per_img.items()},
                             "ratio_to_forward": {v: t / fwd for v, t in per_img.items()},
                             "rel_error_of_C": errors}
        rows.append([f"{model_name} `{layer}`", str(dim), f"{1 / fwd:.1f}",
                     *(f"{per_img[v] / fwd:.2f}×" for v in ["forward bf16", *(f"+ {m}" for m in MODES),
                                                            "+ default, bf16 fwd"])])
        err_rows.append([f"{model_name} `{layer}`", *(f"{errors['+ ' + m]:.1e}" for m in MODES[1:]),
                         f"{errors['+ default, bf16 fwd']:.1e}"])
        if model_name == "efficientnet-lite0":
            r["edit_effect"] = coffee_edit_effect(clf, layer, {m: stats[f"+ {m}"] for m in MODES}
                                                  | {"default, bf16 fwd": stats["+ default, bf16 fwd"]})
            ev_paths = subsample(paths_all, 64 if gpu or not args.quick else 16, seed=1)
            ev_labels = [labels_all[paths_all.index(p)] for p in ev_paths]
            r["evaluation_images_per_s"] = eval_throughput(clf, ev_paths, ev_labels, args.batch or batch,
                                                           1 if args.quick else 3)
        results.append(r)
        print(f"  {model_name} {layer}: " + ", ".join(f"{v} {t / fwd:.2f}×" for v, t in per_img.items()))

    memory = []
    if not args.quick:
        for kind, model_name, layer, n, batch in [
            ("stats", "vgg16", "features.28", 16, 8), ("stats", "vgg16", "features.28", 64, 8),
            ("evaluate", "efficientnet-lite0", "", 250, 32), ("evaluate", "efficientnet-lite0", "", 1000, 32),
        ]:
            memory.append(run_probe(kind, model_name, layer, n, batch, str(device)))
            print(f"  memory {memory[-1]}")

    lite = results[0]
    edit_rows = [[name, f"{e['delta_w_rel_change']:.1e}", f"{e['espresso_prob']:.3f}"]
                 for name, e in lite.get("edit_effect", {}).items()]
    ev = lite.get("evaluation_images_per_s", {})
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    md = [
        f"# Throughput of statistics and evaluation ({dev_name})", "",
        f"Default product mode here: `{default_precision(device)}`. Forward in float32 unless marked bf16. "
        "Ratios are seconds per image against the float32 forward to the layer, on the same batches in one "
        f"run. {'' if gpu else 'On this CPU, tf32x2/tf32/bf16 products emulate the rounding of those formats (numerics, not speed).'}",
        "", C.markdown_table(header, rows), "",
        f"Relative error of C against fp64 (tolerance for a default: {TOLERANCE:g}):", "",
        C.markdown_table(["model / layer", *MODES[1:], "default + bf16 forward"], err_rows), "",
    ]
    if edit_rows:
        md += ["Effect on a real edit (gravel cup → espresso, EfficientNet-Lite0 default layer, C from the images "
               f"above; espresso probability before the edit: "
               f"{next(iter(lite['edit_effect'].values()))['espresso_prob_before_edit']:.3f}):", "",
               C.markdown_table(["C from", "‖ΔW − ΔW_fp64‖/‖ΔW_fp64‖", "espresso prob. after"], edit_rows), ""]
    if ev:
        md += [f"Evaluation (EfficientNet-Lite0, files decoded in both): plain DataLoader + forward "
               f"{ev['plain']:.1f} img/s, `evaluate.predict` {ev['predict']:.1f} img/s "
               f"({ev['predict'] / ev['plain']:.2f}×).", ""]
    if memory:
        md += ["Peak memory, each run in a fresh process:", "",
               C.markdown_table(["run", "images", "batch", "peak", "seconds"],
                                [[f"{m['kind']} {m['model']}" + (f" ({m.get('key_dim')}-d keys)" if m['kind'] == 'stats' else ""),
                                  str(m["images"]), str(m["batch"]), f"{m['peak_bytes'] / 2**20:.0f} MiB ({m['memory']})",
                                  f"{m['seconds']:.1f}"] for m in memory]), ""]
    total = time.perf_counter() - t_start
    md.append(f"Total run time {total / 60:.1f} min ({'quick' if args.quick else 'full'} mode).")
    text = "\n".join(md)
    print("\n" + text)
    C.write_results(NAME, {"device": dev_name, "mode": "quick" if args.quick else "full", "results": results,
                           "memory": memory, "total_seconds": total}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
