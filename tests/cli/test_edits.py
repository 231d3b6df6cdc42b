"""`rulewriter edit --after`, `edits list|show|check` and `export` on the real model; bad input exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rulewriter.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def library(tmp_path_factory, coffee_case, photo_dir):
    """Two edits of the coffee photo: gravel → cup (A), then brick → cup written on A (B)."""
    # capsys is function-scoped: this module-scoped fixture sends the commands' output to buffers instead.
    import contextlib
    import io

    original, manipulated, mask = coffee_case
    d = tmp_path_factory.mktemp("library")
    original.save(d / "coffee.png")
    manipulated.save(d / "coffee_gravel.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(d / "mask.png")
    lib = d / "lib"
    lib.mkdir()
    common = ["--model", "efficientnet-lite0", "--original", d / "coffee.png", "--mask", d / "mask.png",
              "--stats-data", photo_dir, "--stats-samples", "60", "--cache-dir", d / "cache", "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([str(a) for a in ["edit", *common, "--manipulated", d / "coffee_gravel.png",
                                      "--out", lib / "a.safetensors"]]) == 0, err.getvalue()
        assert main([str(a) for a in ["edit", *common, "--texture", "skimage:brick", "--after", lib / "a.safetensors",
                                      "--out", lib / "b.safetensors"]]) == 0, err.getvalue()
    return d, lib


def test_edit_after_keeps_the_earlier_rule_and_records_it(library):
    from rulewriter.core.edit import Edit

    _, lib = library
    a, b = Edit.load(lib / "a.safetensors"), Edit.load(lib / "b.safetensors")
    assert b.meta["after"] == [a.fingerprint()] and b.meta["preserved_keys"] == 1
    ka = a.updates[0].keys.double()
    # B's update vanishes on A's key: A's rule maps as it did.
    assert float((b.updates[0].delta() @ ka).abs().max()) < 1e-8 * float(a.updates[0].delta().abs().max() * ka.abs().max())


def test_edits_list_show_check(capsys, library):
    _, lib = library
    code, out, err = _run(capsys, "edits", "list", lib, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["a.safetensors", "b.safetensors"]
    assert rows[0]["model"] == "efficientnet-lite0" and rows[0]["weights"] and rows[0]["created"]
    assert rows[1]["layers"][0] == {"layer": "_blocks.15._project_conv", "view": 2, "rank": 1, "rule_keys": 1}
    code, out, _ = _run(capsys, "edits", "list", lib)
    assert out.splitlines()[0].startswith("FILE\tMODEL\tWEIGHTS\tLAYER\tRANK\tRULES\tCREATED")
    code, out, _ = _run(capsys, "edits", "show", lib / "b.safetensors")
    assert code == 0 and "written on 1 earlier edit" in out and "skimage:brick" in out
    code, out, err = _run(capsys, "edits", "check", lib, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["rules"]) == 2 and all(r["holds"] for r in res["rules"]) and res["missing_predecessors"] == []


def test_check_warns_about_a_sequential_edit_without_its_predecessor(capsys, library, tmp_path):
    import shutil

    _, lib = library
    shutil.copy(lib / "b.safetensors", tmp_path / "b.safetensors")
    code, out, _ = _run(capsys, "edits", "check", tmp_path)
    assert code == 0 and "warning: b.safetensors was written on edit" in out


def test_export_loads_with_weights_and_equals_the_edited_model(capsys, library, tmp_path):
    import torch

    from rulewriter.core.edit import Edit
    from rulewriter.models.registry import load_classifier

    d, lib = library
    out = tmp_path / "edited.safetensors"
    code, _, err = _run(capsys, "export", "--edit", lib / "a.safetensors", "--edit", lib / "b.safetensors", "--out", out)
    assert code == 0, err
    clf = load_classifier("efficientnet-lite0")
    x = clf.preprocess.batch([Image.open(d / "coffee_gravel.png").convert("RGB"), Image.open(d / "coffee.png").convert("RGB")])
    with Edit.load(lib / "a.safetensors").applied(clf.model), Edit.load(lib / "b.safetensors").applied(clf.model):
        edited = clf.model(x).detach()
        sd = {k: v.clone() for k, v in clf.model.state_dict().items()}
    exported = load_classifier("efficientnet-lite0", weights=out)
    assert all(torch.equal(v, sd[k]) for k, v in exported.model.state_dict().items())
    assert torch.equal(exported.model(x).detach(), edited)
    code, pred, _ = _run(capsys, "predict", "--weights", out, "--json", d / "coffee_gravel.png")
    code, ref, _ = _run(capsys, "predict", "--edit", lib / "a.safetensors", "--edit", lib / "b.safetensors", "--json",
                        d / "coffee_gravel.png")
    assert json.loads(pred) == json.loads(ref)
    # Edits made for the original weights are refused on the exported ones, saying what they were made for.
    code, _, err = _run(capsys, "export", "--weights", out, "--edit", lib / "a.safetensors", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "a.safetensors was made for model efficientnet-lite0 with weights" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("case", ["out_is_edit", "out_is_sidecar", "out_is_weights", "missing_edit", "not_an_edit",
                                  "after_missing", "out_is_after", "no_edits_dir"])
def test_bad_input_exits_2_and_writes_nothing(capsys, library, tmp_path, case):
    d, lib = library
    before = sorted(p.name for p in lib.iterdir())
    stamp = {p.name: p.stat().st_mtime_ns for p in lib.iterdir()}
    out = tmp_path / "o.safetensors"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    argv = {
        "out_is_edit": ["export", "--edit", lib / "a.safetensors", "--out", lib / "a.safetensors"],
        "out_is_sidecar": ["export", "--edit", lib / "a.safetensors", "--out", lib / "a.safetensors.json"],
        "out_is_weights": ["export", "--weights", lib / "a.safetensors", "--edit", lib / "b.safetensors",
                           "--out", lib / "a.safetensors"],
        "missing_edit": ["export", "--edit", tmp_path / "nope.safetensors", "--out", out],
        "not_an_edit": ["export", "--edit", tmp_path / "junk.safetensors", "--out", out],
        "after_missing": ["edit", "--original", d / "coffee.png", "--mask", d / "mask.png", "--texture", "skimage:brick",
                          "--stats-data", d, "--after", tmp_path / "nope.safetensors", "--out", out],
        "out_is_after": ["edit", "--original", d / "coffee.png", "--mask", d / "mask.png", "--texture", "skimage:brick",
                         "--stats-data", d, "--after", lib / "a.safetensors", "--out", lib / "a.safetensors"],
        "no_edits_dir": ["edits", "list", tmp_path / "nowhere"],
    }[case]
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("rulewriter: error:") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(lib.glob(".*.tmp"))
    assert sorted(p.name for p in lib.iterdir()) == before
    assert {p.name: p.stat().st_mtime_ns for p in lib.iterdir()} == stamp
