"""Two layers, one rule: the default rewrite of ``_blocks.11._project_conv``, then of ``_blocks.15._project_conv``
read from the model with the first edit applied (MEMIT's idea of spreading a change over layers).

An experiment on the scoreboard's scenarios (``generalise.py``'s sets, run from block 11 so the tail covers
both layers). Each stage is the package's default (views, validated strength and context, the locality budget
on the calibration images), the second measured against the model the first leaves; the table gives each
stage alone and the pair, with the pair's calibration changes against the unedited model (each stage has its
own budget, so the pair may spend up to twice one). Exploration, not a method: no default was read off it,
and it prints held-out figures.

Run: ``python benchmarks/two_layer.py [--scenarios "gravel car,brick car,wood wheels,snow ground"]``;
writes ``benchmarks/results/two_layer.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

FIRST, SECOND = "_blocks.11._project_conv", "_blocks.15._project_conv"


def probe(rows: list[dict[str, Any]]):
    state: dict[str, Any] = {}

    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import DEFAULT_VIEWS, LocalityBudget, calibration_set
        from rulewriter.core.rules import rewrite, rule_from_images
        from rulewriter.core.stats import collect_second_moment

        assert layer == FIRST, f"run with --layer {FIRST}"
        if "stats2" not in state:  # C and the calibration paths of the second layer, as generalise.main has them
            paths, _ = C.imagenet_samples(C.require_shared("data/imagenet-samples"), clf)
            n_ph = 4 * len(cal)  # 1000 photos, or 200 with --quick: the calibration images are a quarter
            state["stats2"] = collect_second_moment(clf, SECOND, paths[0:n_ph:2], cache_dir=C.CACHE_DIR,
                                                    progress=False)
            state["cal_paths"] = paths[1:n_ph:4]
        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]
        e1 = rewrite(clf, rule_from_images(clf, FIRST, o, m, k, views=DEFAULT_VIEWS), stats, calibration=cal)
        with e1.applied(clf.model):  # the second layer's rule, keys and calibration as the first edit leaves them
            rule2 = rule_from_images(clf, SECOND, o, m, k, views=DEFAULT_VIEWS)
            cal2 = calibration_set(clf, SECOND, state["cal_paths"])
            e2 = rewrite(clf, rule2, state["stats2"], calibration=cal2)
        for which, e in (("first alone", e1), ("second alone", e2), ("both", e1 + e2)):
            ch = cal.changed(clf.model, e)
            r = {"scenario": sc.name, "n_exemplars": n, "edit": which, "cal_changed": len(ch["which"]),
                 "within_budget": LocalityBudget().admits(ch), **G.measure(clf, start, sc, n, photos, e)}
            rows.append(r)
            G.log(f"  {sc.name} n={n} {which}: calibration changed {r['cal_changed']} | SR {G.pct(r['SR'])} GR "
                  f"{G.pct(r['GR'])} LR {100 * r['LR']:.1f}%/{G.pct(r['LR_sensitive'])} Δ {r['d_top1']:+.1f}")
        G.log(f"    first: {e1.meta['strength']['reason']}\n    second: {e2.meta['strength']['reason']}")
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    argv = list(argv if argv is not None else sys.argv[1:])
    G.run_probe(argv + ["--layer", FIRST], probe(rows), scenarios="gravel car,brick car,wood wheels,snow ground",
                exemplars="5,1")
    head = ["scenario", "exemplars", "edit", "calibration changed", "budget", "SR", "GR", "GR clean classes", "LR",
            "LR sens.", "Δ top-1"]
    table = [[r["scenario"], r["n_exemplars"], r["edit"], r["cal_changed"], "within" if r["within_budget"] else
              "over", G.pct(r["SR"]), G.pct(r["GR"]), G.pct(r["GR_classes"]), f"{100 * r['LR']:.1f}%",
              G.pct(r["LR_sensitive"]), f"{r['d_top1']:+.1f}"] for r in rows]
    md = (f"# Two layers, one rule: `{FIRST}` then `{SECOND}`\n\nCalibration: the 250 imagenet-samples of index "
          "1 mod 4 (budget: ≤ 0.5 % changed, ≤ 5 % of near ties; the pair against the unedited model). SR, GR, LR "
          "and Δ top-1 on the scoreboard's sets.\n\n" + C.markdown_table(head, table))
    C.write_results("two_layer", {"rows": rows, "first": FIRST, "second": SECOND}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
