"""Stylizers: pixels outside the mask never change; Gram style transfer really moves the texture statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.errors import ImageLoadError, MaskError, RulewriterError
from rulewriter.models.registry import Preprocess, load_classifier
from rulewriter.studies.stylize import (GramStyle, Stylizer, TexturePaste, _Features, masked_gram, style_layers,
                                stylizer_from)


class Strided(nn.Module):
    """Four stride-2 convs (strides 2, 4, 8, 16), then a linear head: enough stages for style layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.c3b = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3b(torch.relu(self.c3(x))))
        return self.fc(torch.relu(self.c4(x)).mean((2, 3)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return load_classifier(Strided(), labels=["a", "b", "c"], preprocess=Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3))


def _photo(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8))


def _stripes(size=64):
    y, x = np.mgrid[:size, :size]
    a = (np.sin(x / 1.5) > 0)[..., None] * np.array([230, 40, 30]) + (np.sin(y / 3.0) > 0)[..., None] * np.array([0, 60, 200])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _mask(size=(48, 40)):
    m = np.zeros((size[1], size[0]), np.float32)
    m[8:32, 10:38] = 1
    return m


def test_texture_paste_changes_only_the_mask():
    img, m = _photo(), _mask()
    paste = TexturePaste(_stripes(), shading_strength=0)
    out = paste(img, m)
    a, b = np.asarray(img), np.asarray(out)
    assert out.size == img.size and out.mode == "RGB"
    assert np.array_equal(a[m == 0], b[m == 0])
    assert np.abs(a[m == 1].astype(int) - b[m == 1]).mean() > 30
    assert isinstance(paste, Stylizer) and paste.name == "paste:<Image>"


def test_stylizers_refuse_bad_masks(tiny):
    img = _photo()
    for s in (TexturePaste(_stripes()), GramStyle(tiny, _stripes(), steps=1)):
        with pytest.raises(MaskError):
            s(img, np.zeros((40, 48), np.float32))
        with pytest.raises(MaskError):
            s(img, np.ones((20, 48), np.float32))


def test_style_layers_take_one_conv_per_stage(tiny):
    styles, content = style_layers(tiny.model, 32)
    assert styles == ["c1", "c2", "c3", "c4"]
    assert content == "c3b"  # the last conv at stride 8


def test_masked_gram_weights_and_normalises():
    f = torch.arange(8.0).reshape(1, 2, 2, 2)
    full = masked_gram(f)
    flat = f.reshape(2, 4)
    assert torch.allclose(full[0], flat @ flat.T / 4)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(masked_gram(f, w)[0], flat[:, :1] @ flat[:, :1].T)


def _relative_gram_distance(gram: GramStyle, img: Image.Image, m: np.ndarray) -> float:
    """Mean over style layers of ‖G(img; mask) − G(texture)‖² / ‖G(texture)‖², measured on a finished image."""
    from rulewriter.concepts.masks import mask_to_grid

    canvas = gram.canvas_size(img.size)
    target = gram.texture_grams(canvas)
    small = img.resize(canvas, Image.Resampling.BICUBIC)
    ms = np.array(Image.fromarray(m).resize(canvas, Image.Resampling.BILINEAR), np.float32)
    with torch.no_grad():
        f = _Features(gram.classifier.model, gram.layers)(gram._normalize(gram._to_tensor(small)))
    d = [float((masked_gram(f[n].double(), mask_to_grid(ms, f[n].shape[-2:]).double())[0] - target[n]).pow(2).sum()
               / target[n].pow(2).sum()) for n in gram.layers]
    return float(np.mean(d))


def test_gram_style_halves_its_loss_moves_statistics_and_keeps_the_rest(tiny):
    img, m = _photo(), _mask()
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    gram = GramStyle(tiny, _stripes(), steps=40, lr=0.05)
    out = gram(img, m)
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(a[m == 0], b[m == 0])
    assert not np.array_equal(a[m == 1], b[m == 1])
    style = gram.last_losses["style"]
    assert len(style) == 41 and style[-1] < style[0] / 2
    # The finished, quantised image (not just the optimiser's variable) is closer to the texture.
    assert _relative_gram_distance(gram, out, m) < 0.6 * _relative_gram_distance(gram, img, m)
    # The model is left exactly as it was, gradients off.
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in tiny.model.parameters())


def test_gram_style_is_deterministic(tiny):
    img, m = _photo(1), _mask()
    a = GramStyle(tiny, _stripes(), steps=8, seed=3)(img, m)
    b = GramStyle(tiny, _stripes(), steps=8, seed=3)(img, m)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_gram_style_soft_mask_blends_and_zero_stays_exact(tiny):
    img = _photo(2)
    m = np.zeros((40, 48), np.float32)
    m[10:30, 10:30] = 0.5
    out = GramStyle(tiny, _stripes(), steps=5)(img, m)
    assert np.array_equal(np.asarray(img)[m == 0], np.asarray(out)[m == 0])


def test_stylizer_from_specs(tiny, tmp_path):
    p = tmp_path / "tex.png"
    _stripes().save(p)
    s = stylizer_from(f"paste:{p}")
    assert isinstance(s, TexturePaste) and s.name == f"paste:{p}"
    g = stylizer_from(f"gram:{p}", tiny, steps=2)
    assert isinstance(g, GramStyle) and g.steps == 2 and g.lr == 0.5 and g.name == f"gram:{p}"
    with pytest.raises(RulewriterError, match="classifier"):
        stylizer_from(f"gram:{p}")
    with pytest.raises(RulewriterError, match="unknown stylizer"):
        stylizer_from(f"blur:{p}")
    with pytest.raises(RulewriterError):
        stylizer_from("gravel")
    with pytest.raises(ImageLoadError):
        stylizer_from(f"paste:{tmp_path / 'missing.png'}")


def test_skimage_and_snow_textures(shared_dir):
    pytest.importorskip("skimage.data")
    img, m = _photo(), _mask()
    for spec in ("paste:skimage:gravel", f"paste:{shared_dir / 'data/textures/snow_texture.jpg'}"):
        out = stylizer_from(spec)(img, m)
        assert np.array_equal(np.asarray(img)[m == 0], np.asarray(out)[m == 0])


@pytest.mark.slow
def test_gram_style_on_efficientnet_lite0(lite0, coffee_case):
    torch.set_num_threads(2)
    img, _, mask = coffee_case
    gram = GramStyle(lite0, "skimage:gravel", steps=30)
    out = gram(img, mask)
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(a[mask == 0], b[mask == 0])
    assert gram.last_losses["style"][-1] < gram.last_losses["style"][0] / 2
    assert gram.layers == ["_conv_stem", "_blocks.1._depthwise_conv", "_blocks.3._depthwise_conv",
                           "_blocks.5._depthwise_conv"]
