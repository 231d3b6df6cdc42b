"""The command line: the acceptance forms work exactly as written; bad input exits 2 and writes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rulewriter.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, coffee_case):
    original, manipulated, mask = coffee_case
    d = tmp_path_factory.mktemp("cli")
    original.save(d / "coffee.png")
    manipulated.save(d / "coffee_gravel.png")
    Image.fromarray((mask * 255).astype(np.uint8)).resize((300, 200)).save(d / "mask.png")  # any resolution
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_and_layers(capsys):
    code, out, _ = _run(capsys, "models", "--json")
    assert code == 0 and "efficientnet-lite0" in [r["name"] for r in json.loads(out)]
    code, out, _ = _run(capsys, "layers", "--model", "efficientnet-lite0", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["_blocks.15._project_conv"]["default"] and rows["_blocks.15._project_conv"]["editable"]
    assert not rows["_blocks.15._depthwise_conv"]["editable"]


def test_edit_then_predict_exact_forms(capsys, files, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RULEWRITER_CACHE", str(tmp_path / "cache"))
    out_edit = tmp_path / "EDIT.safetensors"
    code, out, err = _run(
        capsys, "edit", "--model", "efficientnet-lite0", "--original", files / "coffee.png",
        "--manipulated", files / "coffee_gravel.png", "--mask", files / "mask.png",
        "--stats-data", photo_dir, "--stats-samples", "60", "--out", out_edit, "--quiet",
    )
    assert code == 0, err
    assert "default layer _blocks.15._project_conv" in err  # says which layer it chose
    assert out_edit.is_file() and (tmp_path / "EDIT.safetensors.json").is_file()
    code, out, err = _run(capsys, "predict", "--model", "efficientnet-lite0", "--json", files / "coffee_gravel.png")
    before = json.loads(out)
    code, out, err = _run(capsys, "predict", "--model", "efficientnet-lite0", "--edit", out_edit, "--json",
                          files / "coffee_gravel.png", files / "coffee.png")
    after = json.loads(out)
    assert code == 0 and len(after) == 2
    assert set(after[0]) == {"path", "top5"} and len(after[0]["top5"]) == 5
    assert set(after[0]["top5"][0]) == {"index", "label", "prob"}
    assert before[0]["top5"][0]["label"] != "espresso"
    assert after[0]["top5"][0]["label"] == "espresso" and after[1]["top5"][0]["label"] == "espresso"


def test_stats_and_merge(capsys, photo_dir, tmp_path):
    a, b, m = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    code, out, err = _run(capsys, "stats", "--data", photo_dir, "--samples", "8", "--layer", "_blocks.15._project_conv",
                          "--no-cache", "--quiet", "--out", a, "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 8 * 49
    assert _run(capsys, "stats", "--data", photo_dir, "--samples", "4", "--no-cache", "--quiet", "--out", b)[0] == 0
    code, out, _ = _run(capsys, "merge-stats", "--out", m, a, b, "--json")
    assert code == 0 and json.loads(out)["count"] == 12 * 49


@pytest.mark.parametrize(
    "case, message",
    [
        ("layer", "no_such_layer"),
        ("depthwise", "depthwise"),
        ("empty_mask", "empty"),
        ("wrong_shape_mask", "aspect"),
        ("corrupt_image", "corrupt|cannot|not"),
        ("missing_mask", "mask"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(capsys, files, photo_dir, tmp_path, case, message):
    out_edit = tmp_path / "e.safetensors"
    args = {"--original": files / "coffee.png", "--manipulated": files / "coffee_gravel.png", "--mask": files / "mask.png"}
    layer = "_blocks.15._project_conv"
    if case == "layer":
        layer = "no_such_layer"
    elif case == "depthwise":
        layer = "_blocks.15._depthwise_conv"
    elif case == "empty_mask":
        Image.new("L", (60, 40)).save(tmp_path / "empty.png")
        args["--mask"] = tmp_path / "empty.png"
    elif case == "wrong_shape_mask":
        Image.new("L", (50, 50), 255).save(tmp_path / "square.png")
        args["--mask"] = tmp_path / "square.png"
    elif case == "corrupt_image":
        (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        args["--original"] = tmp_path / "bad.jpg"
    elif case == "missing_mask":
        args.pop("--mask")
    argv = ["edit", "--layer", layer, "--stats-data", photo_dir, "--stats-samples", "4", "--no-cache", "--quiet",
            "--out", out_edit]
    for k, v in args.items():
        argv += [k, v]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("rulewriter: error:") and __import__("re").search(message, err), err
    assert not out_edit.exists() and not list(tmp_path.glob("*.tmp"))


def test_predict_refuses_pickled_edit(capsys, files, tmp_path):
    import torch

    evil = tmp_path / "evil.safetensors"
    torch.save({"x": torch.ones(1)}, evil)
    code, _, err = _run(capsys, "predict", "--edit", evil, "--json", files / "coffee.png")
    assert code == 2 and "pickle" in err


def test_heatmap_writes_overlays(capsys, files, tmp_path):
    code, out, err = _run(capsys, "heatmap", "--concept-image", files / "coffee.png", "--concept-mask",
                          files / "mask.png", "--out-dir", tmp_path / "h", "--json", files / "coffee_gravel.png")
    assert code == 0, err
    rows = json.loads(out)
    img = Image.open(rows[0]["heatmap"])
    assert img.size == (224, 224)
