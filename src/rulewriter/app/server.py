"""``rulewriter app``: rewrite a rule in the browser, without writing code.

One command starts a local web app over a folder of photos::

    rulewriter app --model efficientnet-lite0 --images photos/            # http://127.0.0.1:8765

In the page a user browses the photos with their top-5 predictions, paints the concept's mask, chooses
what to paste into it (a texture, a region of another photo, or a key region picked directly), adds more
exemplars as context, searches the folder for the concept (key-match heatmaps ranked by match), runs the
edit with a progress bar, compares predictions before and after, reverts, saves and loads the edit
(safetensors + JSON) and exports the HTML evaluation report.

The server is a JSON API usable on its own (FastAPI: ``/docs`` and ``/openapi.json`` document it). The
design rules that keep it safe to leave running:

* **Images by id, never by path.** Only the configured folder is listed (every path resolved and checked
  to lie inside it) and images are addressed by opaque ids; uploads live in memory, are size-limited
  and must decode with PIL as one of a few image formats.
* **Long work runs as jobs** (statistics, edits, heatmaps, reports): ``POST`` returns a job id,
  ``GET /api/jobs/{id}`` reports progress in [0, 1] and the result.
* **Only its own names and its own page.** A request whose Host is not a name the app serves is refused
  (DNS rebinding), and state-changing calls from another origin are refused (no foreign page can evict
  sessions or run edits).
* **Sessions.** Each browser tab creates a session; exemplars, drafts, edits and uploads are keyed by it,
  so tabs cannot corrupt each other's state.
* **One model lock.** Every forward pass holds it, and an edit is applied only inside
  ``edit.applied(model)`` while holding it, so one session's edit never leaks into another's
  prediction, and the weights are always restored (the user's model file is never written).
* **No pickle.** Edits are read with :meth:`rulewriter.core.edit.Edit.load` (safetensors only).

Statistics ``C`` are collected once per layer from the image folder (or ``--stats-data DIR``) with
:func:`rulewriter.core.stats.collect_second_moment` and its on-disk cache; the page says where they came from.

The server is built from one module per idea: :mod:`rulewriter.app.guards` (the host names it answers
to, same-origin state changes, the request-body limit), :mod:`rulewriter.app.images` (decoding uploads and
masks, size limits), :mod:`rulewriter.app.jobs` (work off the request thread), :mod:`rulewriter.app.state`
(sessions, exemplars and :class:`~rulewriter.app.state.AppState`) and this module (the routes and
:func:`serve`).

Programmatic use (e.g. in tests)::

    >>> from rulewriter.app.server import create_app
    >>> app = create_app(clf, "photos/")                      # doctest: +SKIP
    >>> from fastapi.testclient import TestClient             # doctest: +SKIP
    >>> TestClient(app).get("/api/info").json()["model"]      # doctest: +SKIP
    'efficientnet-lite0'

Needs the ``app`` extra: ``pip install 'rulewriter[app]'`` (FastAPI, uvicorn, python-multipart, and
fastapi-offline, whose Swagger UI and ReDoc assets make ``/docs`` work without the internet).
"""
# No ``from __future__ import annotations`` here: FastAPI resolves the route functions' annotations at
# runtime, and the request models are local classes of create_app that a string annotation cannot find.
import contextlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import ImageLoadError, RulewriterError
from .guards import LOOPBACK_NAMES, BodyLimit, HostOriginGuard, is_loopback, split_host  # noqa: F401 (re-export)
from .images import MAX_UPLOAD_BYTES, decode_image_bytes, fit_upload, image_bytes, jpeg_bytes, mask_box, png_bytes, read_mask
from .jobs import Job
from .state import AppState, Exemplar, Session, checked_path

__all__ = ["DEFAULT_PORT", "MAX_BODY_BYTES", "TEXTURES", "create_app", "is_loopback", "serve"]

DEFAULT_PORT = 8765
#: Whole request bodies: one upload plus multipart overhead, or a JSON body with a base64 mask (4/3 larger).
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 3 // 2
#: Textures offered by name (from scikit-image, which the demo extra installs).
TEXTURES: tuple[str, ...] = ("skimage:gravel", "skimage:brick", "skimage:grass")
MAX_UPLOADS_PER_SESSION = 24
#: Decoded uploads the server keeps, all sessions together (each upload is downscaled on arrival to at most
#: about PAGE_SIDE² pixels, 4 MB as RGBA): about 64 full-size uploads; beyond it an upload is refused.
MAX_UPLOAD_TOTAL_BYTES = 256 * 1024 * 1024
MAX_EXEMPLARS = 16
#: The edit's before/after comparison covers the exemplars and at most this many other folder images,
#: so a large folder does not make every edit slow; the HTML report covers the whole folder.
COMPARE_LIMIT = 48
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATIC_DIR = Path(__file__).with_name("static")


