"""Closed-form edit time against projected gradient descent reaching the same loss, side by side.

Both solvers minimise the same objective over updates ``W1 = W0 + Λ Dᵀ`` with ``D = (C + εI)⁻¹ k*``:

    L(Λ) = Σᵢ wᵢ ‖vᵢ − W1 kᵢ‖²      (the masked (key, value) pairs of a rule, weights from the mask)

* closed form: ``update_direction`` (Cholesky solve) + ``solve_lambda`` (a weighted least-squares solve);
* projected GD (``projected_gd``, eq. 2.20): the same ``update_direction``, then gradient steps (as
  ``rulewriter.core.edit.projected_gd`` takes them), each projected back onto ``W0 + span(Dᵀ)``, stopped as soon
  as its loss is within 1e-6 (relative) of the closed-form loss (``tol = L_cf · (1 + 1e-6)``).
  ``projected_gd`` records the loss of the current iterate before each step, so the index of the first
  loss under ``tol`` is the number of steps needed; its time is the whole call, setup included.

Step budgets of 2000, then 5000 and 20000 are tried until one reaches the tolerance. The rule is the
coffee photo with gravel pasted on cup and saucer (``rule_from_images``), at the default layer and at
view 2 of ``_blocks.10._project_conv``; ``C`` comes from 300 imagenet-samples photos (cached in
``benchmarks/.cache``). Times are medians of interleaved repeats.

Run: ``python benchmarks/edit_speed.py [--quick]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "edit_speed"
REL_TOL = 1e-6
STEP_BUDGETS = (2000, 5000, 20000)


def weighted_loss(w1: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> float:
    """Σᵢ wᵢ ‖vᵢ − W1 kᵢ‖² with keys/values as columns (float64)."""
    return float(((v - w1 @ k).pow(2).sum(0) * w).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: statistics from 100 photos, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (full 9, quick 3)")
    ap.add_argument("--samples", type=int, default=None, help="photos for C (full 300, quick 100)")
    args = ap.parse_args(argv)

    shared = C.require_shared("data/imagenet-samples")
    if importlib.util.find_spec("skimage") is None:
        print("SKIPPED: scikit-image is needed for the coffee photo and gravel (pip install 'rulewriter[demo]').")
        return 0
    C.setup_torch()
    from rulewriter.core.edit import projected_gd, solve_lambda, update_direction
    from rulewriter.concepts.manipulate import paste_texture, texture_from
    from rulewriter.core.memory import LayerMemory
    from rulewriter.models.registry import get_module, load_classifier
    from rulewriter.core.rules import rule_from_images
    from rulewriter.core.stats import collect_second_moment

    t_start = time.perf_counter()
    clf = load_classifier("efficientnet-lite0")
    repeats = args.repeats or (3 if args.quick else 9)
    samples = args.samples or (100 if args.quick else 300)
    img, mask = C.coffee_photo()
    man = paste_texture(img, mask, texture_from("skimage:gravel"))

    results: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    for layer in (clf.default_layer, "_blocks.10._project_conv"):
        stats = collect_second_moment(clf, layer, shared / "data" / "imagenet-samples", samples=samples,
                                      cache_dir=C.CACHE_DIR, progress=False)
        rule = rule_from_images(clf, layer, [img], [man], [mask])
        mem = LayerMemory(get_module(clf.model, layer), rule.view, name=layer)
        w0 = mem.matrix().double()
        c, u = stats.moment(), rule.key()
        k, v, w = rule.keys.T.double(), rule.values.T.double(), rule.weights.double()

        def closed_form() -> tuple[torch.Tensor, torch.Tensor]:
            d = update_direction(c, u)
            return solve_lambda(w0, k, v, d, w), d

        lam, d = closed_form()
        cf_loss = weighted_loss(w0 + lam @ d[:, None].T, k, v, w)
        tol = cf_loss * (1 + REL_TOL)

        # Find a step budget that reaches the closed-form loss.
        budget, steps_needed, losses = None, None, []
        for s in STEP_BUDGETS:
            _, losses = projected_gd(w0, k, v, update_direction(c, u), weights=w, steps=s, tol=tol)
            hit = next((i for i, loss in enumerate(losses) if loss <= tol), None)
            if hit is not None:
                budget, steps_needed = s, hit
                break
        cf_times: list[float] = []
        gd_times: list[float] = []
        gd_final: list[float] = []
        gd_calls: list[int] = []
        for _ in range(repeats):
            with C.stopwatch(cf_times):
                closed_form()
            if budget is not None:
                with C.stopwatch(gd_times):
                    d_gd = update_direction(c, u)
                    lam_gd, ls = projected_gd(w0, k, v, d_gd, weights=w, steps=budget, tol=tol)
                gd_calls.append(len(ls))
                gd_final.append(weighted_loss(w0 + lam_gd @ d_gd[:, None].T, k, v, w))
        cf_ms = 1e3 * C.median(cf_times)
        r: dict[str, Any] = {
            "layer": layer, "view": rule.view, "key_dim": mem.key_dim, "value_dim": mem.value_dim,
            "n_pairs": int(k.shape[1]), "stats_images": samples, "stats_keys": stats.count,
            "initial_loss": weighted_loss(w0, k, v, w), "closed_form_loss": cf_loss,
            "closed_form_ms": cf_ms, "closed_form_min_ms": 1e3 * min(cf_times), "closed_form_times_s": cf_times,
            "gd_step_budget": budget, "gd_steps_needed": steps_needed,
            "gd_best_rel_gap": (min(losses) - cf_loss) / cf_loss if losses else None,
        }
        if budget is not None:
            gd_ms = 1e3 * C.median(gd_times)
            r.update({"gd_ms": gd_ms, "gd_min_ms": 1e3 * min(gd_times), "gd_times_s": gd_times, "gd_steps_run": gd_calls,
                      "gd_ms_per_step": gd_ms / C.median(gd_calls),
                      "gd_final_loss_rel_gap": (C.median(gd_final) - cf_loss) / cf_loss,
                      "ratio_gd_over_closed_form": gd_ms / cf_ms})
            rows.append([f"`{layer}` (view {rule.view})", f"{mem.value_dim}×{mem.key_dim}", str(r["n_pairs"]),
                         f"{cf_loss:.6g}", f"{cf_ms:.1f}", f"{gd_ms:.0f}", f"{gd_ms / cf_ms:.0f}×",
                         f"{steps_needed} (budget {budget})", f"{r['gd_ms_per_step']:.1f}",
                         f"{r['closed_form_min_ms']:.1f} / {r['gd_min_ms']:.0f}"])
        else:
            rows.append([f"`{layer}` (view {rule.view})", f"{mem.value_dim}×{mem.key_dim}", str(r["n_pairs"]),
                         f"{cf_loss:.6g}", f"{cf_ms:.1f}", "not reached", "—",
                         f"> {STEP_BUDGETS[-1]} (best gap {r['gd_best_rel_gap']:.1e})", "—",
                         f"{r['closed_form_min_ms']:.1f} / —"])
        results.append(r)
        print(f"  {layer}: closed form {cf_ms:.1f} ms; projected GD "
              + (f"{r['gd_ms']:.0f} ms, {steps_needed} steps" if budget else "did not reach the loss"))

    total = time.perf_counter() - t_start
    md = "\n".join([
        "# Closed-form edit vs projected gradient descent to the same loss", "",
        f"Rule: coffee photo, gravel pasted on cup and saucer, one exemplar; C from {samples} imagenet-samples "
        f"photos. Both solvers include `update_direction`; projected GD stops at loss ≤ L_cf·(1+{REL_TOL:g}). "
        f"Medians of {repeats} interleaved repeats, wall clock.", "",
        C.markdown_table(["layer", "W (f×d)", "pairs", "loss L_cf", "closed form ms", "projected GD ms",
                          "GD / closed form", "GD steps needed", "GD ms/step",
                          "fastest run ms (closed form / GD)"], rows), "",
        f"Total run time {total / 60:.1f} min ({'quick' if args.quick else 'full'} mode).",
    ])
    print("\n" + md)
    C.write_results(NAME, {"mode": "quick" if args.quick else "full", "rel_tol": REL_TOL, "repeats": repeats,
                           "stats_samples": samples, "results": results, "total_seconds": total}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
