// node --test clients/test/ — the pure modules the plugin and the page share.
import test from "node:test";
import assert from "node:assert/strict";
import { SseParser } from "../shared/sse.js";
import { padToBounds, rgbToRgba, rgbaToRgb, to8bit, selectionToGray8, cropBox } from "../shared/pixels.js";
import { bytesToBase64, base64ToBytes } from "../shared/base64.js";
import { buildEditRequest } from "../shared/request.js";
import { errorFromResponse, errorFromEvent } from "../shared/errors.js";
import { EditState } from "../shared/state.js";
import { startEdit, chooseMode } from "../shared/transport.js";

test("padToBounds puts trimmed data back at its offset, zero elsewhere", () => {
  // A 2×2 RGBA patch at (3,1) of a layer; asked for (2,0)-(6,3): a 4×3 buffer.
  const data = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
  const out = padToBounds(data, { left: 3, top: 1, right: 5, bottom: 3 }, { left: 2, top: 0, right: 6, bottom: 3 }, 4);
  assert.equal(out.length, 4 * 3 * 4);
  const px = (x, y) => Array.from(out.subarray((y * 4 + x) * 4, (y * 4 + x) * 4 + 4));
  assert.deepEqual(px(0, 0), [0, 0, 0, 0]);
  assert.deepEqual(px(1, 1), [1, 2, 3, 4]);
  assert.deepEqual(px(2, 1), [5, 6, 7, 8]);
  assert.deepEqual(px(1, 2), [9, 10, 11, 12]);
  assert.deepEqual(px(3, 2), [0, 0, 0, 0]);
  // Data reaching past the asked bounds (canvas edge) is cut.
  const cut = padToBounds(data, { left: 0, top: 0, right: 2, bottom: 2 }, { left: 1, top: 1, right: 3, bottom: 3 }, 4);
  assert.deepEqual(Array.from(cut.subarray(0, 4)), [13, 14, 15, 16]);
  assert.deepEqual(Array.from(cut.subarray(4)), new Array(12).fill(0));
  // No overlap at all: all zero, typed array kept.
  const none = padToBounds(new Uint16Array([7]), { left: 9, top: 9, right: 10, bottom: 10 }, { left: 0, top: 0, right: 2, bottom: 1 }, 1);
  assert.ok(none instanceof Uint16Array);
  assert.deepEqual(Array.from(none), [0, 0]);
});

test("RGB and RGBA convert both ways", () => {
  const rgb = Uint8Array.from([1, 2, 3, 4, 5, 6]);
  const rgba = rgbToRgba(rgb);
  assert.deepEqual(Array.from(rgba), [1, 2, 3, 255, 4, 5, 6, 255]);
  assert.deepEqual(Array.from(rgbaToRgb(rgba)), Array.from(rgb));
});

test("16-bit documents become 8-bit (Photoshop's 0..32768)", () => {
  assert.deepEqual(Array.from(to8bit(Uint16Array.from([0, 16384, 32768, 128]))), [0, 128, 255, 1]);
  assert.deepEqual(Array.from(to8bit(Uint16Array.from([65535]), 65535)), [255]);
});

test("a feathered selection becomes a GRAY8 mask of the crop", () => {
  const feather = Uint8Array.from([0, 64, 128, 255]); // 4×1 ramp at (1,1)
  const m = selectionToGray8(feather, { left: 1, top: 1, right: 5, bottom: 2 }, { left: 0, top: 0, right: 6, bottom: 3 });
  assert.equal(m.length, 18);
  assert.deepEqual(Array.from(m.subarray(6, 12)), [0, 0, 64, 128, 255, 0]);
  const m16 = selectionToGray8(Uint16Array.from([32768, 16384]), { left: 0, top: 0, right: 2, bottom: 1 }, { left: 0, top: 0, right: 2, bottom: 1 }, 16);
  assert.ok(m16 instanceof Uint8Array);
  assert.deepEqual(Array.from(m16), [255, 128]);
});

