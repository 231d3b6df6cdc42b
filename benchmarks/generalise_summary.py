"""The README's summary of ``results/generalise.json``: GR per scenario and method, and each method's means.

Run: ``python benchmarks/generalise_summary.py [results/generalise.json]`` (prints markdown).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def summary(data: dict) -> str:
    rows = data["rows"]
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    meth = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for n in sorted({r["n_exemplars"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["n_exemplars"] == n]
        held = {r["scenario"]: r["n_heldout"] for r in sel}
        # Scenarios whose photos have an ImageNet class: GR against it as well (the second measure).
        true = [s for s in scen if any(r.get("GR_true") is not None for r in sel if r["scenario"] == s)]
        classes = any("GR_classes" in r for r in sel)  # runs before it was measured lack the column
        head = (["method"] + [f"{s} ({held.get(s, 0)})" for s in scen] + ["mean SR", "mean GR"]
                + (["mean GR, clean classes"] if classes else [])
                + ["min LR", "min LR sens.", "worst Δ top-1", "mean seconds"])
        if true:
            head.append(f"GR vs true class ({' / '.join(true)})")
        table = []
        for m in meth:
            rs = [r for r in sel if r["method"] == m]
            if not rs:
                continue
            by = {r["scenario"]: r for r in rs}
            grs = [r["GR"] for r in rs if r["GR"] is not None]
            gcs = [r["GR_classes"] for r in rs if r.get("GR_classes") is not None]
            table.append([m] + [pct(by[s]["GR"]) if s in by else "—" for s in scen] + [
                pct(sum(r["SR"] for r in rs) / len(rs)), pct(sum(grs) / len(grs) if grs else None)] + (
                [pct(sum(gcs) / len(gcs) if gcs else None)] if classes else []) + [
                pct(min(r["LR"] for r in rs)), pct(min(r["LR_sensitive"] for r in rs)),
                f"{min(r['d_top1'] for r in rs):+.1f}", f"{sum(r['seconds'] for r in rs) / len(rs):.1f}"]
                + ([" / ".join(pct(by[s].get("GR_true")) if s in by else "—" for s in true)] if true else []))
        out.append(f"**{n} exemplar{'s' if n > 1 else ''}** — GR per scenario (held-out errors in brackets), "
                   "then means over scenarios:\n\n" + C.markdown_table(head, table))
    return "\n\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else C.RESULTS_DIR / "generalise.json"
    print(summary(json.loads(path.read_text())))
