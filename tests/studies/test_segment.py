"""Tests for rulewriter.studies.segment: every mask source, spec parsing, combinators and the CLI."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.cli import main
from rulewriter.errors import ImageLoadError, MaskError, ModelError, RulewriterError
from rulewriter.studies.segment import load_segmenter
from rulewriter.studies.segmenters import (
    VOC_CLASSES,
    Below,
    ContextSegmenter,
    Everything,
    LowerBand,
    MaskFolderSegmenter,
    Segmenter,
    SpecError,
    complement,
)

BUS = "n04146614_school_bus.jpg"
TROLLEYBUS = "n04487081_trolleybus.jpg"


# ------------------------------------------------------------------------------------------ helpers
class Fixed(Segmenter):
    """A segmenter that returns a given mask (resized by nothing: the test picks the image size)."""

    def __init__(self, mask: np.ndarray, name: str = "fixed") -> None:
        self.mask, self.name = np.asarray(mask, np.float32), name

    def _segment(self, image, source):
        return self.mask


def _img(w: int = 8, h: int = 6) -> Image.Image:
    return Image.new("RGB", (w, h), (10, 20, 30))


@pytest.fixture(scope="module")
def litert():
    return pytest.importorskip("ai_edge_litert.interpreter", reason="deeplab: needs ai-edge-litert (rulewriter[segment])")


@pytest.fixture(scope="module")
def samples(shared_dir) -> Path:
    d = shared_dir / "data" / "imagenet-samples"
    if not (d / BUS).is_file():
        pytest.skip(f"{d / BUS} not found")
    return d


@pytest.fixture(scope="module")
def deeplab(litert, shared_dir):
    model = shared_dir / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
    if not model.is_file():
        pytest.skip(f"DeepLab model not found at {model}")
    return load_segmenter(f"deeplab:bus@{model}")


@pytest.fixture()
def shared_env(shared_dir, monkeypatch):
    monkeypatch.setenv("RULEWRITER_SHARED", str(shared_dir))
    return shared_dir


# ------------------------------------------------------------------------------------------ base contract
def test_output_contract_is_enforced():
    img = _img(8, 6)
    m = Fixed(np.full((6, 8), 2.0))(img)  # out-of-range values are clipped
    assert m.dtype == np.float32 and m.shape == (6, 8) and float(m.max()) == 1.0
    with pytest.raises(MaskError, match="6x8"):
        Fixed(np.zeros((8, 6)))(img)
    with pytest.raises(ImageLoadError, match="PIL image"):
        Fixed(np.zeros((6, 8)))(np.zeros((6, 8, 3)))


def test_combinators_and_regions():
    img = _img(2, 4)
    top = Fixed(np.array([[1, 1], [1, 0], [0, 0], [0, 0]]), "top")
    low = LowerBand(0.5)
    assert low(img)[:, 0].tolist() == [0, 0, 1, 1]
    assert LowerBand(0.375)(img)[:, 0].tolist() == [0, 0, 0.5, 1]  # 1.5 rows: the partial row half covered
    assert (top | low)(img).tolist() == [[1, 1], [1, 0], [1, 1], [1, 1]]
    assert (top & low)(img).sum() == 0
    assert (Everything() - top)(img).tolist() == complement(top)(img).tolist() == [[0, 0], [0, 1], [1, 1], [1, 1]]
    # centroid of `top` is row 1/3 -> every row from 0 down
    assert Below(top)(img).sum() == 8
    assert Below(low)(img)[:, 0].tolist() == [0, 0, 1, 1]  # centroid 2.5 -> rows 2, 3
    assert Below(Fixed(np.zeros((4, 2))))(img).sum() == 0  # no object, no ground
    assert (top - low).name == "top - lower:0.5"
    assert (top - (low | top)).name == "top - (lower:0.5 | top)"


def test_spec_parsing_of_regions_and_operators():
    img = _img(4, 4)
    seg = load_segmenter("below:lower:0.5 - lower:0.25")
    assert seg.name == "below:lower:0.5 - lower:0.25"
    assert seg(img)[:, 0].tolist() == [0, 0, 1, 0]
    # left to right, parentheses group
    assert load_segmenter("all - lower:0.5 | lower:0.25")(img)[:, 0].tolist() == [1, 1, 0, 1]
    assert load_segmenter("all - (lower:0.5 | lower:0.25)")(img)[:, 0].tolist() == [1, 1, 0, 0]
    named = load_segmenter("lower:0.5 - (all & lower:0.25)")
    assert load_segmenter(named.name)(img).tolist() == named(img).tolist()  # names parse back
    seg_obj = LowerBand(0.5)
    assert load_segmenter(seg_obj) is seg_obj


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ("nonsense", "unknown segmenter spec"),
        ("foo:bar", "unknown segmenter kind 'foo'"),
        ("coco:annotations.json", "coco:ANNOTATIONS.json:CATEGORY"),
        ("lower:2", r"\(0, 1\]"),
        ("lower:x", "fraction"),
        ("torchvision:lraspp_mobilenet_v3_large", "torchvision:MODEL:CLASS"),
        ("all - (lower:0.5", "unbalanced"),
        ("masks:", "masks:DIR"),
    ],
)
def test_bad_specs_list_the_forms(spec, match):
    with pytest.raises(SpecError, match=match) as info:
        load_segmenter(spec)
    assert "deeplab:CLASS" in str(info.value) and "coco:ANNOTATIONS.json:CATEGORY" in str(info.value)


def test_context_options_refused_for_other_specs():
    with pytest.raises(SpecError, match="threshold given, but no part of 'lower:0.5' uses it"):
        load_segmenter("lower:0.5", threshold=0.3)
    with pytest.raises(SpecError, match="size given"):
        load_segmenter("all", size=64)


# ------------------------------------------------------------------------------------------ mask folder
def test_mask_folder_round_trip_and_errors(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = np.zeros((30, 40), np.float32)
    truth[5:20, 10:30] = 1.0
    Image.fromarray((truth * 255).astype(np.uint8)).save(masks / "foo.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(masks / "empty.png")
    Image.fromarray(np.full((15, 20), 255, np.uint8)).save(masks / "half.bmp")  # half resolution, other ext
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(masks / "square.png")
    seg = load_segmenter(f"masks:{masks}")
    img = _img(40, 30)
    assert np.array_equal(seg(img, source=tmp_path / "photos" / "foo.jpg"), truth)
    assert seg(img, source="x/empty.jpg").sum() == 0  # black = concept absent, not an error
    assert seg(img, source="half.jpg").shape == (30, 40) and seg(img, source="half.jpg").min() == 1.0
    with pytest.raises(MaskError, match="no mask for missing.jpg.*missing.png"):
        seg(img, source="missing.jpg")
    with pytest.raises(MaskError, match="square.png does not fit square.jpg.*aspect"):
        seg(img, source="square.jpg")
    with pytest.raises(MaskError, match="source="):
        seg(img)
    with pytest.raises(MaskError, match="does not exist"):
        MaskFolderSegmenter(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ COCO
def test_coco_masks_agree_with_concepts(shared_dir, tmp_path):
    from rulewriter.concepts.masks import coco_index, coco_masks
    from rulewriter.models.data import load_image

    root = shared_dir / "data" / "car-parts" / "testset"
    ann = root / "annotations.json"
    if not ann.is_file():
        pytest.skip(f"{ann} not found")
    index = coco_index(ann)
    seg = load_segmenter(f"coco:{ann}:wheel")
    for name in index.images("wheel")[:3]:
        path = root / "JPEGImages" / name
        img = load_image(path)
        m = seg(img, source=path)
        assert np.array_equal(m, coco_masks(index, path, "wheel")) and m.sum() > 0
        half = img.resize((img.width // 2, img.height // 2))
        assert seg(half, source=path).shape == (img.height // 2, img.width // 2)  # the mask follows a resize
    no_tailgate = next(n for n in index.images("wheel") if n not in index.images("tailgate"))
    path = root / "JPEGImages" / no_tailgate
    assert load_segmenter(f"coco:{ann}:tailgate")(load_image(path), source=path).sum() == 0
    with pytest.raises(MaskError, match="not-a-car.jpg' is not in"):
        seg(_img(), source=tmp_path / "not-a-car.jpg")
    with pytest.raises(MaskError, match="unknown category 'wheels'.*'wheel'"):
        load_segmenter(f"coco:{ann}:wheels")


# ------------------------------------------------------------------------------------------ context match
def _tiny_classifier():
    """Colour detectors at a 4x4-pixel patch grid, then a 1x1 conv (the traced layer), pool and a head.

    Key channels are the positive and negative parts of R, G, B: a red patch's key is (1,0,0,0,1,1),
    a blue one's (0,0,1,1,1,0).
    """
    from rulewriter.models.registry import Preprocess, load_classifier

    patch = nn.Conv2d(3, 6, 4, stride=4)
    with torch.no_grad():
        patch.weight.zero_()
        patch.bias.zero_()
        for i in range(6):
            patch.weight[i, i % 3] = (1.0 if i < 3 else -1.0) / 16
    net = nn.Sequential(patch, nn.ReLU(), nn.Conv2d(6, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    pre = Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    return load_classifier(net, labels=["a", "b"], preprocess=pre, default_layer="2")


def _scene(w: int = 64, h: int = 48, square: bool = True) -> tuple[Image.Image, np.ndarray]:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 2] = 255  # blue
    mask = np.zeros((h, w), np.float32)
    if square:
        mask[12:36, 18:42] = 1
        arr[mask > 0] = (255, 0, 0)
    return Image.fromarray(arr), mask


@pytest.fixture(scope="module")
def concept_case(tmp_path_factory):
    from rulewriter.concepts.keys import Concept
    from rulewriter.concepts.masks import mask_to_grid
    from rulewriter.core.memory import LayerMemory
    from rulewriter.core.rules import layer_io, prepare_mask

    clf = _tiny_classifier()
    img, mask = _scene()
    inp, _ = layer_io(clf, "2", clf.preprocess.batch([img]))
    keys = LayerMemory(clf.model[2], view=2).keys(inp)
    grid = mask_to_grid(prepare_mask(clf, mask, img), keys.shape[-2:])
    concept = Concept.from_keys(keys, grid[None], layer="2", view=2)
    path = tmp_path_factory.mktemp("concept") / "red.concept.safetensors"
    concept.save(path)
    flat = keys[0].permute(1, 2, 0).reshape(-1, 6).double()
    return clf, img, mask, path, flat.T @ flat / flat.shape[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def test_context_recovers_the_region_it_was_built_from(concept_case):
    clf, img, mask, path, C = concept_case
    # With C the background's heat is ~0 and the half-match threshold falls on the region's edge; the plain
    # dot product leaves the background at a third of the concept's heat, so upsampled edges spread out.
    for stats, min_iou in ((C, 0.9), (None, 0.6)):
        seg = load_segmenter(f"context:{path}", classifier=clf, stats=stats)
        assert seg.threshold_rule == "half the concept key's own match"
        m = seg(img, source=None)
        assert m.shape == mask.shape and set(np.unique(m)) <= {0.0, 1.0}
        assert _iou(m, mask) > min_iou, (stats is None, _iou(m, mask))
        assert (m * mask).sum() / mask.sum() > 0.95  # all of the region is found
        blue, _ = _scene(square=False)
        assert seg(blue).sum() == 0  # the concept is absent: zeros, no error
    assert seg.name == f"context:{path}"


def test_context_thresholds(concept_case, tmp_path):
    clf, img, mask, path, C = concept_case
    seg = ContextSegmenter(path, clf, threshold=1e9)
    assert seg.threshold_rule == "explicit" and seg(img).sum() == 0
    heat = seg.heat(img)
    assert heat.shape == (8, 8)
    # the quantile of the heat over all locations of the calibration images
    blue, _ = _scene(square=False)
    both = torch.cat([heat.reshape(-1), seg.heat(blue).reshape(-1)]).numpy()
    default_q = ContextSegmenter(path, clf, calibration=[img, blue])
    assert default_q.threshold_rule == "quantile 0.99 of the heat over 2 calibration images"
    assert default_q.threshold == pytest.approx(float(np.quantile(both, 0.99)), rel=1e-6)
    assert default_q(blue).sum() == 0
    q90 = ContextSegmenter(path, clf, calibration=[img, blue], quantile=0.9)  # 12 of 128 locations are red
    assert (q90(img) * mask).sum() / mask.sum() > 0.9 and q90(blue).sum() == 0
    folder = tmp_path / "cal"
    folder.mkdir()
    img.save(folder / "a.png")
    blue.save(folder / "b.png")
    from_folder = load_segmenter(f"context:{path}?calibration={folder}&quantile=0.01", classifier=clf)
    assert from_folder.threshold == pytest.approx(float(np.quantile(both, 0.01)), rel=1e-6)
    assert from_folder(blue).mean() > 0.5  # a threshold below the blue locations' heat matches blue too
    with pytest.raises(SpecError, match="not both"):
        ContextSegmenter(path, clf, threshold=1.0, calibration=[img])
    with pytest.raises(SpecError, match="quantile= needs calibration"):
        ContextSegmenter(path, clf, quantile=0.9)
    with pytest.raises(SpecError, match="unknown option"):
        load_segmenter(f"context:{path}?treshold=1", classifier=clf)
    with pytest.raises(SpecError, match="threshold is '2'"):
        load_segmenter(f"context:{path}?threshold=2", classifier=clf, threshold=1.0)


# ------------------------------------------------------------------------------------------ DeepLab TFLite
def test_deeplab_finds_the_bus_and_not_on_coffee(deeplab, samples):
    from rulewriter.models.data import load_image

    skdata = pytest.importorskip("skimage.data")
    for name in (BUS, TROLLEYBUS):
        img = load_image(samples / name)
        m = deeplab(img, source=samples / name)
        assert m.shape == (img.height, img.width) and m.dtype == np.float32
        assert m.mean() > 0.25, (name, m.mean())  # the school bus covers a third of its photo
    coffee = Image.fromarray(skdata.coffee())
    assert deeplab(coffee).mean() < 0.01


def test_deeplab_classes_union_and_aliases(deeplab, samples, shared_dir):
    from rulewriter.models.data import load_image

    img = load_image(samples / BUS)
    model = deeplab.model_path
    both = load_segmenter(f"deeplab:bus,car@{model}")
    assert both.classes == ["bus", "car"]
    assert (both(img) >= deeplab(img) - 1e-6).all()
    assert load_segmenter(f"deeplab:Motorcycle,6@{model}").class_ids == [14, 6]
    with pytest.raises(SpecError, match="unknown class 'lorry'.*bus"):
        load_segmenter(f"deeplab:lorry@{model}")


def test_deeplab_is_thread_safe(deeplab, samples):
    from rulewriter.models.data import load_image

    img = load_image(samples / TROLLEYBUS)
    want = deeplab(img)
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(deeplab(img))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(np.array_equal(g, want) for g in got)


def test_deeplab_default_model_location(litert, shared_env, monkeypatch, tmp_path):
    seg = load_segmenter("deeplab:bus")
    assert seg.model_path == shared_env / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
    assert seg.name == "deeplab:bus" and seg.labels == list(VOC_CLASSES)
    monkeypatch.delenv("RULEWRITER_SHARED")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ModelError, match="shared/models/deeplabv3_mnv2_pascal_quant.tflite"):
        load_segmenter("deeplab:bus")
    with pytest.raises(ModelError, match="not found: .*nope.tflite"):
        load_segmenter(f"deeplab:bus@{tmp_path / 'nope.tflite'}")


def test_deeplab_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ModelError, match=r"pip install 'rulewriter\[segment\]'"):
        load_segmenter("deeplab:bus@model.tflite")


# ------------------------------------------------------------------------------------------ torchvision
@pytest.fixture(scope="module")
def torchvision():
    return pytest.importorskip("torchvision", reason="torchvision segmenters need torchvision")


def test_torchvision_untrained_model_and_missing_weights(torchvision, tmp_path, monkeypatch):
    seg = load_segmenter("torchvision:lraspp_mobilenet_v3_large:bus@none", size=32)
    img = _img(40, 30)
    m = seg(img)
    assert m.shape == (30, 40) and m.dtype == np.float32 and 0.0 <= m.min() <= m.max() <= 1.0
    assert seg.logits(img).shape == (21, 32, 43)  # short side resized to `size`, aspect kept
    assert seg.name == "torchvision:lraspp_mobilenet_v3_large:bus@none"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelError, match=r"no weights for deeplabv3_mobilenet_v3_large.*looked for .*hub.*@none"):
        load_segmenter("torchvision:deeplabv3_mobilenet_v3_large:bus")
    with pytest.raises(ModelError, match="weights file not found"):
        load_segmenter(f"torchvision:deeplabv3_mobilenet_v3_large:bus@{tmp_path / 'missing.pth'}")


@pytest.mark.slow
def test_torchvision_weights_from_a_file_and_the_hub_cache(torchvision, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    seg = load_segmenter("torchvision:lraspp_mobilenet_v3_large:bus@none", size=32)
    img = _img(40, 30)
    # Weights that make "bus" win everywhere: the mask is the whole image, and empty for "car".
    sd = {k: v.clone() for k, v in seg.model.state_dict().items()}
    sd["classifier.high_classifier.bias"][6] = 1e4
    path = tmp_path / "bus-everywhere.safetensors"
    save_file(sd, str(path))
    assert load_segmenter(f"torchvision:lraspp_mobilenet_v3_large:bus@{path}", size=32)(img).min() == 1.0
    assert load_segmenter(f"torchvision:lraspp_mobilenet_v3_large:car@{path}", size=32)(img).max() == 0.0
    # The same file found in the torch hub cache, by the name torchvision publishes it under.
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(ModelError, match=r"no weights for lraspp_mobilenet_v3_large.*looked for .*hub.*@none"):
        load_segmenter("torchvision:lraspp_mobilenet_v3_large:bus")
    url = torchvision.models.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT.url
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(sd, hub / "checkpoints" / url.rsplit("/", 1)[-1])
    assert load_segmenter("torchvision:lraspp_mobilenet_v3_large:bus", size=32)(img).min() == 1.0
    named = load_segmenter("torchvision:lraspp_mobilenet_v3_large:bus@COCO_WITH_VOC_LABELS_V1", size=32)
    assert named(img).min() == 1.0
    # Published DeepLabV3 checkpoints carry the auxiliary head: the model is built to fit them.
    aux = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                                       num_classes=21, aux_loss=True)
    save_file(aux.state_dict(), str(tmp_path / "aux.safetensors"))
    loaded = load_segmenter(f"torchvision:deeplabv3_mobilenet_v3_large:car@{tmp_path / 'aux.safetensors'}")
    assert loaded.model.aux_classifier is not None and loaded.size == 520


def test_torchvision_bad_names(torchvision):
    with pytest.raises(SpecError, match="unknown segmentation model 'segformer'.*deeplabv3_mobilenet_v3_large"):
        load_segmenter("torchvision:segformer:bus@none")
    with pytest.raises(SpecError, match="unknown class 'lorry'"):
        load_segmenter("torchvision:lraspp_mobilenet_v3_large:lorry@none")


# ------------------------------------------------------------------------------------------ CLI
def _photo(path: Path, w: int = 40, h: int = 30) -> Path:
    _img(w, h).save(path)
    return path


def test_cli_writes_masks_and_reports_areas(tmp_path, capsys):
    a, b = _photo(tmp_path / "a.jpg"), _photo(tmp_path / "b.png", 20, 20)
    out = tmp_path / "out"
    rc = main(["segment", "--segmenter", "lower:0.5", "--out-dir", str(out), "--overlay", "--json", str(a), str(b)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["segmenter"] == "lower:0.5"
    assert [r["area"] for r in res["images"]] == [0.5, 0.5]
    mask = np.asarray(Image.open(out / "a.mask.png"))
    assert mask.shape == (30, 40) and mask[:15].max() == 0 and mask[15:].min() == 255
    assert Image.open(out / "b.overlay.png").size == (20, 20)
    # the masks written are read back by a masks: segmenter
    back = load_segmenter(f"masks:{out}")(_img(40, 30), source=a)
    assert np.array_equal(back, LowerBand(0.5)(_img(40, 30)))


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    a = _photo(tmp_path / "a.jpg")
    out = tmp_path / "out"
    assert main(["segment", "--segmenter", "bogus:x", "--out-dir", str(out), str(a)]) == 2
    err = capsys.readouterr().err
    assert "unknown segmenter kind 'bogus'" in err and "deeplab:CLASS" in err
    assert main(["segment", "--segmenter", "all", "--out-dir", str(out), str(a), str(tmp_path / "gone.jpg")]) == 2
    assert "gone.jpg" in capsys.readouterr().err
    (tmp_path / "sub").mkdir()
    a2 = _photo(tmp_path / "sub" / "a.jpg")
    assert main(["segment", "--segmenter", "all", "--out-dir", str(out), str(a), str(a2)]) == 2
    assert "both write a.mask.png" in capsys.readouterr().err
    assert main(["segment", "--segmenter", "all", "--threshold", "0.5", "--out-dir", str(out), str(a)]) == 2
    assert not out.exists()


def test_cli_deeplab_round_trip_through_mask_files(deeplab, samples, tmp_path, capsys):
    from rulewriter.models.data import load_image

    out = tmp_path / "masks"
    spec = f"deeplab:bus@{deeplab.model_path}"
    assert main(["segment", "--segmenter", spec, "--out-dir", str(out), "--json", str(samples / BUS)]) == 0
    row = json.loads(capsys.readouterr().out)["images"][0]
    img = load_image(samples / BUS)
    direct = deeplab(img)
    assert row["area"] == pytest.approx(float(direct.mean()), abs=1e-5)
    back = load_segmenter(f"masks:{out}")(img, source=samples / BUS)
    assert np.abs(back - direct).max() <= 0.5 / 255 + 1e-6


def test_errors_are_rulewriter_errors():
    assert issubclass(SpecError, RulewriterError) and issubclass(SpecError, ValueError)


def test_deeplab_does_not_print_the_runtimes_info_line(litert, shared_dir):
    import subprocess
    import sys

    model = shared_dir / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
    if not model.is_file():
        pytest.skip(f"DeepLab model not found at {model}")
    # A fresh process: the runtime prints its line once per process, straight to file descriptor 2.
    code = f"from rulewriter.studies.segment import load_segmenter; load_segmenter('deeplab:bus@{model}')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "INFO:" not in run.stderr and "INFO:" not in run.stdout