test("cropBox pads, clamps to the canvas and fits the server's max_pixels", () => {
  const canvas = { width: 100, height: 80 };
  const sel = { left: 10, top: 70, right: 30, bottom: 78 };
  assert.deepEqual(cropBox(sel, 16, canvas, 0), { left: 0, top: 54, right: 46, bottom: 80, scale: 1 });
  // 46 × 26 = 1196 > 1000: the padding shrinks until it fits.
  const fit = cropBox(sel, 16, canvas, 1000);
  assert.ok((fit.right - fit.left) * (fit.bottom - fit.top) <= 1000);
  assert.equal(fit.scale, 1);
  assert.ok(fit.left <= 10 && fit.right >= 30 && fit.top <= 70 && fit.bottom >= 78);
  // A selection larger than the limit by itself: sent downscaled.
  const big = cropBox({ left: 0, top: 0, right: 100, bottom: 80 }, 8, canvas, 2000);
  assert.ok(Math.abs(big.scale - Math.sqrt(2000 / 8000)) < 1e-12);
});

test("base64 matches Node's for every length, and decodes data URLs", () => {
  for (let n = 0; n < 70; n++) {
    const b = Uint8Array.from({ length: n }, (_, i) => (i * 37 + n) & 255);
    const s = bytesToBase64(b);
    assert.equal(s, Buffer.from(b).toString("base64"));
    assert.deepEqual(base64ToBytes(s), b);
  }
  assert.deepEqual(Array.from(base64ToBytes("data:image/png;base64,AAEC")), [0, 1, 2]);
  assert.throws(() => base64ToBytes("A*B"), /not base64/);
});

const STREAM =
  "\uFEFF: keep-alive comment\r\n" +
  "event: queued\r\ndata: {\"position\":2}\r\n\r\n" +
  "event: progress\ndata: {\"step\":1,\n" +
  "data: \"total\":3}\n\n" +
  "event: note\rdata:é ✓\r\r" +
  "data\n\n" +
  "event: result\ndata: {\"images\":[]}\n\n" +
  "event: cut\ndata: never dispatched";

const WANT = [
  { event: "queued", data: '{"position":2}' },
  { event: "progress", data: '{"step":1,\n"total":3}' },
  { event: "note", data: "é ✓" },
  { event: "message", data: "" },
  { event: "result", data: '{"images":[]}' },
];

test("SSE: whole, one character at a time, and one byte at a time", () => {
  const run = (feed) => {
    const got = [];
    const p = new SseParser(({ event, data }) => got.push({ event, data }));
    feed(p);
    p.end();
    return got;
  };
  assert.deepEqual(run((p) => p.push(STREAM)), WANT);
  assert.deepEqual(run((p) => [...STREAM].forEach((c) => p.push(c))), WANT);
  const bytes = new TextEncoder().encode(STREAM);
  assert.deepEqual(run((p) => bytes.forEach((b) => p.pushBytes(Uint8Array.of(b)))), WANT);
});

test("the request carries raw RGBA, a GRAY8 mask, raw output and an id", () => {
  const img = { rgba: new Uint8Array(2 * 1 * 4).fill(9), width: 2, height: 1 };
  const body = buildEditRequest(img, { data: Uint8Array.of(0, 255), width: 2, height: 1 },
    { instruction: "make it night", steps: 20, textGuidance: 7.5, imageGuidance: 1.5, seed: 5, variations: 2, previewEvery: 1 }, "r1");
  assert.deepEqual(body, {
    image_raw: { pixels: "CQkJCQkJCQk=", width: 2, height: 1, format: "rgba8" },
    mask_raw: { pixels: "AP8=", width: 2, height: 1, format: "gray8" },
    instruction: "make it night", output_format: "raw_rgba", request_id: "r1",
    steps: 20, text_guidance: 7.5, image_guidance: 1.5, seed: 5, variations: 2, preview_every: 1,
  });
  assert.throws(() => buildEditRequest({ rgba: new Uint8Array(3), width: 2, height: 1 }, null, {}), /RGBA/);
});

