"""The evaluation harness: exact metrics on hand-made predictions, test sets, streaming, report, and the CLI."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.cli import main
from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.studies.evaluate import Evaluation, evaluate_edit, load_change, predict
from rulewriter.studies.evaluation_report import write_report
from rulewriter.studies.metrics import (
    Predictions,
    accuracy,
    as_label_sets,
    class_shifts,
    errors_corrected,
    four_tests,
    roc,
    summarize,
    target_set,
)
from rulewriter.studies.testsets import (
    MatchedPaste,
    TestSet,
    concept_heatmaps,
    concept_scores,
    confusing_set,
    heat_to_mask,
    match_threshold,
    select_top,
)
from rulewriter.studies.finetune import WeightDelta
from rulewriter.models.registry import Preprocess, load_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def _p(rows, labels, target=None) -> Predictions:
    return Predictions.from_logits(torch.tensor(rows, dtype=torch.float64), labels, target)


# ------------------------------------------------------------------------------------------ metrics
def test_predictions_keep_topk_and_probability_masses():
    p = _p([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]], [0, {1, 2}, -1], target={2, 3})
    e = [math.exp(v) for v in (3.0, 1.0, 0.0, 0.0)]
    assert p.top1.tolist() == [0, 1, 3] and p.topk.shape == (3, 4)  # k is capped at the 4 classes
    assert p.label_prob[0] == pytest.approx(e[0] / sum(e))
    assert p.label_prob[1] == pytest.approx(2 * math.exp(2) / (2 * math.exp(2) + 2))  # a set: summed
    assert p.label_prob[2] == 0.0  # noise: nothing is right
    assert p.target_prob[0] == pytest.approx(2 / sum(e))
    assert p.correct([0, {1, 2}, -1]).tolist() == [True, True, False]
    assert as_label_sets([3, {5, 4}, -1]) == [frozenset({3}), frozenset({4, 5}), frozenset()]
    assert target_set(7) == frozenset({7}) and target_set([1, 2]) == frozenset({1, 2}) and not target_set(None)


def test_accuracy_and_summary_by_hand():
    p = _p([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [1, 0, 9, 2, 3, 4, 5]], [6, 6, {2, 3}])
    assert accuracy(p, [6, 6, {2, 3}]) == pytest.approx(2 / 3)
    s = summarize(p, [6, 6, {2, 3}])
    assert s["n_images"] == 3 and s["top1"] == pytest.approx(2 / 3) and s["top5"] == pytest.approx(2 / 3)
    # top-5 are {6, 5, 4, 3, 2}, {0, 1, 2, 3, 4}, {2, 6, 5, 4, 3}: classes 2 and 5 are in, 6 is not
    assert summarize(p, [2, 6, 5])["top5"] == pytest.approx(2 / 3) and summarize(p, [2, 6, 5])["top1"] == 0.0


def test_errors_corrected_counts():
    before = np.array([0, 0, 0, 1, 1, 0], bool)
    after = np.array([1, 1, 0, 1, 0, 0], bool)
    e = errors_corrected(before, after)
    assert (e["n_errors_before"], e["corrected"], e["n_right_before"], e["introduced"]) == (4, 2, 2, 1)
    assert e["fraction"] == 0.5 and e["introduced_fraction"] == 0.5
    assert errors_corrected(np.ones(2, bool), np.ones(2, bool))["fraction"] is None


def test_four_tests_by_hand():
    labels, target = [0, 0, 1, 2], 0
    big = 50.0  # probabilities of 1 and 0 to float precision
    normal_b = _p([[big, 0, 0], [0, big, 0], [0, big, 0], [big, 0, 0]], labels, target)
    normal_a = _p([[big, 0, 0], [big, 0, 0], [0, big, 0], [0, 0, 0]], labels, target)
    man_b = _p([[0, big, 0], [0, big, 0], [big, 0, 0], [big, 0, 0]], labels, target)
    man_a = _p([[big, 0, 0], [0, big, 0], [0, big, 0], [0, 0, big]], labels, target)
    t = four_tests(labels, target, (normal_b, normal_a), (man_b, man_a))
    assert set(t) == {"normal_same", "normal_other", "manipulated_same", "manipulated_other"}
    ns, no, ms, mo = (t[k] for k in ("normal_same", "normal_other", "manipulated_same", "manipulated_other"))
    assert (ns.n, ns.accuracy_pre, ns.accuracy_post) == (2, 0.5, 1.0)
    assert (no.n, no.accuracy_pre, no.accuracy_post) == (2, 0.5, 0.5)
    assert (ms.accuracy_pre, ms.accuracy_post, mo.accuracy_pre, mo.accuracy_post) == (0.0, 0.5, 0.0, 1.0)
    assert ns.confidence_pre == pytest.approx(0.5) and ns.confidence_post == pytest.approx(1.0)
    assert no.confidence_post == pytest.approx((1 + 1 / 3) / 2)  # image 3 after: uniform over 3 classes
    with pytest.raises(Exception, match="target"):
        four_tests(labels, None, (normal_b, normal_a))


def test_roc_matches_scikit_learn_and_handles_one_class():
    metrics = pytest.importorskip("sklearn.metrics")
    r = roc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    assert r.auc == pytest.approx(0.75)  # scikit-learn's documented example, by hand: 3 of 4 pairs ordered
    fpr, tpr, _ = metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(r.fpr, fpr)
    np.testing.assert_allclose(r.tpr, tpr)
    assert (r.n_positive, r.n_negative) == (2, 2)
    assert roc(np.array([0.9, 0.2, 0.6]), np.array([True, False, False])).auc == 1.0
    assert roc(np.array([0.3, 0.4]), np.array([True, True])) is None
    assert json.dumps(r.to_dict())  # inf thresholds become null
    # The figure says what its curves rest on: how many positives and negatives.
    pytest.importorskip("matplotlib")
    from rulewriter.studies.evaluation_report import plot_roc

    fig = plot_roc({"before": r, "missing": None}, "cars vs confusing", positive="a car class")
    assert fig.axes[0].get_title() == "cars vs confusing\n2 positive (a car class), 2 negative"


def test_class_shifts_by_hand():
    labels = [0, 0, 1, {2, 3}]
    b = _p([[9, 0, 0, 0], [0, 9, 0, 0], [0, 9, 0, 0], [0, 0, 0, 9]], labels)
    a = _p([[9, 0, 0, 0], [9, 0, 0, 0], [9, 0, 0, 0], [0, 0, 9, 0]], labels)
    s = class_shifts(labels, b, a, ["cat", "dog", "car", "van"], groups={frozenset({2, 3}): "vehicle"})
    assert [(c.name, c.n, c.accuracy_pre, c.accuracy_post, c.shift) for c in s] == [
        ("dog", 1, 1.0, 0.0, -1.0), ("vehicle", 1, 1.0, 1.0, 0.0), ("cat", 2, 0.5, 1.0, 0.5)]


def test_errors_wrt_pre_edit_prediction_on_manipulated_images():
    labels = [0, 1, 2]
    normal_b = _p([[9, 0, 0], [0, 0, 9], [0, 0, 9]], labels)  # pre-edit predictions on the originals: 0, 2, 2
    man_b = _p([[0, 9, 0], [0, 9, 0], [0, 0, 9]], labels)  # manipulation flips image 0 and image 1
    man_a = _p([[9, 0, 0], [0, 9, 0], [0, 0, 9]], labels)
    ev = Evaluation("t", as_label_sets(labels), frozenset({0}),
                    {"normal": {"before": normal_b, "after": normal_b}, "manipulated": {"before": man_b, "after": man_a}},
                    ["a", "b", "c"])
    e = ev.errors()["manipulated"]
    assert (e["pre_edit_prediction"]["n_errors_before"], e["pre_edit_prediction"]["corrected"]) == (2, 1)
    assert (e["ground_truth"]["n_errors_before"], e["ground_truth"]["corrected"]) == (1, 1)
    assert e["accuracy_wrt_pre_edit_prediction"] == {"pre": pytest.approx(1 / 3), "post": pytest.approx(2 / 3)}
    assert ev.errors()["normal"]["pre_edit_prediction"]["fraction"] is None  # no errors by definition


# ------------------------------------------------------------------------------------------ test sets
def test_threshold_scores_and_selection():
    assert match_threshold(torch.arange(100.0).reshape(4, 5, 5), 0.9) == pytest.approx(89.1)
    assert concept_scores(np.array([[[1.0, 5.0], [3.0, 0.0]]]), 2.0).tolist() == [8.0]
    assert select_top(np.array([0.0, 3.0, 1.0, 2.0]), 0.5) == [1, 3]
    assert select_top(np.array([0.0, 0.0, 0.0]), 0.5) == []  # zero scores are never "matched"
    assert select_top(np.array([1.0, 2.0]), 0.01) == [1]  # at least one


def test_heat_to_mask_by_hand():
    pre = Preprocess(4, 4, (0.5,) * 3, (0.5,) * 3)
    heat = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # Bilinear 2 → 4 (align_corners=False) gives the profile [1, .75, .25, 0] on each axis; > .5 is the 2×2 corner.
    want = np.zeros((4, 4), np.float32)
    want[:2, :2] = 1
    np.testing.assert_array_equal(heat_to_mask(pre, heat, (4, 4), 0.5), want)
    # A wide image: short side 4, crop columns 2..5 of the 8; the region lands there, zero outside the crop.
    wide = np.zeros((4, 8), np.float32)
    wide[:2, 2:4] = 1
    np.testing.assert_array_equal(heat_to_mask(pre, heat, (8, 4), 0.5), wide)


def test_heat_to_mask_inverts_the_preprocessing():
    pre = Preprocess(224, 256, (0.5,) * 3, (0.5,) * 3)
    heat = torch.zeros(7, 7)
    heat[2, 4] = 1.0
    m = heat_to_mask(pre, heat, (300, 200), 0.5)
    assert m.shape == (200, 300)
    back = pre.mask(m).numpy() > 0.5  # the mask through the model's own resize and crop
    crop = torch.nn.functional.interpolate(heat[None, None], size=(224, 224), mode="bilinear")[0, 0].numpy() > 0.5
    assert (back & crop).sum() / (back | crop).sum() > 0.9


def test_matched_paste_changes_only_the_matched_region():
    pre = Preprocess(4, 4, (0.5,) * 3, (0.5,) * 3)
    img = Image.new("RGB", (4, 4), (200, 10, 10))
    tex = Image.new("RGB", (4, 4), (0, 0, 255))
    heat = np.array([[1.0, 0.0], [0.0, 0.0]])
    out = np.asarray(MatchedPaste(img, heat, 0.5, tex, pre)())
    assert (out[:2, :2, 2] > 100).all() and (out[2:, :, :] == (200, 10, 10)).all() and (out[:, 2:] == (200, 10, 10)).all()
    same = MatchedPaste(img, heat, 5.0, tex, pre)()  # nothing above the threshold: the image as it was
    assert np.array_equal(np.asarray(same), np.asarray(img))


def test_confusing_sets_from_heatmaps(tiny):
    clf, images, labels = tiny
    ts = TestSet("t", images, labels)
    heat = torch.zeros(len(images), 2, 2)
    heat[3, 0, 0], heat[1, 1, 1], heat[0, 0, 1] = 9.0, 7.0, 0.5
    conf = confusing_set(clf, "conv2", torch.zeros(6), ts, Image.new("RGB", (4, 4)), fraction=0.4, quantile=0.9,
                         heatmaps=heat)
    assert conf.images == [images[3], images[1]] and conf.labels == [labels[3], labels[1]]
    assert conf.info["kind"] == "confusing" and all(isinstance(m, MatchedPaste) for m in conf.manipulated)
    # Excluding the target: every confusing image is a negative; the top images of the other classes are kept.
    heat[4, 1, 0] = 6.0  # a matched image of class 3, below the two class-1 images
    assert confusing_set(clf, "conv2", torch.zeros(6), ts, Image.new("RGB", (4, 4)), fraction=0.4, quantile=0.8,
                         heatmaps=heat).labels == [1, 1]  # without exclude: both positives of target {1}
    neg = confusing_set(clf, "conv2", torch.zeros(6), ts, Image.new("RGB", (4, 4)), fraction=0.4, quantile=0.8,
                        heatmaps=heat, exclude={1})
    assert neg.images == [images[4]] and neg.info["excluded"] == [1]  # 40 % of the 3 other-class images
    import rulewriter.studies.testsets as testsets

    assert not hasattr(testsets, "mislabelled_set")  # removed: with every label noise it measured nothing


# ------------------------------------------------------------------------------------------ streaming
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    clf = load_classifier(Tiny(), labels=["cat", "dog", "car", "van"], preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)) for _ in range(5)]
    return clf, images, [0, 1, 2, 1, 3]


def _delta() -> WeightDelta:
    g = torch.Generator().manual_seed(1)
    return WeightDelta({"fc.weight": torch.randn(4, 24, generator=g, dtype=torch.float64)})


def test_predict_streams_every_variant_and_restores_the_model(tiny):
    clf, images, labels = tiny
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    delta = _delta()
    preds = predict(clf, images, labels, {"before": None, "after": delta}, target={2, 3}, batch_size=2, progress=False)
    x = clf.preprocess.batch(images)
    with torch.no_grad():
        want_b = Predictions.from_logits(clf.model(x), labels, {2, 3})
        with delta.applied(clf.model):
            want_a = Predictions.from_logits(clf.model(x), labels, {2, 3})
    for got, want in ((preds["before"], want_b), (preds["after"], want_a)):
        np.testing.assert_array_equal(got.topk, want.topk)
        np.testing.assert_allclose(got.label_prob, want.label_prob, rtol=1e-6)
        np.testing.assert_allclose(got.target_prob, want.target_prob, rtol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in clf.model.state_dict().items())
    with pytest.raises(Exception, match="batch size"):
        predict(clf, images, labels, batch_size=0)


def test_concept_heatmaps_are_key_matches(tiny):
    clf, images, _ = tiny
    key = torch.randn(6, dtype=torch.float64)
    heat = concept_heatmaps(clf, "conv2", key, images, batch_size=2, progress=False)
    x = clf.preprocess.batch(images)
    with torch.no_grad():
        keys = torch.relu(clf.model.conv1(x)).double()  # conv2 is 1×1: its keys are its input
    torch.testing.assert_close(heat, torch.einsum("bdhw,d->bhw", keys, key).float(), rtol=1e-5, atol=1e-5)
    c = torch.eye(6, dtype=torch.float64) * 4
    heat_c = concept_heatmaps(clf, "conv2", key, images, C=c, ridge=0, progress=False)
    torch.testing.assert_close(heat_c, heat / 4, rtol=1e-5, atol=1e-5)  # k · C⁻¹ k*


def test_evaluate_edit_and_report(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    clf, images, labels = tiny
    ts = TestSet("tiny", images, labels, manipulated=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images])
    delta = _delta()
    ev = evaluate_edit(clf, ts, delta, target={2, 3}, batch_size=3, progress=False)
    assert ev.edited and set(ev.four_tests) == {"normal_same", "normal_other", "manipulated_same", "manipulated_other"}
    assert ev.four_tests["normal_same"].n == 2
    s = ev.summary()
    assert s["n_images"] == 5 and set(s["before"]) == {"top1", "top5", "confidence"}
    paths = write_report(tmp_path / "out", clf, ev, change_path="delta.safetensors")
    data = json.loads(paths["json"].read_text())
    assert data["normal"] == json.loads(json.dumps(s)) and len(data["images"]) == 5
    assert data["roc"]["normal"]["before"]["auc"] == pytest.approx(ev.rocs()["normal"]["before"].auc)
    assert {"roc_normal", "roc_manipulated", "class_shifts_normal", "html"} <= set(paths)
    html = paths["html"].read_text()
    assert "The four tests" in html and "Errors corrected" in html
    without = evaluate_edit(clf, TestSet("tiny", images, labels), target=None, progress=False)
    assert set(without.summary()) == {"n_images", "top1", "top5", "confidence"} and not without.four_tests


# ------------------------------------------------------------------------------------------ the command line
def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _random_edit(path):
    g = torch.Generator().manual_seed(0)
    lam = torch.randn(320, 1, generator=g, dtype=torch.float64) * 0.05
    d = torch.randn(1152, 1, generator=g, dtype=torch.float64)
    return Edit([LayerUpdate("_blocks.15._project_conv", 2, lam, d)], {"note": "random test edit"}).save(path)


def _expected(clf, paths, labels, change=None) -> dict:
    x = clf.preprocess.batch([Image.open(p).convert("RGB") for p in paths])
    with torch.no_grad():
        if change is None:
            logits = clf.model(x)
        else:
            with change.applied(clf.model):
                logits = clf.model(x)
    return summarize(Predictions.from_logits(logits, labels), labels)


@pytest.fixture(scope="module")
def six(shared_dir, tmp_path_factory):
    """Six imagenet-samples photos, flat nXXXXXXXX_*.jpg names, as the exact CLI form reads them."""
    src = sorted((shared_dir / "data" / "imagenet-samples").glob("n*.jpg"))
    if len(src) < 1000:
        pytest.skip(f"imagenet-samples incomplete under {shared_dir}")
    d = tmp_path_factory.mktemp("six")
    for i in (0, 200, 407, 479, 817, 999):
        shutil.copy(src[i], d / src[i].name)
    return d, [0, 200, 407, 479, 817, 999]


def test_cli_exact_form_with_and_without_edit(capsys, six, lite0, tmp_path, monkeypatch):
    data, labels = six
    edit = _random_edit(tmp_path / "EDIT.safetensors")
    monkeypatch.chdir(tmp_path)  # the default --out is ./rulewriter-eval
    code, out, err = _run(capsys, "evaluate", "--model", "efficientnet-lite0", "--edit", edit, "--data", data, "--json")
    assert code == 0, err
    res = json.loads(out)
    paths = sorted(data.glob("*.jpg"))
    before, after = _expected(lite0, paths, labels), _expected(lite0, paths, labels, Edit.load(edit))
    assert res["n_images"] == 6
    for key in ("top1", "top5", "confidence"):
        assert res["before"][key] == pytest.approx(before[key]) and res["after"][key] == pytest.approx(after[key])
    assert abs(res["before"]["confidence"] - res["after"]["confidence"]) > 0.01  # the random edit does something
    out_dir = tmp_path / "rulewriter-eval"
    assert (out_dir / "evaluation.json").is_file() and (out_dir / "index.html").is_file()
    assert (out_dir / "class_shifts_normal.png").is_file() and "rulewriter-eval" in err
    code, out, err = _run(capsys, "evaluate", "--model", "efficientnet-lite0", "--data", data, "--json", "--quiet")
    res = json.loads(out)
    assert code == 0 and res["n_images"] == 6
    assert res["top1"] == pytest.approx(before["top1"]) and res["top5"] == pytest.approx(before["top5"])


def test_cli_class_name_folders(capsys, lite0, tmp_path, monkeypatch):
    skdata = pytest.importorskip("skimage.data")
    monkeypatch.setattr("rulewriter.models.registry.load_classifier", lambda *a, **k: lite0)
    d = tmp_path / "data"
    photos = {"espresso": skdata.coffee(), "tabby": skdata.chelsea(), "Space_Shuttle": skdata.rocket()}
    paths, labels = [], []
    for name, arr in photos.items():
        (d / name).mkdir(parents=True)
        Image.fromarray(arr).save(d / name / "photo.png")
        paths.append(d / name / "photo.png")
        labels.append(lite0.class_index(name))
    code, out, err = _run(capsys, "evaluate", "--data", d, "--json", "--quiet", "--out", tmp_path / "rep",
                          "--target", "tabby", "--target", "espresso", "--batch-size", "2")
    assert code == 0, err
    res = json.loads(out)
    want = _expected(lite0, paths, labels)
    assert res["n_images"] == 3 and res["top1"] == pytest.approx(want["top1"]) and res["target"] == sorted(labels[:2])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "no images"),
    ("unknown_class", "name no class"),
    ("corrupt", "cannot load image"),
    ("pickle_edit", "pickle"),
    ("unknown_target", "no class"),
    ("batch", "batch-size"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(capsys, lite0, tmp_path, monkeypatch, case, message):
    monkeypatch.setattr("rulewriter.models.registry.load_classifier", lambda *a, **k: lite0)
    d = tmp_path / "data"
    d.mkdir()
    extra: list = []
    good = Image.new("RGB", (64, 48), (90, 120, 30))
    if case == "missing":
        d = tmp_path / "nope"
    elif case == "unknown_class":
        (d / "not a class at all").mkdir()
        good.save(d / "not a class at all" / "x.jpg")
    elif case == "corrupt":
        good.save(d / "n01440764_ok.jpg")
        (d / "n01440764_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif case != "empty":
        good.save(d / "n01440764_ok.jpg")
    if case == "pickle_edit":
        torch.save({"x": torch.zeros(1)}, tmp_path / "edit.safetensors")
        extra = ["--edit", tmp_path / "edit.safetensors"]
    elif case == "unknown_target":
        extra = ["--target", "flying teapot"]
    elif case == "batch":
        extra = ["--batch-size", "0"]
    out_dir = tmp_path / "report"
    code, out, err = _run(capsys, "evaluate", "--data", d, "--json", "--quiet", "--out", out_dir, *extra)
    assert code == 2 and out == ""
    assert err.count("rulewriter: error:") == 1 and message in err, err
    assert not out_dir.exists()


def test_load_change_dispatches_and_refuses_garbage(tmp_path):
    e = Edit([LayerUpdate("fc", 2, torch.ones(4, 1), torch.ones(24, 1))]).save(tmp_path / "e.safetensors")
    w = _delta().save(tmp_path / "w.safetensors")
    assert isinstance(load_change(e), Edit) and isinstance(load_change(w), WeightDelta)
    (tmp_path / "g.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception, match="safetensors"):
        load_change(tmp_path / "g.safetensors")
