"""How many exemplars does an edit need to carry? The default edit with 1, 5, 10 and 20 of them.

The scoreboard (``generalise.py``) reports every scenario with 5 exemplars and with one. This probe asks
whether more exemplars of the same concept bring GR towards the issue's 60 %: it widens the scoreboard's
scan of training photos to the first 20 with an error (same order, so the first 5 and the first one are the
scoreboard's) and writes the default rewrite (block 15, views, strength/rank/augmentation validated under
the locality budget, the budget spent) and the thesis's closed form from the first n, on the scoreboard's
held-out photos, calibration and LR images. Scenarios whose training photos hold fewer than n errors skip
that n. The edit time is the rewrite alone (rule reading and validation), as in the scoreboard.

Run: ``python benchmarks/exemplar_count.py [--scenarios "gravel car"] [--exemplars 1,5,10,20]``; writes
``benchmarks/results/exemplar_count.{json,md}``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as G  # noqa: E402

SCENARIOS = "wood wheels,snow ground,gravel car,brick car,grass car,snow car,gravel animals"
COUNTS = (20, 10, 5, 1)


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rewrite, rule_from_images

        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]
        t0 = time.perf_counter()
        e = rewrite(clf, rule_from_images(clf, layer, o, m, k, views=DEFAULT_VIEWS), stats, calibration=cal)
        secs = time.perf_counter() - t0
        ch = e.meta["strength"]
        rows.append(G.probe_row(clf, start, sc, n, photos, cal, e, f"default s={ch['chosen']:g} {ch.get('candidate')}",
                                method="default", strength=ch["chosen"], candidate=ch.get("candidate"),
                                seconds=secs, n_heldout=len(sc.ho_x)))
        closed = rewrite(clf, rule_from_images(clf, layer, o, m, k, views=0), stats, strength=1.0)
        rows.append(G.probe_row(clf, start, sc, n, photos, cal, closed, "closed form", method="closed form",
                                strength=1.0, candidate=None, seconds=None, n_heldout=len(sc.ho_x)))
    return run


def main(argv: list[str] | None = None) -> int:
    G.N_EXEMPLARS = COUNTS  # the scan stops at the largest count
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    G.run_probe(argv, probe(rows), scenarios=SCENARIOS, exemplars=",".join(map(str, sorted(COUNTS))))
    return report(rows, time.perf_counter() - t0)


def report(rows: list[dict[str, Any]], total: float) -> int:
    """Write ``results/exemplar_count.{json,md}`` from the probe's rows (``total``: the run's seconds)."""
    rows.sort(key=lambda r: (r["scenario"], r["method"], r["n_exemplars"]))
    md = ("# How many exemplars an edit needs\n\n"
          "EfficientNet-Lite0, block 15, the scoreboard's splits; the first n training photos with an error as "
          f"exemplars. Total {total:.0f} s.\n\n"
          + G.probe_table(rows, [("method", lambda r: r["method"]),
                                 ("held-out errors", lambda r: r["n_heldout"]),
                                 ("strength", lambda r: f"{r['strength']:g}"),
                                 ("candidate", lambda r: str(r["candidate"] or "—")),
                                 ("seconds", lambda r: "—" if r["seconds"] is None else f"{r['seconds']:.1f}")])
          + "\n\n" + count_means(rows))
    return G.report_probe("exemplar_count", {"rows": rows, "seconds": total}, md)


def count_means(rows: list[dict[str, Any]]) -> str:
    """Markdown: the means per method and exemplar count over the scenarios that have every count (the same
    scenarios in each row), then over all the scenarios that have that many."""
    counts = {r["n_exemplars"] for r in rows}
    every = [s for s in dict.fromkeys(r["scenario"] for r in rows)
             if {r["n_exemplars"] for r in rows if r["scenario"] == s} == counts]
    return (f"Over the scenarios with every count ({', '.join(every)}). "
            + G.means_table([r for r in rows if r["scenario"] in every], "method")
            + "\n\nOver every scenario with that many. " + G.means_table(rows, "method"))


if __name__ == "__main__":
    raise SystemExit(main())
