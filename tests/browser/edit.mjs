// Drive the rulewriter app in a real browser: paint the coffee cup, paste gravel, run the edit, check the
// predictions, search by concept, and save screenshots.
//
//   node tests/browser/edit.mjs http://127.0.0.1:PORT/ OUTDIR
//
// Uses Debian's chromium (CHROMIUM env var, default /usr/bin/chromium) through playwright-core, which never
// downloads a browser. Prints one JSON line with what it saw; exits 1 when a check fails.
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [url, outDir] = process.argv.slice(2);
if (!url || !outDir) {
  console.error("usage: node edit.mjs URL OUTDIR");
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });
const shot = (name) => path.join(outDir, name);

// The hand-drawn cup-and-saucer ellipse of rulewriter.demo.COFFEE_MASK_ELLIPSE, on the 600×400 photo.
const ELLIPSE = { left: 78, top: 65, right: 478, bottom: 385 };
const IMAGE_W = 600;

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "rulewriter-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1440, height: 1000 },
  deviceScaleFactor: 1,
});
const summary = { url, checks: {}, screenshots: [] };
const errors = [];
let failed = false;
const check = (name, ok, detail) => {
  summary.checks[name] = { ok: Boolean(ok), detail };
  if (!ok) failed = true;
};

try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.setDefaultTimeout(120_000);

  // 1. Browse: every thumbnail gets its top-1.
  await page.goto(url);
  await page.waitForSelector('body[data-ready="1"]');
  await page.waitForFunction(() => {
    const tops = [...document.querySelectorAll(".thumb .top1")];
    return tops.length > 0 && tops.every((t) => t.textContent !== "…");
  });
  summary.thumbnails = await page.$$eval(".thumb", (ts) => ts.map((t) => ({
    name: t.dataset.name, top1: t.querySelector(".top1").firstChild.textContent })));
  // A very long file name must not widen the thumbnail grid past its panel (minmax(0, 1fr) columns).
  const overflow = await page.evaluate(() => {
    const grid = document.querySelector("#thumbs");
    const name = grid.querySelector(".thumb .name");
    const long = document.createElement("span");  // added, then removed: the thumbnail is left as it was
    long.textContent = "a-very-long-file-name-without-any-spaces-".repeat(6) + ".jpg";
    name.append(long);
    const panel = document.querySelector("#browse");
    const out = { grid: grid.scrollWidth, gridBox: grid.clientWidth, panel: panel.scrollWidth, panelBox: panel.clientWidth };
    long.remove();
    return out;
  });
  check("a long file name does not overflow the thumbnail grid",
        overflow.grid <= overflow.gridBox + 1 && overflow.panel <= overflow.panelBox + 1, overflow);
  await page.click('.thumb[data-name="coffee.jpg"]');
  await page.waitForSelector("#canvas-wrap:not(.empty)");
  await page.waitForFunction(() => document.querySelector("#current-preds li")?.textContent.includes("espresso"));
  await page.screenshot({ path: shot("browse.png") });
  summary.screenshots.push("browse.png");

  // 2. Paint the cup and saucer with mouse strokes inside the ellipse.
  await page.fill("#brush", "36");
  await page.dispatchEvent("#brush", "input");
  const box = await page.locator("#mask-canvas").boundingBox();
  const s = box.width / IMAGE_W;  // screen pixels per image pixel
  const cx = (ELLIPSE.left + ELLIPSE.right) / 2, cy = (ELLIPSE.top + ELLIPSE.bottom) / 2;
  const a = (ELLIPSE.right - ELLIPSE.left) / 2, b = (ELLIPSE.bottom - ELLIPSE.top) / 2;
  const brush = 36 / s;  // the brush in image pixels
  for (let y = cy - b + brush / 2; y <= cy + b - brush / 2 + 1; y += brush * 0.6) {
    const half = a * Math.sqrt(Math.max(0, 1 - ((y - cy) / b) ** 2)) - brush / 2;
    if (half <= 0) continue;
    await page.mouse.move(box.x + (cx - half) * s, box.y + y * s);
    await page.mouse.down();
    await page.mouse.move(box.x + (cx + half) * s, box.y + y * s, { steps: 12 });
    await page.mouse.up();
  }
  const painted = await page.textContent('.thumb[data-name="coffee.jpg"] .painted');
  check("mask painted", painted.includes("mask"), painted);

  // 3. Build the rule: gravel pasted into the mask.
  await page.click('.swatch[data-texture="skimage:gravel"]');
  await page.click("#add-exemplar");
  await page.waitForSelector(".exemplar");
  const exemplarText = await page.textContent(".exemplar");
  summary.exemplar = exemplarText;
  const m = exemplarText.match(/before: (.+?) → (.+?) \d/);
  check("original is espresso", m && m[1] === "espresso", exemplarText);
  check("gravel cup is not espresso before the edit", m && m[2] !== "espresso", exemplarText);
  await page.screenshot({ path: shot("paint.png") });
  summary.screenshots.push("paint.png");

  // 4. Run the edit, watching the progress bar, then read the before/after panel.
  await page.click("#run-edit");
  await page.waitForSelector("#edit-progress:not(.hidden)");
  await page.waitForSelector('#results:not(.hidden) .result[data-kind="manipulated"]', { timeout: 300_000 });
  const rows = await page.$$eval(".result", (rs) => rs.map((r) => ({
    kind: r.dataset.kind, title: r.querySelector(".title").firstChild.textContent,
    before: r.dataset.before, after: r.dataset.after })));
  summary.results = rows;
  const man = rows.find((r) => r.kind === "manipulated");
  const orig = rows.find((r) => r.kind === "exemplar");
  check("gravel cup is espresso after the edit", man && man.before !== "espresso" && man.after === "espresso", man);
  check("original stays espresso", orig && orig.after === "espresso", orig);
  const others = rows.filter((r) => r.kind === "other");
  summary.others_kept = `${others.filter((r) => r.before === r.after).length}/${others.length}`;
  await page.screenshot({ path: shot("edit-result.png"), fullPage: true });
  summary.screenshots.push("edit-result.png");

  // 5. Search by concept: the painted cup's key-match heatmap on every image, ranked.
  await page.click('.thumb[data-name="coffee.jpg"]');
  await page.click("#search-concept");
  await page.waitForSelector("#search:not(.hidden) .heat", { timeout: 300_000 });
  const ranked = await page.$$eval(".heat", (hs) => hs.map((h) => h.textContent));
  summary.search = ranked;
  check("the coffee photo ranks first for its own cup", ranked[0] && ranked[0].includes("coffee"), ranked[0]);
  await page.locator("#search").screenshot({ path: shot("heatmap.png") });
  summary.screenshots.push("heatmap.png");

  // 6. Keep or discard: revert brings the original model's predictions back.
  await page.click("#revert");
  await page.waitForSelector("#results.hidden", { state: "attached" });
  check("revert hides the comparison", true);
} catch (e) {
  failed = true;
  summary.error = String(e && e.stack ? e.stack : e);
} finally {
  summary.page_errors = errors;
  if (errors.length) failed = true;
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
summary.ok = !failed;
console.log(JSON.stringify(summary));
process.exit(failed ? 1 : 0);
