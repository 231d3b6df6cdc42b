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


def test_wheels_figures_match_wheels_json():
    d = _json("wheels")
    m = d["methods"]
    text = _paragraph("* **Wooden wheel → wheel**")
    img = m["rewriting with images"]
    gt = img["cars_man_gt"]
    assert f"on our {gt['n_errors_before'] + gt['n_right_before']}\n  held-out cars" in text or \
        f"on our {gt['n_errors_before'] + gt['n_right_before']} held-out cars" in " ".join(text.split())
    flat = " ".join(text.split())
    assert f"calls {gt['n_right_before']} a car, and the edit corrects {gt['corrected']} of the other " \
           f"{gt['n_errors_before']}" in flat
    a = img["all"]
    assert f"({100 * a['pre']:.1f} → {100 * a['post']:.1f};" in flat
    ref = img["cars_man_ref"]
    assert f"the edit corrects {ref['corrected']} of {ref['n_errors_before']}" in flat
    last, ft = m["retraining the last layer"], m["fine-tuning the layer"]
    assert f"retraining the last layer corrects {last['cars_man_ref']['corrected']}/" \
           f"{last['cars_man_ref']['n_errors_before']}" in flat
    delta = f"{100 * (ft['all']['post'] - ft['all']['pre']):.1f}".replace("-", "−")
    assert f"fine-tuning the layer {ft['cars_man_ref']['corrected']}/{ft['cars_man_ref']['n_errors_before']} at " \
           f"{delta} points" in flat
    assert last["lr"] == ft["lr"] == 1e-4 and "fair rule's lr 1e-4" in flat
    assert f"{ft['loss_last']:.2f} (fine-tuning) and {last['loss_last']:.2f}" in flat
    assert f"from {ft['loss_first']:.2f}" in flat
    t = img["table_confusing"]
    n_conf = len(d["match"]["confusing"])
    assert t["manipulated_other"]["n"] == n_conf and f"every one of the {n_conf} non-car photos" in flat
    assert f"against the {gt['n_errors_before'] + gt['n_right_before']} held-out cars" in flat
    mo, no = t["manipulated_other"], t["normal_other"]
    assert f"accuracy {100 * mo['accuracy_pre']:.1f} → {100 * mo['accuracy_post']:.1f} %" in flat
    assert f"{100 * no['accuracy_pre']:.1f} → {100 * no['accuracy_post']:.1f} % without" in flat
    au = img["auc_confusing"]["manipulated"]
    assert f"AUC stays {au['pre']:.3f} → {au['post']:.3f}" in flat


def test_snow_table_matches_snow_json():
    d = _json("snow")
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in _paragraph("| method (≤ 5 exemplars, package defaults) |").splitlines()[2:]}
    res, abl = d["results"], d["ablations"]

    def fixed(g):
        return f"{g['fixed']}/{g['errors']}"

    for name, key in (("no edit", "no edit"), ("rewriting with images", "images"),
                      ("rewriting with features", "features")):
        g = res[key]["groups"]["all"]
        assert rows[name][0].startswith(fixed(g)), name
        assert rows[name][1] == f"{g['introduced']}/{g['n']}", name
        assert rows[name][2].startswith(f"{res[key]['top1']:.1f} %"), name
    lr4 = next(v for k, v in abl.items() if k.startswith("fine-tuning one layer, lr 0.0001"))
    row = next(v for k, v in rows.items() if k.startswith("fine-tuning the layer, lr 1e-4"))
    g4 = lr4["groups"]["all"]
    assert row[0].startswith(fixed(g4)) and row[1] == f"{g4['introduced']}/{g4['n']}"
    assert row[2] == f"{lr4['top1']:.1f} % ({-lr4['cost']:+.1f})".replace("-", "−")
    assert lr4["finetune"]["fitted"] and f"{lr4['finetune']['steps_run']} steps" in \
        next(k for k in rows if k.startswith("fine-tuning the layer, lr 1e-4"))
    last = res["last-layer"]
    row = next(v for k, v in rows.items() if k.startswith("retraining the last layer"))
    assert row[0].startswith(fixed(last["groups"]["all"])) and row[2].startswith(f"{last['top1']:.1f} %")


def test_bus_gravel_table_matches_bus_gravel_json():
    d = _json("bus_gravel")
    tot, folds = d["totals"], d["folds"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in _paragraph("| method (5 exemplars per fold) |").splitlines()[2:]}

    def cost(m):
        c = sum(f["results"][m]["cost"] for f in folds.values()) / len(folds)
        return f"{-c + 0.0:+.1f}".replace("-", "−")

    for name, m in (("rewriting with images", "images"), ("rewriting with features", "features"),
                    ("fine-tuning the layer (lr", "finetune"), ("retraining the last layer", "last-layer"),
                    ("fine-tuning the layer, all 100 steps", "finetune, all 100 steps"),
                    ("rewriting with images, disjoint C", "images, disjoint C")):
        row = next(v for k, v in rows.items() if k.startswith(name) and (name.endswith("(lr") or k == name
                                                                          or not k.startswith(name + ",")))
        a = tot[m]["all"]
        assert row[0].startswith(f"{a['fixed']}/{a['errors']}"), name
        assert row[1] == f"{a['introduced']}/{a['n']}", name
        assert row[2] == cost(m), name
    for f in folds.values():
        for m in ("finetune", "last-layer"):
            assert f["training"][m]["lr"] == 1e-4 and f["training"][m]["fitted"]


def test_generalisation_scoreboard_tables_match_generalise_json():
    """The README's scoreboard tables are benchmarks/generalise_summary.py's rendering of generalise.json."""
    import sys

    data = _json("generalise")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalise_summary import summary

    assert summary(data) in README


def test_layer_choice_means_match_generalise_layers_md():
    """The README's table of the layer chosen per edit is benchmarks/generalise_layers.py's means table."""
    md = (ROOT / "benchmarks" / "results" / "generalise_layers.md").read_text()
    means = md[md.index("| layer | exemplars | mean SR"):md.index("\n\n_Measured")].strip()
    assert means in README
    rows = _json("generalise_layers")["rows"]
    assert {r["layer"] for r in rows} <= set(_json("generalise_layers")["layers"])


def test_layer_choice_speed_table_matches_its_results_file():
    """The README's timing of the layer choice is benchmarks/layer_choice_speed.py's table, and its sums."""
    md = (ROOT / "benchmarks" / "results" / "layer_choice_speed.md").read_text()
    table = md[md.index("| scenario | exemplars | chosen layer"):md.index("\n\nSums")].strip()
    assert table in README
    rows = _json("layer_choice_speed")["rows"]
    assert all(r["same_choice"] for r in rows)
    before, now, anchor = (round(sum(r[k] for r in rows)) for k in ("seconds_before", "seconds_now", "seconds_anchor"))
    assert f"({before} → {now} s;" in README and f"{now} s against {anchor} s" in README
