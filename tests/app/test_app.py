"""The browser app's JSON API (FastAPI TestClient) on a tiny fixture model and on EfficientNet-Lite0, and the
page itself in a real browser (Debian's chromium driven by playwright-core)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi", reason="the app needs the 'app' extra: pip install 'rulewriter[app]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from rulewriter.app import server as appmod  # noqa: E402
from rulewriter.app.images import MAX_UPLOAD_BYTES, decode_image_bytes, mask_box  # noqa: E402
from rulewriter.app.server import create_app, is_loopback  # noqa: E402
from rulewriter.app.state import MAX_SESSIONS  # noqa: E402
from rulewriter.errors import ImageLoadError  # noqa: E402
from rulewriter.models.registry import Preprocess, load_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "car", "van", "cup", "bus"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 1))
        self.head = nn.Linear(6, len(LABELS))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()


def _mask(size=(48, 40), box=(10, 8, 30, 26)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def _wait(client: TestClient, job: dict, timeout: float = 60.0) -> dict:
    t0 = time.time()
    while job["state"] not in ("done", "error"):
        assert time.time() - t0 < timeout, f"job {job['kind']} did not finish: {job}"
        time.sleep(0.02)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / ("sub" if i == 4 else "") / f"img{i}.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(outside)
    (d / "link.png").symlink_to(outside)  # leads out of the folder: must not be served
    return d


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return load_classifier(Tiny(), labels=LABELS, preprocess=Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3),
                           default_layer="features.4")


@pytest.fixture()
def client(tiny, folder, tmp_path):
    app = create_app(tiny, folder, out_dir=tmp_path / "out")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def _ids(client) -> dict[str, str]:
    return {im["name"]: im["id"] for im in client.get("/api/images").json()}


def _session(client) -> str:
    return client.post("/api/sessions").json()["session"]


def _exemplar(client, sid, image_id, *, target=None, mask=None):
    body = {"image_id": image_id, "mask": mask if mask is not None else _data_url(_mask()),
            "target": target or {"kind": "texture", "texture": "skimage:gravel"}}
    return client.post(f"/api/sessions/{sid}/exemplars", json=body)


# ------------------------------------------------------------------------------------------ helpers
def test_helpers():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    m = np.zeros((4, 6))
    m[1:3, 2:5] = 1
    assert mask_box(m) == (2, 1, 5, 3)
    assert decode_image_bytes(_png_bytes(Image.new("RGB", (5, 3)))).size == (5, 3)
    with pytest.raises(ImageLoadError, match="not a readable image"):
        decode_image_bytes(b"GIF89a but not really")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="TIFF")
    with pytest.raises(ImageLoadError, match="TIFF"):
        decode_image_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------ page, info, docs
def test_page_info_and_openapi(client, tiny):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<canvas id="mask-canvas">' in page.text and "/static/app.js" in page.text
    for f in ("app.js", "app.css"):
        assert client.get(f"/static/{f}").status_code == 200
    info = client.get("/api/info").json()
    assert info["model"] == tiny.name and info["layer"] == "features.4" and info["images"] == 5
    assert info["stats"]["kind"] == "image folder" and info["stats"]["ready"] is False
    assert info["max_upload_bytes"] == MAX_UPLOAD_BYTES and "skimage:gravel" in info["textures"]
    spec = client.get("/openapi.json").json()
    ops = [(p, m, op) for p, d in spec["paths"].items() for m, op in d.items()]
    assert len(ops) >= 25
    missing = [f"{m.upper()} {p}" for p, m, op in ops if not op.get("summary")]
    assert not missing, f"endpoints without a summary: {missing}"
    assert {"ExemplarIn", "Target", "JobOut", "Prediction"} <= set(spec["components"]["schemas"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(client, page):
    """/docs and /redoc load their viewer from the server itself, never from a CDN."""
    import re

    pytest.importorskip("fastapi_offline", reason="the app extra installs fastapi-offline")
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: *'([^']+)'", html)
    assert assets and not [a for a in assets if "//" in a], f"assets from elsewhere: {assets}"
    for a in assets:
        r = client.get(a)
        assert r.status_code == 200 and len(r.content) > 100, a


# ------------------------------------------------------------------------------------------ images
def test_images_by_id_only(client, folder):
    imgs = client.get("/api/images").json()
    assert [i["name"] for i in imgs] == ["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]
    assert "link.png" not in {i["name"] for i in imgs}, "a symlink out of the folder must not be listed"
    assert all(i["width"] == 48 and i["height"] == 40 for i in imgs)
    iid = imgs[0]["id"]
    r = client.get(f"/api/images/{iid}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (48, 40)
    assert Image.open(io.BytesIO(client.get(f"/api/images/{iid}/file?max_side=24").content)).size == (24, 20)
    preds = client.get(f"/api/images/{iid}/predictions").json()
    assert len(preds) == 5 and {p["label"] for p in preds} <= set(LABELS)
    assert [p["prob"] for p in preds] == sorted((p["prob"] for p in preds), reverse=True)
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fsecret.png",
                "..%252F..%252Fetc%252Fpasswd", "img0.png", "sub%2Fimg4.png"):
        for what in ("file", "predictions"):
            r = client.get(f"/api/images/{bad}/{what}")
            assert r.status_code == 404, (bad, what, r.status_code)
            assert b"root:" not in r.content
    for bad in ("/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd",
                "/static/%2e%2e/%2e%2e/app.py", "/static//etc/passwd"):
        r = client.get(bad)
        assert r.status_code == 404 and b"root:" not in r.content and b"create_app" not in r.content, bad
    assert client.get("/api/images/../../etc/passwd").status_code == 404
    assert client.get(f"/api/images/{iid}/file?max_side=99999").status_code == 422
    assert client.get("/api/textures/gravel.png").status_code == 200
    assert client.get("/api/textures/..%2F..%2Fsecret.png").status_code == 404


@pytest.mark.parametrize("stats_from", ["image folder", "stats-data"])
def test_statistics_use_the_filtered_listing(tiny, folder, tmp_path, stats_from):
    """Issue 12.3: the statistics read the same filtered listing as browsing (the symlink out is never opened)."""
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean, ignore=shutil.ignore_patterns("link.png"))
    kw = {"stats_data": folder} if stats_from == "stats-data" else {}
    state = create_app(tiny, folder, out_dir=tmp_path / "out", **kw).state.rulewriter
    assert [p.name for p in state.stats_paths] == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]
    reference = create_app(tiny, clean, out_dir=tmp_path / "out2").state.rulewriter.stats()
    assert torch.equal(state.stats().moment(), reference.moment())


def test_a_file_swapped_for_a_symlink_is_refused(tiny, folder, tmp_path):
    """Issue 12.3: a listed file replaced by a symlink (out of the folder) after start is refused everywhere."""
    with TestClient(create_app(tiny, folder, out_dir=tmp_path / "out"), base_url="http://127.0.0.1") as client:
        ids = _ids(client)
        victim = folder / "img1.png"
        victim.unlink()
        victim.symlink_to(tmp_path / "secret.png")
        for url in (f"/api/images/{ids['img1.png']}/file", f"/api/images/{ids['img1.png']}/predictions"):
            r = client.get(url)
            assert r.status_code == 400 and "no longer a file" in r.json()["detail"], (url, r.text)
        r = client.get("/api/images")
        assert r.status_code == 200 and "img1.png" not in [i["name"] for i in r.json()]
        assert json.loads(r.headers["X-Skipped-Images"])[0]["name"] == "img1.png"
        sid = _session(client)
        _exemplar(client, sid, ids["img0.png"])
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
        assert job["state"] == "error" and "no longer a file" in job["error"], job


def test_one_unreadable_image_is_skipped_and_named(tiny, folder, tmp_path):
    """One-line errors: an unreadable image in the folder is skipped by the listing (which says so), not a 500."""
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with TestClient(create_app(tiny, folder, out_dir=tmp_path / "out"), base_url="http://127.0.0.1") as client:
        r = client.get("/api/images")
        assert r.status_code == 200 and len(r.json()) == 5
        skipped = json.loads(r.headers["X-Skipped-Images"])
        assert [x["name"] for x in skipped] == ["broken.png"] and skipped[0]["reason"]
        bid = hashlib.sha256(b"broken.png").hexdigest()[:12]
        for what in ("file", "predictions"):
            r = client.get(f"/api/images/{bid}/{what}")
            assert r.status_code == 400 and "broken.png" in r.json()["detail"], r.text


def test_unknown_session_and_job(client):
    assert client.get("/api/sessions/nope").status_code == 404
    assert client.post("/api/sessions/nope/edit").status_code == 404
    assert client.get("/api/images?session=nope").status_code == 404
    assert client.get("/api/jobs/nope").status_code == 404


# ------------------------------------------------------------------------------------------ exemplars and masks
def test_exemplar_with_texture(client):
    sid, ids = _session(client), _ids(client)
    r = _exemplar(client, sid, ids["img0.png"])
    assert r.status_code == 200, r.text
    ex = r.json()
    assert ex["target"] == "texture" and ex["spec"]["texture"] == "skimage:gravel"
    assert len(ex["before"]["original"]) == 5 and len(ex["before"]["manipulated"]) == 5
    man = Image.open(io.BytesIO(client.get(ex["manipulated_url"]).content))
    orig = Image.open(io.BytesIO(client.get(f"/api/images/{ids['img0.png']}/file").content))
    assert man.size == orig.size == (48, 40)
    mask = np.asarray(Image.open(io.BytesIO(client.get(ex["mask_url"]).content)))
    assert mask.shape == (40, 48) and mask[10:25, 12:28].min() == 255 and mask[:5].max() == 0
    # a mask at another resolution with the image's aspect ratio is resized to the image
    assert _exemplar(client, sid, ids["img1.png"], mask=_data_url(_mask().resize((96, 80)))).status_code == 200
    state = client.get(f"/api/sessions/{sid}").json()
    assert len(state["exemplars"]) == 2 and state["edit"] is None
    # preview does not add
    body = {"image_id": ids["img2.png"], "mask": _data_url(_mask()), "target": {"kind": "texture", "texture": "skimage:brick"}}
    assert client.post(f"/api/sessions/{sid}/preview", json=body).status_code == 200
    assert len(client.get(f"/api/sessions/{sid}").json()["exemplars"]) == 2
    assert client.delete(f"/api/sessions/{sid}/exemplars/{ex['id']}").status_code == 200
    assert client.delete(f"/api/sessions/{sid}/exemplars/{ex['id']}").status_code == 404
    assert client.get(ex["manipulated_url"]).status_code == 404
    assert client.delete(f"/api/sessions/{sid}/exemplars").json() == {"removed": 1}


def test_malformed_masks_and_targets(client):
    sid, ids = _session(client), _ids(client)
    iid = ids["img0.png"]
    cases = {
        "wrong aspect ratio": (_data_url(_mask((100, 20), (0, 0, 50, 10))), 400, "aspect"),
        "empty mask": (_data_url(Image.new("L", (48, 40), 0)), 400, "empty"),
        "not an image": ("data:image/png;base64," + base64.b64encode(b"hello, not a png").decode(), 400, "not a readable image"),
        "not base64": ("data:image/png;base64,@@@not base64@@@", 400, "base64"),
        "zero bytes": ("", 400, "empty"),
    }
    for name, (mask, code, words) in cases.items():
        r = _exemplar(client, sid, iid, mask=mask)
        assert r.status_code == code, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json())
    assert _exemplar(client, sid, "nope").status_code == 404
    assert _exemplar(client, sid, iid, target={"kind": "texture", "texture": "/etc/passwd"}).status_code == 404
    assert _exemplar(client, sid, iid, target={"kind": "texture"}).status_code == 422
    assert _exemplar(client, sid, iid, target={"kind": "paint"}).status_code == 422
    assert _exemplar(client, sid, iid, target={"kind": "region"}).status_code == 422
    assert _exemplar(client, sid, iid, target={"kind": "region", "image_id": "nope", "box": [0, 0, 4, 4]}).status_code == 404
    r = _exemplar(client, sid, iid, target={"kind": "region", "image_id": ids["img1.png"], "box": [0, 0, 400, 4]})
    assert r.status_code == 400 and "crop_box" in r.json()["detail"]
    assert _exemplar(client, sid, iid, target={"kind": "key", "image_id": ids["img1.png"]}).status_code == 422
    assert client.get(f"/api/sessions/{sid}").json()["exemplars"] == [], "a refused exemplar must not be kept"


def test_region_and_key_targets(client):
    sid, ids = _session(client), _ids(client)
    other = ids["img3.png"]
    r = _exemplar(client, sid, ids["img0.png"], target={"kind": "region", "image_id": other,
                                                        "mask": _data_url(_mask(box=(20, 10, 40, 30)))})
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["box"] == [20, 10, 40, 30] and r.json()["spec"]["source"] == "img3.png"
    # the pasted pixels come from the other image's region
    man = np.asarray(Image.open(io.BytesIO(client.get(r.json()["manipulated_url"]).content)).convert("RGB"), float)
    orig = np.asarray(client.app.state.rulewriter.image(ids["img0.png"]), float)  # the file, not a JPEG of it
    assert np.abs(man[:5] - orig[:5]).max() == 0 and np.abs(man[12:24, 12:28] - orig[12:24, 12:28]).mean() > 20
    r = _exemplar(client, sid, ids["img1.png"], target={"kind": "key", "image_id": other, "mask": _data_url(_mask())})
    assert r.status_code == 200 and r.json()["manipulated_url"] is None and r.json()["spec"]["key_image"] == "img3.png"
    assert client.get(f"/api/sessions/{sid}/exemplars/{r.json()['id']}/manipulated.png").status_code == 404


# ------------------------------------------------------------------------------------------ the edit lifecycle
def test_edit_lifecycle(client, tiny, tmp_path):
    sid, ids = _session(client), _ids(client)
    weights = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert client.post(f"/api/sessions/{sid}/edit").status_code == 400  # no exemplars yet
    for path in ("compare", "report"):
        assert client.post(f"/api/sessions/{sid}/{path}").status_code == 400  # no edit yet
    assert client.post(f"/api/sessions/{sid}/edit/save", json={"name": "x"}).status_code == 400
    assert _exemplar(client, sid, ids["img0.png"]).status_code == 200
    assert _exemplar(client, sid, ids["img1.png"], target={"kind": "key", "image_id": ids["img2.png"],
                                                           "mask": _data_url(_mask())}).status_code == 200
    job = client.post(f"/api/sessions/{sid}/edit").json()
    assert job["kind"] == "edit" and 0.0 <= job["progress"] <= 1.0
    job = _wait(client, job)
    assert job["state"] == "done", job
    res = job["result"]
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds[:3] == ["exemplar", "manipulated", "exemplar"] and kinds.count("other") == 3
    assert res["edit"]["updates"][0]["layer"] == "features.4" and res["edit"]["updates"][0]["rank"] == 1
    assert res["pairs"] > 1 and all(len(r["before"]) == len(r["after"]) == 5 for r in res["rows"])
    # the edit moved the exemplars' outputs, yet the model's weights are exactly as before
    assert any(r["before"] != r["after"] for r in res["rows"] if r["kind"] != "other")
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} was left edited"
    assert client.get("/api/info").json()["stats"]["ready"] is True

    # save, list, download, load by name, upload
    r = client.post(f"/api/sessions/{sid}/edit/save", json={"name": "gravel-cup"})
    assert r.status_code == 200, r.text
    saved = Path(r.json()["path"])
    assert saved == tmp_path / "out" / "edits" / "gravel-cup.safetensors" and saved.is_file()
    assert json.loads(saved.with_name(saved.name + ".json").read_text())["format"] == "rulewriter.core.edit/1"
    assert client.get("/api/edits").json()["edits"] == ["gravel-cup.safetensors"]
    blob = client.get("/api/edits/gravel-cup.safetensors").content
    assert blob == saved.read_bytes()
    assert client.post(f"/api/sessions/{sid}/edit/revert").json() == {"reverted": True}
    assert client.get(f"/api/sessions/{sid}/edit").json() == {"edit": None}
    r = client.post(f"/api/sessions/{sid}/edit/load", json={"name": "gravel-cup"})
    assert r.status_code == 200 and r.json()["edit"]["source"] == "loaded gravel-cup.safetensors"
    sid2 = _session(client)
    r = client.post(f"/api/sessions/{sid2}/edit/upload", files={"file": ("mine.safetensors", blob)})
    assert r.status_code == 200 and r.json()["edit"]["source"] == "uploaded mine.safetensors"
    cmp = _wait(client, client.post(f"/api/sessions/{sid2}/compare", json={"image_ids": [ids["img3.png"]]}).json())
    assert cmp["state"] == "done" and [r["kind"] for r in cmp["result"]["rows"]] == ["other"]
    assert client.post(f"/api/sessions/{sid2}/compare", json={"image_ids": ["nope"]}).status_code == 404

    # the HTML report of the edit on the folder
    job = _wait(client, client.post(f"/api/sessions/{sid}/report").json())
    assert job["state"] == "done", job
    assert job["result"]["labels"] == "the unedited model's top-1"
    page = client.get(job["result"]["url"])
    assert page.status_code == 200 and "rulewriter evaluation" in page.text
    assert client.get(f"/api/sessions/{sid}/report/evaluation.json").json()["normal"]["n_images"] == 6
    for bad in ("..%2F..%2Fedits%2Fgravel-cup.safetensors", "%2Fetc%2Fpasswd", "nope.html"):
        assert client.get(f"/api/sessions/{sid}/report/{bad}").status_code == 404
    assert client.get(f"/api/sessions/{sid2}/report/index.html").status_code == 404
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, weights[k])


def _many(tmp_path) -> Path:
    """60 random photos: enough for the app to set a tenth aside as calibration images."""
    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"im{i:02d}.png")
    return d


def test_pasted_edits_are_validated_on_calibration_images_never_in_c(tiny, tmp_path):
    """As in `rulewriter edit`: with enough statistics images, some are set aside as calibration images
    (never C's), and an edit from pasted exemplars has its strength chosen under the locality budget; a key
    region exemplar (no manipulated image to augment) keeps the closed form."""
    d = _many(tmp_path)
    app = create_app(tiny, d, out_dir=tmp_path / "out", stats_samples=10)
    state = app.state.rulewriter
    assert len(state.stats_paths) == 10 and len(state.calibration_paths) == 50
    assert not set(state.stats_paths) & set(state.calibration_paths)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/api/info").json()["stats"]["calibration_images"] == 50
        sid, ids = _session(client), _ids(client)
        assert _exemplar(client, sid, ids["im00.png"]).status_code == 200
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
        assert job["state"] == "done", job
        info = job["result"]["edit"]
        assert info["strength"] is not None and "50 calibration images" in info["why"], info
        assert info["rules"][0]["views"] >= 4  # one exemplar gets MIN_VIEWS (8)
        assert _exemplar(client, sid, ids["im01.png"], target={"kind": "key", "image_id": ids["im02.png"],
                                                               "mask": _data_url(_mask())}).status_code == 200
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
        assert job["state"] == "done", job
        assert "no exemplar views" in job["result"]["edit"]["why"]
    # Without --stats-samples a tenth is set aside, and a tenth of 60 is too few: the closed form, said.
    few = create_app(tiny, d, out_dir=tmp_path / "out2").state.rulewriter
    assert few.calibration_paths == [] and len(few.stats_paths) == 60
    assert "closed form" in few.stats_source()["validation"]


def test_a_model_with_candidate_layers_gets_its_validated_edit_at_the_layer_it_prefers(tmp_path, monkeypatch):
    """As `rulewriter edit` without --layer: a validated edit is written at each candidate layer (each one's
    statistics read once, every layer's calibration from one pass) and kept at the one its validation
    prefers; --layer names one."""
    import rulewriter.core.locality as L
    from rulewriter.core.generalise import choose_layer
    from rulewriter.core.rules import rewrite

    passes = []
    real = L.calibration_sets
    monkeypatch.setattr(L, "calibration_sets", lambda clf, layers, data, **kw: passes.append(list(layers)) or
                        real(clf, layers, data, **kw))

    torch.manual_seed(0)
    clf = load_classifier(Tiny(), labels=LABELS, preprocess=Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3),
                          default_layer="features.4")
    clf.candidate_layers = ("features.4", "features.2")
    d = _many(tmp_path)
    app = create_app(clf, d, out_dir=tmp_path / "out", stats_samples=10)
    state = app.state.rulewriter
    assert state.layers == ["features.4", "features.2"] and state.layer == "features.4"
    with TestClient(app, base_url="http://127.0.0.1") as client:
        sid, ids = _session(client), _ids(client)
        assert _exemplar(client, sid, ids["im00.png"]).status_code == 200
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
        assert job["state"] == "done", job
        info = job["result"]["edit"]
        edit = state.sessions[sid].edit
        choice = edit.meta["layer_choice"]
        assert [r["layer"] for r in choice["layers"]] == ["features.4", "features.2"]
        assert info["layer"] == choice["chosen"] == edit.meta["layer"] and info["layer_why"] == choice["reason"]
        assert passes == [["features.4", "features.2"]]  # both layers' calibration images in one pass
        # The same choice as the two layers' edits solved one by one (each layer's statistics and calibration
        # images are the ones the job read: collected once, then reused).
        exemplars = list(state.sessions[sid].exemplars.values())
        alone = [rewrite(clf, state.build_rule(state.sessions[sid], exemplars, at), state.stats(layer=at),
                         calibration=state.calibration(at)) for at in state.layers]
        want = choose_layer(state.layers, [e.meta["strength"] for e in alone])
        assert (want["chosen"], want["index"]) == (choice["chosen"], choice["index"])
        # a layer that could not have won is pruned: every other row is the one-by-one edit's
        assert all(got == full or "pruned" in got for got, full in zip(choice["layers"], want["layers"]))
    one = create_app(clf, d, out_dir=tmp_path / "out2", stats_samples=10, layer="features.2").state.rulewriter
    assert one.layers == ["features.2"]
    import rulewriter.core.stats as S

    collected = []
    real_stats = S.collect_second_moments
    monkeypatch.setattr(S, "collect_second_moments", lambda clf, layers, data, **kw: collected.append(list(layers))
                        or real_stats(clf, layers, data, **kw))
    got = state.stats_at(["features.0", "features.4", "features.2", "head"])
    assert collected == [["features.0", "head"]]  # the layers not collected yet, in one pass
    assert list(got) == ["features.0", "features.4", "features.2", "head"]
    assert state.stats_at(["head"])["head"] is got["head"] and len(collected) == 1


def test_edit_names_stay_in_the_output_folder(client, tmp_path):
    sid, ids = _session(client), _ids(client)
    _exemplar(client, sid, ids["img0.png"])
    assert _wait(client, client.post(f"/api/sessions/{sid}/edit").json())["state"] == "done"
    for bad in ("../../evil", "/tmp/evil", "a/b", "..", ".hidden", "", "x" * 70, "a\\b", "%2e%2e%2fevil"):
        r = client.post(f"/api/sessions/{sid}/edit/save", json={"name": bad})
        assert r.status_code in (400, 422), (bad, r.status_code)
        r = client.post(f"/api/sessions/{sid}/edit/load", json={"name": bad})
        assert r.status_code in (400, 404, 422), (bad, r.status_code)
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..%2Fedits%2Fx", "nope"):
        assert client.get(f"/api/edits/{bad}").status_code in (400, 404), bad
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                     and "images" not in p.parts and p.name != "secret.png")
    assert written == [], f"refused names wrote files: {written}"


# ------------------------------------------------------------------------------------------ uploads
def test_uploads_sizes_types_and_pickles(client, tmp_path):
    sid, ids = _session(client), _ids(client)
    url = f"/api/sessions/{sid}/uploads"
    big = b"\x89PNG" + b"\0" * MAX_UPLOAD_BYTES
    assert client.post(url, files={"file": ("big.png", big, "image/png")}).status_code == 413
    huge = b"\0" * (MAX_UPLOAD_BYTES * 2)
    assert client.post(url, files={"file": ("huge.png", huge, "image/png")}).status_code == 413
    r = client.post(url, files={"file": ("x.png", b"not an image at all", "image/png")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    r = client.post(url, files={"file": ("../../etc/passwd", _png_bytes(Image.new("RGB", (30, 20), (200, 10, 10))))})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["upload"] and up["name"] == "passwd" and (up["width"], up["height"]) == (30, 20)
    # the upload is this session's: usable as a texture and an image here, unknown elsewhere
    assert _exemplar(client, sid, ids["img0.png"], target={"kind": "texture", "texture": up["id"]}).status_code == 200
    assert client.get(f"/api/images/{up['id']}/file?session={sid}").status_code == 200
    assert client.get(f"/api/images/{up['id']}/predictions?session={sid}").status_code == 200
    assert up["id"] in [i["id"] for i in client.get(f"/api/images?session={sid}").json()]
    other = _session(client)
    assert client.get(f"/api/images/{up['id']}/file?session={other}").status_code == 404
    assert client.get(f"/api/images/{up['id']}/file").status_code == 404
    assert _exemplar(client, other, ids["img0.png"], target={"kind": "texture", "texture": up["id"]}).status_code == 404

    # edits: pickles, torch.save archives and junk are refused without being unpickled
    eurl = f"/api/sessions/{sid}/edit/upload"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    r = client.post(eurl, files={"file": ("edit.safetensors", pickle.dumps(Evil()))})
    assert r.status_code == 400 and "pickle" in r.json()["detail"] and not marker.exists()
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    r = client.post(eurl, files={"file": ("edit.pt", buf.getvalue())})
    assert r.status_code == 400 and "pickle" in r.json()["detail"]
    r = client.post(eurl, files={"file": ("edit.safetensors", b"junk" * 10)})
    assert r.status_code == 400 and "safetensors" in r.json()["detail"]
    assert client.post(eurl, files={"file": ("e.safetensors", b"\0" * (MAX_UPLOAD_BYTES + 1))}).status_code == 413
    assert client.get(f"/api/sessions/{sid}/edit").json() == {"edit": None}
    # an edit of another model's layer is refused, and the model is left as it was
    from rulewriter.core.edit import Edit, LayerUpdate

    wrong = tmp_path / "wrong.safetensors"
    Edit([LayerUpdate("features.4", 2, torch.ones(3, 1), torch.ones(5, 1))]).save(wrong)
    r = client.post(eurl, files={"file": ("wrong.safetensors", wrong.read_bytes())})
    assert r.status_code == 400 and "another model" in r.json()["detail"]


def _bad_edit_file(kind: str, tiny, path: Path) -> Path:
    """An edit file that must be refused with a 4xx and a clear message (issue 12.5, 12.7, one-line errors)."""
    from safetensors.torch import save_file

    from rulewriter.core.edit import Edit, LayerUpdate

    g = torch.Generator().manual_seed(0)
    lam, d = torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    meta = {"model": tiny.name, "weights": tiny.weights_id}
    if kind == "huge factors":
        Edit([LayerUpdate("features.4", 2, lam * 1e150, d * 1e150)], meta).save(path)
    elif kind == "outputs overflow":
        Edit([LayerUpdate("features.4", 2, lam * 3e18, d * 3e18)], meta).save(path)
    elif kind == "other weights":
        Edit([LayerUpdate("features.4", 2, lam, d)], {"model": tiny.name, "weights": "0123456789abcdef"}).save(path)
    elif kind == "other model":
        Edit([LayerUpdate("features.4", 2, lam, d)], {"model": "vgg16", "weights": "imagenet1k_v1"}).save(path)
    elif kind in ("scalar tensors", "deep json"):
        Edit([LayerUpdate("features.4", 2, lam, d)], meta).save(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata()
        tensors = {"updates.0.lam": torch.tensor(1.0), "updates.0.direction": torch.tensor(2.0)}
        if kind == "deep json":
            header["rulewriter"] = "[" * 100_000 + "]" * 100_000
            tensors = {"updates.0.lam": lam, "updates.0.direction": d}
        save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("kind, words", [
    ("huge factors", "weights NaN or inf"), ("outputs overflow", "outputs NaN or inf"),
    ("other weights", "0123456789abcdef"), ("other model", "vgg16"),
    ("scalar tensors", "the uploaded file"), ("deep json", "nested too deeply")])
def test_bad_edit_files_are_refused(client, tiny, tmp_path, kind, words):
    """Bad edits get a 400 with a clear message, never a 500 or NaN JSON, and are neither kept nor saveable,
    whether uploaded or loaded by name from the output folder."""
    sid = _session(client)
    p = _bad_edit_file(kind, tiny, tmp_path / "bad.safetensors")
    r = client.post(f"/api/sessions/{sid}/edit/upload", files={"file": ("bad.safetensors", p.read_bytes())})
    assert r.status_code == 400 and words in r.json()["detail"], (kind, r.status_code, r.text)
    if kind.startswith("other"):  # names the model and weights of both sides
        assert tiny.name in r.json()["detail"] and tiny.weights_id in r.json()["detail"]
    edits = tmp_path / "out" / "edits"
    edits.mkdir(parents=True, exist_ok=True)
    shutil.copy(p, edits / "bad.safetensors")
    r = client.post(f"/api/sessions/{sid}/edit/load", json={"name": "bad"})
    assert r.status_code == 400 and (words if kind != "scalar tensors" else "bad.safetensors") in r.json()["detail"]
    assert client.get(f"/api/sessions/{sid}/edit").json() == {"edit": None}
    assert client.post(f"/api/sessions/{sid}/edit/save", json={"name": "saved"}).status_code == 400
    assert not (edits / "saved.safetensors").exists()


def test_an_edit_job_with_non_finite_outputs_is_not_kept(client, monkeypatch):
    """Issue 12.5: an edit built in the session whose outputs are not finite ends the job with an error,
    and nothing is kept to save."""
    from rulewriter.core.edit import LayerUpdate

    sid, ids = _session(client), _ids(client)
    _exemplar(client, sid, ids["img0.png"])
    state = client.app.state.rulewriter
    solve = state.solve

    def blown(rule, stats, *args):
        e = solve(rule, stats, *args)
        u = e.updates[0]
        e.updates[0] = LayerUpdate(u.layer, u.view, u.lam.double() * 1e150, u.direction.double() * 1e150)
        return e

    monkeypatch.setattr(state, "solve", blown)
    job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
    assert job["state"] == "error" and "NaN or inf" in job["error"] and job["result"] is None
    assert client.get(f"/api/sessions/{sid}/edit").json() == {"edit": None}
    assert client.post(f"/api/sessions/{sid}/edit/save", json={"name": "x"}).status_code == 400


@pytest.mark.parametrize("size, kept", [((6300, 6300), (1024, 1024)), ((3000, 2000), (1024, 683)),
                                        ((2000, 100), (1024, 51)), ((4000, 100), (1280, 32)),
                                        ((300, 200), (300, 200))])
def test_uploads_are_downscaled_on_arrival(client, tiny, size, kept):
    """Issue 12.8: an upload is kept at most as large as the editor shows it (1024 px long side), with its short
    side at least the model's resize (32 for the tiny model); never enlarged. A 6300² PNG (about 100 KB) is kept as 3 MB, not 119 MB."""
    sid = _session(client)
    r = client.post(f"/api/sessions/{sid}/uploads", files={"file": ("big.png", _png_bytes(Image.new("RGB", size, (9, 80, 200))))})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == kept
    img = client.app.state.rulewriter.session(sid).uploads[r.json()["id"]][1]
    assert img.size == kept and min(img.size) >= min(min(size), tiny.preprocess.resize)


def test_uploads_are_bounded_in_total(client, monkeypatch):
    """Issue 12.8: the decoded uploads of all sessions together are bounded; beyond it an upload is refused (413)."""
    one = 1024 * 1024 * 3
    monkeypatch.setattr(appmod, "MAX_UPLOAD_TOTAL_BYTES", 3 * one)
    png = _png_bytes(Image.new("RGB", (4000, 4000), (1, 2, 3)))
    a, b = _session(client), _session(client)
    for sid in (a, a, b):
        assert client.post(f"/api/sessions/{sid}/uploads", files={"file": ("x.png", png)}).status_code == 200
    for sid in (a, b, _session(client)):
        r = client.post(f"/api/sessions/{sid}/uploads", files={"file": ("x.png", png)})
        assert r.status_code == 413 and "MB of uploads" in r.json()["detail"], r.text
    assert client.app.state.rulewriter.upload_bytes() == 3 * one
    small = _png_bytes(Image.new("RGB", (8, 8)))
    assert client.post(f"/api/sessions/{b}/uploads", files={"file": ("s.png", small)}).status_code == 413


def test_json_body_limit(client):
    sid = _session(client)
    body = json.dumps({"image_id": "x", "mask": "A" * (appmod.MAX_BODY_BYTES + 10),
                       "target": {"kind": "texture", "texture": "skimage:gravel"}})
    r = client.post(f"/api/sessions/{sid}/exemplars", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413


# ------------------------------------------------------------------------------------------ sessions and the lock
def test_sessions_do_not_share_state(client):
    ids = _ids(client)
    a, b = _session(client), _session(client)
    _exemplar(client, a, ids["img0.png"])
    assert client.get(f"/api/sessions/{b}").json()["exemplars"] == []
    assert client.post(f"/api/sessions/{b}/edit").status_code == 400
    assert _wait(client, client.post(f"/api/sessions/{a}/edit").json())["state"] == "done"
    assert client.get(f"/api/sessions/{a}").json()["edit"] is not None
    assert client.get(f"/api/sessions/{b}").json()["edit"] is None


def test_predictions_never_see_another_sessions_edit(client, tiny):
    """While one session runs edits and comparisons, other requests' predictions stay the unedited model's."""
    ids = _ids(client)
    state = client.app.state.rulewriter
    imgs = [state.image(i) for i in ids.values()]
    reference = state.predict(imgs)
    sid = _session(client)
    _exemplar(client, sid, ids["img0.png"])
    seen, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            seen.append(state.predict(imgs))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(3):
            job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
            assert job["state"] == "done"
            assert any(r["changed"] or r["before"] != r["after"] for r in job["result"]["rows"])
    finally:
        stop.set()
        t.join()
    assert len(seen) >= 3
    assert all(s == reference for s in seen), "a prediction ran while another session's edit was applied"


def test_identical_edits_under_concurrent_load(client, tmp_path):
    """Issue 12.1: while another tab keeps its edit applied, sessions with identical inputs get identical edits
    (every solve reads the original weights, under the model lock)."""
    from rulewriter.core.edit import Edit

    ids = _ids(client)
    state = client.app.state.rulewriter
    a = _session(client)
    _exemplar(client, a, ids["img3.png"], target={"kind": "texture", "texture": "skimage:brick"})
    assert _wait(client, client.post(f"/api/sessions/{a}/edit").json())["state"] == "done"
    foreign = state.session(a).edit
    imgs = [state.image(i) for i in ids.values()]
    stop = threading.Event()

    def hammer():  # tab A compares under its edit, over and over
        while not stop.is_set():
            state.predict(imgs, foreign)

    sessions = [_session(client) for _ in range(8)]
    for sid in sessions:
        assert _exemplar(client, sid, ids["img0.png"]).status_code == 200
    t = threading.Thread(target=hammer)
    t.start()
    try:
        jobs = [client.post(f"/api/sessions/{sid}/edit").json() for sid in sessions]
        jobs = [_wait(client, j) for j in jobs]
    finally:
        stop.set()
        t.join()
    assert [j["state"] for j in jobs] == ["done"] * len(jobs), [j["error"] for j in jobs]
    lams = []
    for i, sid in enumerate(sessions):
        r = client.post(f"/api/sessions/{sid}/edit/save", json={"name": f"same-{i}"})
        assert r.status_code == 200, r.text
        lams.append(Edit.load(r.json()["path"]).updates[0].lam)
    assert all(torch.equal(lam, lams[0]) for lam in lams), "identical inputs gave different edits"
    alone = _session(client)
    _exemplar(client, alone, ids["img0.png"])
    assert _wait(client, client.post(f"/api/sessions/{alone}/edit").json())["state"] == "done"
    assert torch.equal(state.session(alone).edit.updates[0].lam.double(), lams[0]), "not the edit made alone"


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8765", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example", "", "[::2]:8765"])
def test_dns_rebinding_is_refused(client, host):
    """Issue 12.4: a Host the app does not serve (a rebound name) gets nothing, not even the image list."""
    for method, url in (("GET", "/api/images"), ("GET", "/api/info"), ("GET", "/"), ("POST", "/api/sessions")):
        r = client.request(method, url, headers={"host": host})
        assert r.status_code == 400 and "not a name this app serves" in r.json()["detail"], (host, url, r.text)
        assert b"img0.png" not in r.content


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765"])
def test_loopback_names_are_served(client, host):
    assert client.get("/api/info", headers={"host": host}).status_code == 200


def test_allowed_hosts_and_the_bound_address(tiny, folder, tmp_path, monkeypatch):
    app = create_app(tiny, folder, out_dir=tmp_path / "out", allowed_hosts=["photos.lan"])
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", type("U", (), {"run": staticmethod(lambda *a, **k: None)}))
    appmod.serve(app, "192.168.7.9", 9003)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for host, code in (("photos.lan:8765", 200), ("192.168.7.9:9003", 200), ("evil.lan", 400)):
            assert c.get("/api/info", headers={"host": host}).status_code == code, host


@pytest.mark.parametrize("headers", [{"origin": "http://attacker.example"}, {"origin": "null"},
                                     {"origin": "http://127.0.0.1:9999"}, {"origin": "https://127.0.0.1"},
                                     {"origin": "http://localhost"}, {"sec-fetch-site": "cross-site"},
                                     {"sec-fetch-site": "same-site"}])
def test_foreign_origins_cannot_change_state_or_evict_sessions(client, headers):
    """Issue 12.4: 64 POST /api/sessions from another origin (which used to evict the user's session) are refused,
    as is every other state-changing call; reads and same-origin calls pass."""
    ids = _ids(client)
    mine = _session(client)
    assert _exemplar(client, mine, ids["img0.png"]).status_code == 200
    for _ in range(MAX_SESSIONS):
        r = client.post("/api/sessions", headers=headers)
        assert r.status_code == 403 and "refused" in r.json()["detail"], r.text
    assert client.get(f"/api/sessions/{mine}").status_code == 200, "the user's session was evicted"
    for method, url in (("DELETE", f"/api/sessions/{mine}/exemplars"), ("POST", f"/api/sessions/{mine}/edit"),
                        ("POST", f"/api/sessions/{mine}/edit/revert")):
        assert client.request(method, url, headers=headers).status_code == 403, url
    assert len(client.get(f"/api/sessions/{mine}").json()["exemplars"]) == 1
    same = {"origin": "http://127.0.0.1", "sec-fetch-site": "same-origin"}
    assert client.post("/api/sessions", headers=same).status_code == 200


def test_job_errors_are_reported(client, monkeypatch):
    from rulewriter.errors import EditError

    sid, ids = _session(client), _ids(client)
    _exemplar(client, sid, ids["img0.png"])

    def broken(*a, **k):
        raise EditError("the update directions are degenerate")

    monkeypatch.setattr(client.app.state.rulewriter, "build_rule", broken)
    job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
    assert job["state"] == "error" and "degenerate" in job["error"] and job["result"] is None


def test_search_by_concept(client):
    sid, ids = _session(client), _ids(client)
    assert client.get(f"/api/sessions/{sid}/heatmaps/{ids['img0.png']}.png").status_code == 404
    r = client.post(f"/api/sessions/{sid}/search", json={"image_id": ids["img2.png"], "mask": _data_url(_mask())})
    job = _wait(client, r.json())
    assert job["state"] == "done", job
    rows = job["result"]["rows"]
    assert len(rows) == 5 and [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    png = client.get(rows[0]["heatmap_url"])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (32, 32)
    assert client.post(f"/api/sessions/{sid}/search", json={"image_id": "nope", "mask": _data_url(_mask())}).status_code == 404
    r = client.post(f"/api/sessions/{sid}/search", json={"image_id": ids["img2.png"],
                                                         "mask": _data_url(Image.new("L", (48, 40)))})
    assert r.status_code == 400


@pytest.mark.parametrize("samples, warns", [(1, True), (None, False)])
def test_search_warns_when_c_has_fewer_keys_than_dimensions(folder, tmp_path, samples, warns):
    """C from fewer keys than key dimensions is singular: search and edit say it is too small to trust.
    Layer features.2 has 8·3·3 = 72-dim keys on a 4×4 grid: 1 image gives 16 keys (warns), 5 give 80 (does not)."""
    torch.manual_seed(0)
    clf = load_classifier(Tiny(), labels=LABELS, preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3),
                          default_layer="features.2")
    with TestClient(create_app(clf, folder, out_dir=tmp_path / "out", stats_samples=samples),
                    base_url="http://127.0.0.1") as client:
        sid, ids = _session(client), _ids(client)
        assert client.get("/api/info").json()["stats"]["warning"] is None  # not collected yet: nothing to say
        job = _wait(client, client.post(f"/api/sessions/{sid}/search",
                                        json={"image_id": ids["img2.png"], "mask": _data_url(_mask())}).json())
        assert job["state"] == "done", job
        warning = job["result"]["warning"]
        if warns:
            assert "too small to trust" in warning and "16 keys (1 images)" in warning and "72 key dimensions" in warning
        else:
            assert warning is None
        assert client.get("/api/info").json()["stats"]["warning"] == warning
        _exemplar(client, sid, ids["img0.png"])
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json())
        assert job["state"] == "done" and job["result"]["warning"] == warning


