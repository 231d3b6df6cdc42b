"""Tests for rulewriter.models.registry: loading by name / file / module, preprocessing, labels, layer lookup."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from rulewriter.errors import LayerError, MaskError, ModelError
from rulewriter.models.registry import (
    DEFAULT_LAYERS,
    Classifier,
    get_module,
    imagenet_classes,
    layer_names,
    list_models,
    load_classifier,
    module_fingerprint,
)
from rulewriter.models.preprocess import Preprocess, mask_for_image

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0() -> Classifier:
    return load_classifier("efficientnet-lite0")


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.chelsea())


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


# ------------------------------------------------------------------------------------------ efficientnet
def test_efficientnet_lite0_loads(lite0: Classifier) -> None:
    assert lite0.name == "efficientnet-lite0"
    assert len(lite0.labels) == 1000 and lite0.wnids is not None and len(lite0.wnids) == 1000
    assert not lite0.model.training
    assert len(lite0.weights_id) == 16
    assert lite0.default_layer == DEFAULT_LAYERS["efficientnet-lite0"]
    assert lite0.preprocess.size == 224
    json.dumps(lite0.describe())
    # The underscore spelling is accepted and the id is stable across loads.
    assert load_classifier("efficientnet_lite0").weights_id == lite0.weights_id


def test_chelsea_is_a_cat(lite0: Classifier, chelsea: Image.Image) -> None:
    top5 = lite0.predict(lite0.preprocess.batch([chelsea]), topk=5)[0]
    assert len(top5) == 5
    assert CAT_CLASSES & {label for _, label, _ in top5}
    probs = [p for _, _, p in top5]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    # PIL images and a single (3, H, W) tensor are accepted too.
    assert lite0.predict([chelsea], topk=1)[0][0][0] == top5[0][0]
    assert lite0.predict(lite0.preprocess.image(chelsea), topk=1)[0][0][0] == top5[0][0]


def test_imagenet_classes_line_up() -> None:
    wnids, labels = imagenet_classes()
    assert len(wnids) == len(labels) == 1000 and wnids == sorted(wnids)
    d = dict(zip(wnids, labels))
    assert d["n02124075"] == "Egyptian cat"
    assert d["n04285008"] == "sports car"
    assert d["n01440764"] == "tench"


def test_class_index(lite0: Classifier) -> None:
    assert lite0.class_index("n04285008") == 817
    assert lite0.class_index("sports car") == lite0.class_index("Sports_Car") == 817
    assert lite0.class_index(3) == 3
    with pytest.raises(ModelError, match="sports car"):
        lite0.class_index("sports cra")


def test_default_layers_exist(lite0: Classifier) -> None:
    get_module(lite0.model, DEFAULT_LAYERS["efficientnet-lite0"])


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocess_image_shape_and_range() -> None:
    pre = Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    white = pre.image(Image.new("RGB", (320, 240), "white"))
    assert white.shape == (3, 224, 224) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white))
    gray = pre.image(Image.new("L", (100, 300), 0))  # non-RGB inputs are converted
    assert torch.allclose(gray, -torch.ones_like(gray))
    assert pre.batch([Image.new("RGB", (300, 300))] * 2).shape == (2, 3, 224, 224)
    assert json.loads(json.dumps(pre.describe()))["resize"] == 256


def test_preprocess_matches_torchvision() -> None:
    tv = pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (301, 457, 3), dtype=np.uint8))
    tf = tv.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    pre = Preprocess(size=224, resize=232, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert torch.allclose(pre.image(img), tf(img), atol=1e-5)


@pytest.mark.parametrize("size_wh", [(400, 300), (300, 500), (256, 256)])
def test_mask_lands_where_the_box_is_drawn(size_wh: tuple[int, int]) -> None:
    w, h = size_wh
    box = (int(w * 0.3), int(h * 0.4), int(w * 0.6), int(h * 0.7))
    img = Image.new("RGB", size_wh, "black")
    ImageDraw.Draw(img).rectangle(box, fill="white")
    mask = np.zeros((h, w), dtype=bool)
    mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = True

    pre = Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    bright = pre.image(img).mean(0) > 0
    m = pre.mask(mask)
    assert m.shape == (224, 224) and m.dtype == torch.float32
    assert 0 <= float(m.min()) and float(m.max()) <= 1
    assert ((m > 0.5) == bright).float().mean() > 0.995

    # A mask drawn at half resolution lines up after mask_for_image.
    small = Image.fromarray(mask).resize((w // 2, h // 2), Image.Resampling.NEAREST)
    m2 = pre.mask(mask_for_image(small, img.size))
    assert ((m2 > 0.5) == bright).float().mean() > 0.98


def test_mask_inputs() -> None:
    pre = Preprocess(size=8, resize=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    ones = np.ones((16, 16), np.float32)
    for m in (ones, torch.ones(1, 16, 16), Image.new("L", (16, 16), 255), np.full((16, 16), 255, np.uint8)):
        out = pre.mask(m)
        assert out.shape == (8, 8) and torch.allclose(out, torch.ones(8, 8, dtype=torch.float32))
    with pytest.raises(MaskError):
        pre.mask(np.full((4, 4), 2.0))
    with pytest.raises(MaskError):
        pre.mask(np.zeros((2, 3, 4, 5)))
    soft = mask_for_image(np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), (4, 4))
    assert soft.shape == (4, 4) and 0 < soft[0, 1] < 1  # bilinear keeps soft edges
    hard = mask_for_image(np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), (4, 4), resample="nearest")
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert mask_for_image(np.ones((200, 300)), (600, 400)).shape == (400, 600)  # any resolution
    with pytest.raises(MaskError, match="aspect"):  # but not another picture's shape
        mask_for_image(np.ones((300, 300)), (600, 400))


def test_denormalize_round_trips() -> None:
    pre = Preprocess(size=32, resize=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    back = pre.denormalize(pre.image(img))
    assert back.size == (32, 32) and back.mode == "RGB"
    assert np.abs(np.asarray(back, np.int16) - np.asarray(img, np.int16)).max() <= 1
    assert pre.denormalize(pre.image(img)[None]).size == (32, 32)


def test_preprocess_validates() -> None:
    with pytest.raises(ModelError):
        Preprocess(size=256, resize=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ModelError, match="interpolation"):
        Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="fancy")


# ------------------------------------------------------------------------------------------ names
def test_unknown_model_suggests() -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(ModelError, match="resnet50") as e:
        load_classifier("resnet5O")
    assert "Did you mean" in str(e.value)
    with pytest.raises(ModelError, match="efficientnet-lite0"):
        load_classifier("efficientnet-lite")


def test_list_models() -> None:
    names = list_models()
    assert names[0] == "efficientnet-lite0"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert names == ["efficientnet-lite0"]
    else:
        assert {"resnet18", "resnet50", "vgg16"} <= set(names)


def test_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    assert list_models() == ["efficientnet-lite0"]
    with pytest.raises(ModelError, match=r"rulewriter\[torchvision\]"):
        load_classifier("resnet18", weights="none")


# ------------------------------------------------------------------------------------------ torchvision
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2"])
def test_torchvision_random_init(name: str) -> None:
    pytest.importorskip("torchvision")
    clf = load_classifier(name, weights="none")
    assert clf.name == name and len(clf.labels) == 1000 and clf.wnids is not None
    assert not clf.model.training
    x = torch.zeros(1, 3, clf.preprocess.size, clf.preprocess.size)
    assert len(clf.predict(x, topk=3)[0]) == 3


def test_torchvision_default_layers_exist() -> None:
    tv = pytest.importorskip("torchvision")
    for name, layer in DEFAULT_LAYERS.items():
        if name != "efficientnet-lite0":
            get_module(tv.models.get_model(name, weights=None), layer)


def test_torchvision_missing_hub_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelError) as e:
        load_classifier("resnet18")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "resnet18-f37072fd.pth" in msg and "weights=" in msg


def test_torchvision_weights_from_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = tv.models.resnet18().float()
    (tmp_path / "checkpoints").mkdir()
    torch.save(net.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    clf = load_classifier("resnet18")
    assert clf.labels[817] == "sports car" and clf.default_layer == "layer4.1.conv2"
    assert clf.preprocess.describe() == {"size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406],
                                         "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    x = torch.randn(2, 3, 224, 224, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(clf.model(x), net.eval()(x), atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path: Path, suffix: str) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18().float().eval()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": net.state_dict()}, path)  # a wrapped checkpoint is unwrapped
    clf = load_classifier("resnet18", weights=path)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(clf.model(x), net(x))
    assert clf.weights_id == load_classifier("resnet18", weights=str(path)).weights_id


def test_bad_weights_files(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(ModelError, match="not found"):
        load_classifier("resnet18", weights=tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_classifier("resnet18", weights=junk)
    wrong = tmp_path / "wrong.pt"
    torch.save(TinyNet().state_dict(), wrong)
    with pytest.raises(ModelError, match="do not fit"):
        load_classifier("resnet18", weights=wrong)


# ------------------------------------------------------------------------------------------ nn.Module
def test_module_passed_directly() -> None:
    torch.manual_seed(0)
    net = TinyNet(classes=3).float().train()
    clf = load_classifier(net)
    assert clf.name == "TinyNet" and clf.labels == ["class_0", "class_1", "class_2"]
    assert clf.wnids is None and clf.default_layer == "conv" and not net.training  # its last groups=1 conv
    assert clf.weights_id == module_fingerprint(net)
    assert clf.preprocess.size == 224
    pre = Preprocess(size=32, resize=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    clf2 = load_classifier(net, labels=["a", "b", "c"], preprocess=pre, default_layer="conv")
    assert clf2.predict(torch.zeros(1, 3, 32, 32), topk=5)[0][0][1] in {"a", "b", "c"}
    assert clf2.default_layer == "conv"
    with pytest.raises(LayerError):
        load_classifier(net, default_layer="convv")


def test_module_fingerprint_tracks_weights() -> None:
    net = TinyNet()
    before = module_fingerprint(net)
    assert module_fingerprint(net) == before
    with torch.no_grad():
        net.fc.weight[0, 0] += 1
    assert module_fingerprint(net) != before


# ------------------------------------------------------------------------------------------ layers
def test_get_module_and_suggestions(lite0: Classifier) -> None:
    assert isinstance(get_module(lite0.model, "_blocks.12._project_conv"), nn.Conv2d)
    assert get_module(lite0.model, "") is lite0.model
    with pytest.raises(LayerError, match=r"_blocks\.12\._project_conv") as e:
        get_module(lite0.model, "_blocks.12._project_con")
    assert "Did you mean" in str(e.value)
    with pytest.raises(KeyError):  # LayerError is also a KeyError
        get_module(TinyNet(), "nothing.like.this")


def test_layer_names() -> None:
    rows = dict(layer_names(TinyNet()))
    assert rows == {"conv": "Conv2d 3→4 k3 s2 groups=1", "fc": "Linear 4→3"}
    assert dict(layer_names(TinyNet(), types=(nn.Linear,))) == {"fc": "Linear 4→3"}


def test_layer_names_efficientnet(lite0: Classifier) -> None:
    rows = dict(layer_names(lite0.model))
    assert rows["_fc"] == "Linear 1280→1000"
    assert rows["_blocks.1._depthwise_conv"].endswith("groups=96")


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.slow
def test_imagenet_samples_top1(lite0: Classifier, shared_dir: Path) -> None:
    root = shared_dir / "data" / "imagenet-samples"
    if not root.is_dir():
        pytest.skip(f"ImageNet samples not found at {root}")
    from rulewriter.models.data import load_image

    files = sorted(root.glob("*.jpg"))
    assert len(files) == 1000
    wnids, _ = imagenet_classes()
    assert [f.name.split("_", 1)[0] for f in files] == wnids
    correct = 0
    for i in range(0, len(files), 50):
        x = lite0.preprocess.batch([load_image(f) for f in files[i : i + 50]])
        with torch.no_grad():
            pred = lite0.model(x).argmax(1)
        correct += int((pred == torch.arange(i, i + len(x))).sum())
    assert correct / len(files) >= 0.85