test("errors keep the server's words, its field and the retry hint", () => {
  const e = errorFromResponse(400, '{"error":{"code":"invalid argument","message":"must be finite","field":"text_guidance"}}');
  assert.equal(e.display(), "text_guidance: must be finite");
  const q = errorFromResponse(429, '{"error":{"code":"resource exhausted","message":"the edit queue is full (4 waiting)"}}', "3");
  assert.equal(q.retryAfter, 3);
  assert.equal(q.display(), "the edit queue is full (4 waiting) (retry in 3 s)");
  assert.equal(errorFromResponse(401, "missing or bad bearer token").display(), "missing or bad bearer token");
  assert.equal(errorFromEvent('{"error":{"code":"cancelled","message":"the edit was cancelled"}}').message, "the edit was cancelled");
});

test("the state machine: queued → running → done, history, reuse", () => {
  const s = new EditState();
  const seen = [];
  s.onChange((c) => seen.push(c.phase));
  s.submit({ instruction: "x", steps: 3, seed: 1 });
  assert.throws(() => s.submit({}), /already running/);
  s.event("queued", { position: 1 });
  assert.equal(s.current.position, 1);
  s.event("started", {});
  s.event("progress", { step: 2, total: 3, preview: "AAA" });
  assert.equal(s.current.step, 2);
  s.event("result", { images: [{ seed: 42 }] });
  assert.deepEqual(seen, ["submitting", "queued", "running", "running", "done"]);
  assert.equal(s.history.length, 1);
  assert.deepEqual(s.reuse(0), { instruction: "x", steps: 3, seed: 42 });
  s.event("progress", { step: 3, total: 3 }); // late event after done: ignored
  assert.equal(s.current.phase, "done");
});

test("the state machine: cancel while queued, then a new edit", () => {
  const s = new EditState();
  s.submit({ instruction: "x" });
  s.event("queued", { position: 3 });
  assert.equal(s.cancel(), true);
  assert.equal(s.current.phase, "cancelled");
  s.fail(new Error("aborted")); // the aborted request's rejection does not turn it into an error
  assert.equal(s.current.phase, "cancelled");
  s.event("result", {}); // nor does a result that raced the cancel
  assert.equal(s.history.length, 0);
  assert.equal(s.cancel(), false);
  s.submit({ instruction: "y" });
  assert.equal(s.current.phase, "submitting");
});

// Fakes of the three transports.
const EVENTS = "event: queued\ndata: {\"position\":1}\n\nevent: progress\ndata: {\"step\":1,\"total\":2}\n\nevent: result\ndata: {\"images\":[{\"seed\":7}]}\n\n";

function fakeFetch(status, text, { stream = true } = {}) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const bytes = new TextEncoder().encode(text);
    let i = 0;
    return {
      ok: status >= 200 && status < 300, status,
      headers: { get: (h) => (h === "retry-after" && status === 429 ? "2" : null) },
      text: async () => text,
      body: stream ? { getReader: () => ({ read: async () => (i < bytes.length ? { value: bytes.subarray(i, (i += 7)), done: false } : { done: true }) }) } : null,
    };
  };
  return { fetch, calls };
}

// A `Response` whose prototype has `body` (browsers; UXP before 8 lacks it).
class StreamingResponse {
  get body() {
    return null;
  }
}

test("transport: the mode follows what the host has", () => {
  const base = { fetch: () => {}, ReadableStream: function () {}, XMLHttpRequest: function () {} };
  assert.equal(chooseMode({ ...base, Response: StreamingResponse }), "stream");
  // fetch without a readable body (UXP-like): partial XHR text.
  assert.equal(chooseMode({ ...base, Response: class {} }), "xhr");
  assert.equal(chooseMode({ ...base, Response: StreamingResponse, ReadableStream: undefined }), "xhr");
  // Neither: the unary call.
  assert.equal(chooseMode({ fetch: () => {}, Response: class {} }), "unary");
});

