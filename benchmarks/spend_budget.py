"""Spending the budget: the default's candidate at the strongest strength the locality budget admits.

An experiment on the scoreboard's scenarios (``generalise.py``). The default (``rewrite`` with views and the
locality budget) ranks its admissible settings by the exemplars restored, then by the left-out views right,
then prefers the smaller strength. The principle tried here: the budget is the collateral the user accepts,
so once the validation has chosen the candidate (context, rank, augmentation), scale it to the strongest
strength that is within the budget on the calibration images and restores as many exemplars as the
default's choice. Exploration, not a method: it prints held-out figures for both.

Run: ``python benchmarks/spend_budget.py [--scenarios "gravel car,brick car"] [--exemplars 5,1]``;
writes ``benchmarks/results/spend_budget.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as G  # noqa: E402

SCENARIOS = "wood wheels,snow ground,gravel car,brick car,grass car,snow car,gravel bus,gravel animals"


def strongest(choice: dict[str, Any]) -> float:
    """The strongest strength of the chosen candidate within the budget that restores as many exemplars."""
    rows = [r for r in choice["candidates"] if r.get("candidate") == choice.get("candidate")
            and r["admitted"] in ("budget", "fallback")]
    best = next(r for r in rows if r["strength"] == choice["chosen"]) if any(
        r["strength"] == choice["chosen"] for r in rows) else None
    need = best["exemplars_restored"] if best is not None else 0
    ok = [r["strength"] for r in rows if r["admitted"] == "budget" and r["exemplars_restored"] >= need]
    return max(ok + [float(choice["chosen"])])


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rewrite, rule_from_images

        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        e = rewrite(clf, rule, stats, calibration=cal)
        ch = e.meta["strength"]
        chosen = float(ch["chosen"])
        s = strongest(ch)
        for how, ed, st in (("default", e, chosen), ("strongest", e.scaled(s / chosen), s)):
            rows.append(G.probe_row(clf, start, sc, n, photos, cal, ed, f"{how} s={st:g} {ch.get('candidate')}",
                                    policy=how, strength=st, candidate=ch.get("candidate")))
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows), scenarios=SCENARIOS, exemplars="5,1")
    md = ("# Spending the budget\n\nThe default's candidate at its chosen strength, and at the strongest strength "
          "within the locality budget that restores as many exemplars.\n\n"
          + G.probe_table(rows, [("policy", lambda r: r["policy"]), ("candidate", lambda r: str(r["candidate"])),
                                 ("strength", lambda r: f"{r['strength']:g}")])
          + "\n\n" + G.means_table(rows, "policy"))
    return G.report_probe("spend_budget", {"rows": rows}, md)


if __name__ == "__main__":
    raise SystemExit(main())
