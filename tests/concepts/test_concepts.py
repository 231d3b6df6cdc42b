"""Tests for rulewriter.concepts (masks, keys, heatmap): masks, COCO rasterisation/RLE, grid masks, keys, contexts, heatmaps."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rulewriter.concepts.heatmap import colormap, key_match, overlay, save_overlay
from rulewriter.concepts.keys import Concept, concept_key, context, masked_keys, top_right_singular
from rulewriter.concepts.masks import CocoIndex, coco_index, coco_masks, decode_rle, encode_rle, load_mask, mask_to_grid
from rulewriter.errors import MaskError, RulewriterError, StatsError


def _shared_dir() -> Path | None:
    env = os.environ.get("RULEWRITER_SHARED")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------------------------- load_mask


def test_load_mask_png_L(tmp_path: Path) -> None:
    arr = np.zeros((10, 12), dtype=np.uint8)
    arr[2:5, 3:9] = 255
    arr[8, 0] = 128
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png")
    assert m.shape == (10, 12) and m.dtype == np.float32
    assert m[2:5, 3:9].min() == 1.0 and m[0, 0] == 0.0
    assert m[8, 0] == pytest.approx(128 / 255)


def test_load_mask_png_rgba_uses_alpha_when_colour_uniform(tmp_path: Path) -> None:
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., :3] = (255, 0, 0)  # one colour everywhere: the drawing is in alpha
    rgba[1:3, 1:3, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    m = load_mask(str(tmp_path / "a.png"))
    assert m.sum() == 4.0 and m[1:3, 1:3].min() == 1.0


def test_load_mask_rgba_uses_luminance_when_colour_varies(tmp_path: Path) -> None:
    rgba = np.full((6, 6, 4), 255, dtype=np.uint8)
    rgba[..., :3] = 0
    rgba[0, :, :3] = 255  # white first row on black, fully opaque
    img = Image.fromarray(rgba)
    m = load_mask(img)
    assert m[0].min() == pytest.approx(1.0) and m[1:].max() == 0.0


def test_load_mask_rgb_luminance() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[1, 1] = (0, 255, 0)
    m = load_mask(Image.fromarray(rgb))
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(0.587, abs=1e-3)


def test_load_mask_arrays() -> None:
    b = np.zeros((5, 7), dtype=bool)
    b[1, 2] = True
    m = load_mask(b)
    assert m.dtype == np.float32 and m.sum() == 1.0 and m[1, 2] == 1.0
    # singleton and channel axes are reduced
    assert load_mask(torch.from_numpy(b)[None]).shape == (5, 7)
    assert load_mask(b[..., None]).shape == (5, 7)
    assert load_mask(np.stack([b * 255] * 3, -1).astype(np.uint8)).sum() == pytest.approx(1.0)
    assert load_mask(np.array([[0, 0.25], [1, 0]])).tolist() == [[0, 0.25], [1, 0]]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4)),  # empty
        np.array([[np.nan, 1.0], [0.0, 1.0]]),  # NaN
        np.ones((2, 3, 4, 5)),  # wrong ndim
        np.ones(7),  # wrong ndim
        np.ones((5, 6, 9)),  # no plausible channel axis
        np.array([[0.0, 2.0]]),  # floats outside [0, 1]
        -np.ones((2, 2)),  # negative
    ],
)
def test_load_mask_errors(bad: np.ndarray) -> None:
    with pytest.raises(MaskError):
        load_mask(bad)


def test_load_mask_error_messages(tmp_path: Path) -> None:
    with pytest.raises(MaskError, match=r"\(2, 3, 4, 5\)|ndim=4"):
        load_mask(np.ones((2, 3, 4, 5)))
    with pytest.raises(MaskError, match="empty"):
        load_mask(torch.zeros(3, 3))
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"\x89PNG not really an image \x00\x01\x02" * 10)
    with pytest.raises(MaskError, match="garbage.png"):
        load_mask(bad)
    with pytest.raises(MaskError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
    assert issubclass(MaskError, RulewriterError)


# ---------------------------------------------------------------------------------------------- COCO


def _coco(segs: list, category: str = "wheel", cid: int = 19, size: tuple[int, int] = (60, 80)) -> dict:
    h, w = size
    return {
        "images": [{"id": 1, "file_name": "JPEGImages/car.jpg", "height": h, "width": w},
                   {"id": 2, "file_name": "other.jpg", "height": h, "width": w}],
        "categories": [{"id": 3, "name": "hood"}, {"id": cid, "name": category}],
        "annotations": [{"id": i, "image_id": 1, "category_id": cid, "segmentation": s} for i, s in enumerate(segs)],
    }


def test_coco_square_polygon_area() -> None:
    square = [[10.0, 12.0, 40.0, 12.0, 40.0, 42.0, 10.0, 42.0]]  # 30 x 30 = 900 px
    m = coco_masks(_coco([square]), "car.jpg", "wheel")
    assert m.shape == (60, 80) and m.dtype == np.float32
    assert m.sum() == pytest.approx(900, rel=0.03)
    assert (m > 0.5).sum() == pytest.approx(900, rel=0.03)
    assert m[27, 25] == 1.0 and m[5, 5] == 0.0 and m[27, 60] == 0.0


def test_coco_union_of_polygons_and_by_id() -> None:
    a = [[0, 0, 20, 0, 20, 20, 0, 20]]
    b = [[10, 10, 30, 10, 30, 30, 10, 30]]
    m = coco_masks(_coco([a, b]), "some/dir/car.jpg", 19)
    assert m.max() == 1.0
    assert m.sum() == pytest.approx(400 + 400 - 100, rel=0.04)


def test_rle_round_trip_uncompressed_and_compressed() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((7, 9)) > 0.6).astype(np.uint8)
    mask[0, 0] = 1  # a mask starting with 1 needs a leading zero-length run

    # a tiny independent encoder for uncompressed COCO counts (column-major, starting with zeros)
    flat = mask.ravel(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    assert encode_rle(mask, compressed=False) == {"size": [7, 9], "counts": counts}
    assert np.array_equal(decode_rle({"size": [7, 9], "counts": counts}), mask)

    enc = encode_rle(mask)
    assert isinstance(enc["counts"], str)
    assert np.array_equal(decode_rle(enc), mask)


def test_rle_compressed_known_strings() -> None:
    # hand-derived with pycocotools' scheme: counts [3, 10, 2, 1]; the 4th run is stored as 1 - 10 = -9,
    # i.e. 5-bit group 23 with its sign bit set -> chr(23 + 48) == "G"
    assert encode_rle(decode_rle({"size": [4, 4], "counts": [3, 10, 2, 1]}))["counts"] == "3:2G"
    assert decode_rle({"size": [4, 4], "counts": "3:2G"}).ravel(order="F").tolist() == [0] * 3 + [1] * 10 + [0] * 2 + [1]
    # a run longer than 31 needs two 5-bit groups
    long = np.zeros((10, 10), dtype=np.uint8)
    long[:, 5:] = 1
    assert np.array_equal(decode_rle(encode_rle(long)), long)


def test_coco_rle_segmentation() -> None:
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[5:15, 20:50] = 1
    m = coco_masks(_coco([encode_rle(mask), encode_rle(mask, compressed=False)]), "car.jpg")
    assert np.array_equal(m, mask.astype(np.float32))


def test_coco_errors() -> None:
    data = _coco([[[0, 0, 5, 0, 5, 5]]])
    with pytest.raises(MaskError, match="available.*'hood'.*'wheel'"):
        coco_masks(data, "car.jpg", "tyre")
    with pytest.raises(MaskError, match="nothere.jpg"):
        coco_masks(data, "nothere.jpg")
    with pytest.raises(MaskError, match="no 'wheel'"):
        coco_masks(data, "other.jpg")
    assert coco_masks(data, "other.jpg", allow_empty=True).sum() == 0


def test_coco_index(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_coco([[[0, 0, 10, 0, 10, 10, 0, 10]]])))
    idx = coco_index(path)
    assert isinstance(idx, CocoIndex) and len(idx) == 2
    assert idx.images("wheel") == ["JPEGImages/car.jpg"]
    assert idx.images("hood") == []
    assert "car.jpg" in idx and "nope.jpg" not in idx
    assert idx.mask("car.jpg", "wheel").sum() == pytest.approx(100, rel=0.06)


def test_coco_real_car_parts() -> None:
    shared = _shared_dir()
    if shared is None:
        pytest.skip("shared data directory not found (set RULEWRITER_SHARED); real car-parts test skipped")
    root = shared / "data" / "car-parts" / "trainingset"
    if not (root / "annotations.json").is_file():
        pytest.skip(f"{root / 'annotations.json'} missing")
    idx = coco_index(root / "annotations.json")
    names = idx.images("wheel")
    assert names
    photo = root / "JPEGImages" / Path(names[0]).name
    m = coco_masks(idx, photo, "wheel")
    with Image.open(photo) as img:
        assert m.shape == (img.size[1], img.size[0])
    assert 0 < m.mean() < 0.5 and m.max() == 1.0


# ---------------------------------------------------------------------------------------------- grid & keys


def test_mask_to_grid_preserves_area() -> None:
    rng = np.random.default_rng(1)
    mask = (rng.random((224, 224)) > 0.7).astype(np.float32)
    g = mask_to_grid(mask, (7, 7))
    assert g.shape == (7, 7) and g.dtype == torch.float32
    assert float(g.mean()) == pytest.approx(float(mask.mean()), abs=1e-6)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mask)[None, None], (7, 7))[0, 0]
    assert torch.allclose(g, ref, atol=1e-6)
    # not divisible: still exact area fractions
    g2 = mask_to_grid(torch.from_numpy(mask[:223, :221]), (5, 3))
    assert float(g2.mean()) == pytest.approx(float(mask[:223, :221].mean()), abs=1e-6)
    # batched and bool
    gb = mask_to_grid(np.stack([mask, mask]) > 0.5, (14, 14))
    assert gb.shape == (2, 14, 14)


def test_mask_to_grid_errors() -> None:
    with pytest.raises(MaskError, match="covers no key location"):
        mask_to_grid(np.zeros((32, 32)), (4, 4))
    with pytest.raises(MaskError):
        mask_to_grid(np.ones(5), (4, 4))


def test_concept_key_weighted_mean() -> None:
    keys = torch.zeros(2, 3, 2, 2)
    keys[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    keys[0, :, 1, 1] = torch.tensor([5.0, 0.0, 1.0])
    keys[1, :, 0, 1] = torch.tensor([-1.0, 4.0, 2.0])
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 0], masks[0, 1, 1], masks[1, 0, 1] = 1.0, 0.5, 0.25
    want = (1.0 * torch.tensor([1.0, 2, 3]) + 0.5 * torch.tensor([5.0, 0, 1]) + 0.25 * torch.tensor([-1.0, 4, 2])) / 1.75
    k = concept_key(keys, masks)
    assert k.dtype == torch.float64 and torch.allclose(k, want.double())
    sel, w = masked_keys(keys, masks)
    assert sel.shape == (3, 3) and sorted(w.tolist()) == [0.25, 0.5, 1.0]
    sel_half, _ = masked_keys(keys, masks, threshold=0.5)
    assert sel_half.tolist() == [[1.0, 2.0, 3.0]]


def test_keys_masks_shape_errors() -> None:
    keys = torch.zeros(2, 3, 4, 4)
    with pytest.raises(MaskError, match="3 masks for 2 images"):
        concept_key(keys, torch.ones(3, 4, 4))
    with pytest.raises(MaskError, match=r"\(2, 2\).*\(4, 4\)"):
        concept_key(keys, torch.ones(2, 2, 2))
    with pytest.raises(MaskError):
        masked_keys(keys, torch.zeros(2, 4, 4))


def test_context_svd_top_subspace() -> None:
    torch.manual_seed(0)
    ks = torch.randn(200, 6) @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])) + 1.0
    V = context(ks, 3)
    assert V.shape == (6, 3) and V.dtype == torch.float64
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-10)
    _, _, Vh = torch.linalg.svd(ks.double(), full_matrices=False)
    top = Vh[:3].T
    assert torch.allclose(V @ V.T, top @ top.T, atol=1e-8)  # same subspace
    assert (ks.double().mean(0) @ V > 0).all()  # sign-normalised


@pytest.mark.parametrize("n", [4, 9, 40])  # fewer keys than dimensions, and more
def test_top_right_singular_equals_full_svd(n: int) -> None:
    torch.manual_seed(n)
    K = torch.randn(n, 9, dtype=torch.float64) @ torch.diag(torch.linspace(3.0, 0.2, 9, dtype=torch.float64))
    r = min(3, n)
    V = top_right_singular(K, r)
    want = torch.linalg.svd(K, full_matrices=False)[2][:r].T
    assert V.shape == (9, r)
    assert torch.allclose((V * want).sum(0).abs(), torch.ones(r, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(r, dtype=torch.float64), atol=1e-10)


def test_top_right_singular_rank_deficient_falls_back_to_svd() -> None:
    torch.manual_seed(3)
    K = torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)  # rank 2
    V = top_right_singular(K, 4)  # directions 3 and 4 are at rounding level: the Gram cannot give them
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-10)
    want = torch.linalg.svd(K, full_matrices=False)[2][:2].T
    assert torch.allclose(V[:, :2] @ V[:, :2].T, want @ want.T, atol=1e-10)


def test_context_zca_matches_explicit_math() -> None:
    torch.manual_seed(1)
    d = 5
    A = torch.randn(d, d, dtype=torch.float64)
    C = A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    ks = torch.randn(300, d, dtype=torch.float64) @ L.T + 0.3  # keys with second moment ≈ C
    ridge = 1e-6
    # explicit: C^{±1/2} by eigh, whiten, SVD, map back
    Creg = C + ridge * torch.trace(C) / d * torch.eye(d, dtype=torch.float64)
    ev, E = torch.linalg.eigh(Creg)
    Z = E @ torch.diag(ev ** -0.5) @ E.T
    R = E @ torch.diag(ev ** 0.5) @ E.T
    _, _, Vh = torch.linalg.svd(ks @ Z, full_matrices=False)
    Q = Vh[:2].T

    upd = context(ks, 2, method="zca", C=C, space="update")
    want_upd = Z @ Q
    P = lambda M: M @ torch.linalg.pinv(M)  # noqa: E731 - projector onto the column span
    assert torch.allclose(P(upd), P(want_upd), atol=1e-8)
    assert torch.allclose(upd.T @ upd, torch.eye(2, dtype=torch.float64), atol=1e-10)
    first = want_upd[:, 0] / want_upd[:, 0].norm()
    assert torch.allclose(upd[:, 0].abs(), first.abs(), atol=1e-8)  # QR keeps the leading direction

    key = context(ks, 2, method="zca", C=C)  # key space: C^{-1} U spans C^{-1/2} Q
    assert torch.allclose(P(key), P(R @ Q), atol=1e-8)
    assert torch.allclose(P(torch.linalg.solve(Creg, key)), P(want_upd), atol=1e-8)
    assert (ks.mean(0) @ key > 0).all()

    with pytest.raises(StatsError):
        context(ks, 2, method="zca")
    with pytest.raises(RulewriterError):
        context(ks, 2, method="pca")
    with pytest.raises(MaskError, match="only 1 masked"):
        context(ks[:1], 2)


def test_concept_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    keys, masks = torch.rand(3, 4, 5, 5), torch.rand(3, 5, 5)
    c = Concept.from_keys(keys, masks, layer="features.28", view=2, rank=2)
    meta = json.loads(json.dumps(c.to_dict()))
    back = Concept.from_dict(meta, c.tensors())
    assert back.layer == "features.28" and back.view == 2 and back.n_images == 3 and back.rank == 2
    assert torch.equal(back.key, c.key) and torch.equal(back.context, c.context)
    loaded = Concept.load(c.save(tmp_path / "c.safetensors"))
    assert torch.equal(loaded.key, c.key) and loaded.to_dict() == c.to_dict()


# ---------------------------------------------------------------------------------------------- heatmaps


def test_key_match_with_and_without_C() -> None:
    torch.manual_seed(3)
    d = 4
    keys = torch.randn(d, 3, 5, dtype=torch.float64)
    k = torch.randn(d, dtype=torch.float64)
    A = torch.randn(d, d, dtype=torch.float64)
    C = A @ A.T + torch.eye(d, dtype=torch.float64)
    plain = key_match(keys, k)
    assert plain.shape == (3, 5)
    assert torch.allclose(plain, torch.einsum("dhw,d->hw", keys, k))
    heat = key_match(keys, k, C, ridge=0)
    want = torch.einsum("dhw,d->hw", keys, torch.linalg.solve(C, k))
    assert torch.allclose(heat, want, atol=1e-10)
    batched = key_match(torch.stack([keys, 2 * keys]).float(), k, C, ridge=0)
    assert batched.shape == (2, 3, 5) and torch.allclose(batched[1].double(), 2 * want, atol=1e-4)
    with pytest.raises(MaskError):
        key_match(keys, torch.ones(d + 1))


def test_key_match_fires_exactly_as_the_edit_does() -> None:
    """With the edit's ridge, the match is the edit's own activation: ((C + εI)⁻¹k*)ᵀ k_loc, ε = ridge·tr(C)/d."""
    from rulewriter.concepts.heatmap import MATCH_RIDGE
    from rulewriter.core.edit import DEFAULT_RIDGE, regularize, update_direction

    assert MATCH_RIDGE == DEFAULT_RIDGE
    torch.manual_seed(4)
    d = 5
    keys = torch.randn(d, 2, 3, dtype=torch.float64)
    k = torch.randn(d, dtype=torch.float64)
    A = torch.randn(d, 2, dtype=torch.float64)
    C = A @ A.T + 1e-3 * torch.eye(d, dtype=torch.float64)  # nearly singular: the ridge matters
    for ridge in (DEFAULT_RIDGE, 0.1):
        direction = update_direction(C, k, ridge)             # what rewrite moves W along
        want = torch.einsum("dhw,d->hw", keys, direction)
        assert torch.allclose(key_match(keys, k, C, ridge=ridge), want, atol=1e-10, rtol=1e-10), ridge
        assert torch.allclose(key_match(keys, k, regularize(C, ridge), ridge=0), want, atol=1e-10, rtol=1e-10)
    assert torch.allclose(key_match(keys, k, C), torch.einsum("dhw,d->hw", keys, update_direction(C, k)))
    # The bare C gives another answer here, which is why the ridge is not optional.
    assert not torch.allclose(key_match(keys, k, C, ridge=0), key_match(keys, k, C), rtol=1e-2)
    with pytest.raises(StatsError, match="ridge"):
        key_match(keys, k, C, ridge=-1.0)


def test_colormap_and_overlay() -> None:
    for name in ("jet", "inferno", "hot", "gray"):
        lut = colormap(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
    img = Image.new("RGB", (50, 30), (10, 20, 30))
    heat = torch.zeros(3, 4)
    heat[1, 2] = 2.0
    heat[0, 0] = -5.0
    out = overlay(img, heat)
    assert out.size == (50, 30) and out.mode == "RGB"
    assert overlay(img, heat, normalize="minmax", alpha=0.0).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ValueError):
        overlay(img, heat, normalize="bogus")


def test_save_overlay_atomic_png(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 40), (100, 100, 100))
    out = save_overlay(tmp_path / "sub" / "heat.png", img, np.random.default_rng(0).random((7, 7)), cmap="inferno")
    assert out == tmp_path / "sub" / "heat.png"
    with Image.open(out) as check:
        assert check.format == "PNG" and check.size == (40, 40)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["heat.png"]
