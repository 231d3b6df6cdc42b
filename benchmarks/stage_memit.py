"""One rule spread over a residual stage (MEMIT's joint split of one value change), against one layer.

EfficientNet-Lite0's stage 6 is a residual stream: ``_blocks.11`` writes it (no skip), ``_blocks.12``–``14``
add to it, and ``_blocks.15`` reads it. MEMIT's idea, carried to this CNN: the *target* is the stage's output
on the clean exemplar at the masked places, ``z``; each of the stage's project convs in turn (11, 12, 13, 14)
is rewritten, with the edits before it applied, to close its share ``(z − h)/(layers left)`` of what is still
missing, ``h`` the stage's output on the manipulated exemplar now; the share is moved into the conv's own
output space through its BatchNorm's per-channel scale (the conv feeds ``_bn2``, then the stream). Each layer's
update is the thesis's closed form (rank 1, direction ``C_l⁻¹k̄_l`` of that layer's mean masked key, Λ by least
squares on the masked pairs), so the edit has rank 4 over four layers. Unlike an edit of one conv inside a
residual block (the default's reason to avoid those), the stream's identity path is compensated: the target
is the stream, not the conv's clean output. "stream 14" is the one-layer case (block 14 closes the whole gap);
"block 15" is the default layer's mean-key closed form, for comparison on the same footing. The stage's
edits are :func:`rulewriter.core.stage.fit_stage`'s; ``--validated [--final]`` runs
:func:`~rulewriter.core.stage.rewrite_stage` instead (validated and spent like the default; with ``--final``
block 15 is one more share, its directions validated), as scoreboard rows named "default" in
``results/generalise_stage{,_final}.json`` for ``generalise_layers.py``.

Every variant is scaled by ``s ∈ STRENGTHS`` and chosen like the default spends its budget: the strongest
strength within the locality budget (calibration images) that restores the most exemplars, strength 1 when
none is within it. The pairs are the exemplars' own (no augmented views), for all three variants alike.
Exploration, not a method: the table prints held-out figures for every strength, and no default is read off it.

Run: ``python benchmarks/stage_memit.py [--views] [--scenarios ...] [--exemplars 5,1]`` (``--views``: the
stage also fitted on every exemplar's joint views); writes ``benchmarks/results/stage_memit.{json,md}``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generalise as G  # noqa: E402

STAGE = [f"_blocks.{i}._project_conv" for i in (11, 12, 13, 14)]
STREAM = "_blocks.14"  # the stage's output: what block 15 reads
DEFAULT_LAYER = "_blocks.15._project_conv"
VARIANTS = {"stage MEMIT 11-14": STAGE, "stream 14": STAGE[-1:]}
VIEWS = "--views" in sys.argv
FINAL = "--final" in sys.argv  # with --validated: block 15 fitted last to its own clean values


def probe(rows: list[dict[str, Any]]):
    state: dict[str, Any] = {}

    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        from rulewriter.core.generalise import STRENGTHS, LocalityBudget
        from rulewriter.core.rules import load_exemplars, rewrite, rule_from_images
        from rulewriter.core.stage import Stage, fit_stage
        from rulewriter.core.stats import collect_second_moments

        assert layer == STAGE[0], f"run with --layer {STAGE[0]}"
        if "stats" not in state:  # C at every edited layer from the scoreboard's C images, one pass
            paths, _ = C.imagenet_samples(C.require_shared("data/imagenet-samples"), clf)
            n_ph = 4 * len(cal)
            state["stats"] = collect_second_moments(clf, STAGE + [DEFAULT_LAYER], paths[0:n_ph:2],
                                                    cache_dir=C.CACHE_DIR, progress=False)
        st = state["stats"]
        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]
        orig, man, masks_s = load_exemplars(clf, o, m, k)
        pre = clf.preprocess
        x_o, x_m = pre.batch(orig), pre.batch(man)
        stages = {name: Stage(tuple(layers), STREAM, tuple(n.rsplit(".", 1)[0] + "._bn2" for n in layers))
                  for name, layers in VARIANTS.items()}
        edits = {name: fit_stage(clf, s, [st[n] for n in s.layers], x_o, x_m, masks_s) for name, s in stages.items()}
        if VIEWS:  # the same, fitted on every exemplar's joint views as well (the default's "all views" pairs)
            from rulewriter.concepts.masks import load_mask
            from rulewriter.core.generalise import DEFAULT_VIEWS, exemplar_views
            from rulewriter.models.preprocess import mask_for_image

            full = [mask_for_image(load_mask(mk), im.size) for mk, im in zip(k, orig)]
            vo, vm, vk, _ = exemplar_views(orig, man, full, DEFAULT_VIEWS)
            s = stages["stage MEMIT 11-14"]
            edits["stage MEMIT 11-14, views"] = fit_stage(clf, s, [st[n] for n in s.layers], pre.batch(vo),
                                                          pre.batch(vm), torch.stack([pre.mask(mk) for mk in vk]))
        edits["block 15"] = rewrite(clf, rule_from_images(clf, DEFAULT_LAYER, o, m, k, views=0), st[DEFAULT_LAYER],
                                    strength=1.0)
        budget = LocalityBudget()
        for name, e in edits.items():
            curve = []
            for s in STRENGTHS:
                es = e.scaled(s)
                r = G.probe_row(clf, start, sc, n, photos, cal, es, f"{name} s={s}", variant=name, strength=s)
                r["within_budget"] = budget.admits({"changed": r["cal_changed"],
                                                    "changed_near_tie": r["cal_near_tie"]})
                curve.append(r)
                rows.append(r)
            admitted = [r for r in curve if r["within_budget"]]
            best = max(admitted, key=lambda r: (r["SR"], r["strength"])) if admitted else curve[0]
            rows.append({**best, "variant": f"{name}, chosen", "chosen": True})
            G.log(f"  {sc.name} n={n} {name} chosen s={best['strength']}: SR {G.pct(best['SR'])} "
                  f"GR {G.pct(best['GR'])} LR {G.pct(best['LR'])}/{G.pct(best['LR_sensitive'])}")
    return run


def validated(rows: list[dict[str, Any]], details: list[dict[str, Any]]):
    """``rewrite_stage`` (validated and spent like the default) as a scoreboard method named "default", so
    ``generalise_layers.py`` can weigh it against the single layers."""
    state: dict[str, Any] = {}

    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        import time

        from rulewriter.core.generalise import DEFAULT_VIEWS
        from rulewriter.core.rules import rule_from_images
        from rulewriter.core.stage import Stage, rewrite_stage, stage_before
        from rulewriter.core.stats import collect_second_moments

        assert layer == STAGE[0], f"run with --layer {STAGE[0]}"
        stage = stage_before(clf.model, DEFAULT_LAYER)
        assert stage.layers == tuple(STAGE) and stage.stream == STREAM
        if not FINAL:  # the stream's convs close the whole gap
            stage = Stage(stage.layers, stage.stream, stage.norms)
        if "stats" not in state:
            paths, _ = C.imagenet_samples(C.require_shared("data/imagenet-samples"), clf)
            st = collect_second_moments(clf, list(stage.convs), paths[0:4 * len(cal):2], cache_dir=C.CACHE_DIR,
                                        progress=False)
            state["stats"] = [st[name] for name in stage.convs]
        t0 = time.perf_counter()
        rule = rule_from_images(clf, STAGE[0], sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n], views=DEFAULT_VIEWS)
        e = rewrite_stage(clf, stage, rule, state["stats"], calibration=cal)
        secs = time.perf_counter() - t0
        r = {"scenario": sc.name, "method": "default", "n_exemplars": n, **G.measure(clf, start, sc, n, photos, e),
             "seconds": secs}
        rows.append(r)
        details.append({**r, "info": {"strength": e.meta["strength"]}})
        G.log(f"  {sc.name} n={n} stage, validated: SR {G.pct(r['SR'])} GR {G.pct(r['GR'])} LR {G.pct(r['LR'])}/"
              f"{G.pct(r['LR_sensitive'])} Δ {r['d_top1']:+.1f} {secs:.1f}s\n    {e.meta['strength']['reason']}")
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--views", "--final")]
    if "--validated" in argv:
        details: list[dict[str, Any]] = []
        G.run_probe([a for a in argv if a != "--validated"] + ["--layer", STAGE[0]], validated(rows, details),
                    scenarios=",".join(G.SCENARIOS), exemplars="5,1")
        md = ("# The stage's edit, validated and spent like the default\n\n"
              + G.probe_table([{**r, "cal_changed": None} for r in rows], [("seconds", lambda r: f"{r['seconds']:.1f}")])
              + "\n\n" + G.means_table(rows, "method"))
        name = "generalise_stage_final" if FINAL else "generalise_stage"
        return G.report_probe(name, {"rows": rows, "details": details, "layer": "stage " + STAGE[0] + " … "
                                     + (DEFAULT_LAYER if FINAL else STAGE[-1])}, md)
    G.run_probe(argv + ["--layer", STAGE[0]], probe(rows),
                scenarios=",".join(G.SCENARIOS), exemplars="5,1")
    chosen = [r for r in rows if r.get("chosen")]
    md = ("# One rule over a residual stage (MEMIT's split) against one layer\n\n"
          "Calibration: the 250 imagenet-samples of index 1 mod 4 (budget ≤ 0.5 % changed, ≤ 5 % of near ties); "
          "SR, GR, LR and Δ top-1 on the scoreboard's sets. Chosen: the strongest strength within the budget "
          "that restores the most exemplars (strength 1 when none is within it).\n\n## Chosen\n\n"
          + G.probe_table(chosen, [("variant", lambda r: r["variant"]), ("strength", lambda r: r["strength"])])
          + "\n\n" + G.means_table(chosen, "variant")
          + "\n\n## Every strength\n\n"
          + G.probe_table([r for r in rows if not r.get("chosen")],
                          [("variant", lambda r: r["variant"]), ("strength", lambda r: r["strength"]),
                           ("within budget", lambda r: "yes" if r["within_budget"] else "no")]))
    return G.report_probe("stage_memit", {"rows": rows, "stage": STAGE, "stream": STREAM}, md)


if __name__ == "__main__":
    raise SystemExit(main())
