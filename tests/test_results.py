"""README figures equal the results files they come from (benchmarks/results/*.json).

Each check reads a number from the README's Results section and the same number from the JSON the
benchmark wrote, so a rerun that changes a result without the README (or a README edit without a rerun)
fails here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"


def _json(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


def _paragraph(start: str) -> str:
    """The README text from ``start`` to the next blank line."""
    i = README.index(start)
    j = README.find("\n\n", i)
    return README[i: j if j >= 0 else None]


def test_newclass_car_figures_match_newclass_json():
    rows = _json("newclass")["results"]["car"]["rows"]
    text = _paragraph("* **A new class from one image**")
    want = {
        "filter": rows["filter, mined negatives (default)"]["auc"],
        "class-feature": rows["baseline: class feature vector"]["auc"],
        "compositional": rows["baseline: compositional vector"]["auc"],
        "random": rows["baseline: random vector"]["auc"],
        "random logit": rows["baseline: random vector"]["auc_logit"],
        "filter look-alikes": rows["filter, mined negatives (default)"]["auc_lookalike"],
        "class-feature look-alikes": rows["baseline: class feature vector"]["auc_lookalike"],
        "compositional look-alikes": rows["baseline: compositional vector"]["auc_lookalike"],
    }
    got = {
        "filter": re.search(r'For "car" the filter \((0\.\d+)\)', text),
        "class-feature": re.search(r"class-feature \((0\.\d+)\)", text),
        "compositional": re.search(r"compositional \((0\.\d+)\)", text),
        "random": re.search(r"random-vector\s+baseline is not \((0\.\d+)", text),
        "random logit": re.search(r"and (0\.\d+) on the logit alone", text),
        "filter look-alikes": re.search(r"the filter loses: (0\.\d+)", text),
        "class-feature look-alikes": re.search(r"loses: 0\.\d+ against (0\.\d+)", text),
        "compositional look-alikes": re.search(r"against 0\.\d+ and (0\.\d+)", text),
    }
    for k, m in got.items():
        assert m is not None, f"README no longer states the {k} AUC"
        assert float(m.group(1)) == pytest.approx(want[k], abs=5e-4), k
    dog = _json("newclass")["results"]["dog"]["rows"]
    lo, hi = re.search(r"filter AUC of its logit (0\.\d+)–(0\.\d+)", text).groups()
    filters = [v["auc_logit"] for k, v in dog.items() if k.startswith("filter")]
    assert (float(lo), float(hi)) == pytest.approx((min(filters), max(filters)), abs=5e-3)
