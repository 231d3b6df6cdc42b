"""Tests for rulewriter.models.data: safe image loading, listings, labels from names, the dataset."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rulewriter.models.data import ImageDataset, labelled_images, list_images, load_image, subsample
from rulewriter.errors import ImageLoadError, RulewriterError
from rulewriter.models.preprocess import Preprocess

LABELS = ["tench", "goldfish", "sports car", "Egyptian cat"]
WNIDS = ["n01440764", "n01443537", "n04285008", "n02124075"]
PRE = Preprocess(size=8, resize=8, mean=(0.5,) * 3, std=(0.5,) * 3)


def png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (10, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ load_image
def test_load_image_ok(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(jpeg_bytes())
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (64, 48)
    gray = tmp_path / "g.png"
    Image.new("L", (5, 5), 7).save(gray)
    assert load_image(str(gray)).mode == "RGB"
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (5, 5), (1, 2, 3, 0)).save(rgba)
    assert load_image(rgba).getpixel((0, 0)) == (1, 2, 3)


def test_load_image_does_not_keep_file_open(tmp_path: Path) -> None:
    p = png(tmp_path / "x.png")
    img = load_image(p)
    p.unlink()  # the returned image no longer needs the file
    assert img.load()[0, 0] == (255, 0, 0)
    assert getattr(img, "fp", None) is None


def test_corrupt_image(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(b"\x00garbage bytes, not a JPEG" * 10)
    with pytest.raises(ImageLoadError, match="x.jpg"):
        load_image(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes((128, 128))
    p = tmp_path / "t.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="t.jpg") as e:
        load_image(p)
    assert "truncated" in str(e.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(RulewriterError):  # one base class for callers to catch
        load_image(tmp_path / "nope.png")


def test_non_image_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(p)


# ------------------------------------------------------------------------------------------ list_images
def test_list_images(tmp_path: Path) -> None:
    png(tmp_path / "b.png")
    png(tmp_path / "sub" / "a.PNG")
    (tmp_path / "c.JPG").write_bytes(jpeg_bytes())
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "._b.png").write_bytes(b"AppleDouble")
    got = list_images(tmp_path)
    assert got == sorted(got)
    assert {p.relative_to(tmp_path).as_posix() for p in got} == {"b.png", "sub/a.PNG", "c.JPG"}
    assert list_images(tmp_path, exts=("jpg",)) == [tmp_path / "c.JPG"]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_list_images_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ImageLoadError, match="no images found under"):
        list_images(tmp_path)
    with pytest.raises(ImageLoadError, match="no such directory"):
        list_images(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ labels
def test_labelled_wnid_folders(tmp_path: Path) -> None:
    png(tmp_path / "n04285008" / "1.png")
    png(tmp_path / "n04285008" / "deeper" / "2.png")
    png(tmp_path / "n01440764" / "3.png")
    (tmp_path / "empty").mkdir()  # no images: nothing to label, not an error
    got = labelled_images(tmp_path, LABELS, WNIDS)
    assert [(p.name, y) for p, y in got] == [("3.png", 0), ("1.png", 2), ("2.png", 2)]


def test_labelled_class_name_folders(tmp_path: Path) -> None:
    png(tmp_path / "Sports_Car" / "1.png")
    png(tmp_path / "egyptian cat" / "2.png")
    png(tmp_path / "goldfish" / "3.png")
    got = {p.name: y for p, y in labelled_images(tmp_path, LABELS)}
    assert got == {"1.png": 2, "2.png": 3, "3.png": 1}


def test_labelled_flat_files(tmp_path: Path) -> None:
    png(tmp_path / "n02124075_egyptian_cat.png")
    png(tmp_path / "n01443537_7.png")
    got = {p.name: y for p, y in labelled_images(tmp_path, LABELS, WNIDS)}
    assert got == {"n02124075_egyptian_cat.png": 3, "n01443537_7.png": 1}


def test_labelled_unknown_names(tmp_path: Path) -> None:
    png(tmp_path / "spaceship" / "1.png")
    png(tmp_path / "goldfish" / "2.png")
    with pytest.raises(ImageLoadError, match="spaceship"):
        labelled_images(tmp_path, LABELS, WNIDS)
    flat = tmp_path / "flat"
    png(flat / "n99999999_x.png")
    png(flat / "holiday.png")
    with pytest.raises(ImageLoadError, match="holiday.png") as e:
        labelled_images(flat, LABELS, WNIDS)
    assert "n99999999_x.png" in str(e.value)
    with pytest.raises(ImageLoadError, match="wnids"):
        labelled_images(flat, LABELS, None)


def test_labelled_real_samples(shared_dir: Path) -> None:
    root = shared_dir / "data" / "imagenet-samples"
    if not root.is_dir():
        pytest.skip(f"ImageNet samples not found at {root}")
    from rulewriter.models.registry import imagenet_classes

    wnids, labels = imagenet_classes()
    got = labelled_images(root, labels, wnids)
    assert [y for _, y in got] == list(range(1000))


# ------------------------------------------------------------------------------------------ dataset
def test_dataset_items(tmp_path: Path) -> None:
    a = png(tmp_path / "a.png", (255, 255, 255))
    b = png(tmp_path / "b.png", (0, 0, 0))
    ds = ImageDataset([a, str(b)], PRE, labels=[4, 2])
    assert len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 4 and torch.allclose(x, torch.ones_like(x))
    assert ImageDataset([a], PRE)[0][1] == -1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 8, 8) and batch[1].tolist() == [4, 2]
    with pytest.raises(ValueError):
        ImageDataset([a, b], PRE, labels=[1])


def test_dataset_from_folder(tmp_path: Path) -> None:
    png(tmp_path / "n04285008" / "1.png")
    png(tmp_path / "goldfish" / "2.png")
    ds = ImageDataset.from_folder(tmp_path, PRE, LABELS, WNIDS)
    assert sorted(ds.labels or []) == [1, 2]
    assert len(ImageDataset.from_folder(tmp_path, PRE)) == 2


def test_fingerprint(tmp_path: Path) -> None:
    a, b = png(tmp_path / "d" / "a.png"), png(tmp_path / "d" / "b.png")
    fp = ImageDataset([a, b], PRE).fingerprint()
    assert fp == ImageDataset([b, a], PRE, labels=[0, 1]).fingerprint()  # order and labels do not matter
    # Same names and sizes in another folder: same fingerprint (portable across machines).
    a2, b2 = png(tmp_path / "copy" / "a.png"), png(tmp_path / "copy" / "b.png")
    assert ImageDataset([a2, b2], PRE).fingerprint() == fp
    c = png(tmp_path / "d" / "c.png")
    assert ImageDataset([a, b, c], PRE).fingerprint() != fp
    png(b, size=(30, 30))  # same name, different size
    assert ImageDataset([a, b], PRE).fingerprint() != fp
    a3, b3 = png(tmp_path / "e" / "a.png"), png(tmp_path / "e" / "b.png")
    exact = ImageDataset([a3, b3], PRE).fingerprint(content=True)
    assert exact == ImageDataset([a2, b2], PRE).fingerprint(content=True)
    raw = bytearray(b2.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes: only content=True sees it
    b2.write_bytes(bytes(raw))
    assert ImageDataset([a2, b2], PRE).fingerprint() == fp
    assert ImageDataset([a2, b2], PRE).fingerprint(content=True) != exact


def test_fingerprint_missing_file(tmp_path: Path) -> None:
    a = png(tmp_path / "a.png")
    ds = ImageDataset([a, tmp_path / "gone.png"], PRE)
    with pytest.raises(ImageLoadError, match="gone.png"):
        ds.fingerprint()


# ------------------------------------------------------------------------------------------ subsample
def test_subsample() -> None:
    items = [f"img{i}.jpg" for i in range(100)]
    s = subsample(items, 10, seed=0)
    assert len(s) == 10 and len(set(s)) == 10
    assert s == subsample(items, 10, seed=0)
    assert s == [x for x in items if x in s]  # original order kept
    assert s != subsample(items, 10, seed=1)
    assert subsample(items, 1000) == items and subsample(items, None) == items
    assert subsample(items, 0) == []
    with pytest.raises(ValueError):
        subsample(items, -1)