test("transport: streaming fetch with the token, events in order", async () => {
  const { fetch, calls } = fakeFetch(200, EVENTS);
  const env = { fetch, ReadableStream: function () {}, Response: StreamingResponse, AbortController };
  const got = [];
  const h = startEdit({ server: "http://127.0.0.1:1/", token: "t0k", body: { a: 1 }, onEvent: (n) => got.push(n), env });
  assert.equal(h.mode, "stream");
  assert.deepEqual(await h.done, { images: [{ seed: 7 }] });
  assert.deepEqual(got, ["queued", "progress", "result"]);
  assert.equal(calls[0].url, "http://127.0.0.1:1/v1/edit/stream");
  assert.equal(calls[0].init.headers.authorization, "Bearer t0k");
});

test("transport: an HTTP error becomes the server's message", async () => {
  const { fetch } = fakeFetch(429, '{"error":{"message":"the edit queue is full"}}');
  const h = startEdit({ server: "http://x", body: {}, onEvent: () => {}, env: { fetch, ReadableStream: function () {}, Response: StreamingResponse, AbortController } });
  await assert.rejects(h.done, (e) => e.status === 429 && e.retryAfter === 2);
});

test("transport: XHR partial text when fetch cannot stream", async () => {
  class FakeXhr {
    static last;
    constructor() { FakeXhr.last = this; this.headers = {}; this.status = 0; this.responseText = ""; }
    open(m, u) { this.url = u; }
    setRequestHeader(k, v) { this.headers[k] = v; }
    getResponseHeader() { return null; }
    abort() { this.aborted = true; }
    send() {
      this.status = 200;
      setTimeout(() => {
        for (let i = 1; i <= EVENTS.length; i += 11) { this.responseText = EVENTS.slice(0, i); this.onprogress(); }
        this.responseText = EVENTS;
        this.onload();
      }, 0);
    }
  }
  const env = { XMLHttpRequest: FakeXhr };
  assert.equal(chooseMode(env), "xhr");
  const got = [];
  const h = startEdit({ server: "http://x", token: "k", body: {}, onEvent: (n) => got.push(n), env });
  assert.deepEqual(await h.done, { images: [{ seed: 7 }] });
  assert.deepEqual(got, ["queued", "progress", "result"]);
  assert.equal(FakeXhr.last.headers.authorization, "Bearer k");
  const c = startEdit({ server: "http://x", body: {}, onEvent: () => {}, env });
  c.cancel();
  assert.equal(FakeXhr.last.aborted, true);
  assert.equal(await c.done, null);
});

test("transport: the unary call when nothing streams, and cancel aborts fetch", async () => {
  const { fetch, calls } = fakeFetch(200, '{"images":[{"seed":9}]}', { stream: false });
  const got = [];
  const h = startEdit({ server: "http://x", body: {}, onEvent: (n, d) => got.push([n, d.images[0].seed]), env: { fetch } });
  assert.equal(h.mode, "unary");
  assert.deepEqual(await h.done, { images: [{ seed: 9 }] });
  assert.deepEqual(got, [["result", 9]]);
  assert.equal(calls[0].url, "http://x/v1/edit");
  let aborted = false;
  const hang = (url, init) => new Promise((_, rej) => init.signal.addEventListener("abort", () => { aborted = true; rej(new Error("aborted")); }));
  const c = startEdit({ server: "http://x", body: {}, onEvent: () => {}, env: { fetch: hang, ReadableStream: function () {}, Response: StreamingResponse, AbortController } });
  c.cancel();
  assert.equal(await c.done, null);
  assert.equal(aborted, true);
});
