"""The ridge as a knob: the default edit with ``C + ε I``, ``ε = ridge · tr(C)/d``, for several ridges.

An experiment on the scoreboard's scenarios (``generalise.py``): the default ``rewrite`` (views, validated
strength, rank and augmentation, the locality budget spent) at each ridge of :data:`RIDGES` (the default is
1e-3). A larger ridge whitens less: the direction ``(C + εI)⁻¹k*`` leans towards ``k*`` itself, so it moves
keys merely similar to the exemplars' more, other photos' keys of the concept among them, and costs more
collateral per unit of strength, which the budget then caps. Exploration, not a method: it prints held-out
figures.

Run: ``python benchmarks/ridge_probe.py [--scenarios "gravel car,brick car"] [--exemplars 5,1]``;
writes ``benchmarks/results/ridge_probe.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as G  # noqa: E402
from spend_budget import SCENARIOS  # noqa: E402

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rewrite, rule_from_images

        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        for ridge in RIDGES:
            e = rewrite(clf, rule, stats, calibration=cal, ridge=ridge)
            ch = e.meta["strength"]
            rows.append(G.probe_row(clf, start, sc, n, photos, cal, e, f"ridge {ridge:g} s={ch['chosen']:g}",
                                    ridge=f"{ridge:g}", strength=ch["chosen"], candidate=ch.get("candidate")))
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows), scenarios=SCENARIOS, exemplars="5,1")
    md = ("# The ridge as a knob\n\nThe default edit at each ridge (ε = ridge · tr(C)/d; default 1e-3).\n\n"
          + G.probe_table(rows, [("ridge", lambda r: r["ridge"]), ("candidate", lambda r: str(r["candidate"])),
                                 ("strength", lambda r: f"{r['strength']:g}")])
          + "\n\n" + G.means_table(rows, "ridge"))
    return G.report_probe("ridge_probe", {"rows": rows, "ridges": list(RIDGES)}, md)


if __name__ == "__main__":
    raise SystemExit(main())
