"""Values read downstream: at the same collateral energy, does a Λ fitted to the logits carry further?

An experiment on the scoreboard's scenarios (``generalise.py``). The default edit (``rewrite`` with views and
the locality budget) fixes a direction ``D`` and a Λ fitted to the layer's clean *features* at the masked
positions. Here Λ is instead fitted to what the network *outputs*: projected Adam on Λ alone (``D`` fixed)
minimising KL(unedited clean view ‖ edited manipulated view) + KL(unedited clean view ‖ edited clean view)
over the rule's exemplar views, with Λ kept on the sphere of equal output energy ``tr((DᵀCD)(ΛᵀΛ))`` as the
default's closed form scaled by ``s``. Every ``s`` of :data:`LADDER` is measured both ways: calibration
changes, SR, GR, LR and Δ top-1. Exploration, not a method: it prints held-out figures.

Run: ``python benchmarks/downstream_values.py [--scenarios "gravel car,brick car"] [--exemplars 5,1]``;
writes ``benchmarks/results/downstream_values.{json,md}``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

LADDER = (1.0, 1.5, 2.0, 3.0, 4.0)
STEPS = 150


class _Add(nn.Module):
    def __init__(self, delta) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


def fit_downstream(clf: Any, layer: str, rule: Any, lam0: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                   steps: int = STEPS) -> torch.Tensor:
    """Λ of the same output energy as ``lam0`` that best restores the views' logits (D fixed)."""
    from torch.nn.utils import parametrize

    from rulewriter.core.memory import LayerMemory
    from rulewriter.core.tail import run_tail
    from rulewriter.core.trace import get_module

    model = clf.model
    views = rule.views
    module = get_module(model, layer)
    mem = LayerMemory(module, rule.view, name=layer)
    m = (d.T.double() @ c.double() @ d.double()).float()
    energy = float(((lam0.T.float() @ lam0.float()) * m).sum())
    lam = lam0.float().clone().requires_grad_(True)
    df = d.float()
    with torch.no_grad():
        t_o = run_tail(model, views.start, views.x_orig).log_softmax(1)
    opt = torch.optim.Adam([lam], lr=0.05 * float(lam0.abs().mean()))
    parametrize.register_parametrization(module, "weight", _Add(lambda: mem.weight_from_matrix(lam @ df.T)))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(steps):
            opt.zero_grad()
            lm = run_tail(model, views.start, views.x_man).log_softmax(1)
            lo = run_tail(model, views.start, views.x_orig).log_softmax(1)
            loss = (torch.nn.functional.kl_div(lm, t_o, log_target=True, reduction="batchmean")
                    + torch.nn.functional.kl_div(lo, t_o, log_target=True, reduction="batchmean"))
            loss.backward()
            opt.step()
            with torch.no_grad():  # back onto the sphere of equal energy
                e = float(((lam.T @ lam) * m).sum())
                lam.mul_((energy / max(e, 1e-30)) ** 0.5)
    finally:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return lam.detach().double()


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.edit import Edit, LayerUpdate
        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rewrite, rule_from_images

        rule = rule_from_images(clf, layer, sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        e = rewrite(clf, rule, stats, calibration=cal)
        u = e.updates[0]
        chosen = float(e.meta["strength"]["chosen"])
        lam1, d = u.lam / chosen, u.direction
        c = stats.moment()
        for s in LADDER:
            for how in ("features", "downstream"):
                t0 = time.perf_counter()
                lam = lam1 * s if how == "features" else fit_downstream(clf, layer, rule, lam1 * s, d, c)
                secs = time.perf_counter() - t0
                ed = Edit([LayerUpdate(layer, u.view, lam, d)])
                rows.append(G.probe_row(clf, start, sc, n, photos, cal, ed, f"s={s:g} {how} ({secs:.1f}s)",
                                        strength=s, values=how, candidate=e.meta["strength"].get("candidate"),
                                        default_strength=chosen, seconds=secs))
    return run


def summary(rows: list[dict[str, Any]]) -> str:
    """Per scenario and Λ: the strongest setting within the locality budget (as the default would cap it)."""
    from rulewriter.core.generalise import LocalityBudget

    b = LocalityBudget()
    out = []
    keys = sorted({(r["scenario"], r["n_exemplars"], r["values"]) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    for sc, n, how in keys:
        ok = [r for r in rows if (r["scenario"], r["n_exemplars"], r["values"]) == (sc, n, how)
              and b.admits({"changed": r["cal_changed"], "changed_near_tie": r["cal_near_tie"]})]
        if not ok:
            out.append([sc, n, how, "none", "—", "—", "—", "—"])
            continue
        r = max(ok, key=lambda r: r["strength"])
        out.append([sc, n, how, f"{r['strength']:g}", G.pct(r["SR"]), G.pct(r["GR"]),
                    f"{G.pct(r['LR'])} / {G.pct(r['LR_sensitive'])}", f"{r['d_top1']:+.1f}"])
    return ("The strongest strength within the locality budget on the calibration images:\n\n"
            + C.markdown_table(["scenario", "exemplars", "values", "strength", "SR", "GR", "LR / near ties",
                                "Δ top-1"], out))


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows), scenarios="gravel car,brick car,wood wheels,snow ground", exemplars="5,1")
    head = ["scenario", "exemplars", "strength", "values", "calibration changed", "SR", "GR", "LR",
            "LR_sensitive", "Δ top-1", "seconds"]
    table = [[r["scenario"], r["n_exemplars"], f"{r['strength']:g}", r["values"], G.pct(r["cal_changed"]),
              G.pct(r["SR"]), G.pct(r["GR"]), G.pct(r["LR"]), G.pct(r["LR_sensitive"]), f"{r['d_top1']:+.1f}",
              f"{r['seconds']:.1f}"] for r in rows]
    md = ("# Values read downstream\n\nThe default edit's direction; Λ from the layer's clean features (the "
          "default's closed form × strength) or fitted to the views' logits at the same output energy "
          f"({STEPS} projected Adam steps).\n\n" + C.markdown_table(head, table) + "\n\n" + summary(rows))
    return G.report_probe("downstream_values", {"rows": rows, "steps": STEPS, "ladder": list(LADDER)}, md)


if __name__ == "__main__":
    raise SystemExit(main())