def test_save_says_where_and_the_report_downloads(client, tmp_path):
    import zipfile

    sid, ids = _session(client), _ids(client)
    _exemplar(client, sid, ids["img0.png"])
    assert _wait(client, client.post(f"/api/sessions/{sid}/edit").json())["state"] == "done"
    r = client.post(f"/api/sessions/{sid}/edit/save", json={"name": "where"}).json()
    dest = tmp_path / "out" / "edits" / "where.safetensors"
    assert r["path"] == str(dest) and str(dest) in r["message"] and Path(r["sidecar"]).is_file()
    assert client.get(f"/api/sessions/{sid}/report.zip").status_code == 404  # nothing exported yet
    job = _wait(client, client.post(f"/api/sessions/{sid}/report").json())
    assert job["state"] == "done", job
    z = client.get(job["result"]["download_url"])
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    assert z.headers["content-disposition"].startswith("attachment; filename=\"rulewriter-report-")
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    folder_name = Path(job["result"]["folder"]).name
    assert f"{folder_name}/index.html" in names and f"{folder_name}/evaluation.json" in names
    assert all(n.startswith(folder_name + "/") for n in names)


# ------------------------------------------------------------------------------------------ command line
def test_cli_checks_input_and_warns_on_public_hosts(monkeypatch, capsys, folder, tiny):
    from rulewriter.cli import build_parser, main

    args = build_parser().parse_args(["app", "--images", str(folder)])
    assert (args.host, args.port, args.model) == ("127.0.0.1", appmod.DEFAULT_PORT, "efficientnet-lite0")
    assert main(["app", "--images", str(folder / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["app", "--images", str(folder), "--port", "0"]) == 2
    runs = []
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", type("U", (), {"run": staticmethod(
        lambda app, host, port, log_level: runs.append((host, port)))}))
    app = create_app(tiny, folder)
    appmod.serve(app, "127.0.0.1", 9001)
    assert "warning" not in capsys.readouterr().err
    appmod.serve(app, "0.0.0.0", 9002)
    assert "reachable from other machines" in capsys.readouterr().err
    assert runs == [("127.0.0.1", 9001), ("0.0.0.0", 9002)]


