"""probe() and mitigate(): on a hand-built colour classifier whose spurious rule is known, and on EfficientNet-Lite0."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.errors import EditError, RulewriterError
from rulewriter.studies.evaluate import predict
from rulewriter.studies.testsets import TestSet
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.core.rules import layer_io
from rulewriter.core.memory import LayerMemory
from rulewriter.studies.spurious import FilteredSet, FixedSplit, mitigate, probe
from rulewriter.core.stats import SecondMoment
from rulewriter.studies.stylize import TexturePaste

RED, GREEN, BLUE, GRAY = (230, 20, 20), (20, 230, 20), (20, 20, 230), (128, 128, 128)


class ColourNet(nn.Module):
    """Classifies by the dominant saturated colour: logits = 10 · mean(relu(±rgb)) of red, green, blue.

    conv1 (1×1) splits the normalised colour into positive and negative parts, conv2 (1×1, identity) is
    the layer that is rewritten, the head reads the positive parts. Gray (0 after normalising) is silent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            w = torch.zeros(8, 3)
            w[:3] = torch.eye(3)
            w[3:6] = -torch.eye(3)
            self.conv1.weight.copy_(w[:, :, None, None])
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(torch.eye(8)[:, :, None, None])
            self.conv2.bias.zero_()
            f = torch.zeros(3, 8)
            f[:, :3] = 10 * torch.eye(3)
            self.fc.weight.copy_(f)
            self.fc.bias.zero_()

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def clf():
    return load_classifier(ColourNet(), labels=["red", "green", "blue"], default_layer="conv2",
                           preprocess=Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3))


