"""One rule per exemplar: the thesis's r rules → rank r, as a candidate for a 5-exemplar edit.

An experiment on the scoreboard's scenarios (``generalise.py``'s sets). The exemplars' rule (with its
augmented views) is split into one rule per exemplar (its own pairs, or all its views), and ``rewrite``
solves them together (``context="mean"``: each rule's ``k*``, or ``"uniform"``), rank n, at each strength
of :data:`STRENGTHS`: the calibration images it changes (and whether that is within the locality budget), and
SR, GR, GR_classes, LR and Δ top-1 on the scoreboard's sets. Exploration, not a method: no default was read
off it, and it prints held-out figures.

Run: ``python benchmarks/per_exemplar_rules.py [--scenarios "gravel car,brick car,wood wheels,grass car"]``;
writes ``benchmarks/results/per_exemplar_rules.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

STRENGTHS = (1, 1.5, 2, 3, 4)


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import DEFAULT_VIEWS, LocalityBudget
        from rulewriter.core.rules import Rule, rewrite, rule_from_images

        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        group, own = rule.views.group[rule.pair_view], rule.views.own[rule.pair_view]
        for aug in (False, True):
            rules = [Rule(rule.layer, rule.view, rule.keys[m], rule.values[m], rule.weights[m])
                     for m in ((group == g) & (own | aug) for g in range(n))]
            for ctx in ("mean", "uniform"):
                base = rewrite(clf, rules, stats, strength=1.0, context=ctx)
                for s in STRENGTHS:
                    e = base.scaled(s)
                    ch = cal.changed(clf.model, e)
                    r = {"scenario": sc.name, "n_exemplars": n, "views": aug, "context": ctx, "strength": s,
                         "cal_changed": len(ch["which"]), "within_budget": LocalityBudget().admits(ch),
                         **G.measure(clf, start, sc, n, photos, e)}
                    rows.append(r)
                    G.log(f"  {sc.name} n={n} views={aug} {ctx} s={s}: calibration changed {r['cal_changed']} "
                          f"({'within' if r['within_budget'] else 'over'} the budget) | SR {G.pct(r['SR'])} GR "
                          f"{G.pct(r['GR'])} LR {100 * r['LR']:.1f}% Δ {r['d_top1']:+.1f}")
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows), scenarios="gravel car,brick car,wood wheels,grass car")
    head = ["scenario", "exemplars", "views", "context", "strength", "calibration changed", "budget", "SR", "GR",
            "GR clean classes", "LR", "LR sens.", "Δ top-1"]
    table = [[r["scenario"], r["n_exemplars"], "all" if r["views"] else "own", r["context"], r["strength"],
              r["cal_changed"], "within" if r["within_budget"] else "over", G.pct(r["SR"]), G.pct(r["GR"]),
              G.pct(r["GR_classes"]), f"{100 * r['LR']:.1f}%", G.pct(r["LR_sensitive"]), f"{r['d_top1']:+.1f}"]
             for r in rows]
    md = ("# One rule per exemplar (rank n)\n\nCalibration: the 250 imagenet-samples of index 1 mod 4 (budget "
          "0.5 % / 5 % of near ties); LR, Δ top-1: the 250 of index 3 mod 4.\n\n" + C.markdown_table(head, table))
    C.write_results("per_exemplar_rules", {"rows": rows, "strengths": list(STRENGTHS)}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
