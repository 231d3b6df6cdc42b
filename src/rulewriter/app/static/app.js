// rulewriter app: plain JS, no build step. Talks to the JSON API documented at /docs.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
};

const state = {
  session: null,
  info: null,
  images: [],          // [{id, name, width, height, upload}]
  preds: new Map(),    // image id -> top-5
  current: null,       // image id on the canvas
  masks: new Map(),    // image id -> offscreen canvas holding the painted mask (any alpha = painted)
  mode: "paint",
  texture: "skimage:gravel",
  exemplars: [],
  edit: null,
  busy: false,
};

// ------------------------------------------------------------------ API helpers
async function api(path, opts = {}) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    let msg = body && body.detail !== undefined ? body.detail : `${r.status} ${r.statusText}`;
    if (Array.isArray(msg)) msg = msg.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return body;
}
const post = (path, data) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data ?? {}),
});
const sp = () => `/api/sessions/${state.session}`;

let toastTimer = null;
function toast(msg, kind = "error") {
  const t = $("#toast");
  t.textContent = msg;
  t.className = `toast ${kind === "info" ? "info" : ""}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.add("hidden"), kind === "info" ? 2500 : 7000);
}
async function guarded(fn) {
  try { return await fn(); } catch (e) { toast(e.message || String(e)); return undefined; }
}

async function pollJob(job, box) {
  const bar = box.querySelector(".bar span");
  const msg = box.querySelector(".msg");
  box.classList.remove("hidden");
  try {
    for (;;) {
      bar.style.width = `${Math.round(job.progress * 100)}%`;
      msg.textContent = job.message || job.state;
      if (job.state === "done") return job.result;
      if (job.state === "error") throw new Error(job.error || "the job failed");
      await new Promise((r) => setTimeout(r, 300));
      job = await api(`/api/jobs/${job.id}`);
    }
  } finally {
    setTimeout(() => box.classList.add("hidden"), 600);
  }
}

// ------------------------------------------------------------------ session
async function ensureSession() {
  // sessionStorage is per tab: each tab gets its own session, a reload keeps it.
  const saved = sessionStorage.getItem("rulewriter.session");
  if (saved) {
    try { await api(`/api/sessions/${saved}`); state.session = saved; return; } catch (_) { /* expired */ }
  }
  state.session = (await post("/api/sessions")).session;
  sessionStorage.setItem("rulewriter.session", state.session);
}

// ------------------------------------------------------------------ browse
const fmtP = (p) => `${(100 * p).toFixed(p >= 0.1 ? 0 : 1)}%`;
const imageUrl = (id, side) => `/api/images/${id}/file?max_side=${side}&session=${encodeURIComponent(state.session)}`;
const nameOf = (id) => (state.images.find((i) => i.id === id) || {}).name || id;

function renderThumbs() {
  const box = $("#thumbs");
  box.replaceChildren();
  $("#image-count").textContent = `(${state.images.length})`;
  for (const im of state.images) {
    const top = el("div", { class: "top1", text: "…" });
    const t = el("div", { class: "thumb", "data-id": im.id, "data-name": im.name, title: im.name,
                          onclick: () => selectImage(im.id) },
      el("img", { src: imageUrl(im.id, 256), alt: im.name, loading: "lazy" }),
      el("div", { class: "name" }, el("span", { class: "painted", text: "" }), im.name),
      top);
    box.append(t);
  }
  loadAllPredictions();
  markSelected();
}

async function loadAllPredictions() {
  // A few at a time: the server runs one forward pass at a time anyway.
  const todo = state.images.filter((im) => !state.preds.has(im.id));
  const worker = async () => {
    while (todo.length) {
      const im = todo.shift();
      const p = await guarded(() => api(`/api/images/${im.id}/predictions?session=${encodeURIComponent(state.session)}`));
      if (p) { state.preds.set(im.id, p); renderThumbTop(im.id); }
    }
  };
  await Promise.all([worker(), worker(), worker()]);
}

function renderThumbTop(id) {
  const t = document.querySelector(`.thumb[data-id="${id}"] .top1`);
  const p = state.preds.get(id);
  if (!t || !p) return;
  t.replaceChildren(p[0].label, el("span", { class: "p", text: ` ${fmtP(p[0].prob)}` }));
  t.title = p.map((x) => `${x.label} ${fmtP(x.prob)}`).join("\n");
  if (id === state.current) renderPreds(p);
}

function markSelected() {
  for (const t of document.querySelectorAll(".thumb")) {
    t.classList.toggle("selected", t.dataset.id === state.current);
    const painted = state.masks.has(t.dataset.id) && hasPaint(state.masks.get(t.dataset.id));
    t.querySelector(".painted").textContent = painted ? "● mask" : "";
  }
}

function renderPreds(p) {
  $("#current-preds").replaceChildren(...p.map((x) => el("li", {}, x.label, el("span", { class: "p", text: fmtP(x.prob) }))));
}

// ------------------------------------------------------------------ paint
const imgCanvas = () => $("#image-canvas");
const maskCanvas = () => $("#mask-canvas");

function hasPaint(canvas) {
  if (!canvas || !canvas.width) return false;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < d.length; i += 16) if (d[i] > 0) return true;
  return false;
}

function storeMask() {
  if (!state.current) return;
  const src = maskCanvas();
  const copy = el("canvas");
  copy.width = src.width; copy.height = src.height;
  copy.getContext("2d").drawImage(src, 0, 0);
  state.masks.set(state.current, copy);
}

// The mask as the server reads it: an opaque PNG, white where painted (soft edges kept), black elsewhere.
function maskPng(canvas) {
  const off = el("canvas");
  off.width = canvas.width; off.height = canvas.height;
  const c = off.getContext("2d");
  c.drawImage(canvas, 0, 0);
  c.globalCompositeOperation = "source-in";
  c.fillStyle = "#fff"; c.fillRect(0, 0, off.width, off.height);
  c.globalCompositeOperation = "destination-over";
  c.fillStyle = "#000"; c.fillRect(0, 0, off.width, off.height);
  return off.toDataURL("image/png");
}

async function selectImage(id) {
  if (state.current === id) return;
  storeMask();
  state.current = id;
  markSelected();
  const im = state.images.find((i) => i.id === id);
  $("#current-name").textContent = im ? im.name : id;
  const pic = new Image();
  pic.src = imageUrl(id, 1024);
  await pic.decode().catch(() => toast("cannot load this image"));
  if (state.current !== id) return;  // the user clicked on; a later image wins
  for (const c of [imgCanvas(), maskCanvas()]) { c.width = pic.naturalWidth; c.height = pic.naturalHeight; }
  imgCanvas().getContext("2d").drawImage(pic, 0, 0);
  const mc = maskCanvas().getContext("2d");
  mc.clearRect(0, 0, pic.naturalWidth, pic.naturalHeight);
  const saved = state.masks.get(id);
  if (saved) mc.drawImage(saved, 0, 0);
  $("#canvas-wrap").classList.remove("empty");
  if (state.preds.has(id)) renderPreds(state.preds.get(id));
  else $("#current-preds").replaceChildren(el("li", { text: "…" }));
  refreshOtherImages();
  updateButtons();
}

function setupPainting() {
  const c = maskCanvas();
  let last = null;
  const pos = (e) => {
    const r = c.getBoundingClientRect();
    return { x: (e.clientX - r.left) * c.width / r.width, y: (e.clientY - r.top) * c.height / r.height,
             scale: c.width / r.width };
  };
  const stroke = (a, b) => {
    const ctx = c.getContext("2d");
    ctx.globalCompositeOperation = state.mode === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--mask") || "#ff2d6f";
    ctx.lineWidth = Number($("#brush").value) * b.scale;  // the brush size is in screen pixels
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath(); ctx.moveTo(a.x, a.y); ctx.lineTo(b.x, b.y); ctx.stroke();
  };
  c.addEventListener("pointerdown", (e) => {
    if (!state.current) return;
    c.setPointerCapture(e.pointerId);
    last = pos(e);
    stroke(last, last);
  });
  c.addEventListener("pointermove", (e) => { if (!last) return; const p = pos(e); stroke(last, p); last = p; });
  const end = () => { if (!last) return; last = null; storeMask(); markSelected(); refreshOtherImages(); updateButtons(); };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
}

function setMode(m) {
  state.mode = m;
  $("#mode-paint").classList.toggle("active", m === "paint");
  $("#mode-erase").classList.toggle("active", m === "erase");
}

// ------------------------------------------------------------------ rule building
function targetKind() { return document.querySelector('input[name="target"]:checked').value; }

function refreshOtherImages() {
  const sel = $("#other-image");
  const keep = sel.value;
  const others = state.images.filter((im) => im.id !== state.current && state.masks.has(im.id) && hasPaint(state.masks.get(im.id)));
  sel.replaceChildren(...(others.length ? others.map((im) => el("option", { value: im.id, text: im.name }))
    : [el("option", { value: "", text: "— paint on another image first —" })]));
  if (others.some((o) => o.id === keep)) sel.value = keep;
  sel.disabled = targetKind() === "texture" || !others.length;
}

function renderTextures() {
  const box = $("#textures");
  const items = state.info.textures.map((t) => ({ value: t, label: t.split(":")[1], src: `/api/textures/${t.split(":")[1]}.png` }));
  for (const up of state.images.filter((i) => i.upload)) items.push({ value: up.id, label: up.name, src: imageUrl(up.id, 128) });
  box.replaceChildren(...items.map((it) => el("button", {
    class: `swatch${it.value === state.texture ? " selected" : ""}`, "data-texture": it.value, title: it.value,
    onclick: () => { state.texture = it.value; document.querySelector('input[name="target"][value="texture"]').checked = true;
                     refreshOtherImages(); renderTextures(); },
  }, el("img", { src: it.src, alt: it.label }), it.label)));
}

function updateButtons() {
  const painted = state.current && hasPaint(maskCanvas());
  $("#add-exemplar").disabled = !painted || state.busy || (targetKind() !== "texture" && !$("#other-image").value);
  $("#search-concept").disabled = !painted || state.busy;
  $("#run-edit").disabled = !state.exemplars.length || state.busy;
  for (const b of ["#revert", "#save", "#export"]) $(b).disabled = !state.edit || state.busy;
}

async function addExemplar() {
  const kind = targetKind();
  const target = { kind };
  if (kind === "texture") target.texture = state.texture;
  else {
    target.image_id = $("#other-image").value;
    target.mask = maskPng(state.masks.get(target.image_id));
  }
  $("#add-exemplar").disabled = true;
  const ex = await guarded(() => post(`${sp()}/exemplars`, { image_id: state.current, mask: maskPng(maskCanvas()), target }));
  if (ex) { state.exemplars.push(ex); renderExemplars(); }
  updateButtons();
}

function describeTarget(ex) {
  if (ex.target === "texture") return ex.spec.texture.replace("skimage:", "");
  if (ex.target === "region") return `region of ${ex.spec.source}`;
  return `keys of ${ex.spec.key_image}`;
}

function renderExemplars() {
  const box = $("#exemplars");
  box.replaceChildren(...state.exemplars.map((ex) => {
    const o = ex.before.original[0], m = ex.before.manipulated ? ex.before.manipulated[0] : null;
    return el("div", { class: "exemplar", "data-id": ex.id },
      el("img", { src: imageUrl(ex.image_id, 160), alt: "original", title: nameOf(ex.image_id) }),
      ex.manipulated_url ? el("img", { src: ex.manipulated_url, alt: "manipulated", title: "manipulated (what the rule maps)" })
        : el("img", { src: ex.mask_url, alt: "mask" }),
      el("div", {},
        el("div", { text: `${nameOf(ex.image_id)} ← ${describeTarget(ex)}` }),
        el("div", { class: "muted", text: m ? `before: ${o.label} → ${m.label} ${fmtP(m.prob)}` : `before: ${o.label}` })),
      el("button", { class: "x", title: "remove", text: "×", onclick: () => removeExemplar(ex.id) }));
  }));
  updateButtons();
}

async function removeExemplar(id) {
  await guarded(() => api(`${sp()}/exemplars/${id}`, { method: "DELETE" }));
  state.exemplars = state.exemplars.filter((e) => e.id !== id);
  renderExemplars();
}

// ------------------------------------------------------------------ edit, results
function setBusy(b) { state.busy = b; updateButtons(); }

function predList(p, other) {
  return el("ol", {}, ...p.slice(0, 3).map((x, i) => el("li", { class: i === 0 ? "first" : "" },
    `${x.label} `, el("span", { class: "muted", text: fmtP(x.prob) }))));
}

function renderResults(res, summary) {
  $("#results").classList.remove("hidden");
  $("#results-summary").textContent = summary;
  $("#result-rows").replaceChildren(...res.rows.map((r) => el("div", {
    class: `result${r.changed ? " changed" : ""}`, "data-kind": r.kind,
    "data-before": r.before[0].label, "data-after": r.after[0].label,
  },
    el("div", { class: "title" }, r.title,
      el("span", { class: "badge kind", text: r.kind }),
      el("span", { class: `badge${r.changed ? " changed" : ""}`, text: r.changed ? "top-1 changed" : "same top-1" })),
    el("img", { src: r.image_url, alt: r.title }),
    el("div", {}, el("h3", { text: "before" }), predList(r.before)),
    el("div", {}, el("h3", { text: "after" }), predList(r.after)))));
}

function renderEditStatus() {
  const e = state.edit;
  $("#edit-status").textContent = !e ? "No edit. The model is unchanged."
    : `Edit (${e.source}): ${e.updates.map((u) => `${u.layer}, rank ${u.rank}`).join("; ")}`
      + (e.layer_why ? ` (chose ${e.layer_why})` : "")
      + (e.strength != null ? `, strength ${e.strength}: ${e.why}` : "")
      + ". Applied only while predicting; the model file is never written.";
  updateButtons();
}

async function runEdit() {
  setBusy(true);
  try {
    const job = await post(`${sp()}/edit`);
    const res = await pollJob(job, $("#edit-progress"));
    state.edit = res.edit;
    renderEditStatus();
    renderResults(res, `${res.pairs} key/value pairs, ${res.seconds} s; top-1 changed on ${res.changed} of ${res.rows.length} images`);
    $("#results").scrollIntoView({ behavior: "smooth", block: "start" });
    refreshStats();
  } catch (e) { toast(e.message); } finally { setBusy(false); }
}

async function compareLoaded() {
  setBusy(true);
  try {
    const res = await pollJob(await post(`${sp()}/compare`), $("#edit-progress"));
    renderResults(res, `loaded edit; top-1 changed on ${res.changed} of ${res.rows.length} images`);
  } catch (e) { toast(e.message); } finally { setBusy(false); }
}

async function revert() {
  await guarded(() => post(`${sp()}/edit/revert`));
  state.edit = null;
  renderEditStatus();
  $("#results").classList.add("hidden");
  $("#report-link").classList.add("hidden");
  $("#report-download").classList.add("hidden");
  toast("Edit discarded: predictions are the original model's again.", "info");
}

async function save() {
  const r = await guarded(() => post(`${sp()}/edit/save`, { name: $("#save-name").value.trim() }));
  if (r) {
    toast(`Saved: ${r.path} (and ${r.name}.json beside it).`, "info");
    $("#edit-status").textContent += ` Saved to ${r.path}.`;
    refreshSaved();
  }
}

async function refreshSaved() {
  const r = await guarded(() => api("/api/edits"));
  if (!r) return;
  $("#saved-edits").replaceChildren(el("option", { value: "", text: r.edits.length ? "saved edits…" : "no saved edits" }),
    ...r.edits.map((n) => el("option", { value: n, text: n })));
}

async function afterLoad(r) {
  if (!r) return;
  state.edit = r.edit;
  renderEditStatus();
  toast(`Loaded: ${r.edit.source}`, "info");
  await compareLoaded();
}

async function load() {
  const name = $("#saved-edits").value;
  if (!name) { toast("choose a saved edit first"); return; }
  await afterLoad(await guarded(() => post(`${sp()}/edit/load`, { name })));
}

async function uploadEdit(file) {
  const fd = new FormData();
  fd.append("file", file);
  await afterLoad(await guarded(() => api(`${sp()}/edit/upload`, { method: "POST", body: fd })));
}

async function exportReport() {
  setBusy(true);
  try {
    const res = await pollJob(await post(`${sp()}/report`), $("#report-progress"));
    const a = $("#report-link");
    a.href = res.url; a.classList.remove("hidden");
    a.textContent = "Open the report";
    a.title = `the HTML report in a new tab; accuracy against ${res.labels}`;
    const d = $("#report-download");
    d.href = res.download_url; d.classList.remove("hidden");
    $("#report-where").textContent = `Report written to ${res.folder} (labels: ${res.labels}).`;
  } catch (e) { toast(e.message); } finally { setBusy(false); }
}

// ------------------------------------------------------------------ search by concept
async function searchConcept() {
  setBusy(true);
  try {
    const job = await post(`${sp()}/search`, { image_id: state.current, mask: maskPng(maskCanvas()) });
    const res = await pollJob(job, $("#search-progress"));
    $("#search").classList.remove("hidden");
    $("#search-summary").textContent = `concept painted on ${nameOf(state.current)}; score: ${res.scale}`;
    $("#search-warning").textContent = res.warning || "";
    $("#search-warning").classList.toggle("hidden", !res.warning);
    const stamp = Date.now();  // new heatmaps under the same URLs
    $("#search-rows").replaceChildren(...res.rows.map((r, i) => el("div", { class: "heat", "data-id": r.image_id },
      el("img", { src: `${r.heatmap_url}?t=${stamp}`, alt: r.name }),
      el("div", {}, el("span", { class: "score", text: `#${i + 1} · ${r.score.toFixed(2)}` }), ` ${r.name}`))));
    $("#search").scrollIntoView({ behavior: "smooth", block: "start" });
    refreshStats();
  } catch (e) { toast(e.message); } finally { setBusy(false); }
}

