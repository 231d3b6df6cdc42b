"""Tests for rulewriter.concepts.manipulate: pasting textures in pixels and in features, loading textures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rulewriter.errors import ImageLoadError, MaskError
from rulewriter.concepts.manipulate import paste_features, paste_texture, texture_from


def _photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(w: int = 40, h: int = 30) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.float32)
    m[5:20, 10:30] = 1.0
    return m


def test_paste_texture_outside_unchanged_inside_changed() -> None:
    img, m = _photo(), _mask()
    tex = Image.new("RGB", (16, 16), (0, 200, 50))
    out = paste_texture(img, m, tex)
    a, b = np.asarray(img), np.asarray(out)
    assert out.size == img.size and out.mode == "RGB"
    assert np.array_equal(a[m == 0], b[m == 0])
    assert (a[m == 1] != b[m == 1]).any(axis=-1).mean() > 0.9


def test_paste_texture_without_shading_is_the_texture() -> None:
    img, m = _photo(), _mask()
    tex = _photo(seed=5)  # same size as the image: covering it once is the identity
    out = np.asarray(paste_texture(img, m, tex, keep_shading=False))
    assert np.array_equal(out[m == 1], np.asarray(tex)[m == 1])
    assert np.array_equal(out[m == 0], np.asarray(img)[m == 0])


def test_paste_texture_shading_follows_luminance() -> None:
    arr = np.full((20, 20, 3), 100, dtype=np.uint8)
    arr[:, 10:] = 200  # right half of the object is brighter
    m = np.ones((20, 20), dtype=np.float32)
    out = np.asarray(paste_texture(Image.fromarray(arr), m, Image.new("RGB", (5, 5), (120, 120, 120))))
    assert out[:, 10:].mean() > out[:, :10].mean() + 20
    flat = np.asarray(paste_texture(Image.fromarray(arr), m, Image.new("RGB", (5, 5), (120, 120, 120)),
                                    shading_strength=0.0))
    assert np.all(flat == 120)


def test_paste_texture_soft_edges_and_tiling() -> None:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    m = np.zeros((32, 32), dtype=np.float32)
    m[:, 16:] = 0.5
    out = np.asarray(paste_texture(img, m, Image.new("RGB", (4, 4), (200, 200, 200)), keep_shading=False, scale=0.25))
    assert np.all(out[:, 16:] == 100) and np.all(out[:, :16] == 0)


def test_paste_texture_keeps_alpha() -> None:
    img = _photo().convert("RGBA")
    out = paste_texture(img, _mask(), Image.new("RGB", (8, 8), (1, 2, 3)))
    assert out.mode == "RGBA"


def test_paste_texture_errors() -> None:
    img = _photo()
    with pytest.raises(MaskError, match=r"30x30.*30x40"):
        paste_texture(img, np.ones((30, 30)), Image.new("RGB", (4, 4)))
    with pytest.raises(MaskError, match="empty"):
        paste_texture(img, np.zeros((30, 40)), Image.new("RGB", (4, 4)))


def test_paste_features() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 5)
    t = torch.randn(1, 3, 4, 5)
    m = torch.zeros(2, 4, 5)
    m[0, 1:3, 2:4] = 1.0
    m[1, 0, 0] = 1.0
    out = paste_features(f, t, m)
    outside = (m == 0)[:, None].expand_as(f)
    assert torch.equal(out[outside], f[outside])
    assert torch.equal(out[0, :, 1:3, 2:4], t[0, :, 1:3, 2:4])
    assert torch.equal(out[1, :, 0, 0], t[0, :, 0, 0])
    soft = paste_features(f, t, 0.25 * torch.ones(1, 4, 5))
    assert torch.allclose(soft, 0.75 * f + 0.25 * t)


def test_paste_features_resizes_texture() -> None:
    f = torch.zeros(1, 2, 6, 6)
    t = torch.full((1, 2, 3, 3), 7.0)
    out = paste_features(f, t, torch.ones(6, 6))
    assert torch.allclose(out, torch.full_like(f, 7.0))


@pytest.mark.parametrize(
    ("feat", "tex", "mask"),
    [
        ((2, 3, 4, 4), (1, 2, 4, 4), (2, 4, 4)),  # channel mismatch
        ((2, 3, 4, 4), (3, 3, 4, 4), (2, 4, 4)),  # texture batch
        ((2, 3, 4, 4), (1, 3, 4, 4), (3, 4, 4)),  # mask batch
        ((2, 3, 4, 4), (1, 3, 4, 4), (2, 5, 4)),  # mask grid
        ((3, 4, 4), (1, 3, 4, 4), (1, 4, 4)),  # features ndim
    ],
)
def test_paste_features_shape_errors(feat: tuple, tex: tuple, mask: tuple) -> None:
    with pytest.raises(MaskError):
        paste_features(torch.zeros(feat), torch.zeros(tex), torch.zeros(mask))


def test_texture_from_path_crop_and_gray(tmp_path: Path) -> None:
    Image.new("L", (20, 10), 77).save(tmp_path / "t.png")
    tex = texture_from(tmp_path / "t.png", crop_box=(2, 3, 12, 8))
    assert tex.mode == "RGB" and tex.size == (10, 5) and tex.getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(ImageLoadError):
        texture_from(tmp_path / "t.png", crop_box=(0, 0, 30, 5))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        texture_from(tmp_path / "bad.jpg")


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_texture_from_skimage() -> None:
    gravel = texture_from("skimage:gravel")
    assert gravel.mode == "RGB" and min(gravel.size) > 100
    with pytest.raises(ImageLoadError, match="no image"):
        texture_from("skimage:not_a_dataset")
