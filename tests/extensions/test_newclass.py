"""Adding a class (Chapter 4): exact original logits, a filter that learns, packaging, composition, errors, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.core.edit import Edit, LayerUpdate
from rulewriter.errors import EditError, LayerError, MaskError, RulewriterError
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.extensions.class_baselines import (
    class_feature_vector,
    compositional_vector,
    evaluate,
    random_vector,
    roc_curve,
    vector_class,
    weighted_roc_auc,
)
from rulewriter.extensions.class_filter import calibrate, collect_features, pool_map, train_filter
from rulewriter.extensions.newclass import NewClass, add_class, is_new_class_file

S = 32  # input size of the fixture model


class Tiny(nn.Module):
    """conv → relu → conv(stride 2) → relu → depthwise → relu → global average pool → linear (5 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.dw(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(autouse=True)
def one_thread():
    """The fixture model's tensors are tiny: one thread avoids the cost of waking others on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    pre = Preprocess(size=S, resize=S, mean=(0.5,) * 3, std=(0.5,) * 3)
    return load_classifier(Tiny(), preprocess=pre, labels=list("abcde"), default_layer="conv2")


def _photo(rng: np.random.Generator, square: tuple[int, int] | None = None) -> tuple[Image.Image, np.ndarray]:
    """Noise, optionally with a 10×10 red square (the synthetic 'new class') and its silhouette."""
    a = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    m = np.zeros((S, S), np.float32)
    if square is not None:
        y, x = square
        a[y : y + 10, x : x + 10] = (255, 0, 0)
        m[y : y + 10, x : x + 10] = 1
    return Image.fromarray(a), m


@pytest.fixture()
def task():
    """One positive with its mask, a pool of 30 negatives, and 25 + 25 evaluation photos."""
    rng = np.random.default_rng(0)
    pos, mask = _photo(rng, (6, 12))
    pool = [_photo(rng)[0] for _ in range(30)]
    ev_pos = [_photo(rng, tuple(rng.integers(0, S - 10, 2)))[0] for _ in range(25)]
    ev_neg = [_photo(rng)[0] for _ in range(25)]
    return pos, mask, pool, ev_pos, ev_neg


@pytest.fixture()
def red(tiny, task):
    pos, mask, pool, _, _ = task
    return add_class(tiny, pos, mask, pool, name="red square")


# ------------------------------------------------------------------------------------------ exactness
def test_original_logits_bit_identical_and_detach(tiny, red):
    x = torch.randn(16, 3, S, S) * 3
    with torch.no_grad():
        base = tiny.model(x)
        handle = red.apply(tiny)
        out = tiny.model(x)
        handle.remove()
        after = tiny.model(x)
    assert out.shape == (16, 6)
    assert torch.equal(out[:, :5], base)
    assert torch.equal(after, base)  # hooks off: the model is exactly as before
    assert handle.classifier.labels == [*"abcde", "red square"]
    assert tiny.labels == list("abcde")


def test_extend_copies_and_new_logit_matches_features(tiny, red, task):
    ext = red.extend(tiny)
    x = tiny.preprocess.batch(task[3][:5])
    with torch.no_grad():
        out, base = ext.model(x), tiny.model(x)
    assert base.shape == (5, 5) and out.shape == (5, 6)  # the original network is untouched
    assert torch.equal(out[:, :5], base)
    feats = collect_features(tiny, task[3][:5], "conv2")
    assert torch.allclose(out[:, 5].double(), red.logits(tiny.model, feats), atol=1e-5)
    assert ext.predict(x, topk=6)[0][0][1] in ext.labels


def test_extended_parameters_are_eq_4_2(tiny, red):
    """A conv with W1 = [W0; w] (f+1 filters) gives the original channels and the new filter's map."""
    x = torch.randn(3, 8, 20, 20)
    w1, b1 = red.extended_parameters(tiny.model)
    assert w1.shape == (17, 8, 3, 3) and b1.shape == (17,)
    conv = tiny.model.conv2
    y1 = nn.functional.conv2d(x, w1, b1, stride=2, padding=1)
    assert torch.allclose(y1[:, :16], conv(x), atol=1e-6)
    new_map = nn.functional.conv2d(x, red.weight.float(), red.bias.float(), stride=2, padding=1)[:, 0]
    assert torch.allclose(pool_map(y1[:, 16], "max"), red.score_input(conv, x).float(), atol=1e-5)
    assert torch.allclose(y1[:, 16], new_map, atol=1e-5)


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("mode", ["mined", "random"])
def test_filter_learns_the_pattern(tiny, task, mode):
    pos, mask, pool, ev_pos, ev_neg = task
    new = add_class(tiny, pos, mask, pool, name="red", negatives_mode=mode)
    assert len(new.meta["negatives"]) == 15 and new.meta["lambda"] == pytest.approx(1 / 15)
    fp, fn = collect_features(tiny, ev_pos, "conv2"), collect_features(tiny, ev_neg, "conv2")
    r = evaluate(new.extended_logits(tiny.model, fp), new.extended_logits(tiny.model, fn))
    assert r["auc"] > 0.9
    assert weighted_roc_auc(np.r_[new.scores(tiny.model, fp), new.scores(tiny.model, fn)],
                            np.r_[np.ones(25), np.zeros(25)]) > 0.9
    # It fires where the pattern is: the strongest location of the positive lies inside the square.
    z = nn.functional.conv2d(tiny.model.conv1(tiny.preprocess.batch([pos])).relu(), new.weight.float(),
                             new.bias.float(), stride=2, padding=1)[0, 0]
    iy, ix = divmod(int(z.argmax()), z.shape[1])
    assert 6 // 2 - 1 <= iy <= 16 // 2 and 12 // 2 - 1 <= ix <= 22 // 2


def test_training_objective_and_lambda(tiny, task):
    """Eq. 4.4 goes down monotonically; λ=None means 1/N; λ=0 ignores the negatives."""
    from rulewriter.core.memory import LayerMemory
    from rulewriter.extensions.class_filter import silhouette_target

    pos, mask, pool, _, _ = task
    mem = LayerMemory(tiny.model.conv2)
    xp = collect_features(tiny, [pos], "conv2").x
    xn = collect_features(tiny, pool[:6], "conv2").x
    y = silhouette_target(tiny, "conv2", pos, mask)
    assert y.shape == (16, 16) and float(y.sum()) == pytest.approx(100 / 4)
    fit = train_filter(mem, xp, y, xn)
    assert fit.lam == pytest.approx(1 / 6) and fit.n_negatives == 6
    total = fit.history["total"]
    assert all(b <= a + 1e-12 for a, b in zip(total, total[1:])) and total[-1] < 0.5 * total[0]
    alone = train_filter(mem, xp, y, xn, lam=0.0)
    none = train_filter(mem, xp, y, None)
    assert alone.n_negatives == 0 and torch.allclose(alone.weight, none.weight)


def test_calibration_principle():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(400, generator=g, dtype=torch.float64)
    m = 10 + 3 * torch.randn(400, generator=g, dtype=torch.float64)
    cal = calibrate(s, m, fpr=0.05)
    iqr = lambda v: float(v.quantile(0.75) - v.quantile(0.25))  # noqa: E731
    assert cal.scale == pytest.approx(iqr(m) / iqr(s))
    assert cal.realized_fpr == pytest.approx(0.05)  # exactly ⌊0.05·400⌋ = 20 images
    assert int(((cal.scale * s + cal.shift) > m).sum()) == 20
    with pytest.raises(EditError):
        calibrate(s, m, fpr=1.5)


def test_roc_matches_sklearn_with_ties_and_weights():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    s = rng.integers(0, 8, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    w = rng.uniform(0.2, 2.0, 60)
    fpr, tpr, _ = roc_curve(s, y, w)
    assert np.trapezoid(tpr, fpr) == pytest.approx(sk.roc_auc_score(y, s, sample_weight=w))
    groups = rng.integers(0, 5, 60)
    cw = np.where(y > 0, 1.0 / (y > 0).sum(), 0.0)
    for g in np.unique(groups[y == 0]):
        sel = (y == 0) & (groups == g)
        cw[sel] = 1.0 / sel.sum()
    assert weighted_roc_auc(s, y, groups) == pytest.approx(sk.roc_auc_score(y, s, sample_weight=cw))


# ------------------------------------------------------------------------------------------ packaging
def test_save_load_roundtrip_exact(tmp_path, tiny, red):
    path = red.save(tmp_path / "red.safetensors")
    assert (tmp_path / "red.safetensors.json").is_file() and is_new_class_file(path)
    meta = json.loads((tmp_path / "red.safetensors.json").read_text())
    assert meta["meta"]["calibration"]["principle"] and meta["layer"] == "conv2"
    back = NewClass.load(path)
    assert torch.equal(back.weight, red.weight.double()) and torch.equal(back.bias, red.bias.double())
    assert (back.scale, back.shift, back.pool, back.name) == (red.scale, red.shift, red.pool, red.name)
    x = torch.randn(4, 3, S, S)
    with torch.no_grad(), red.applied(tiny) as a:
        o1 = a.model(x)
    with torch.no_grad(), back.applied(tiny) as b:
        o2 = b.model(x)
    assert torch.equal(o1, o2)


def test_load_refuses_pickles_and_other_files(tmp_path, tiny):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "p.safetensors")
    with pytest.raises(EditError, match="pickle"):
        NewClass.load(tmp_path / "p.safetensors")
    Edit([LayerUpdate("conv2", 2, torch.zeros(16, 1), torch.zeros(72, 1))]).save(tmp_path / "e.safetensors")
    assert not is_new_class_file(tmp_path / "e.safetensors")
    with pytest.raises(EditError, match="not an added class"):
        NewClass.load(tmp_path / "e.safetensors")


def test_wrong_model_is_a_clear_error(tiny, red):
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    with pytest.raises(LayerError):
        red.apply(other)  # no layer named conv2
    other.conv2 = nn.Conv2d(3, 16, 3)  # a conv2 with other input channels
    with pytest.raises(EditError, match="another model"):
        red.apply(other)


def test_composes_with_a_rule_edit(tiny, red, task):
    """An Edit of the base model and the added class work together, in either order, and undo exactly."""
    g = torch.Generator().manual_seed(3)
    edit = Edit([LayerUpdate("conv1", 2, torch.randn(8, 1, generator=g), torch.randn(27, 1, generator=g) * 0.1),
                 LayerUpdate("conv2", 2, torch.randn(16, 1, generator=g), torch.randn(72, 1, generator=g) * 0.1)])
    x = tiny.preprocess.batch(task[3][:6])
    with torch.no_grad():
        base = tiny.model(x)
        with edit.applied(tiny.model):
            edited = tiny.model(x)
            feats = collect_features(tiny, task[3][:6], "conv2")  # the edited model's conv2 inputs
            with red.applied(tiny) as ext:
                both = ext.model(x)
        assert not torch.equal(edited, base)
        assert torch.equal(both[:, :5], edited)
        assert torch.allclose(both[:, 5].double(), red.logits(tiny.model, feats), atol=1e-5)
        handle = red.apply(tiny)  # the other order: class first, edit on top
        h2 = edit.apply(tiny.model)
        other_order = tiny.model(x)
        h2.undo()
        restored = tiny.model(x)
        handle.remove()
    assert torch.equal(other_order, both)
    assert torch.equal(restored[:, :5], base)


def test_vector_baselines(tiny, task):
    pos, mask, pool, ev_pos, ev_neg = task
    v = class_feature_vector(tiny, pos, mask)
    assert v.shape == (16,) and float(v.norm()) == pytest.approx(1.0)
    c = compositional_vector(tiny, [pos, pos], [mask, 1 - mask])
    assert float(c.norm()) == pytest.approx(1.0)
    neg = collect_features(tiny, pool, None, head=True)
    for vec in (v, c, random_vector(16, seed=1)):
        new = vector_class(tiny, vec, neg, name="baseline", fpr=0.1)
        assert new.kind == "vector" and new.layer == "fc"
        assert new.meta["calibration"]["realized_fpr"] <= 0.1
        x = tiny.preprocess.batch(ev_pos[:4])
        with torch.no_grad(), new.applied(tiny) as ext:
            out = ext.model(x)
        assert torch.equal(out[:, :5], tiny.model(x).detach())
        f = collect_features(tiny, ev_pos[:4], None, head=True)
        assert torch.allclose(out[:, 5].double(), new.logits(tiny.model, f), atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(tiny, task):
    pos, mask, pool, _, _ = task
    with pytest.raises(LayerError, match="depthwise"):
        add_class(tiny, pos, mask, pool, layer="dw")
    with pytest.raises(LayerError, match="conv layer"):
        add_class(tiny, pos, mask, pool, layer="fc")
    with pytest.raises(LayerError, match="no layer named"):
        add_class(tiny, pos, mask, pool, layer="conv9")
    with pytest.raises(MaskError, match="empty"):
        add_class(tiny, pos, np.zeros_like(mask), pool)
    with pytest.raises(MaskError, match="aspect"):
        add_class(tiny, pos, np.ones((10, 30), np.float32), pool)
    with pytest.raises(EditError, match="pool"):
        add_class(tiny, pos, mask, pool, pool="median")
    with pytest.raises(EditError, match="fpr"):
        add_class(tiny, pos, mask, pool, fpr=0.0)
    with pytest.raises(EditError, match="mode"):
        add_class(tiny, pos, mask, pool, negatives_mode="hard")
    with pytest.raises(EditError, match="already has a class"):
        add_class(tiny, pos, mask, pool, name="c")
    with pytest.raises(EditError, match="λ"):
        add_class(tiny, pos, mask, pool, lam=-1.0)
    with pytest.raises(RulewriterError, match="negative"):
        add_class(tiny, pos, mask, pool[:1])


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, coffee_case, photo_dir):
    """The coffee photo with its cup mask, and 16 negatives: photo crops that are not of the coffee photo."""
    original, _, mask = coffee_case
    d = tmp_path_factory.mktemp("addclass")
    original.save(d / "coffee.png")
    Image.fromarray((mask * 255).astype(np.uint8)).resize((300, 200)).save(d / "cup.png")
    Image.fromarray((mask * 255).astype(np.uint8)).resize((200, 200)).save(d / "square.png")
    neg = d / "negatives"
    neg.mkdir()
    # photo_dir cycles through 8 sources; source 2 is the coffee photo itself.
    for i in [i for i in range(80) if i % 8 != 2][:16]:
        (neg / f"crop_{i:03d}.jpg").write_bytes((photo_dir / f"crop_{i:03d}.jpg").read_bytes())
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    from rulewriter.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_class_then_predict(capsys, cli_files, tmp_path):
    out_file = tmp_path / "cup.safetensors"
    code, out, err = _run(capsys, "add-class", "--model", "efficientnet-lite0", "--image", cli_files / "coffee.png",
                          "--mask", cli_files / "cup.png", "--negatives", cli_files / "negatives",
                          "--name", "espresso cup (added)", "--out", out_file, "--json", "--quiet")
    assert code == 0, err
    info = json.loads(out)
    assert info["layer"] == "_blocks.15._project_conv" and len(info["negatives"]) == 8  # half of 16 train
    assert info["exemplar"]["top1"] and out_file.is_file()
    assert info["calibration"]["realized_fpr"] == 0.0  # 8 calibration photos: fpr 1 % lets none win
    # crop_001 sits at an odd position of the folder, so it calibrated the logit and must not be the new class.
    code, out, err = _run(capsys, "predict", "--model", "efficientnet-lite0", "--edit", out_file, "--json",
                          cli_files / "coffee.png", cli_files / "negatives" / "crop_001.jpg")
    assert code == 0, err
    res = json.loads(out)
    assert res[0]["top5"][0] == {"index": 1000, "label": "espresso cup (added)", "prob": res[0]["top5"][0]["prob"]}
    assert res[1]["top5"][0]["label"] != "espresso cup (added)"
    # A rule edit still goes through `predict --edit` as before.
    edit_file = tmp_path / "noop.safetensors"
    Edit([LayerUpdate("_blocks.15._project_conv", 2, torch.zeros(320, 1), torch.zeros(1152, 1))]).save(edit_file)
    code, out, err = _run(capsys, "predict", "--model", "efficientnet-lite0", "--edit", edit_file, "--json",
                          cli_files / "coffee.png")
    assert code == 0, err
    assert json.loads(out)[0]["top5"][0]["index"] < 1000


def test_cli_add_class_bad_input_exits_2(capsys, cli_files, tmp_path):
    out_file = tmp_path / "x.safetensors"
    common = ["add-class", "--model", "efficientnet-lite0", "--image", cli_files / "coffee.png",
              "--negatives", cli_files / "negatives", "--name", "my cup", "--out", out_file, "--quiet"]
    code, _, err = _run(capsys, *common, "--mask", cli_files / "square.png")
    assert code == 2 and "aspect ratio" in err and not out_file.exists()
    code, _, err = _run(capsys, *common, "--mask", cli_files / "cup.png", "--layer", "_blocks.15._depthwise_conv")
    assert code == 2 and "depthwise" in err and not out_file.exists()


def test_two_added_classes_stack(tiny, red):
    other = NewClass("other", red.kind, red.layer, -red.weight, red.bias, "mean", 1.0, 0.0)
    x = torch.randn(3, 3, S, S)
    with torch.no_grad():
        base = tiny.model(x)
        with red.applied(tiny) as one, other.applied(one) as two:
            out = two.model(x)
            assert two.labels[-2:] == ["red square", "other"]
    assert out.shape == (3, 7) and torch.equal(out[:, :5], base)
    assert torch.allclose(out[:, 6], pool_map(nn.functional.conv2d(
        tiny.model.conv1(x).relu(), -red.weight.float(), red.bias.float(), stride=2, padding=1)[:, 0], "mean"),
        atol=1e-5)
