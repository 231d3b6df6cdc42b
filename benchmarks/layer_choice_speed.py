"""The layer chosen per edit, timed: what the layer choice no longer spends, side by side in one run.

``rewrite_choosing_layer`` writes the rule at each candidate layer (EfficientNet-Lite0: blocks 15 and 11
project convs, the head conv) and keeps the edit whose own validation wins. Exact shortcuts, all on now:

* one pass over the exemplars and their views reads every layer's rule (``rules_from_images``);
* a calibration measurement stops once its setting is ruled out (over the locality budget and changing an
  image the closed form leaves alone), the most fragile images first (``Calibration.changed(stop=...)``);
* the strength choice is a best-first search: the setting whose rank bound is highest is refined (its
  views validated, then its calibration measured) until the best bound is a setting known in full, so
  settings that could not rank first are never measured (``choose_strength``; ``exhaustive=True`` measures
  every admissible one);
* a layer none of whose still possible settings could score above a layer already written cannot win,
  so its validation stops as soon as that is settled (``to_beat``);
* the head conv has an exact linear map to the logits like block 15 (``LinearTail``), and the exemplar
  views are scored through these maps too (``ViewSet.logits_under``).

Measured on scoreboard scenarios (``generalise.py``'s splits), each case three ways back to back:
**before** (the previous runtime: each layer's rule read on its own, every layer validated in full, every
measurement over all calibration images, the tail run for the head conv's calibration images and for every
view, every admissible setting measured and validated), **now** (``rules_from_images`` + ``rewrite_choosing_layer`` as ``rulewriter edit`` runs them) and
the **EditingClassifiers anchor** at the default layer (lr 1e-4, 2,000 Adam steps: the faster of the
scoreboard's two anchor rows). The two choices are compared (layer, strength, candidate); the held-out
figures of the chosen edit are those of ``generalise_layers.py``.

Run: ``python benchmarks/layer_choice_speed.py [--scenarios "wood wheels,gravel car"] [--exemplars 5,1]``;
writes ``benchmarks/results/layer_choice_speed.{json,md}``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

SCENARIOS = "wood wheels,snow ground,gravel car,brick car,gravel animals"
ANCHOR_LR, ANCHOR_STEPS = 1e-4, 2000


def probe(rows: list[dict[str, Any]]):
    per_layer: dict[str, tuple[Any, Any]] = {}  # layer -> (statistics, calibration), built once

    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core import generalise as GZ
        from rulewriter.core.generalise import DEFAULT_VIEWS, calibration_set, choose_layer
        from rulewriter.core.rules import rewrite, rewrite_choosing_layer, rule_from_images, rules_from_images
        from rulewriter.core.stats import collect_second_moment

        layers = clf.candidate_layers
        if not per_layer:
            paths, _ = C.imagenet_samples(C.shared_dir(), clf)
            for lay in layers:  # the scoreboard's disjoint halves: C from the even photos, calibration 1 mod 4
                per_layer[lay] = (stats if lay == layer else collect_second_moment(
                    clf, lay, paths[0:1000:2], cache_dir=C.CACHE_DIR, progress=False),
                    cal if lay == layer else calibration_set(clf, lay, paths[1:1000:4]))
        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]

        def old_rule(lay: str) -> Any:  # read on its own, views scored through the tail
            r = rule_from_images(clf, lay, o, m, k, views=DEFAULT_VIEWS)
            r.views.linear_orig = r.views.linear_man = None
            return r

        old_cal = {lay: c if lay == layer else dataclasses.replace(c, linear=None)
                   for lay, (_, c) in per_layer.items()}  # block 15's map is the old runtime's too
        real, search = GZ.Calibration.changed, GZ.choose_strength
        GZ.Calibration.changed = lambda self, model, edit, stop=None: real(self, model, edit)  # measure in full
        GZ.choose_strength = lambda *a, **kw: search(*a, **{**kw, "exhaustive": True})  # every setting
        try:
            t0 = time.perf_counter()
            edits = [rewrite(clf, old_rule(lay), per_layer[lay][0], calibration=old_cal[lay]) for lay in layers]
            old = choose_layer(layers, [e.meta["strength"] for e in edits])
            t_old = time.perf_counter() - t0
        finally:
            GZ.Calibration.changed, GZ.choose_strength = real, search
        t0 = time.perf_counter()
        rules = rules_from_images(clf, layers, o, m, k, views=DEFAULT_VIEWS)
        new = rewrite_choosing_layer(clf, layers, rules.__getitem__, lambda lay: per_layer[lay][0],
                                     calibration_at=lambda lay: per_layer[lay][1])
        t_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        G.anchor_edit(clf, layer, rule_from_images(clf, layer, o, m, k, views=0), stats, ANCHOR_LR, ANCHOR_STEPS)
        t_anchor = time.perf_counter() - t0
        was, now = edits[old["index"]].meta["strength"], new.meta["strength"]
        same = (old["chosen"] == new.meta["layer_choice"]["chosen"] and was["chosen"] == now["chosen"]
                and list(was.get("candidate") or []) == list(now.get("candidate") or []))
        pruned = [r["layer"] for r in new.meta["layer_choice"]["layers"] if "pruned" in r]
        rows.append({"scenario": sc.name, "n_exemplars": n, "layer": old["chosen"], "same_choice": same,
                     "pruned": pruned, "seconds_before": t_old, "seconds_now": t_new, "seconds_anchor": t_anchor})
        G.log(f"  {sc.name} n={n}: {old['chosen']} ({'same' if same else 'DIFFERENT'} choice), before "
              f"{t_old:.1f} s, now {t_new:.1f} s (pruned: {', '.join(pruned) or 'none'}), anchor {t_anchor:.1f} s")

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    G.run_probe(argv, probe(rows), scenarios=SCENARIOS, exemplars="5,1")
    short = lambda lay: lay.replace("._project_conv", "").lstrip("_")  # noqa: E731
    table = [[r["scenario"], r["n_exemplars"], short(r["layer"]), "yes" if r["same_choice"] else "NO",
              ", ".join(short(p) for p in r["pruned"]) or "—", f"{r['seconds_before']:.1f}",
              f"{r['seconds_now']:.1f}", f"{r['seconds_before'] / r['seconds_now']:.1f}×",
              f"{r['seconds_anchor']:.1f}"] for r in rows]
    tot = {k: sum(r[k] for r in rows) for k in ("seconds_before", "seconds_now", "seconds_anchor")}
    md = ("# The layer chosen per edit, timed\n\n"
          f"EfficientNet-Lite0, candidate layers blocks 15 / 11 / head conv, scoreboard splits; seconds on this "
          f"machine ({C.machine_info().get('cpu_count', '?')} CPUs, 1 torch thread unless --threads), each case's three "
          f"runs back to back. Total {time.perf_counter() - t0:.0f} s.\n\n"
          + C.markdown_table(["scenario", "exemplars", "chosen layer", "same choice", "pruned layers",
                              "before (s)", "now (s)", "speed-up", "anchor lr 1e-4, 2000 steps (s)"], table)
          + f"\n\nSums: before {tot['seconds_before']:.0f} s, now {tot['seconds_now']:.0f} s, anchor "
            f"{tot['seconds_anchor']:.0f} s.\n")
    return G.report_probe("layer_choice_speed", {"rows": rows, "machine": C.machine_info()}, md)


if __name__ == "__main__":
    raise SystemExit(main())
