"""The layer chosen per edit: the scoreboard's default at three layers, one picked by :func:`choose_layer`.

``rulewriter.core.generalise.choose_layer`` picks among the same rule's edits at several layers by their own
validation records (exemplars restored, within the budget, left-out views right), never by held-out
photos. The choice is a deterministic function of the three edits' records, so it is computed here from
three scoreboard runs of the default on the same splits (block 15 from ``results/generalise.json``, the
other two from ``python benchmarks/generalise.py --layer L --methods default --name N``) exactly as
``rewrite_choosing_layer`` makes it at run time; its held-out figures are the chosen layer's.

Run: ``python benchmarks/generalise_layers.py [generalise_default_now generalise_layer_blocks11_stop
generalise_layer_conv_head_now]`` (result names, the model's default layer first; these three are the
default rerun with this code's shortcuts, ``generalise.py --methods default [--layer L] --name N``, identical
in every figure and choice to the runs before them); writes
``benchmarks/results/generalise_layers.{json,md}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RUNS = ("generalise_default_now", "generalise_layer_blocks11_stop", "generalise_layer_conv_head_now")


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def defaults(name: str) -> tuple[str, dict[tuple[str, int], dict[str, Any]]]:
    data = json.loads((C.RESULTS_DIR / f"{name}.json").read_text())
    rows = {(r["scenario"], r["n_exemplars"]): dict(r) for r in data["rows"] if r["method"] == "default"}
    for d in data["details"]:
        if d.get("method") == "default":
            rows[d["scenario"], d["n_exemplars"]]["strength_record"] = d["info"]["strength"]
    return data["layer"], rows


def main(argv: list[str] | None = None) -> int:
    from rulewriter.core.generalise import choose_layer

    names = list(argv if argv is not None else sys.argv[1:])
    out_name = "generalise_layers"
    if "--name" in names:  # another results file, e.g. for a trial with a fourth candidate
        i = names.index("--name")
        out_name = names[i + 1]
        del names[i:i + 2]
    names = names or list(RUNS)
    runs = [defaults(n) for n in names]
    layers = [layer for layer, _ in runs]
    keys = [k for k in runs[0][1] if all(k in rows for _, rows in runs)]
    out = []
    for key in keys:
        got = choose_layer(layers, [rows[key]["strength_record"] for _, rows in runs])
        r = runs[got["index"]][1][key]
        out.append({"scenario": key[0], "n_exemplars": key[1], "layer": got["chosen"], "reason": got["reason"],
                    **{m: r[m] for m in ("SR", "GR", "LR", "LR_sensitive", "d_top1", "n_heldout")},
                    "seconds": sum(rows[key]["seconds"] for _, rows in runs),
                    "per_layer": {layer: {m: rows[key][m] for m in ("SR", "GR", "LR", "LR_sensitive", "d_top1")}
                                  for layer, rows in runs}})
    short = [layer.replace("._project_conv", "").lstrip("_") for layer in layers]
    head = ["scenario", "exemplars", "chosen layer"] + [f"GR {s}" for s in short] + [
        "SR", "GR", "LR", "LR sens.", "Δ top-1"]
    table = [[o["scenario"], o["n_exemplars"], o["layer"].replace("._project_conv", "").lstrip("_")]
             + [pct(o["per_layer"][layer]["GR"]) for layer in layers]
             + [pct(o["SR"]), pct(o["GR"]), pct(o["LR"]), pct(o["LR_sensitive"]), f"{o['d_top1']:+.1f}"]
             for o in out]
    mean = []
    for n in sorted({o["n_exemplars"] for o in out}, reverse=True):
        sel = [o for o in out if o["n_exemplars"] == n]
        for what, get in [(f"layer {s}", lambda o, layer=layer: o["per_layer"][layer]) for s, layer in
                          zip(short, layers)] + [("chosen per edit", lambda o: o)]:
            rs = [get(o) for o in sel]
            mean.append([what, n, pct(sum(r["SR"] for r in rs) / len(rs)), pct(sum(r["GR"] for r in rs) / len(rs)),
                         pct(min(r["LR"] for r in rs)), pct(min(r["LR_sensitive"] for r in rs)),
                         f"{min(r['d_top1'] for r in rs):+.1f}"])
    md = ("# The layer chosen per edit\n\nThe default at each layer on the scoreboard's splits, and the layer "
          "`choose_layer` picks from the three edits' validation records.\n\n" + C.markdown_table(head, table)
          + "\n\nMeans over the scenarios (LR, near ties and Δ: the worst):\n\n"
          + C.markdown_table(["layer", "exemplars", "mean SR", "mean GR", "min LR", "min LR sens.", "worst Δ"],
                             mean))
    C.write_results(out_name, {"runs": names, "layers": layers, "rows": out}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