class MaskFolder:
    """A segmenter reading ``<stem>.png`` masks from a folder, zeros when absent (like ``masks:DIR``)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.name = Path(folder), f"masks:{folder}"

    def __call__(self, image, source=None):
        p = self.folder / f"{Path(source).stem}.png"
        if not p.is_file():
            return np.zeros((image.size[1], image.size[0]), np.float32)
        return np.asarray(Image.open(p).convert("L"), np.float32) / 255


def _scene(colour, box=(4, 4, 20, 20), size=24):
    a = np.full((size, size, 3), GRAY, np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = colour
    return Image.fromarray(a)


@pytest.fixture()
def scenes(tmp_path):
    """12 photos: 6 red objects (class 0), 4 green (class 1), 2 blue (class 2); masks in a folder.

    Red masks cover the object: painted blue, it reads as blue. Two green masks cover the object, two
    only a quarter of it (still green). One blue photo has no mask (skipped by the probe).
    """
    img_dir, mask_dir = tmp_path / "photos", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    pairs = []
    specs = [(RED, 0, "full")] * 6 + [(GREEN, 1, "full")] * 2 + [(GREEN, 1, "quarter")] * 2 \
        + [(BLUE, 2, "full"), (BLUE, 2, None)]
    for i, (colour, label, cover) in enumerate(specs):
        box = (4 + i % 3, 4, 20, 20 - i % 2)
        p = img_dir / f"img{i:02d}.png"
        _scene(colour, box).save(p)
        if cover:
            m = np.zeros((24, 24), np.uint8)
            x0, y0, x1, y1 = box
            if cover == "quarter":
                x1, y1 = x0 + (x1 - x0) // 2, y0 + (y1 - y0) // 2
            m[y0:y1, x0:x1] = 255
            Image.fromarray(m).save(mask_dir / f"img{i:02d}.png")
        pairs.append((p, label))
    return pairs, MaskFolder(mask_dir)


def _blue():
    return Image.new("RGB", (8, 8), BLUE)


def _stats(clf, pairs):
    s = SecondMoment()
    mem = LayerMemory(clf.model.conv2, 2)
    imgs = [Image.open(p).convert("RGB") for p, _ in pairs] + [_blue(), _scene(BLUE)]
    x, _ = layer_io(clf, "conv2", clf.preprocess.batch(imgs))
    s.add(mem.flat_keys(x))
    return s


def test_probe_ranks_the_classes_the_stylization_hurts(clf, scenes, tmp_path):
    pairs, seg = scenes
    res = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False)
    assert res.meta["n_images"] == 12 and res.meta["n_probed"] == 11 and res.meta["n_without_concept"] == 1
    red, green, blue = res.classes
    assert (red.label, green.label, blue.label) == (0, 1, 2)
    assert (red.error_before, red.error_after, red.flipped) == (0.0, 1.0, 6)
    assert red.confusions[0][:2] == (2, "blue") and red.confusions[0][2] == 6
    assert (green.n, green.error_change, green.flipped) == (4, 0.5, 2)
    assert blue.error_change == 0 and blue.changed_after == 0
    assert red.top1_prob_before > 0.9 and red.true_prob_after < 0.1
    # The stylized copies differ from their originals only inside the masks.
    for o, s, m, it in zip(res.originals, res.stylized, res.masks, res.items):
        a, b = np.asarray(o), np.asarray(s)
        assert np.array_equal(a[m == 0], b[m == 0])
        assert np.array_equal(a, b) == (it["label"] == 2)  # blue painted blue stays the same
    d = json.loads(json.dumps(res.to_dict()))
    assert d["classes"][0]["error_change"] == 1.0 and len(d["items"]) == 11
    paths = res.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["meta"]["n_probed"] == 11
    assert Image.open(paths["figure"]).size[0] > 200
    assert "Classes ranked by error increase" in paths["html"].read_text()


def test_probe_skips_small_concepts_and_refuses_when_none(clf, scenes):
    pairs, seg = scenes
    res = probe(clf, pairs, seg, TexturePaste(_blue()), min_area=0.3, progress=False)
    assert res.meta["n_probed"] == 9  # the two quarter masks (~11% of the image) are skipped
    with pytest.raises(RulewriterError, match="none of"):
        probe(clf, pairs, seg, TexturePaste(_blue()), min_area=0.9, progress=False)
    with pytest.raises(RulewriterError, match="class index"):
        probe(clf, [(pairs[0][0], {0, 1})], seg, TexturePaste(_blue()), progress=False)


def test_filtered_set_selects_saves_loads_and_splits(clf, scenes, tmp_path):
    pairs, seg = scenes
    res = probe(clf, TestSet("s", [p for p, _ in pairs], [y for _, y in pairs]), seg,
                TexturePaste(_blue(), shading_strength=0), progress=False)
    fs = res.filtered_set(k=5)
    assert fs.classes == [0, 1] and len(fs) == 10 and sorted(set(fs.labels)) == [0, 1]
    assert len(res.filtered_set(threshold=0.75)) == 6
    fs.save(tmp_path / "f")
    back = FilteredSet.load(tmp_path / "f")
    assert back.labels == fs.labels and back.sources == fs.sources and back.classes == fs.classes
    for a, b in zip(fs.stylized + fs.originals, back.stylized + back.originals):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(np.array_equal(a, b) for a, b in zip(fs.masks, back.masks))
    train, test = back.split(3, seed=1)
    assert len(train) == 3 and len(test) == 7 and not set(train.sources) & set(test.sources)
    assert train.sources == back.split(3, seed=1)[0].sources
    with pytest.raises(EditError, match="no test"):
        back.split(10)
    only = back.split(2, eligible=[4, 7])[0]
    assert only.sources == [back.sources[4], back.sources[7]]
    with pytest.raises(EditError, match="exemplars"):
        back.split(3, eligible=[4, 7])
    with pytest.raises(RulewriterError, match="no filtered set"):
        FilteredSet.load(tmp_path / "nothing")


def test_mitigate_rewrites_fix_the_stylized_target_and_leave_the_model(clf, scenes):
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=1)
    assert fs.classes == [0] and len(fs) == 6
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    res = mitigate(clf, fs, 2, _stats(clf, pairs), texture=_blue(), finetune_steps=60, finetune_lr=0.05,
                   accuracy_set=pairs, progress=False)
    for k, v in clf.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert list(res.rows) == ["no edit", "features", "images", "finetune", "last-layer"]
    assert set(res.groups()) == {"target", "all"}
    none = res.rows["no edit"]["target"]
    assert none["n"] == 4 and none["accuracy_gt"] == 0.0 and none["accuracy_original"] == 1.0
    for m in ("features", "images"):
        t = res.rows[m]["target"]
        assert t["accuracy_gt"] == 1.0 and t["corrected_gt"]["fraction"] == 1.0, m
        assert t["accuracy_pred"] == 1.0 and t["accuracy_original"] == 1.0, m
    # The rule blue → red also turns the genuinely blue photos red: the collateral damage of Table 2.3.
    overall_none = float(predict(clf, [p for p, _ in pairs], [y for _, y in pairs], progress=False)["before"]
                         .correct([y for _, y in pairs]).mean())
    assert res.overall["no edit"] == pytest.approx(overall_none)
    assert res.overall["images"] < res.overall["no edit"]
    assert res.rows["last-layer"]["target"]["accuracy_gt"] > 0
    md = res.to_markdown()
    assert "rewriting using images" in md and md.count("| pre (no edit) |") == 2
    assert json.loads(json.dumps(res.to_dict()))["meta"]["n_test"] == 4


def test_mitigate_groups_target_and_other_and_checks_inputs(clf, scenes, tmp_path):
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=2)
    res = mitigate(clf, fs, 3, _stats(clf, pairs), methods=["images", "last-layer"], progress=False)
    assert res.groups() == ["target", "other", "all"]
    r = res.rows["no edit"]
    assert r["target"]["n"] + r["other"]["n"] == r["all"]["n"] == 7
    # errors corrected w.r.t. the pre-edit prediction: the unedited model's top-1 on the original is the reference
    for m in ("images", "last-layer"):
        c = res.rows[m]["all"]["corrected_pred"]
        assert c["n_errors_before"] == 7 - round(7 * r["all"]["accuracy_pred"])
    paths = res.save(tmp_path / "mit")
    assert (tmp_path / "mit" / "changes" / "images.safetensors").is_file()
    assert "Other classes" in paths["markdown"].read_text()
    with pytest.raises(EditError, match="stats"):
        mitigate(clf, fs, 3, None, methods=["images"], progress=False)
    with pytest.raises(RulewriterError, match="unknown methods"):
        mitigate(clf, fs, 3, None, methods=["magic"], progress=False)
    with pytest.raises(EditError, match="texture"):
        mitigate(clf, fs, 3, _stats(clf, pairs), methods=["features"], progress=False)


def test_probe_min_area_is_measured_on_the_models_centre_crop(scenes):
    """A concept outside the centre crop counts for nothing; one inside counts at its share of the crop."""
    pairs, seg = scenes
    # 24×24 photos, the model sees the central 12×12 (pixels 6..17).
    cropped = load_classifier(ColourNet(), labels=["red", "green", "blue"], default_layer="conv2",
                              preprocess=Preprocess(12, 24, (0.5,) * 3, (0.5,) * 3))
    masks = {"corner": np.zeros((24, 24), np.float32), "centre": np.zeros((24, 24), np.float32)}
    masks["corner"][0:6, 0:12] = 1    # 12.5 % of the photo, none of the crop
    masks["centre"][8:12, 8:12] = 1   # 2.8 % of the photo, 11 % of the crop

    def seg2(image, source=None):
        return masks["corner" if Path(source).stem == "img00" else "centre"]

    seg2.name = "two masks"
    res = probe(cropped, pairs[:2], seg2, TexturePaste(_blue()), min_area=0.05, progress=False)
    assert [Path(it["source"]).stem for it in res.items] == ["img01"]
    assert res.items[0]["area"] == pytest.approx(16 / 144, abs=0.01)


def test_fixed_split_keeps_exemplars_and_test_apart(clf, scenes, tmp_path):
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=5)
    fixed = FixedSplit(fs.originals, fs.stylized, fs.masks, fs.labels, fs.sources, fs.classes, {"n_pool": 4})
    for seed in (0, 1, 7):  # the seed does not move the split
        train, test = fixed.split(3, seed=seed)
        assert train.sources == fs.sources[:3] and test.sources == fs.sources[4:]
    # eligible restricts the pool, in order; pool item 3, unused, is in neither split.
    train, test = fixed.split(2, eligible=[1, 3, 5])
    assert train.sources == [fs.sources[1], fs.sources[3]] and test.sources == fs.sources[4:]
    with pytest.raises(EditError, match="only 2 exemplar candidates"):
        fixed.split(3, eligible=[0, 2, 8])          # 8 is a test image: never an exemplar
    fixed.save(tmp_path / "fixed")
    back = FixedSplit.load(tmp_path / "fixed")
    assert back.n_pool == 4 and back.split(1)[1].sources == fs.sources[4:]
    with pytest.raises(RulewriterError, match="n_pool"):
        FixedSplit(fs.originals, fs.stylized, fs.masks, fs.labels, fs.sources, fs.classes, {})
    with pytest.raises(EditError, match="no test"):
        FixedSplit(fs.originals, fs.stylized, fs.masks, fs.labels, fs.sources, fs.classes,
                   {"n_pool": len(fs)}).split(1)
    # mitigate honours the fixed split: its exemplars are the pool's first ones and it tests on the rest.
    res = mitigate(clf, fixed, 2, _stats(clf, pairs), methods=["images"], progress=False)
    assert res.meta["exemplars"] == fs.sources[:2] and res.meta["n_test"] == len(fs) - 4


def test_mitigation_errors_corrected_counts_wrong_before_and_right_after(clf, scenes):
    """The numerator of errors corrected, recounted by hand from each change's own predictions."""
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=2)
    res = mitigate(clf, fs, 3, _stats(clf, pairs), methods=["images", "last-layer"], progress=False)
    _, test = fs.split(3, 0, eligible=[i for i in range(len(fs))
                                       if float(clf.preprocess.mask(fs.mask(i)).max()) > 0])
    y = np.asarray(test.labels)
    pre = predict(clf, list(test.originals) + list(test.stylized), list(y) * 2, progress=False)["before"].top1
    ref, base = pre[:len(y)], pre[len(y):]
    assert res.rows["no edit"]["all"]["n"] == len(y)
    for m in ("images", "last-layer"):
        with res.changes[m].applied(clf.model):
            post = predict(clf, list(test.stylized), list(y), progress=False)["before"].top1
        gt, pred = res.rows[m]["all"]["corrected_gt"], res.rows[m]["all"]["corrected_pred"]
        assert gt["corrected"] == int(((base != y) & (post == y)).sum()), m
        assert gt["n_errors_before"] == int((base != y).sum()), m
        assert pred["corrected"] == int(((base != ref) & (post == ref)).sum()), m
        assert pred["n_errors_before"] == int((base != ref).sum()), m
        if gt["n_errors_before"]:
            assert gt["fraction"] == gt["corrected"] / gt["n_errors_before"]
    assert res.rows["images"]["all"]["corrected_gt"]["corrected"] > 0   # the count is not trivially zero


