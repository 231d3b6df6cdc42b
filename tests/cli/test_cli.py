"""The command line: the acceptance forms work exactly as written; bad input exits 2 and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

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


def test_edit_prints_top3_and_knobs_and_saves_pasted_exemplars(capsys, files, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RULEWRITER_CACHE", str(tmp_path / "cache"))
    out_edit, saved = tmp_path / "E.safetensors", tmp_path / "pasted"
    argv = ["edit", "--model", "efficientnet-lite0", "--original", files / "coffee.png", "--mask", files / "mask.png",
            "--texture", files / "coffee_gravel.png", "--stats-data", photo_dir, "--stats-samples", "30",
            "--out", out_edit, "--quiet", "--save-exemplars", saved]
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    # Views are the default; the 50 photos the statistics leave out are the calibration images.
    assert "50 of the --stats-data images are calibration images" in err
    info = json.loads(out)
    assert info["strength"] > 0 and "left-out exemplar views" in info["why"]
    assert "of 50 calibration images" in info["why"]
    (ex,) = info["exemplars"]
    assert len(ex["before"]) == len(ex["after"]) == 3 and ex["before"] != ex["after"]
    (png,) = info["saved_exemplars"]
    with Image.open(png) as im, Image.open(files / "coffee.png") as orig:
        assert im.format == "PNG" and im.size == orig.size
    meta = json.loads((tmp_path / "E.safetensors.json").read_text())["meta"]
    assert meta["strength"]["chosen"] == info["strength"] and meta["strength"]["candidates"]
    # No --layer: the rule is written at each candidate layer and the one its own validation prefers is kept.
    layers = ["_blocks.15._project_conv", "_blocks.11._project_conv", "_conv_head"]
    assert "writing the rule at " + ", ".join(layers) in err
    choice = meta["layer_choice"]
    assert [r["layer"] for r in choice["layers"]] == layers and choice["chosen"] == info["layer"] == meta["layer"]
    assert info["layer_why"] == choice["reason"] and choice["reason"].startswith(f"layer {info['layer']}:")
    code, out, err = _run(capsys, *argv)  # the human-readable form says the same
    assert code == 0 and "chose:" in out and "before:" in out and "after:" in out
    assert f"chose: layer {info['layer']}:" in out
    code, out, err = _run(capsys, *argv, "--layer", "_conv_head", "--json")  # --layer names the one layer
    assert code == 0 and json.loads(out)["layer"] == "_conv_head" and "writing the rule at" not in err
    assert "layer_choice" not in json.loads((tmp_path / "E.safetensors.json").read_text())["meta"]
    # --save-exemplars needs --texture: a clear error, nothing written.
    bad = tmp_path / "bad.safetensors"
    code, out, err = _run(capsys, "edit", "--original", files / "coffee.png", "--mask", files / "mask.png",
                          "--manipulated", files / "coffee_gravel.png", "--stats-data", photo_dir,
                          "--out", bad, "--save-exemplars", tmp_path / "x", "--quiet")
    assert code == 2 and err.startswith("rulewriter: error:") and "--texture" in err
    assert not bad.exists() and not (tmp_path / "x").exists()


def test_edit_stage_spreads_the_rule_over_the_residual_stage_and_refuses_what_it_cannot_honour(
        capsys, files, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RULEWRITER_CACHE", str(tmp_path / "cache"))
    out_edit = tmp_path / "S.safetensors"
    base = ["edit", "--model", "efficientnet-lite0", "--original", files / "coffee.png", "--mask", files / "mask.png",
            "--texture", files / "coffee_gravel.png", "--stats-data", photo_dir, "--stats-samples", "30", "--quiet",
            "--stage"]
    code, out, err = _run(capsys, *base, "--out", out_edit, "--json")
    assert code == 0, err
    convs = [f"_blocks.{i}._project_conv" for i in (11, 12, 13, 14, 15)]
    assert "spreading the rule over " + ", ".join(convs) in err and "writing the rule at" not in err
    info = json.loads(out)
    assert info["layer"] == "stage _blocks.11._project_conv … _blocks.15._project_conv" and info["rank"] >= 5
    assert info["context"] == "stage" and "of 50 calibration images" in info["why"] and info["pairs"] > 0
    from rulewriter.core.edit import Edit

    edit = Edit.load(out_edit)
    assert [u.layer for u in edit.updates] == convs and edit.meta["strength"]["chosen"] == info["strength"]
    (ex,) = info["exemplars"]
    assert ex["before"] != ex["after"]
    # What --stage cannot honour, and a layer that reads no residual stage: one error line, nothing written.
    for extra, words in ((["--rank", "2"], "--rank"), (["--views", "0"], "--views 0"),
                         (["--layer", "_conv_head"], "reads a residual stage")):
        bad = tmp_path / "bad.safetensors"
        code, out, err = _run(capsys, *base, *extra, "--out", bad)
        assert code == 2 and err.startswith("rulewriter: error:") and words in err, err
        assert len(err.strip().splitlines()) <= 2 and not bad.exists() and not Path(str(bad) + ".json").exists()


def test_edit_without_calibration_images_is_the_closed_form_and_says_so(capsys, files, photo_dir, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("RULEWRITER_CACHE", str(tmp_path / "cache"))
    base = ["edit", "--model", "efficientnet-lite0", "--original", files / "coffee.png", "--mask", files / "mask.png",
            "--manipulated", files / "coffee_gravel.png", "--quiet", "--json"]
    out_edit = tmp_path / "E.safetensors"
    # 80 photos: a tenth is too few calibration images, so the edit is not validated.
    code, out, err = _run(capsys, *base, "--stats-data", photo_dir, "--out", out_edit)
    assert code == 0, err
    assert "the closed form, not validated" in err
    assert json.loads(out)["strength"] == 1.0
    # Calibration images that are also statistics images are refused: nothing written.
    bad = tmp_path / "bad.safetensors"
    code, out, err = _run(capsys, *base, "--stats-data", photo_dir, "--calibration-data", photo_dir, "--out", bad)
    assert code == 2 and err.startswith("rulewriter: error:") and "calibration images must not" in err
    assert not bad.exists() and not Path(str(bad) + ".json").exists()


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


# ------------------------------------------------------------------------------------------ help and `models`
def _subcommands() -> dict:
    import argparse

    from rulewriter.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"parser": parser, **sub.choices}


@pytest.mark.parametrize("name", [n for n in _subcommands() if n != "parser"])
def test_every_command_has_a_description_a_runnable_example_and_shows_defaults(name):
    import argparse
    import shlex

    cmds = _subcommands()
    p = cmds[name]
    assert p.description and len(p.description) > 10
    assert (p.epilog or "").startswith("example:\n  rulewriter "), p.epilog
    example = shlex.split(p.epilog.split("\n", 1)[1])
    assert example[:2] == ["rulewriter", name]
    cmds["parser"].parse_args(example[1:])  # every option in the example exists and the required ones are given
    assert "example:" in p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest}: no help text"
        fmt = p.formatter_class(prog=p.prog)
        fmt.add_argument(action)
        shown = "".join(fmt.format_help().split())  # wrapping may break a line inside the default
        if action.option_strings and action.default not in (None, False, []):
            assert "".join(f"(default: {action.default})".split()) in shown, shown
            assert shown.count("(default") == 1, f"{name}: the default is written twice: {shown}"


def test_models_labels_its_columns_and_says_where_weights_are(capsys, tmp_path, monkeypatch):
    import torch

    from rulewriter.models.registry import list_models, weights_available

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    has_tv = "resnet18" in list_models()
    if has_tv:  # a published file in the (redirected) hub cache is found; another model's is not
        fake = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        fake.parent.mkdir(parents=True)
        fake.write_bytes(b"")
    code, out, _ = _run(capsys, "models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["MODEL", "DEFAULT", "LAYER", "WEIGHTS", "HERE"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln and not ln.startswith("missing:")}
    lite = rows["efficientnet-lite0"]
    assert lite[1] == "_blocks.15._project_conv" and lite[2] == weights_available("efficientnet-lite0")
    assert Path(lite[2]).is_file()
    code, out, _ = _run(capsys, "models", "--json")
    js = {r["name"]: r for r in json.loads(out)}
    assert set(js) == set(rows) and all(set(r) == {"name", "default_layer", "weights"} for r in js.values())
    assert js["efficientnet-lite0"]["weights"] == lite[2]
    if has_tv:
        assert rows["resnet18"][1:] == ["layer4.1.conv2", str(fake)] and js["resnet18"]["weights"] == str(fake)
        assert rows["resnet50"][2] == "missing" and js["resnet50"]["weights"] is None
        assert lines[-1].startswith("missing: pass --weights FILE")
