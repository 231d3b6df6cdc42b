"""Hard negatives: does keeping the flipped calibration images' keys still let an edit go further?

An experiment on the scoreboard's scenarios (``generalise.py``: its exemplars, held-out errors, calibration
images and LR photos). Along the mean-key edit's direction ``d = C⁻¹k*`` (the exemplars' augmented views,
``solve_lambda`` for Λ), every strength of :data:`LADDER` is measured: the calibration images whose top-1
changes, and SR, GR, LR and Δ top-1 on the scoreboard's sets. Then the keys of the calibration images the
ladder flipped (the half of each image's positions where ``d`` fires most) are added to the direction's
solve, ``d = (C + β K_negᵀK_neg)⁻¹k*`` with ``β`` such that they carry a tenth of ``tr C``, and the ladder
is run again; :data:`ROUNDS` times. The question is whether the collateral the budget sees is specific
(images that share the concept, whose keys a direction could avoid) or diffuse, and whether GR keeps growing
with strength at all. Exploration, not a method: no default was read off it, and it prints held-out figures.

Run: ``python benchmarks/hard_negatives.py [--scenarios "gravel car"] [--exemplars 5]``; writes
``benchmarks/results/hard_negatives.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

LADDER = (1, 2, 3, 4, 6, 8, 12, 16)
ROUNDS = 3
NEGATIVE_SHARE = 0.1  # of tr C: the mined keys' weight in the direction's solve
STOP_AFTER = 12  # calibration images changed: the ladder stops there (far past the 0.5 % budget)


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.edit import Edit, LayerUpdate, solve_lambda, update_direction
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.memory import LayerMemory
        from rulewriter.core.rules import rule_from_images

        if cal.linear is None:
            raise SystemExit("hard_negatives needs the calibration images' keys (the default layer's linear map)")
        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        w0 = LayerMemory(dict(clf.model.named_modules())[layer], 2).matrix().double()
        c = stats.moment().double()
        k, v, w = rule.keys.double(), rule.values.double(), rule.weights.double()
        kstar = (k * w[:, None]).sum(0) / w.sum()
        keys = cal.linear.keys.double()  # (N, P, d): every calibration image's keys at the layer
        extra = torch.zeros_like(c)
        for rnd in range(ROUNDS + 1):
            d = update_direction(c + extra, kstar[:, None])
            lam = solve_lambda(w0, k.T, v.T, d, w)
            flipped: set[int] = set()
            for s in LADDER:
                e = Edit([LayerUpdate(layer, 2, lam * s, d)])
                ch = cal.changed(clf.model, e)
                flipped |= set(ch["which"])
                r = {"scenario": sc.name, "n_exemplars": n, "round": rnd, "strength": s,
                     "cal_changed": len(ch["which"]), "cal_near_tie": ch["changed_near_tie"],
                     **G.measure(clf, start, sc, n, photos, e)}
                rows.append(r)
                G.log(f"  {sc.name} n={n} round {rnd} s={s}: calibration changed {r['cal_changed']} | GR "
                      f"{G.pct(r['GR'])} SR {G.pct(r['SR'])} LR {r['LR']:.3f} LR sens. {G.pct(r['LR_sensitive'])} "
                      f"Δ {r['d_top1']:+.1f}")
                if r["cal_changed"] > STOP_AFTER:
                    break
            G.log(f"    flipped: {', '.join(clf.labels[int(cal.base[i])] for i in sorted(flipped))}")
            neg = keys[sorted(flipped)].reshape(-1, keys.shape[-1])
            if not len(neg):
                break
            resp = (neg @ d[:, 0]).abs()
            top = neg[resp >= resp.quantile(0.5)]
            extra = extra + NEGATIVE_SHARE * float(torch.trace(c)) / float((top * top).sum()) * (top.T @ top)
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows))
    head = ["scenario", "exemplars", "round", "strength", "calibration changed", "GR", "SR", "LR", "LR sens.",
            "Δ top-1"]
    table = [[r["scenario"], r["n_exemplars"], r["round"], r["strength"], r["cal_changed"], G.pct(r["GR"]),
              G.pct(r["SR"]), f"{100 * r['LR']:.1f}%", G.pct(r["LR_sensitive"]), f"{r['d_top1']:+.1f}"] for r in rows]
    md = ("# Hard negatives\n\nRound 0: the mean-key edit along `C⁻¹k*`; round i: the keys of the calibration "
          "images rounds < i flipped kept still in the direction's solve. Calibration: the 250 images of index 1 "
          "mod 4; LR, Δ top-1: the 250 of index 3 mod 4.\n\n" + C.markdown_table(head, table))
    C.write_results("hard_negatives", {"rows": rows, "ladder": list(LADDER), "negative_share": NEGATIVE_SHARE}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
