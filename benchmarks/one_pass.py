"""The layer choice reads its calibration images and its statistics images once for every candidate layer.

``rulewriter edit`` and ``mitigate`` (without ``--layer``) write and validate the rule at each candidate
layer, so each layer needs C (its keys' second moment over the statistics images) and its
:class:`~rulewriter.core.locality.Calibration` (the calibration images' inputs to its tail, their unedited
top-1 and near ties). Per layer, ``collect_second_moment`` and ``calibration_set`` each run the images through
the network once per layer; ``collect_second_moments`` and ``calibration_sets`` read every layer from one
pass (what ``edit`` and ``mitigate`` now do). Side by side in one run, alternating, medians of
:data:`REPEATS`, on the scoreboard's imagenet-samples photos (C from the even-indexed ones, calibration from
those of index 1 mod 4), with a check that both ways give the same C and the same Calibration at every layer.

Run: ``python benchmarks/one_pass.py [--threads 1] [--stats-images 500]``; writes
``benchmarks/results/one_pass.{json,md}``.
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


def same_calibration(a, b) -> bool:
    return (a.start, a.linear is None) == (b.start, b.linear is None) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("x", "base", "near_tie", "margin"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the scoreboard)")
    ap.add_argument("--stats-images", type=int, default=500, help="statistics images (default 500, the scoreboard's)")
    args = ap.parse_args(argv)
    C.setup_torch(args.threads)
    from rulewriter import load_classifier
    from rulewriter.core.locality import calibration_set, calibration_sets
    from rulewriter.core.stats import collect_second_moment, collect_second_moments

    clf = load_classifier("efficientnet-lite0")
    paths, _ = C.imagenet_samples(C.require_shared("data/imagenet-samples"), clf)
    stats_paths, cal_paths = paths[0:2 * args.stats_images:2], paths[1:1000:4]
    layers = list(clf.candidate_layers)
    kw = dict(progress=False, num_workers=0)  # no cache: every repeat collects
    what = {
        "statistics (C)": (len(stats_paths),
                           lambda: {lay: collect_second_moment(clf, lay, stats_paths, **kw) for lay in layers},
                           lambda: collect_second_moments(clf, layers, stats_paths, **kw),
                           lambda a, b: torch.equal(a.moment(), b.moment()) and a.count == b.count),
        "calibration images": (len(cal_paths), lambda: {lay: calibration_set(clf, lay, cal_paths) for lay in layers},
                               lambda: calibration_sets(clf, layers, cal_paths), same_calibration),
    }
    rows = []
    for name, (n, each_fn, once_fn, same) in what.items():
        t_each, t_once, ok = [], [], True
        for _ in range(REPEATS):  # alternating, so drifts of this shared machine hit both alike
            te, each = timed(each_fn)
            to, once = timed(once_fn)
            t_each.append(te)
            t_once.append(to)
            ok = ok and all(same(each[lay], once[lay]) for lay in layers)
        rows.append({"what": name, "images": n, "layers": layers, "seconds_per_layer": statistics.median(t_each),
                     "seconds_one_pass": statistics.median(t_once), "same": ok})
        print(rows[-1], flush=True)
    md = ("# The layer choice's images read once for every candidate layer\n\n"
          f"EfficientNet-Lite0, layers {', '.join(layers)}; imagenet-samples photos; medians of {REPEATS}, "
          "alternating.\n\n"
          + C.markdown_table(["what", "images", "one pass per layer (s)", "one pass for all (s)", "speed-up",
                              "same result at every layer"],
                             [[r["what"], r["images"], f"{r['seconds_per_layer']:.1f}", f"{r['seconds_one_pass']:.1f}",
                               f"{r['seconds_per_layer'] / r['seconds_one_pass']:.1f}×", "yes" if r["same"] else "NO"]
                              for r in rows]))
    C.write_results("one_pass", {"rows": rows}, md)
    print(md)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