# ------------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def skimage_folder(tmp_path_factory):
    """coffee and a few other real photos from scikit-image."""
    pytest.importorskip("skimage.data", reason="the real-photo tests need scikit-image")
    from rulewriter.studies.demo import skimage_photos

    photos = skimage_photos()
    d = tmp_path_factory.mktemp("skphotos")
    for name in ("coffee", "chelsea", "astronaut", "rocket", "motorcycle_left", "camera"):
        if name in photos:
            photos[name].save(d / f"{name}.jpg", quality=92)
    return d


def test_coffee_gravel_edit_through_the_api(lite0, skimage_folder, tmp_path):
    """The demo's known-good case, through the API: the gravel cup is not espresso before, espresso after."""
    from rulewriter.studies.demo import coffee_mask

    with TestClient(create_app(lite0, skimage_folder, out_dir=tmp_path / "out"), base_url="http://127.0.0.1") as client:
        sid, ids = _session(client), _ids(client)
        r = _exemplar(client, sid, ids["coffee.jpg"], mask=_data_url(coffee_mask().resize((300, 200))))
        assert r.status_code == 200
        before = r.json()["before"]
        assert before["original"][0]["label"] == "espresso"
        assert before["manipulated"][0]["label"] != "espresso"
        job = _wait(client, client.post(f"/api/sessions/{sid}/edit").json(), timeout=180)
        assert job["state"] == "done", job
        rows = {r["kind"] if r["kind"] != "other" else r["title"]: r for r in job["result"]["rows"]}
        assert rows["manipulated"]["after"][0]["label"] == "espresso"
        assert rows["exemplar"]["after"][0]["label"] == "espresso"
        others = [r for r in job["result"]["rows"] if r["kind"] == "other"]
        assert others and all(not r["changed"] for r in others)


