"""Where a validated edit's time goes, and two shortcuts measured side by side in one run.

On a scoreboard scenario (``generalise.py``; default: gravel on the car, 5 exemplars), medians of
:data:`REPEATS`:

* **context**: the top-4 SVD directions of the rule's masked keys (its augmented views' keys, as
  ``rewrite(context="auto")`` computes them for every candidate and fold): a full ``torch.linalg.svd``
  against :func:`rulewriter.concepts.keys.top_right_singular` (``eigh`` of the smaller Gram matrix), and the
  largest angle between the two subspaces;
* **calibration check**: counting the top-1 changes of one candidate edit on the 250 calibration images,
  through the network's tail (``Calibration.top1`` under the edit) against the exact linear map of
  :class:`rulewriter.core.tail.LinearTail`, and whether both give the same changed images;
* **rewrite**: the whole default ``rewrite`` (validation included) once, for scale.

Run: ``python benchmarks/validation_speed.py [--scenarios "gravel car"] [--exemplars 5]``; writes
``benchmarks/results/validation_speed.{json,md}``.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

REPEATS = 9


def median_seconds(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, Any]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.concepts.keys import masked_keys, top_right_singular
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rewrite, rule_from_images

        t0 = time.perf_counter()
        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        t_rule = time.perf_counter() - t0
        K = (rule.keys.double() * rule.weights.double().sqrt()[:, None])
        t_svd, v_svd = median_seconds(lambda: torch.linalg.svd(K, full_matrices=False)[2][:4].T)
        t_gram, v_gram = median_seconds(lambda: top_right_singular(K, 4))
        angle = float(torch.linalg.svdvals(v_svd.T @ v_gram).min().clamp(max=1).acos())
        t0 = time.perf_counter()
        edit = rewrite(clf, rule, stats, calibration=cal)
        t_rewrite = time.perf_counter() - t0
        linear = cal.linear
        t_lin, fast = median_seconds(lambda: cal.changed(clf.model, edit))
        cal.linear = None
        try:
            t_tail, slow = median_seconds(lambda: cal.changed(clf.model, edit), repeats=3)
        finally:
            cal.linear = linear
        rows.append({"scenario": sc.name, "n_exemplars": n, "masked_keys": int(K.shape[0]), "key_dim": int(K.shape[1]),
                     "svd_s": t_svd, "gram_s": t_gram, "max_angle_rad": angle,
                     "calibration_images": len(cal), "tail_check_s": t_tail, "linear_check_s": t_lin,
                     "same_changed": fast["which"] == slow["which"], "changed": len(fast["which"]),
                     "rule_s": t_rule, "rewrite_s": t_rewrite, "fallback": cal.linear is None})
        G.log(f"  {rows[-1]}")
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows))
    head = ["scenario", "exemplars", "masked keys", "full SVD", "Gram eigh", "ratio", "max angle",
            "tail check", "linear map", "ratio", "same changed images", "reading the rule", "rewrite"]
    table = [[r["scenario"], r["n_exemplars"], f"{r['masked_keys']}×{r['key_dim']}", f"{1e3 * r['svd_s']:.0f} ms",
              f"{1e3 * r['gram_s']:.0f} ms", f"{r['svd_s'] / r['gram_s']:.1f}×", f"{r['max_angle_rad']:.1e} rad",
              f"{r['tail_check_s']:.2f} s", f"{r['linear_check_s']:.3f} s", f"{r['tail_check_s'] / r['linear_check_s']:.0f}×",
              "yes" if r["same_changed"] else "NO", f"{r['rule_s']:.1f} s", f"{r['rewrite_s']:.1f} s"] for r in rows]
    md = (f"# Validation speed\n\nMedians of {REPEATS} (the tail check: of 3); context: top-4 directions of the "
          "rule's weighted masked keys; checks: one candidate edit's top-1 changes on the "
          f"{rows[0]['calibration_images'] if rows else 0} calibration images.\n\n" + C.markdown_table(head, table))
    C.write_results("validation_speed", {"rows": rows, "machine": C.machine_info()}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
