"""models/preprocess.py: ``Preprocess.batch`` takes PIL images and paths alike, and refuses anything else clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rulewriter.errors import ImageLoadError
from rulewriter.models.data import load_image
from rulewriter.models.preprocess import Preprocess


@pytest.fixture()
def pre() -> Preprocess:
    return Preprocess(size=16, resize=20, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_batch_reads_paths_like_the_images_themselves(pre, tmp_path):
    img = Image.new("RGB", (30, 24))
    img.putpixel((3, 4), (250, 10, 40))
    img.paste((20, 200, 90), (10, 5, 28, 20))
    img.save(tmp_path / "a.png")
    Image.new("L", (24, 30), 128).save(tmp_path / "b.png")  # grey: converted to RGB on reading
    mixed = pre.batch([str(tmp_path / "a.png"), img, tmp_path / "b.png"])
    assert mixed.shape == (3, 3, 16, 16)
    assert torch.equal(mixed[0], mixed[1])  # a path gives exactly what its decoded image gives
    assert torch.equal(mixed[0], pre.image(load_image(tmp_path / "a.png")))
    assert torch.equal(mixed[2], pre.image(load_image(tmp_path / "b.png")))
    assert pre.batch([]).shape == (0, 3, 16, 16)


def test_batch_refuses_what_is_not_an_image_or_a_path(pre, tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        pre.batch([tmp_path / "missing.jpg"])
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageLoadError, match="notes.png"):
        pre.batch([Image.new("RGB", (8, 8)), str(tmp_path / "notes.png")])
    with pytest.raises(TypeError, match=r"item 1 is a ndarray.*PIL images or paths"):
        pre.batch([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))])
    with pytest.raises(TypeError, match="wrap it in a list"):
        pre.batch(str(tmp_path / "a.png"))  # one path, not a list of its characters
    with pytest.raises(TypeError, match="wrap it in a list"):
        pre.batch(Image.new("RGB", (8, 8)))