// ------------------------------------------------------------------ uploads
async function uploadImage(file) {
  const fd = new FormData();
  fd.append("file", file);
  const im = await guarded(() => api(`${sp()}/uploads`, { method: "POST", body: fd }));
  if (!im) return;
  state.images.push(im);
  renderThumbs();
  renderTextures();
  toast(`Uploaded ${im.name}: paint on it, or pick it as a texture.`, "info");
}

async function refreshStats() {
  state.info = await api("/api/info");
  const s = state.info.stats;
  $("#stats-note").textContent = `Statistics C (${s.ready ? "collected" : "collected at the first edit or search"}) `
    + `from ${s.kind} ${s.source}${s.samples ? ` (${s.samples} images)` : ""}. ${s.note}.`
    + (s.warning ? ` ${s.warning}` : "");
}

// ------------------------------------------------------------------ start
async function main() {
  await ensureSession();
  state.info = await api("/api/info");
  $("#model-info").textContent = `${state.info.model} · layer ${state.info.layer} · ${state.info.images} images`;
  await refreshStats();
  const sess = await api(sp());
  const listing = await fetch(`/api/images`);
  if (!listing.ok) throw new Error(`listing the images failed: ${listing.status}`);
  state.images = [...(await listing.json()), ...sess.uploads];
  const skipped = JSON.parse(listing.headers.get("X-Skipped-Images") || "[]");
  if (skipped.length) {
    toast(`skipped ${skipped.length} unreadable image(s): ` + skipped.map((x) => `${x.name} (${x.reason})`).join("; "));
  }
  state.exemplars = sess.exemplars;
  state.edit = sess.edit;
  renderThumbs();
  renderTextures();
  renderExemplars();
  renderEditStatus();
  refreshSaved();
  setupPainting();

  $("#mode-paint").onclick = () => setMode("paint");
  $("#mode-erase").onclick = () => setMode("erase");
  document.addEventListener("keydown", (e) => {
    if (e.target.matches("input, select, textarea")) return;
    if (e.key === "p") setMode("paint");
    if (e.key === "e") setMode("erase");
  });
  $("#clear-mask").onclick = () => {
    maskCanvas().getContext("2d").clearRect(0, 0, maskCanvas().width, maskCanvas().height);
    storeMask(); markSelected(); refreshOtherImages(); updateButtons();
  };
  for (const r of document.querySelectorAll('input[name="target"]')) r.onchange = () => { refreshOtherImages(); updateButtons(); };
  $("#other-image").onchange = updateButtons;
  $("#add-exemplar").onclick = addExemplar;
  $("#clear-exemplars").onclick = async () => {
    await guarded(() => api(`${sp()}/exemplars`, { method: "DELETE" }));
    state.exemplars = []; renderExemplars();
  };
  $("#run-edit").onclick = runEdit;
  $("#revert").onclick = revert;
  $("#save").onclick = save;
  $("#load").onclick = load;
  $("#export").onclick = exportReport;
  $("#search-concept").onclick = searchConcept;
  $("#upload-image").onchange = (e) => { if (e.target.files[0]) uploadImage(e.target.files[0]); e.target.value = ""; };
  $("#upload-edit").onchange = (e) => { if (e.target.files[0]) uploadEdit(e.target.files[0]); e.target.value = ""; };
  document.body.dataset.ready = "1";  // for scripted browsers: the page is wired up
}

main().catch((e) => toast(`cannot start: ${e.message}`));
