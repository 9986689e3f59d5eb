// Drives the web page of a running `ip2p serve` in headless Chromium as a person would:
// a wrong token (the server's 401 shown), the right one, a picture uploaded, a mask painted,
// an edit with 2 variations; then a cancelled edit. Prints one JSON line of what it saw and
// keeps a screenshot.
//   node --experimental-websocket clients/browser/page.mjs SERVER TOKEN IMAGE OUT_DIR
import { writeFileSync, mkdirSync } from "node:fs";
import { resolve, join } from "node:path";
import { launch } from "./cdp.mjs";

const [server, token, image, outDir] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const b = await launch();
const seen = {};
try {
  await b.send("Page.enable");
  await b.send("Page.navigate", { url: `${server}/` });
  await b.waitFor("document.readyState === 'complete' && !!document.getElementById('edit')");

  const setToken = (t) => b.evaluate(`(() => { const e = document.getElementById('token'); e.value = ${JSON.stringify(t)}; e.dispatchEvent(new Event('change')); })()`);
  await setToken("wrong");
  seen.wrongToken = await b.waitFor("document.getElementById('status').classList.contains('error') && document.getElementById('status').textContent");
  await setToken(token);
  seen.model = await b.waitFor("document.getElementById('model').textContent");

  const { root } = await b.send("DOM.getDocument");
  const { nodeId } = await b.send("DOM.querySelector", { nodeId: root.nodeId, selector: "#file" });
  await b.send("DOM.setFileInputFiles", { nodeId, files: [resolve(image)] });
  await b.waitFor("!document.querySelector('.stack').hidden && document.getElementById('picture').width > 0");

  // Paint the left half of the picture's middle band.
  const r = await b.evaluate("(() => { const r = document.getElementById('mask').getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; })()");
  const mouse = (type, x, y) => b.send("Input.dispatchMouseEvent", { type, x, y, button: "left", buttons: type === "mouseReleased" ? 0 : 1, clickCount: 1 });
  await mouse("mousePressed", r.x + r.w * 0.1, r.y + r.h * 0.5);
  for (let i = 1; i <= 10; i++) await mouse("mouseMoved", r.x + r.w * (0.1 + 0.03 * i), r.y + r.h * 0.5);
  await mouse("mouseReleased", r.x + r.w * 0.4, r.y + r.h * 0.5);
  seen.maskPixels = await b.evaluate("(() => { const m = document.getElementById('mask'); const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()");

  // Record every status text and preview the page shows.
  await b.evaluate(`(() => { window.__log = { status: [], previews: 0 };
    new MutationObserver(() => window.__log.status.push(document.getElementById('status').textContent)).observe(document.getElementById('status'), { childList: true, characterData: true, subtree: true });
    new MutationObserver(() => window.__log.previews++).observe(document.getElementById('preview'), { attributes: true, attributeFilter: ['src'] }); })()`);
  await b.evaluate(`(() => { const v = (id, x) => document.getElementById(id).value = x;
    v('instruction', 'turn the sunflowers into roses'); v('steps', 3); v('variations', 2); v('seed', 5);
    document.getElementById('seed-lock').checked = true; document.getElementById('edit').click(); })()`);
  await b.waitFor("/^(Done|Error)/.test(document.getElementById('status').textContent) || document.getElementById('status').classList.contains('error')", 120000);
  seen.status = await b.evaluate("document.getElementById('status').textContent");
  seen.log = await b.evaluate("window.__log");
  seen.results = await b.evaluate(`(async () => {
    const pic = document.getElementById('picture'), mask = document.getElementById('mask');
    const w = pic.width, h = pic.height;
    const p = pic.getContext('2d').getImageData(0, 0, w, h).data, m = mask.getContext('2d').getImageData(0, 0, w, h).data;
    const out = [];
    for (const img of document.querySelectorAll('#results img')) {
      await img.decode();
      const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext('2d'); g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let outside = 0, inside = 0, nIn = 0;
      if (c.width === w && c.height === h) for (let i = 0; i < w * h; i++) {
        const diff = Math.max(...[0, 1, 2].map((k) => Math.abs(d[4 * i + k] - p[4 * i + k])));
        if (m[4 * i + 3] === 0) outside = Math.max(outside, diff); else { inside += diff; nIn++; }
      }
      out.push({ width: img.naturalWidth, height: img.naturalHeight, seed: img.dataset.seed, maxDiffOutsideMask: outside, meanDiffInsideMask: nIn ? inside / nIn : 0 });
    }
    return out; })()`);
  seen.picture = await b.evaluate("({ width: document.getElementById('picture').width, height: document.getElementById('picture').height })");
  seen.history = await b.evaluate("document.querySelectorAll('#history li').length");
  const shot = await b.send("Page.captureScreenshot", { format: "png" });
  writeFileSync(join(outDir, "web-page.png"), Buffer.from(shot.data, "base64"));

  // Cancel after the first progress event.
  await b.evaluate(`(() => { document.getElementById('steps').value = 200; document.getElementById('variations').value = 1; document.getElementById('edit').click(); })()`);
  await b.waitFor("/^Step [1-9]/.test(document.getElementById('status').textContent)", 60000);
  await b.evaluate("document.getElementById('cancel').click()");
  seen.afterCancel = await b.waitFor("document.getElementById('status').textContent === 'Cancelled.' && !document.getElementById('edit').disabled && document.getElementById('status').textContent");
} catch (e) {
  seen.failure = String(e.stack ?? e);
} finally {
  b.close();
}
console.log(JSON.stringify(seen));