def test_mitigate_baselines_use_the_fair_lr_rule_unless_given(clf, scenes):
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=1)
    res = mitigate(clf, fs, 2, None, methods=["finetune", "last-layer"], finetune_steps=60, progress=False)
    for m in ("finetune", "last-layer"):
        meta = res.meta["change_meta"][m]
        assert "smallest of" in meta["lr_rule"], m
        tried = meta["lr_tried"]
        fitted = [float(k) for k, v in tried.items() if v["fitted"]]
        assert meta["lr"] == (min(fitted) if fitted else max(float(k) for k in tried)), m
        assert all(not v["fitted"] for k, v in tried.items() if float(k) < meta["lr"]), m
    res = mitigate(clf, fs, 2, None, methods=["finetune", "last-layer"], finetune_steps=5, finetune_lr=0.05,
                   retrain_lr=0.002, progress=False)
    assert res.meta["change_meta"]["finetune"]["lr"] == 0.05 and res.meta["change_meta"]["last-layer"]["lr"] == 0.002
    assert "lr_rule" not in res.meta["change_meta"]["finetune"]


def test_mitigate_with_calibration_images_validates_the_images_rewrite(clf, scenes):
    """With calibration images, the images rewrite is what `rulewriter edit` builds by default: a rule with
    joint views, its strength chosen under the locality budget; the choice is reported."""
    from rulewriter.core.generalise import DEFAULT_VIEWS, LocalityBudget, calibration_set

    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=1)
    stats = _stats(clf, pairs)
    closed = mitigate(clf, fs, 2, stats, methods=["images"], progress=False)
    assert closed.meta["n_calibration"] is None
    assert "no exemplar views" in closed.meta["change_meta"]["images"]["strength"]["reason"]
    cal = calibration_set(clf, clf.default_layer, [p for p, _ in pairs])
    res = mitigate(clf, fs, 2, stats, methods=["images"], calibration=cal, progress=False)
    meta = res.meta["change_meta"]["images"]
    assert res.meta["n_calibration"] == len(pairs)
    assert meta["rules"][0]["views"] == DEFAULT_VIEWS and not closed.meta["change_meta"]["images"]["rules"][0].get("views")
    st = meta["strength"]
    assert "no exemplar views" not in st["reason"] and st["folds"] == 2 and st["budget"]["changed"] == 0.005
    # The chosen strength's collateral, recounted on the calibration images, is inside the budget (or it is
    # the closed form, the fallback).
    recount = cal.changed(clf.model, res.changes["images"])
    assert LocalityBudget().admits(recount) or st["chosen"] == 1.0
    assert any(c.startswith("rewriting using images: strength") for c in res.choices())
    assert "strength" in res.to_markdown()


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def cli_env(clf, scenes, monkeypatch, tmp_path):
    """The CLI with the colour model, and masks:DIR specs naming the scenes' mask folder."""
    import rulewriter.cli as cli
    import rulewriter.cli.common as common

    pairs, seg = scenes
    data = tmp_path / "data"
    for p, y in pairs:  # class-name subfolders, as labelled_images reads them
        (data / clf.labels[y]).mkdir(parents=True, exist_ok=True)
        Image.open(p).save(data / clf.labels[y] / p.name)
    # The real masks:DIR segmenter: one blue photo has no mask file, which a probe reads as "absent".
    # Import every command module first: one imported while the patch is on would keep the colour model for good.
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(cli.__path__):
        importlib.import_module(f"rulewriter.cli.{m.name}")
    monkeypatch.setattr(common, "load_model", lambda args: clf)
    tex = tmp_path / "blue.png"
    _blue().save(tex)
    return cli, data, seg.folder, tex


