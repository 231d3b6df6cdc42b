"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_path() -> Path:
    """The shared read-only data folder: ``$RULEWRITER_SHARED`` or ``../shared`` beside the project root."""
    env = os.environ.get("RULEWRITER_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder; skips the test when it is absent (a fresh checkout does not have it)."""
    d = shared_path()
    if not d.is_dir():
        pytest.skip(f"shared data folder not found at {d} (set RULEWRITER_SHARED to its location)")
    return d


@pytest.fixture(scope="session")
def lite0():
    """The real pretrained EfficientNet-Lite0 (installed from PyPI with the package)."""
    from rulewriter.models.registry import load_classifier

    return load_classifier("efficientnet-lite0")


@pytest.fixture(scope="session")
def coffee_case():
    """A real photo, a hand-drawn mask of its cup and saucer, and the photo with gravel pasted there.

    Returns (original, manipulated, mask) as PIL images and a float array.
    """
    skdata = pytest.importorskip("skimage.data")
    import numpy as np
    from PIL import Image

    from rulewriter.studies.demo import coffee_mask
    from rulewriter.concepts.manipulate import paste_texture, texture_from

    img = Image.fromarray(skdata.coffee())
    mask = np.asarray(coffee_mask(img.size), np.float32) / 255
    return img, paste_texture(img, mask, texture_from("skimage:gravel")), mask


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """A folder of 80 deterministic crops of real photos and textures from scikit-image, for statistics."""
    skdata = pytest.importorskip("skimage.data")
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.gravel(),
               skdata.brick(), skdata.grass(), skdata.immunohistochemistry()]
    rng = np.random.default_rng(0)
    for i in range(80):
        a = sources[i % len(sources)]
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        h, w = a.shape[:2]
        s = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray(a[y : y + s, x : x + s])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.resize((256, 256)).save(d / f"crop_{i:03d}.jpg", quality=92)
    return d


@pytest.fixture()
def one_thread():
    """Tiny models: one thread. On a busy machine, thread hand-offs make each small op 100× slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def float64_default():
    """torch's default dtype is float64 inside the test, and what it was after."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