# ------------------------------------------------------------------------------------------ the FastAPI app
def create_app(
    classifier,
    images_dir: str | os.PathLike[str],
    *,
    layer: str | None = None,
    stats_data: str | os.PathLike[str] | None = None,
    stats_samples: int | None = None,
    out_dir: str | os.PathLike[str] = "rulewriter-app",
    cache_dir: str | os.PathLike[str] | None = None,
    allowed_hosts: "list[str] | None" = None,
):
    """The FastAPI application serving the page (``/``) and the JSON API (``/api/...``, see ``/docs``).

    Args:
        classifier: a :class:`~rulewriter.models.registry.Classifier`.
        images_dir: the only folder whose images the app shows and reads.
        layer: the layer to edit (default: the model's default layer).
        stats_data, stats_samples: where the statistics ``C`` come from (default: ``images_dir``, all images).
        out_dir: where saved edits and exported reports are written.
        cache_dir: statistics cache folder (``None``: no disk cache).
        allowed_hosts: host names the app answers to besides the loopback names (:data:`LOOPBACK_NAMES`);
            :func:`serve` adds the address it binds. Anything else is refused (DNS rebinding).

    Example::

        >>> app = create_app(load_classifier("efficientnet-lite0"), "photos/")   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8765)                        # doctest: +SKIP
    """
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
        from fastapi.responses import FileResponse, JSONResponse, Response
        from fastapi.staticfiles import StaticFiles
        from pydantic import BaseModel, Field
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RulewriterError("the app needs FastAPI: pip install 'rulewriter[app]'") from e

    state = AppState(classifier, images_dir, layer=layer, stats_data=stats_data, stats_samples=stats_samples,
                     out_dir=out_dir, cache_dir=cache_dir)

    # ---------------------------------------------------------------- models (OpenAPI schemas)
    class Prediction(BaseModel):
        index: int
        label: str
        prob: float

    class Info(BaseModel):
        model: str
        layer: str
        num_classes: int
        images: int
        stats: dict
        textures: list[str]
        max_upload_bytes: int
        compare_limit: int
        out_dir: str

    class ImageInfo(BaseModel):
        id: str
        name: str
        width: int
        height: int
        upload: bool = False

    class SessionOut(BaseModel):
        session: str

    class SessionState(BaseModel):
        session: str
        exemplars: list[dict]
        edit: dict | None
        uploads: list[ImageInfo]

    class Target(BaseModel):
        kind: Literal["texture", "region", "key"] = Field(
            description="texture: paste a texture into the mask; region: paste the painted region of another "
                        "image (its bounding box); key: map the keys of another image's painted region directly")
        texture: str | None = Field(None, description="for kind=texture: skimage:gravel|brick|grass or an upload id")
        image_id: str | None = Field(None, description="for kind=region|key: the other image")
        mask: str | None = Field(None, max_length=MAX_UPLOAD_BYTES * 4 // 3 + 64,
                                 description="for kind=region|key: its painted mask (PNG, base64 or data: URL)")
        box: list[int] | None = Field(None, min_length=4, max_length=4,
                                      description="for kind=region: crop box [left, top, right, bottom] "
                                                  "instead of the mask's bounding box")

    class ExemplarIn(BaseModel):
        image_id: str = Field(description="the exemplar image (its concept is where the mask is)")
        mask: str = Field(max_length=MAX_UPLOAD_BYTES * 4 // 3 + 64,
                          description="the painted mask: PNG as a data: URL or base64, white = concept, "
                                      "any resolution with the image's aspect ratio")
        target: Target

    class ExemplarOut(BaseModel):
        id: str
        image_id: str
        target: str
        spec: dict
        manipulated_url: str | None
        mask_url: str
        before: dict

    class SearchIn(BaseModel):
        image_id: str
        mask: str = Field(max_length=MAX_UPLOAD_BYTES * 4 // 3 + 64)

    class CompareIn(BaseModel):
        image_ids: list[str] | None = Field(None, max_length=1000,
                                            description="images to compare (default: the first folder images)")

    class SaveIn(BaseModel):
        name: str = Field(description="file name (letters, digits, . _ -); .safetensors is added", max_length=80)

    class LoadIn(BaseModel):
        name: str = Field(description="the name of an edit saved in the output folder", max_length=80)

    class JobOut(BaseModel):
        id: str
        kind: str
        state: str
        progress: float
        message: str
        result: Any = None
        error: str | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.jobs.shutdown()

    try:  # /docs and /redoc from assets installed with the package: they work offline (no CDN)
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:  # pragma: no cover - the app extra installs it; without it /docs needs the internet
        make_app = FastAPI
    app = make_app(title="rulewriter app", version="1", lifespan=lifespan,
                   description="Rewrite a rule of an image classifier from a few painted exemplars. Long work runs "
                               "as jobs: poll GET /api/jobs/{id}.")
    app.state.rulewriter = state
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.state.allowed_hosts = set(LOOPBACK_NAMES) | {split_host(h)[0] for h in allowed_hosts or ()}
    app.add_middleware(HostOriginGuard, allowed=app.state.allowed_hosts)  # outermost: runs first

    @app.exception_handler(RulewriterError)
    async def _rulewriter_error(request: Request, exc: RulewriterError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    def get_session(sid: str) -> Session:
        s = state.session(sid)
        if s is None:
            raise HTTPException(404, "unknown session; create one with POST /api/sessions")
        return s

    def get_image(image_id: str, session: Session | None = None) -> Image.Image:
        try:
            return state.image(image_id, session)
        except KeyError:
            raise HTTPException(404, f"unknown image id {image_id[:40]!r}") from None

    def image_info(image_id: str, session: Session | None = None) -> ImageInfo:
        if image_id in state.images:
            with Image.open(checked_path(state.images[image_id], state.root)) as im:  # the header only
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # load_image turns these by 90°
                    w, h = h, w
        else:
            w, h = session.uploads[image_id][1].size
        return ImageInfo(id=image_id, name=state.image_name(image_id, session) or image_id,
                         width=w, height=h, upload=image_id not in state.images)

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        return data

    def exemplar_out(s: Session, e: Exemplar) -> ExemplarOut:
        return ExemplarOut(id=e.id, image_id=e.image_id, target=e.target, spec=e.spec,
                           manipulated_url=(f"/api/sessions/{s.id}/exemplars/{e.id}/manipulated.png"
                                            if e.manipulated is not None else None),
                           mask_url=f"/api/sessions/{s.id}/exemplars/{e.id}/mask.png", before=e.before)

    def edit_info(s: Session) -> dict | None:
        if s.edit is None:
            return None
        d = s.edit.describe()
        st = d["meta"].get("strength") or {}
        return {"source": s.edit_source, "updates": d["updates"], "rules": d["meta"].get("rules"),
                "stats": d["meta"].get("stats"), "layer": d["updates"][0]["layer"] if d["updates"] else None,
                "strength": st.get("chosen"), "why": st.get("reason"),
                "layer_why": (d["meta"].get("layer_choice") or {}).get("reason")}

    def safe_name(name: str) -> str:
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        if not _NAME_RE.match(stem) or ".." in stem:
            raise HTTPException(400, "a name may use letters, digits, '.', '_' and '-' only (no folders)")
        return stem + ".safetensors"

    # ---------------------------------------------------------------- page
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---------------------------------------------------------------- info and images
    @app.get("/api/info", response_model=Info, summary="Model, layer, folder size and where the statistics come from")
    def info():
        return Info(model=state.clf.name, layer=state.layer, num_classes=state.clf.num_classes,
                    images=len(state.images), stats=state.stats_source(), textures=list(TEXTURES),
                    max_upload_bytes=MAX_UPLOAD_BYTES, compare_limit=COMPARE_LIMIT, out_dir=str(state.out_dir))

    @app.get("/api/images", response_model=list[ImageInfo], summary="The folder's images (and a session's uploads)")
    def list_images_(response: Response,
                     session: str | None = Query(None, description="include this session's uploads")):
        s = get_session(session) if session else None
        out, skipped = [], []
        for i in state.image_ids(s):
            try:
                out.append(image_info(i, s))
            except (ImageLoadError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                # One unreadable file must not hide the others: skip it, and say so in a header the page shows.
                skipped.append({"name": state.image_name(i, s), "reason": str(e)[:200] or type(e).__name__})
        if skipped:
            response.headers["X-Skipped-Images"] = json.dumps(skipped, ensure_ascii=True)
        return out

    @app.get("/api/images/{image_id}/file", summary="An image as JPEG, optionally downscaled",
             responses={200: {"content": {"image/jpeg": {}}}})
    def image_file(image_id: str, max_side: int | None = Query(None, ge=16, le=4096),
                   session: str | None = None):
        s = get_session(session) if session else None
        img = get_image(image_id, s)
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return Response(jpeg_bytes(img), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/images/{image_id}/predictions", response_model=list[Prediction],
             summary="Top-5 predictions of the unedited model")
    def image_predictions(image_id: str, session: str | None = None):
        s = get_session(session) if session else None
        if image_id not in state.images and (s is None or image_id not in s.uploads):
            raise HTTPException(404, f"unknown image id {image_id[:40]!r}")
        return state.cached_predictions(image_id, s)

    @app.get("/api/textures/{name}.png", summary="A built-in texture", responses={200: {"content": {"image/png": {}}}})
    def texturepng_bytes(name: str):
        from ..concepts.manipulate import texture_from

        if f"skimage:{name}" not in TEXTURES:
            raise HTTPException(404, f"unknown texture {name[:40]!r}; built in: {', '.join(TEXTURES)}")
        img = texture_from(f"skimage:{name}")
        img.thumbnail((256, 256))
        return Response(png_bytes(img), media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    # ---------------------------------------------------------------- sessions
    @app.post("/api/sessions", response_model=SessionOut, summary="Create a session (one per browser tab)")
    def create_session():
        return SessionOut(session=state.new_session().id)

    @app.get("/api/sessions/{sid}", response_model=SessionState, summary="A session's exemplars, edit and uploads")
    def session_state(sid: str):
        s = get_session(sid)
        with s.lock:
            return SessionState(session=s.id, exemplars=[exemplar_out(s, e).model_dump() for e in s.exemplars.values()],
                                edit=edit_info(s), uploads=[image_info(i, s) for i in s.uploads])

    @app.post("/api/sessions/{sid}/uploads", response_model=ImageInfo,
              summary="Upload an image (≤ 10 MB; JPEG, PNG, WebP, BMP or GIF) to use as texture or exemplar")
    async def upload_image(sid: str, file: UploadFile = File(...)):
        s = get_session(sid)
        data = await read_upload(file)
        try:
            img = decode_image_bytes(data, "the upload")
        except ImageLoadError as e:
            raise HTTPException(415, str(e)) from None
        del data
        img = fit_upload(img, state.clf.preprocess.resize)  # the full decode is dropped here
        with state.uploads_lock, s.lock:
            held = state.upload_bytes()
            if held + image_bytes(img) > MAX_UPLOAD_TOTAL_BYTES:
                raise HTTPException(413, f"the server already holds {held / 2**20:.0f} MB of uploads (the limit is "
                                         f"{MAX_UPLOAD_TOTAL_BYTES / 2**20:.0f} MB); restart the app to free them")
            if len(s.uploads) >= MAX_UPLOADS_PER_SESSION:
                raise HTTPException(400, f"at most {MAX_UPLOADS_PER_SESSION} uploads per session")
            uid = "u" + secrets.token_hex(6)
            name = Path(file.filename or "upload").name[:80] or "upload"
            s.uploads[uid] = (name, img)
        return image_info(uid, s)

    # ---------------------------------------------------------------- exemplars
    def make_exemplar(s: Session, body: ExemplarIn) -> Exemplar:
        from ..concepts.manipulate import paste_texture, texture_from

        img = get_image(body.image_id, s)
        mask = read_mask(body.mask, img.size)
        t = body.target
        ex = Exemplar("e" + secrets.token_hex(5), body.image_id, mask, t.kind, {"kind": t.kind})
        if t.kind == "texture":
            if not t.texture:
                raise HTTPException(422, "target.texture is required for kind=texture")
            if t.texture in TEXTURES:
                tex = texture_from(t.texture)
                ex.spec["texture"] = t.texture
            elif t.texture in s.uploads:
                tex = s.uploads[t.texture][1].convert("RGB")
                ex.spec["texture"] = f"upload:{s.uploads[t.texture][0]}"
            else:
                raise HTTPException(404, f"unknown texture {t.texture[:40]!r}; use {', '.join(TEXTURES)} or an upload id")
            ex.manipulated = paste_texture(img, mask, tex)
        else:
            if not t.image_id:
                raise HTTPException(422, f"target.image_id is required for kind={t.kind}")
            other = get_image(t.image_id, s)
            if t.kind == "region":
                if t.box is not None:
                    box = tuple(int(v) for v in t.box)
                elif t.mask:
                    box = mask_box(read_mask(t.mask, other.size, "the region's mask"))
                else:
                    raise HTTPException(422, "kind=region needs target.mask or target.box")
                ex.manipulated = paste_texture(img, mask, texture_from(other, crop_box=box))
                ex.spec.update(source=state.image_name(t.image_id, s), box=list(box))
            else:
                if not t.mask:
                    raise HTTPException(422, "kind=key needs target.mask: the region whose keys to map")
                ex.key_image_id, ex.key_mask = t.image_id, read_mask(t.mask, other.size, "the key region's mask")
                ex.spec.update(key_image=state.image_name(t.image_id, s))
        shown = [img] + ([ex.manipulated] if ex.manipulated is not None else [])
        preds = state.predict(shown)
        ex.before = {"original": preds[0], **({"manipulated": preds[1]} if len(preds) > 1 else {})}
        return ex

    @app.post("/api/sessions/{sid}/exemplars", response_model=ExemplarOut,
              summary="Add an exemplar: an image, its painted mask, and what the concept becomes there")
    def add_exemplar(sid: str, body: ExemplarIn):
        s = get_session(sid)
        if len(s.exemplars) >= MAX_EXEMPLARS:
            raise HTTPException(400, f"at most {MAX_EXEMPLARS} exemplars per rule")
        ex = make_exemplar(s, body)
        with s.lock:
            s.exemplars[ex.id] = ex
        return exemplar_out(s, ex)

    @app.post("/api/sessions/{sid}/preview", response_model=ExemplarOut,
              summary="What an exemplar would look like (the manipulated image and its predictions), without adding it")
    def preview_exemplar(sid: str, body: ExemplarIn):
        s = get_session(sid)
        ex = make_exemplar(s, body)
        return exemplar_out(s, ex).model_copy(update={"manipulated_url": None})

    @app.delete("/api/sessions/{sid}/exemplars/{eid}", summary="Remove one exemplar")
    def delete_exemplar(sid: str, eid: str):
        s = get_session(sid)
        with s.lock:
            if s.exemplars.pop(eid, None) is None:
                raise HTTPException(404, "unknown exemplar")
        return {"removed": eid}

    @app.delete("/api/sessions/{sid}/exemplars", summary="Remove every exemplar")
    def clear_exemplars(sid: str):
        s = get_session(sid)
        with s.lock:
            n = len(s.exemplars)
            s.exemplars.clear()
        return {"removed": n}

    def exemplar_or_404(s: Session, eid: str) -> Exemplar:
        e = s.exemplars.get(eid)
        if e is None:
            raise HTTPException(404, "unknown exemplar")
        return e

    @app.get("/api/sessions/{sid}/exemplars/{eid}/manipulated.png", summary="An exemplar's manipulated image",
             responses={200: {"content": {"image/png": {}}}})
    def exemplar_manipulated(sid: str, eid: str):
        e = exemplar_or_404(get_session(sid), eid)
        if e.manipulated is None:
            raise HTTPException(404, "this exemplar maps a picked key region; it has no manipulated image")
        return Response(png_bytes(e.manipulated), media_type="image/png")

    @app.get("/api/sessions/{sid}/exemplars/{eid}/mask.png", summary="An exemplar's mask",
             responses={200: {"content": {"image/png": {}}}})
    def exemplar_mask(sid: str, eid: str):
        e = exemplar_or_404(get_session(sid), eid)
        return Response(png_bytes(Image.fromarray(np.rint(e.mask * 255).astype(np.uint8), "L")), media_type="image/png")

    # ---------------------------------------------------------------- edit
    def comparison(s: Session, edit, exemplars: list[Exemplar], others: list[str], job: Job,
                   lo: float, hi: float) -> dict:
        rows = []
        items: list[tuple[dict, Image.Image]] = []
        for e in exemplars:
            name = state.image_name(e.image_id, s)
            items.append(({"kind": "exemplar", "title": f"{name} (original)", "image_url":
                           f"/api/images/{e.image_id}/file?max_side=320&session={s.id}", "exemplar": e.id},
                          state.image(e.image_id, s)))
            if e.manipulated is not None:
                items.append(({"kind": "manipulated", "title": f"{name} ({e.spec.get('texture') or 'region'} pasted)",
                               "image_url": f"/api/sessions/{s.id}/exemplars/{e.id}/manipulated.png",
                               "exemplar": e.id}, e.manipulated))
        used = {e.image_id for e in exemplars}
        for i in others:
            if i in used:
                continue
            items.append(({"kind": "other", "title": state.image_name(i, s), "image_id": i,
                           "image_url": f"/api/images/{i}/file?max_side=320&session={s.id}"}, state.image(i, s)))
        for start in range(0, len(items), 16):
            chunk = items[start : start + 16]
            imgs = [im for _, im in chunk]
            before, after = state.predict(imgs), state.predict(imgs, edit)  # the lock is released between chunks
            for (row, _), b, a in zip(chunk, before, after):
                row.update(before=b, after=a, changed=b[0]["index"] != a[0]["index"])
                rows.append(row)
            job.report(lo + (hi - lo) * min(1.0, (start + 16) / len(items)),
                       f"predictions before and after: {min(len(items), start + 16)}/{len(items)}")
        return {"rows": rows, "changed": sum(r["changed"] for r in rows)}

    def default_others(s: Session) -> list[str]:
        return state.image_ids(None)[:COMPARE_LIMIT]

    @app.post("/api/sessions/{sid}/edit", response_model=JobOut,
              summary="Run the edit (a job): statistics C if needed, the rule from all exemplars, the rewrite, "
                      "and predictions before/after for the exemplars and other images")
    def run_edit(sid: str):
        s = get_session(sid)
        with s.lock:
            exemplars = list(s.exemplars.values())
        if not exemplars:
            raise HTTPException(400, "add at least one exemplar first")

        def work(job: Job) -> dict:
            t0 = time.perf_counter()
            stats = state.stats(job, 0.0, 0.45)
            job.report(0.5, f"reading the rule from {len(exemplars)} exemplar(s)")
            rule = state.build_rule(s, exemplars)
            several = rule.views is not None and len(state.layers) > 1
            job.report(0.6, f"solving the update at {', '.join(state.layers)} (layer, strength and rank chosen "
                       "by validation on the exemplars)" if several else
                       "solving the update (strength and rank chosen by validation on the exemplars)"
                       if rule.views is not None else "solving the update (the closed form)")
            # Under the model lock: no other tab's edit is applied. The other layers' statistics: 0.6 to 0.64.
            edit = state.solve(rule, stats, s, exemplars, job, 0.6, 0.64)
            state.check_edit(edit, "the edit")  # never kept (nor saved) when its weights or outputs are not finite
            edit.meta["stats_source"] = state.stats_source()["source"]
            with s.lock:
                s.edit, s.edit_source = edit, "built in this session"
            result = comparison(s, edit, exemplars, default_others(s), job, 0.65, 1.0)
            result.update(edit=edit_info(s), pairs=int(rule.keys.shape[0]), seconds=round(time.perf_counter() - t0, 2),
                          warning=state.stats_warning())
            with s.lock:
                s.comparison = result
            return result

        return JobOut(**state.jobs.submit("edit", s.id, work).to_dict())

    @app.post("/api/sessions/{sid}/compare", response_model=JobOut,
              summary="Predictions before and after the session's edit for chosen images (a job)")
    def compare(sid: str, body: CompareIn | None = None):
        s = get_session(sid)
        if s.edit is None:
            raise HTTPException(400, "no edit in this session: run or load one first")
        ids = body.image_ids if body and body.image_ids is not None else default_others(s)
        for i in ids:
            if state.image_name(i, s) is None:
                raise HTTPException(404, f"unknown image id {i[:40]!r}")
        with s.lock:
            edit, exemplars = s.edit, list(s.exemplars.values())
        return JobOut(**state.jobs.submit("compare", s.id, lambda job: comparison(
            s, edit, exemplars if body is None or body.image_ids is None else [], ids, job, 0.0, 1.0)).to_dict())

    @app.post("/api/sessions/{sid}/edit/revert", summary="Discard the session's edit (the model is never changed)")
    def revert(sid: str):
        s = get_session(sid)
        with s.lock:
            had = s.edit is not None
            s.edit, s.edit_source, s.comparison = None, None, None
        return {"reverted": had}

    @app.get("/api/sessions/{sid}/edit", summary="The session's edit (description), or null")
    def get_edit(sid: str):
        s = get_session(sid)
        return {"edit": edit_info(s)}

    @app.post("/api/sessions/{sid}/edit/save", summary="Save the edit as NAME.safetensors (+ .json) in the output folder")
    def save_edit(sid: str, body: SaveIn):
        s = get_session(sid)
        if s.edit is None:
            raise HTTPException(400, "no edit to save: run or load one first")
        fname = safe_name(body.name)
        dest = state.out_dir / "edits" / fname
        s.edit.save(dest)
        return {"name": fname, "path": str(dest), "sidecar": str(dest.with_name(dest.name + ".json")),
                "download_url": f"/api/edits/{fname}",
                "message": f"saved {fname} to {dest} (its description beside it, {fname}.json)"}

    @app.get("/api/edits", summary="Edits saved in the output folder")
    def list_edits():
        d = state.out_dir / "edits"
        return {"edits": sorted(p.name for p in d.glob("*.safetensors")) if d.is_dir() else []}

    @app.get("/api/edits/{name}", summary="Download a saved edit (safetensors)",
             responses={200: {"content": {"application/octet-stream": {}}}})
    def download_edit(name: str):
        p = state.out_dir / "edits" / safe_name(name)
        if not p.is_file():
            raise HTTPException(404, "no such saved edit")
        return FileResponse(p, media_type="application/octet-stream", filename=p.name)

    def load_edit_file(path: Path, source: str):
        from ..core.edit import Edit

        try:
            edit = Edit.load(path)
        except RulewriterError as e:
            raise HTTPException(400, str(e).replace(str(path), source)) from None
        except Exception as e:  # noqa: BLE001 - an uploaded file is untrusted: any way it fails to parse is a 400
            raise HTTPException(400, f"{source} is not a valid rulewriter edit ({type(e).__name__}: {e})"[:300]) from None
        try:
            state.check_edit(edit, source)
        except RulewriterError as e:
            raise HTTPException(400, str(e)) from None
        return edit

    @app.post("/api/sessions/{sid}/edit/load", summary="Load an edit saved in the output folder by name")
    def load_edit(sid: str, body: LoadIn):
        s = get_session(sid)
        p = state.out_dir / "edits" / safe_name(body.name)
        if not p.is_file():
            raise HTTPException(404, "no such saved edit")
        edit = load_edit_file(p, p.name)
        with s.lock:
            s.edit, s.edit_source, s.comparison = edit, f"loaded {p.name}", None
        return {"edit": edit_info(s)}

    @app.post("/api/sessions/{sid}/edit/upload", summary="Load an edit from an uploaded .safetensors file (≤ 10 MB; "
                                                         "pickles are refused)")
    async def upload_edit(sid: str, file: UploadFile = File(...)):
        s = get_session(sid)
        data = await read_upload(file)
        with tempfile.TemporaryDirectory(prefix="rulewriter-upload-") as tmp:
            p = Path(tmp) / "edit.safetensors"
            p.write_bytes(data)
            edit = load_edit_file(p, "the uploaded file")
        with s.lock:
            s.edit, s.edit_source, s.comparison = edit, f"uploaded {Path(file.filename or 'edit').name[:80]}", None
        return {"edit": edit_info(s)}

    # ---------------------------------------------------------------- search by concept
    @app.post("/api/sessions/{sid}/search", response_model=JobOut,
              summary="Search by concept (a job): the masked region's key-match heatmap on every folder image, "
                      "ranked by match")
    def search(sid: str, body: SearchIn):
        s = get_session(sid)
        img = get_image(body.image_id, s)
        mask = read_mask(body.mask, img.size)

        def work(job: Job) -> dict:
            from ..concepts.heatmap import overlay
            from ..core.edit import DEFAULT_RIDGE, regularize
            from ..studies.testsets import concept_heatmaps

            stats = state.stats(job, 0.0, 0.3)
            job.report(0.32, "the concept's key")
            k = state.concept_rule(img, mask).key()
            c_reg = regularize(stats.moment(), DEFAULT_RIDGE)
            unit = float(k @ torch.linalg.solve(c_reg, k))  # the concept's own key scores 1
            ids = state.image_ids(s)
            heats = []
            for start in range(0, len(ids), 16):
                chunk = ids[start : start + 16]
                srcs = [state.image(i, s) for i in chunk]
                with state.model_lock:
                    heats.append(concept_heatmaps(state.clf, state.layer, k, srcs, C=stats.moment(),
                                                  progress=False) / unit)
                job.report(0.35 + 0.55 * min(1.0, (start + 16) / len(ids)),
                           f"matching: {min(len(ids), start + 16)}/{len(ids)} images")
            heat = torch.cat(heats)
            vmax = max(float(heat.clamp_min(0).max()), 1e-12)
            rows, pictures = [], {}
            for i, hid in enumerate(ids):
                shown = state.clf.preprocess.denormalize(state.clf.preprocess.image(state.image(hid, s)))
                pictures[hid] = png_bytes(overlay(shown, (heat[i].clamp_min(0) / vmax).numpy(), alpha=0.5, normalize="none"))
                rows.append({"image_id": hid, "name": state.image_name(hid, s), "score": round(float(heat[i].max()), 4),
                             "heatmap_url": f"/api/sessions/{s.id}/heatmaps/{hid}.png"})
            rows.sort(key=lambda r: -r["score"])
            with s.lock:
                s.heatmaps = pictures
            return {"rows": rows, "scale": "peak of k·(C+εI)⁻¹k* per image, in units of the concept's own key "
                                           "(1.0 = as strong as the painted region's mean key)",
                    "warning": state.stats_warning()}

        return JobOut(**state.jobs.submit("search", s.id, work).to_dict())

    @app.get("/api/sessions/{sid}/heatmaps/{image_id}.png", summary="A heatmap from the last concept search",
             responses={200: {"content": {"image/png": {}}}})
    def heatmappng_bytes(sid: str, image_id: str):
        s = get_session(sid)
        data = s.heatmaps.get(image_id)
        if data is None:
            raise HTTPException(404, "no heatmap for this image: run a concept search first")
        return Response(data, media_type="image/png")

    # ---------------------------------------------------------------- report
    @app.post("/api/sessions/{sid}/report", response_model=JobOut,
              summary="Export the HTML evaluation report of the session's edit on the image folder (a job)")
    def export_report(sid: str):
        s = get_session(sid)
        if s.edit is None:
            raise HTTPException(400, "no edit to evaluate: run or load one first")
        edit = s.edit
        with s.lock:
            exemplars = list(s.exemplars.values())

        def work(job: Job) -> dict:
            from ..models.data import labelled_images
            from ..studies.evaluate import evaluate_edit
            from ..studies.evaluation_report import write_report
            from ..studies.testsets import TestSet

            ids = state.image_ids(None)
            paths = [checked_path(state.images[i], state.root) for i in ids]
            try:  # a labelled folder gives real accuracies; otherwise the unedited model's own top-1 is the label
                labels = dict(labelled_images(state.root, state.clf.labels, state.clf.wnids))
                ys = [labels[p] for p in paths]
                kind = "folder labels"
            except (RulewriterError, KeyError):
                job.report(0.05, "no class labels in the folder: using the unedited model's top-1 as the label")
                ys = [state.cached_predictions(i)[0]["index"] for i in ids]
                kind = "the unedited model's top-1"
            # The manipulated exemplars join as extra images labelled with their original's top-1, so the
            # report counts the error the edit was made to correct.
            pasted = [e for e in exemplars if e.manipulated is not None]
            images = list(paths) + [e.manipulated for e in pasted]
            ys += [state.cached_predictions(e.image_id, s)[0]["index"] for e in pasted]
            ts = TestSet(f"{state.root.name} ({len(paths)} images + {len(pasted)} manipulated exemplars)",
                         images, ys, info={"labels": kind, "manipulated_exemplars": len(pasted)})
            job.report(0.1, f"evaluating {len(images)} images before and after")
            with state.model_lock:
                ev = evaluate_edit(state.clf, ts, edit, progress=False)
            job.report(0.8, "writing the report")
            out = state.out_dir / "reports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            written = write_report(out, state.clf, ev, change_path=s.edit_source)
            with s.lock:
                s.report_dir = out
            return {"html": str(written["html"]), "folder": str(out), "url": f"/api/sessions/{s.id}/report/index.html",
                    "download_url": f"/api/sessions/{s.id}/report.zip", "labels": kind, "summary": ev.summary()}

        return JobOut(**state.jobs.submit("report", s.id, work).to_dict())

    @app.get("/api/sessions/{sid}/report.zip", summary="The session's last exported report as one .zip download",
             responses={200: {"content": {"application/zip": {}}}})
    def report_zip(sid: str):
        import io
        import zipfile

        s = get_session(sid)
        if s.report_dir is None:
            raise HTTPException(404, "no report exported in this session")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(s.report_dir.iterdir()):
                if p.is_file():  # the files the report wrote, under the report's folder name
                    z.write(p, f"{s.report_dir.name}/{p.name}")
        fname = f"rulewriter-report-{s.report_dir.name}.zip"
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{fname}"'})

    @app.get("/api/sessions/{sid}/report/{name}", summary="A file of the session's last exported report")
    def report_file(sid: str, name: str):
        s = get_session(sid)
        if s.report_dir is None:
            raise HTTPException(404, "no report exported in this session")
        allowed = {p.name: p for p in s.report_dir.iterdir() if p.is_file()}
        if name not in allowed:  # only names the report wrote: nothing else is reachable
            raise HTTPException(404, "no such report file")
        return FileResponse(allowed[name])

    # ---------------------------------------------------------------- jobs
    @app.get("/api/jobs/{job_id}", response_model=JobOut, summary="A job's state, progress (0..1) and result")
    def job_status(job_id: str):
        job = state.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "unknown job")
        return JobOut(**job.to_dict())

    return app


# ------------------------------------------------------------------------------------------ command line
def serve(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn, warning on stderr when ``host`` accepts connections from other machines."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover
        raise RulewriterError("the app needs uvicorn: pip install 'rulewriter[app]'") from e
    allowed = app.state.allowed_hosts
    bound = split_host(host)[0]
    if bound in ("0.0.0.0", "::", ""):  # every interface: the names this machine is known by
        import socket

        allowed |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        allowed.add(bound.strip("[]"))
    if not is_loopback(host):
        print(f"rulewriter: warning: serving on {host}, reachable from other machines; the app has no "
              "authentication. Use the default 127.0.0.1 unless you trust the network. It answers to the "
              f"host names {', '.join(sorted(allowed))} (add more with --allow-host).", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
