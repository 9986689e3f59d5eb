// Drives the Photoshop plugin's real panel and bundle in headless Chromium against a running
// `ip2p serve` (token on), with a fake Photoshop host (photoshop/test/fake-photoshop.js). The
// panel is served from another loopback origin (its own port), so every call is
// cross-origin: preflight and auth run as in UXP. Prints each check, `N passed, N failed`, and
// one JSON line last.
//   node --experimental-websocket clients/browser/plugin.mjs SERVER TOKEN OUT_DIR
import { createServer } from "node:http";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { join, dirname, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { launch } from "./cdp.mjs";

const [server, token, outDir] = process.argv.slice(2);
const pluginDir = join(dirname(fileURLToPath(import.meta.url)), "..", "photoshop");
mkdirSync(outDir, { recursive: true });
const checks = [];
const check = (name, ok, detail) => checks.push({ name, ok: !!ok, detail: ok ? undefined : detail });
const INSTRUCTION = "turn the sunflowers into roses";

// The harness origin: the plugin's own files, the fake host injected first into index.html.
function serveHarness() {
  const types = { ".html": "text/html", ".js": "text/javascript" };
  const http = createServer((req, res) => {
    const path = normalize(new URL(req.url, "http://x").pathname).replace(/^\/+/, "") || "index.html";
    try {
      let body = readFileSync(join(pluginDir, path));
      if (path === "index.html") body = body.toString().replace("<head>", '<head>\n<script src="test/fake-photoshop.js"></script>');
      res.writeHead(200, { "content-type": types[path.slice(path.lastIndexOf("."))] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  return new Promise((r) => http.listen(0, "127.0.0.1", () => r(http)));
}

const auth = { authorization: `Bearer ${token}` };
async function cancelledCount() {
  const text = await (await fetch(`${server}/metrics`, { headers: auth })).text();
  return text.split("\n").filter((l) => l.includes('outcome="cancelled"') && !l.startsWith("#"))
    .reduce((n, l) => n + Number(l.trim().split(/\s+/).pop()), 0);
}

/** Long edits sent straight to the server (not the panel) to fill its one-slot queue. */
function blocker() {
  const ctl = new AbortController();
  const px = Buffer.alloc(64 * 64 * 4, 128).toString("base64");
  const body = { image_raw: { pixels: px, width: 64, height: 64, format: "rgba8" }, instruction: "block", steps: 1000, resolution: 64 };
  const seen = [];
  const done = (async () => {
    const r = await fetch(`${server}/v1/edit/stream`, { method: "POST", headers: { ...auth, "content-type": "application/json" }, body: JSON.stringify(body), signal: ctl.signal });
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      for (const m of dec.decode(value).matchAll(/event: (\w+)/g)) seen.push(m[1]);
    }
  })().catch(() => {});
  return { ctl, seen, done };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function openPanel(b, base, query) {
  await b.send("Page.navigate", { url: `${base}/index.html${query}` });
  await b.waitFor("document.readyState === 'complete' && !!window.__ps && !!document.getElementById('panel')");
  await b.waitFor("document.getElementById('status').classList.contains('error')"); // the default server is not there
  await setValue(b, "server", server);
}

const setValue = (b, id, v) => b.evaluate(`(() => { const e = document.getElementById('${id}'); e.value = ${JSON.stringify(String(v))}; e.dispatchEvent(new Event('change')); })()`);
const status = (b) => b.evaluate("document.getElementById('status').textContent");

async function login(b) {
  await setValue(b, "token", token);
  return b.waitFor("document.getElementById('model').textContent");
}

/** Fills the form and presses Edit; resolves when the status says Placed or shows an error. */
async function edit(b, { steps, variations, seed, selectionOnly, padding }) {
  await b.evaluate(`(() => { const v = (id, x) => document.getElementById(id).value = x;
    v('instruction', ${JSON.stringify(INSTRUCTION)}); v('steps', ${steps}); v('variations', ${variations}); v('seed', ${seed}); v('padding', ${padding});
    document.getElementById('seed-lock').checked = true; document.getElementById('selection-only').checked = ${selectionOnly};
    window.__seen = { previews: [], statuses: [] };
    new MutationObserver(() => { const img = document.getElementById('preview'); const i = new Image(); i.src = img.src;
      i.decode().then(() => window.__seen.previews.push(i.naturalWidth), () => window.__seen.previews.push(0)); })
      .observe(document.getElementById('preview'), { attributes: true, attributeFilter: ['src'] });
    new MutationObserver(() => window.__seen.statuses.push(document.getElementById('status').textContent))
      .observe(document.getElementById('status'), { childList: true, characterData: true, subtree: true });
    document.getElementById('edit').click(); })()`);
}

const settled = "/^Placed/.test(document.getElementById('status').textContent) || document.getElementById('status').classList.contains('error')";

async function browserMode(b, base) {
  await openPanel(b, base, "");
  await setValue(b, "token", "wrong");
  const wrong = await b.waitFor("document.getElementById('status').classList.contains('error') && /token/i.test(document.getElementById('status').textContent) && document.getElementById('status').textContent");
  check("a wrong token shows the server's 401 message", /token/i.test(wrong), wrong);
  const model = await login(b);
  const info = await (await fetch(`${server}/v1/info`, { headers: auth })).json();
  check("GetInfo fills the model and the defaults", model.includes(info.model) &&
    (await b.evaluate("+document.getElementById('steps').value")) === info.defaults.steps &&
    (await b.evaluate("+document.getElementById('image-guidance').value")) === info.defaults.image_guidance, model);
  check("the token is kept in secure storage", (await b.evaluate("window.__ps.inspect().token")) === token);

  await edit(b, { steps: 3, variations: 2, seed: 5, selectionOnly: true, padding: 32 });
  await b.waitFor(settled, 120000);
  const st = await status(b), seen = await b.evaluate("window.__seen"), ps = await b.evaluate("window.__ps.inspect()");
  check("the edit places its results", st.startsWith("Placed 2 layer(s)"), st);
  const sb = ps.selectionBounds, pad = 32;
  const crop = { left: Math.max(0, sb.left - pad), top: Math.max(0, sb.top - pad), right: Math.min(320, sb.right + pad), bottom: Math.min(240, sb.bottom + pad) };
  const [l0, l1] = ps.layers;
  check("two new layers at the crop's offset, the crop's size", ps.layers.length === 2 && ps.layers.every((l) => JSON.stringify(l.bounds) === JSON.stringify(crop)), { crop, layers: ps.layers });
  check("layers named after the instruction and seed; the variation hidden",
    l0?.name.includes(INSTRUCTION) && l0.name.endsWith("seed 5") && /seed \d+$/.test(l1?.name) && !l1.name.endsWith("seed 5") && l0.visible && !l1.visible, ps.layers);
  check("the selection is each layer's mask", ps.layers.every((l) => l.hasMask && l.maskMaxDiffFromSelection === 0), ps.layers);
  check("pixels outside the selection unchanged (composite and layer)", ps.compositeMaxDiffOutsideSelection === 0 && ps.layers.every((l) => l.layerMaxDiffOutsideSelection === 0), ps);
  check("pixels inside the selection changed", ps.compositeMeanDiffInsideSelection > 1, ps.compositeMeanDiffInsideSelection);
  check("one history step", ps.history.length === 1 && ps.history[0] === `ip2p: ${INSTRUCTION}`, ps.history);
  check("no network call while a modal scope is held; two short scopes", ps.log.networkWhileModal === 0 && ps.log.network > 0 && ps.log.modal.length === 2, ps.log);
  const px = ps.log.reads.find((r) => r.kind === "pixels");
  check("the trimmed read was padded (asked past the document's pixels)", px && px.returned.bottom < px.asked.bottom && px.asked.bottom === crop.bottom, px);
  check("a progress event with a decodable preview", seen.previews.some((w) => w > 0), seen.previews);
  check("streamed through Response.body", (await b.evaluate("document.getElementById('panel').dataset.mode")) === "stream");

  await b.evaluate("document.getElementById('seed').value = 99; document.getElementById('seed-lock').checked = false; document.querySelector('#history li').click()");
  const reused = await b.evaluate("({ n: document.querySelectorAll('#history li').length, seed: +document.getElementById('seed').value, lock: document.getElementById('seed-lock').checked, instruction: document.getElementById('instruction').value })");
  check("the history reuses an edit's parameters", reused.n === 1 && reused.seed === 5 && reused.lock && reused.instruction === INSTRUCTION, reused);
  const shot = await b.send("Page.captureScreenshot", { format: "png" });
  writeFileSync(join(outDir, "plugin-panel.png"), Buffer.from(shot.data, "base64"));

  // Cancel after the first progress event.
  const before = await cancelledCount();
  await edit(b, { steps: 200, variations: 1, seed: 6, selectionOnly: true, padding: 32 });
  await b.waitFor("/^Step [1-9]/.test(document.getElementById('status').textContent)", 60000);
  await b.evaluate("document.getElementById('cancel').click()");
  const idle = await b.waitFor("document.getElementById('panel').dataset.phase === 'idle' && !document.getElementById('edit').disabled && document.getElementById('status').textContent");
  let after = before;
  for (let i = 0; i < 100 && after <= before; i++) (await sleep(50)), (after = await cancelledCount());
  check("cancel after the first progress returns the panel to idle", idle === "Cancelled.", idle);
  check("the server counts the cancelled edit", after > before, { before, after });
  check("a cancelled edit places nothing", (await b.evaluate("window.__ps.inspect().layers.length")) === 2);

  // Behind a running edit the panel's edit waits, shows its place, and can be cancelled there.
  const running = blocker();
  for (let i = 0; i < 200 && !running.seen.includes("progress"); i++) await sleep(50);
  const beforeQueued = await cancelledCount();
  await edit(b, { steps: 3, variations: 1, seed: 8, selectionOnly: true, padding: 32 });
  const queued = await b.waitFor("/^Queued: position \\d+/.test(document.getElementById('status').textContent) && document.getElementById('status').textContent", 30000);
  await b.evaluate("document.getElementById('cancel').click()");
  const idleAgain = await b.waitFor("document.getElementById('panel').dataset.phase === 'idle' && !document.getElementById('edit').disabled && document.getElementById('status').textContent");
  let afterQueued = beforeQueued;
  for (let i = 0; i < 100 && afterQueued <= beforeQueued; i++) (await sleep(50)), (afterQueued = await cancelledCount());
  check("the queue position is shown, and a queued edit can be cancelled", queued === "Queued: position 1." && idleAgain === "Cancelled." && afterQueued > beforeQueued, { queued, idleAgain, beforeQueued, afterQueued });

  // A full queue: one running, one waiting (capacity 1), then the panel's edit.
  const waiting = blocker();
  for (let i = 0; i < 200 && !waiting.seen.includes("queued"); i++) await sleep(50);
  await edit(b, { steps: 3, variations: 1, seed: 7, selectionOnly: true, padding: 32 });
  const full = await b.waitFor("document.getElementById('status').classList.contains('error') && document.getElementById('status').textContent", 30000);
  check("a full queue shows the server's 429 message and when to retry", /queue/i.test(full) && /retry in \d+ s/.test(full), full);
  running.ctl.abort();
  waiting.ctl.abort();
  await Promise.all([running.done, waiting.done]);
}

async function fallbackMode(b, base, query, expectMode, selectionOnly) {
  await openPanel(b, base, query);
  await login(b);
  const apis = (await b.evaluate("window.__ps.inspect()")).apis;
  await edit(b, { steps: 2, variations: 1, seed: 11, selectionOnly, padding: 16 });
  await b.waitFor(settled, 120000);
  const st = await status(b), ps = await b.evaluate("window.__ps.inspect()");
  const mode = await b.evaluate("document.getElementById('panel').dataset.mode");
  const l = ps.layers[0];
  const whole = { left: 0, top: 0, right: 320, bottom: 240 };
  check(`${query}: ${expectMode} transport without Response.body/FormData/btoa`, mode === expectMode && !apis.responseBody && apis.formData === "undefined" && apis.btoa === "undefined", { mode, apis });
  check(`${query}: the result placed, masked, outside unchanged`, st.startsWith("Placed 1 layer") && ps.layers.length === 1 &&
    (selectionOnly || JSON.stringify(l.bounds) === JSON.stringify(whole)) && l.maskMaxDiffFromSelection === 0 && ps.compositeMaxDiffOutsideSelection === 0, { st, ps });
}

const site = await serveHarness();
const base = `http://127.0.0.1:${site.address().port}`; // another port: another origin
const b = await launch();
let failure;
try {
  await b.send("Page.enable");
  // A docked panel's size.
  await b.send("Emulation.setDeviceMetricsOverride", { width: 340, height: 620, deviceScaleFactor: 1, mobile: false });
  await browserMode(b, base);
  await fallbackMode(b, base, "?mode=uxp&depth=16", "xhr", false);
  await fallbackMode(b, base, "?mode=unary", "unary", true);
} catch (e) {
  failure = String(e.stack ?? e);
} finally {
  b.close();
  site.close();
}
for (const c of checks) console.log(`${c.ok ? "ok" : "not ok"} - ${c.name}${c.ok ? "" : `: ${JSON.stringify(c.detail).slice(0, 2000)}`}`);
const passed = checks.filter((c) => c.ok).length, failed = checks.length - passed + (failure ? 1 : 0);
if (failure) console.log(`not ok - the harness stopped: ${failure}`);
console.log(`${passed} passed, ${failed} failed`);
console.log(JSON.stringify({ passed, failed, failure: failure ?? null }));