def test_cli_probe_then_mitigate(cli_env, tmp_path, capsys):
    cli, data, masks, tex = cli_env
    out = tmp_path / "probe"
    rc = cli.main(["probe", "--data", str(data), "--segmenter", f"masks:{masks}", "--stylize", f"paste:{tex}",
                   "--top", "2", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_probed"] == 11 and summary["classes"][0]["class"] == "red"
    assert summary["filtered"]["n"] == 10 and (out / "filtered" / "manifest.json").is_file()
    assert json.loads((out / "probe.json").read_text())["meta"]["n_without_mask_file"] == 1
    mit = tmp_path / "mit"
    rc = cli.main(["mitigate", "--probe", str(out), "--exemplars", "3", "--stats-data", str(data),
                   "--cache-dir", str(tmp_path / "cache"), "--methods", "features,images,last-layer",
                   "--accuracy-data", str(data), "--out", str(mit), "--json", "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)
    assert d["meta"]["texture"] == str(tex) and set(d["rows"]) == {"no edit", "features", "images", "last-layer"}
    assert d["overall"]["no edit"] is not None
    assert (mit / "mitigation.md").is_file() and (mit / "index.html").is_file()
    # Twelve photos are too few to set calibration images aside: the images rewrite is the closed form, said.
    assert d["meta"]["n_calibration"] is None
    assert "the closed form, not validated: too few --stats-data images" in captured.err
    # The baselines' learning rates: the fair rule by default, or as given.
    assert "smallest of" in d["meta"]["change_meta"]["last-layer"]["lr_rule"]
    # With --calibration-data (other photos than the statistics'), the images rewrite is validated.
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, p in enumerate(sorted(data.rglob("*.png"))[:6]):
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(cal / f"c{i}.png")
    rc = cli.main(["mitigate", "--probe", str(out), "--exemplars", "3", "--stats-data", str(data),
                   "--calibration-data", str(cal), "--cache-dir", str(tmp_path / "cache"), "--methods", "images",
                   "--out", str(tmp_path / "mit-cal"), "--json", "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)
    assert d["meta"]["n_calibration"] == 6 and "closed form" not in captured.err
    assert "left-out exemplar views" in d["meta"]["change_meta"]["images"]["strength"]["reason"]
    assert "rewriting using images: strength" in (tmp_path / "mit-cal" / "mitigation.md").read_text()
    rc = cli.main(["mitigate", "--probe", str(out), "--stats-data", str(data), "--calibration-data", str(data),
                   "--methods", "images", "--out", str(tmp_path / "never"), "--quiet"])
    assert rc == 2 and "calibration images must not be statistics images" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    rc = cli.main(["mitigate", "--probe", str(out), "--exemplars", "3", "--methods", "finetune,last-layer",
                   "--finetune-lr", "0.03", "--retrain-lr", "0.004", "--finetune-steps", "3",
                   "--out", str(tmp_path / "mit2"), "--json", "--quiet"])
    assert rc == 0
    meta = json.loads(capsys.readouterr().out)["meta"]["change_meta"]
    assert meta["finetune"]["lr"] == 0.03 and meta["last-layer"]["lr"] == 0.004


def test_cli_bad_input_exits_2_and_writes_nothing(cli_env, tmp_path, capsys):
    cli, data, masks, tex = cli_env
    out = tmp_path / "never"
    for argv in (["probe", "--data", str(data), "--segmenter", f"masks:{masks}", "--stylize", "blur:x", "--out", str(out)],
                 ["probe", "--data", str(data), "--segmenter", "deeplab:bus", "--stylize", f"paste:{tex}", "--out", str(out)],
                 ["probe", "--data", str(tmp_path / "nope"), "--segmenter", f"masks:{masks}", "--stylize", f"paste:{tex}",
                  "--out", str(out)],
                 ["probe", "--data", str(data), "--segmenter", f"masks:{masks}", "--stylize", f"paste:{tex}",
                  "--min-area", "0.99", "--out", str(out)],
                 ["mitigate", "--probe", str(tmp_path), "--stats-data", str(data), "--out", str(out)],
                 ["mitigate", "--probe", str(tmp_path), "--out", str(out)],
                 ["mitigate", "--probe", str(tmp_path), "--methods", "finetune", "--finetune-lr", "-1",
                  "--out", str(out)],
                 ["mitigate", "--probe", str(tmp_path), "--methods", "last-layer", "--retrain-lr", "nan",
                  "--out", str(out)]):
        assert cli.main(argv) == 2, argv
        assert "rulewriter: error:" in capsys.readouterr().err
        assert not out.exists()


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_probe_and_mitigate_on_efficientnet_lite0(lite0, photo_dir, tmp_path):
    """Gravel pasted into the middle of real photos: the probe runs end to end, and so do the mitigations."""
    skdata = pytest.importorskip("skimage.data")
    torch.set_num_threads(2)
    photos = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    paths = []
    for i, a in enumerate(photos):
        for j, f in enumerate((1.0, 0.8)):
            h, w = a.shape[:2]
            s = int(min(h, w) * f)
            p = tmp_path / f"p{i}{j}.png"
            Image.fromarray(a[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]).resize((256, 256)).save(p)
            paths.append(p)
    labels = [r[0][0] for r in lite0.predict([Image.open(p).convert("RGB") for p in paths], topk=1)]

    class Centre:
        name = "centre box"

        def __call__(self, image, source=None):
            m = np.zeros((image.size[1], image.size[0]), np.float32)
            m[64:192, 64:192] = 1
            return m

    res = probe(lite0, list(zip(paths, labels)), Centre(), TexturePaste("skimage:gravel"), progress=False)
    assert res.meta["n_probed"] == 8 and res.meta["error_before"] == 0.0
    assert res.meta["error_after"] > 0  # a quarter of each photo turned to gravel changes some top-1
    assert res.classes[0].error_change == max(r.error_change for r in res.classes)
    res.save(tmp_path / "out")
    rows = res.affected()
    fs = res.filtered_set(k=len(rows))
    if len(fs) < 3:
        pytest.skip(f"only {len(fs)} affected images; too few to split")
    from rulewriter.core.stats import collect_second_moment

    stats = collect_second_moment(lite0, lite0.default_layer, photo_dir, progress=False)
    before = {k: v.clone() for k, v in lite0.model.state_dict().items()}
    mit = mitigate(lite0, fs, 2, stats, methods=["features", "images", "last-layer"], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in lite0.model.state_dict().items())
    assert mit.rows["no edit"]["all"]["n"] == len(fs) - 2
    assert "rewriting using features" in mit.to_markdown()


def test_mitigate_warns_when_the_test_split_is_too_small_to_compare_methods(clf, scenes):
    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=1)
    with pytest.warns(UserWarning, match=r"test split has 1 image\(s\): each one moves an accuracy by 100 points"):
        res = mitigate(clf, fs, len(fs) - 1, _stats(clf, pairs), methods=["images"], progress=False)
    assert res.rows["no edit"]["all"]["n"] == 1


def test_mitigate_with_statistics_of_several_layers_chooses_the_images_rewrites_layer(clf, scenes):
    """A {layer: stats} mapping with calibration images: the images rewrite is written at each layer (the
    named one first) and the layer its own validation prefers is kept, as `rulewriter edit` does."""
    from rulewriter.core.generalise import choose_layer
    from rulewriter.errors import EditError

    pairs, seg = scenes
    fs = probe(clf, pairs, seg, TexturePaste(_blue(), shading_strength=0), progress=False).filtered_set(k=1)
    imgs = [Image.open(p).convert("RGB") for p, _ in pairs] + [_blue(), _scene(BLUE)]
    stats = {}
    for layer in ("conv2", "conv1"):
        x, _ = layer_io(clf, layer, clf.preprocess.batch(imgs))
        stats[layer] = SecondMoment()
        stats[layer].add(LayerMemory(getattr(clf.model, layer), 2).flat_keys(x))
    cal = [p for p, _ in pairs]
    res = mitigate(clf, fs, 2, stats, methods=["images"], calibration=cal, progress=False)
    meta = res.meta["change_meta"]["images"]
    choice = meta["layer_choice"]
    assert [r["layer"] for r in choice["layers"]] == ["conv2", "conv1"]
    assert meta["layer"] == choice["chosen"] == res.changes["images"].updates[0].layer
    single = [mitigate(clf, fs, 2, stats[layer], layer=layer, methods=["images"], calibration=cal,
                       progress=False).meta["change_meta"]["images"]["strength"] for layer in ("conv2", "conv1")]
    assert choose_layer(["conv2", "conv1"], single) == choice  # the same as choosing from the single runs
    with pytest.raises(EditError, match="not conv9"):
        mitigate(clf, fs, 2, stats, layer="conv9", methods=["images"], calibration=cal, progress=False)