# ------------------------------------------------------------------------------------------ the real browser
def _browser_skip_reason() -> str | None:
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        return f"no chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "tests" / "browser" / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules is missing (run: npm ci --prefix tests/browser)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_paints_an_edit(lite0, skimage_folder, tmp_path):
    """Chromium opens the page, paints the cup, pastes gravel, runs the edit and sees espresso come back."""
    reason = _browser_skip_reason()
    if reason:
        pytest.skip(reason)
    import uvicorn

    port = _free_port()
    app = create_app(lite0, skimage_folder, out_dir=tmp_path / "out")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        t0 = time.time()
        while not server.started:
            assert time.time() - t0 < 30 and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        out = tmp_path / "screenshots"
        proc = subprocess.run(["node", str(ROOT / "tests" / "browser" / "edit.mjs"), f"http://127.0.0.1:{port}/", str(out)],
                              capture_output=True, text=True, timeout=300)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no summary from the browser script:\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads(lines[-1])
    failed = {k: v for k, v in summary["checks"].items() if not v["ok"]}
    assert proc.returncode == 0 and summary["ok"], (failed, summary.get("error"), summary.get("page_errors"))
    assert summary["checks"]["gravel cup is espresso after the edit"]["ok"]
    for name in ("browse.png", "paint.png", "edit-result.png", "heatmap.png"):
        assert Image.open(out / name).size[0] >= 1000 or name == "heatmap.png"
