"""The layer choice's calibration images read once for every candidate layer, against once per layer.

``rulewriter edit`` and ``mitigate`` (without ``--layer``) validate the edit at each candidate layer under the
locality budget, so each layer needs its :class:`~rulewriter.core.locality.Calibration`: the calibration
images' inputs to that layer's tail, their unedited top-1 and near ties. ``calibration_set`` per layer runs
the images through the network once per layer; ``calibration_sets`` reads every layer from one pass
(``rewrite_choosing_layer`` now does this). Side by side in one run, alternating, medians of
:data:`REPEATS`, on the 250 imagenet-samples photos the scoreboard calibrates with (index 1 mod 4), and a
check that both give the same Calibration at every layer.

Run: ``python benchmarks/calibration_pass.py [--threads 1]``; writes ``benchmarks/results/calibration_pass.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPEATS = 3


def same(a, b) -> bool:
    return (a.start, a.linear is None) == (b.start, b.linear is None) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("x", "base", "near_tie", "margin"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the scoreboard)")
    args = ap.parse_args(argv)
    C.setup_torch(args.threads)
    from rulewriter import load_classifier
    from rulewriter.core.locality import calibration_set, calibration_sets

    clf = load_classifier("efficientnet-lite0")
    paths, _ = C.imagenet_samples(C.require_shared("data/imagenet-samples"), clf)
    cal_paths = paths[1:1000:4]
    layers = clf.candidate_layers
    t_each, t_once, ok = [], [], True
    for _ in range(REPEATS):  # alternating, so drifts of this shared machine hit both alike
        t0 = time.perf_counter()
        each = {layer: calibration_set(clf, layer, cal_paths) for layer in layers}
        t_each.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        once = calibration_sets(clf, layers, cal_paths)
        t_once.append(time.perf_counter() - t0)
        ok = ok and all(same(each[layer], once[layer]) for layer in layers)
    row = {"images": len(cal_paths), "layers": layers, "seconds_per_layer": statistics.median(t_each),
           "seconds_one_pass": statistics.median(t_once), "same_calibration": ok}
    md = ("# Calibration images for the layer choice: one pass against one per layer\n\n"
          f"EfficientNet-Lite0, {len(cal_paths)} imagenet-samples photos, layers {', '.join(layers)}; medians of "
          f"{REPEATS}, alternating.\n\n"
          + C.markdown_table(["images", "layers", "one pass per layer (s)", "one pass for all (s)", "speed-up",
                              "same Calibration at every layer"],
                             [[len(cal_paths), len(layers), f"{row['seconds_per_layer']:.1f}",
                               f"{row['seconds_one_pass']:.1f}",
                               f"{row['seconds_per_layer'] / row['seconds_one_pass']:.1f}×", "yes" if ok else "NO"]]))
    C.write_results("calibration_pass", {"rows": [row]}, md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
