(() => {
  var __defProp = Object.defineProperty;
  var __require = /* @__PURE__ */ ((x) => typeof require !== "undefined" ? require : typeof Proxy !== "undefined" ? new Proxy(x, {
    get: (a, b) => (typeof require !== "undefined" ? require : a)[b]
  }) : x)(function(x) {
    if (typeof require !== "undefined") return require.apply(this, arguments);
    throw Error('Dynamic require of "' + x + '" is not supported');
  });
  var __export = (target, all) => {
    for (var name in all)
      __defProp(target, name, { get: all[name], enumerable: true });
  };

  // photoshop/src/host.js
  var host_exports = {};
  __export(host_exports, {
    loadToken: () => loadToken,
    onPanelShow: () => onPanelShow,
    placeResults: () => placeResults,
    readRegion: () => readRegion,
    saveToken: () => saveToken
  });

  // shared/pixels.js
  var width = (b) => b.right - b.left;
  var height = (b) => b.bottom - b.top;
  function padToBounds(data, dataBounds, bounds, components) {
    const w = width(bounds), h = height(bounds), dw = width(dataBounds);
    const out = new data.constructor(w * h * components);
    const x0 = Math.max(bounds.left, dataBounds.left), x1 = Math.min(bounds.right, dataBounds.right);
    const y0 = Math.max(bounds.top, dataBounds.top), y1 = Math.min(bounds.bottom, dataBounds.bottom);
    if (x1 <= x0 || y1 <= y0) return out;
    const n = (x1 - x0) * components;
    for (let y = y0; y < y1; y++) {
      const src = ((y - dataBounds.top) * dw + (x0 - dataBounds.left)) * components;
      const dst = ((y - bounds.top) * w + (x0 - bounds.left)) * components;
      out.set(data.subarray(src, src + n), dst);
    }
    return out;
  }
  function rgbToRgba(rgb, alpha = 255) {
    const n = rgb.length / 3, out = new Uint8Array(n * 4);
    for (let i = 0; i < n; i++) {
      out[4 * i] = rgb[3 * i];
      out[4 * i + 1] = rgb[3 * i + 1];
      out[4 * i + 2] = rgb[3 * i + 2];
      out[4 * i + 3] = alpha;
    }
    return out;
  }
  function to8bit(data, max = 32768) {
    const out = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) {
      out[i] = Math.min(255, Math.round(data[i] * 255 / max));
    }
    return out;
  }
  function toDepth8(data, bitDepth) {
    if (bitDepth === 8) return data instanceof Uint8Array ? data : Uint8Array.from(data);
    if (bitDepth === 16) return to8bit(data, 32768);
    const out = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) out[i] = Math.round(Math.min(1, Math.max(0, data[i])) * 255);
    return out;
  }
  function fromDepth8(data, bitDepth) {
    if (bitDepth === 8) return data;
    if (bitDepth === 16) return Uint16Array.from(data, (v) => Math.round(v * 32768 / 255));
    return Float32Array.from(data, (v) => v / 255);
  }
  function selectionToGray8(data, dataBounds, bounds, bitDepth = 8) {
    return padToBounds(toDepth8(data, bitDepth), dataBounds, bounds, 1);
  }
  function cropBox(selection, padding, canvas, maxPixels) {
    const grow = (p) => ({
      left: Math.max(0, selection.left - p),
      top: Math.max(0, selection.top - p),
      right: Math.min(canvas.width, selection.right + p),
      bottom: Math.min(canvas.height, selection.bottom + p)
    });
    const area = (b) => width(b) * height(b);
    let lo = 0, hi = Math.max(0, Math.floor(padding));
    if (!maxPixels || area(grow(hi)) <= maxPixels) return { ...grow(hi), scale: 1 };
    if (area(grow(0)) > maxPixels) {
      return { ...grow(0), scale: Math.sqrt(maxPixels / area(grow(0))) };
    }
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (area(grow(mid)) <= maxPixels) lo = mid;
      else hi = mid - 1;
    }
    return { ...grow(lo), scale: 1 };
  }
  function resize(data, w, h, components, tw, th) {
    if (tw === w && th === h) return data;
    const out = new Uint8Array(tw * th * components);
    const sx = w / tw, sy = h / th;
    for (let y = 0; y < th; y++) {
      for (let x = 0; x < tw; x++) {
        const o = (y * tw + x) * components;
        for (let c = 0; c < components; c++) {
          out[o + c] = sx >= 1 && sy >= 1 ? areaMean(data, w, components, c, x * sx, y * sy, sx, sy) : bilinear(data, w, h, components, c, (x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5);
        }
      }
    }
    return out;
  }
  function areaMean(data, w, components, c, x0, y0, sx, sy) {
    let sum = 0, weight = 0;
    for (let y = Math.floor(y0); y < Math.ceil(y0 + sy); y++) {
      const wy = Math.min(y + 1, y0 + sy) - Math.max(y, y0);
      for (let x = Math.floor(x0); x < Math.ceil(x0 + sx); x++) {
        const wgt = wy * (Math.min(x + 1, x0 + sx) - Math.max(x, x0));
        sum += wgt * data[(y * w + x) * components + c];
        weight += wgt;
      }
    }
    return Math.round(sum / weight);
  }
  function bilinear(data, w, h, components, c, fx, fy) {
    const x = Math.min(Math.max(fx, 0), w - 1), y = Math.min(Math.max(fy, 0), h - 1);
    const x0 = Math.floor(x), y0 = Math.floor(y), x1 = Math.min(x0 + 1, w - 1), y1 = Math.min(y0 + 1, h - 1);
    const ax = x - x0, ay = y - y0;
    const at = (xx, yy) => data[(yy * w + xx) * components + c];
    const top = at(x0, y0) * (1 - ax) + at(x1, y0) * ax;
    const bottom = at(x0, y1) * (1 - ax) + at(x1, y1) * ax;
    return Math.round(top * (1 - ay) + bottom * ay);
  }

  // photoshop/src/region.js
  function planRegion({ canvas, selection, selectionOnly, padding, maxPixels }) {
    const sel = selection && width(selection) > 0 && height(selection) > 0 ? clampTo(selection, canvas) : null;
    let box;
    if (selectionOnly && sel) {
      box = cropBox(sel, padding, canvas, maxPixels);
    } else {
      const whole = { left: 0, top: 0, right: canvas.width, bottom: canvas.height };
      const area = canvas.width * canvas.height;
      box = { ...whole, scale: maxPixels && area > maxPixels ? Math.sqrt(maxPixels / area) : 1 };
    }
    const bounds = { left: box.left, top: box.top, right: box.right, bottom: box.bottom };
    const target = box.scale < 1 ? { width: Math.max(1, Math.floor(width(bounds) * box.scale)), height: Math.max(1, Math.floor(height(bounds) * box.scale)) } : null;
    return { bounds, scale: box.scale, target, masked: sel !== null };
  }
  function clampTo(b, canvas) {
    return {
      left: Math.max(0, b.left),
      top: Math.max(0, b.top),
      right: Math.min(canvas.width, b.right),
      bottom: Math.min(canvas.height, b.bottom)
    };
  }
  function layerName(instruction, seed) {
    const text = instruction.trim().replace(/\s+/g, " ");
    const short = text.length > 60 ? `${text.slice(0, 59)}…` : text;
    return `${short || "edit"} · seed ${seed}`;
  }
  function forServer(region) {
    if (!region.target) return { image: region.image, mask: region.mask };
    const { width: tw, height: th } = region.target;
    const { image: im, mask: m } = region;
    return {
      image: { rgba: resize(im.rgba, im.width, im.height, 4, tw, th), width: tw, height: th },
      mask: m ? { data: resize(m.data, m.width, m.height, 1, tw, th), width: tw, height: th } : null
    };
  }
  function toRegionSize(rgba, w, h, region) {
    return resize(rgba, w, h, 4, width(region.bounds), height(region.bounds));
  }

  // photoshop/src/host.js
  var { app, core, imaging } = __require("photoshop");
  var uxp = __require("uxp");
  var TOKEN_KEY = "ip2p-token";
  function depthOf(doc) {
    const m = /(\d+)/.exec(String(doc.bitsPerChannel ?? "8"));
    const d = m ? Number(m[1]) : 8;
    return d === 16 || d === 32 ? d : 8;
  }
  async function readRegion({ selectionOnly, padding, maxPixels }) {
    const doc = app.activeDocument;
    if (!doc) throw new Error("Open a document first.");
    return core.executeAsModal(() => readInScope(doc, { selectionOnly, padding, maxPixels }), {
      commandName: "ip2p: read the picture"
    });
  }
  async function readInScope(doc, opts) {
    const canvas = { width: Math.round(doc.width), height: Math.round(doc.height) };
    const plan = planRegion({ canvas, selection: doc.selection?.bounds ?? null, ...opts });
    const { bounds } = plan;
    const px = await imaging.getPixels({
      documentID: doc.id,
      sourceBounds: bounds,
      componentSize: 8,
      colorSpace: "RGB"
    });
    let rgba;
    try {
      const data = await px.imageData.getData({ chunky: true });
      const four = px.imageData.components === 4 ? data : rgbToRgba(data);
      rgba = padToBounds(four, px.sourceBounds, bounds, 4);
    } finally {
      px.imageData.dispose();
    }
    let mask = null;
    if (plan.masked) {
      const sel = await imaging.getSelection({ documentID: doc.id, sourceBounds: bounds });
      try {
        const data = await sel.imageData.getData({ chunky: true });
        const gray = selectionToGray8(data, sel.sourceBounds, bounds, sel.imageData.componentSize);
        mask = { data: gray, width: width(bounds), height: height(bounds) };
      } finally {
        sel.imageData.dispose();
      }
    }
    const image = { rgba, width: width(bounds), height: height(bounds) };
    return { documentID: doc.id, bounds, depth: depthOf(doc), scale: plan.scale, target: plan.target, image, mask };
  }
  async function placeResults(region, results, instruction) {
    return core.executeAsModal(async (ctx) => {
      const doc = app.documents.find((d) => d.id === region.documentID);
      if (!doc) throw new Error("The document was closed before the result came.");
      const suspension = await ctx.hostControl.suspendHistory({ documentID: doc.id, name: `ip2p: ${instruction}` });
      try {
        for (const [i, r] of results.entries()) await placeOne(doc, region, r, instruction, i === 0);
      } catch (e) {
        await ctx.hostControl.resumeHistory(suspension, false);
        throw e;
      }
      await ctx.hostControl.resumeHistory(suspension, true);
    }, { commandName: "ip2p: place the result" });
  }
  async function placeOne(doc, region, result, instruction, visible) {
    const { bounds, depth } = region;
    const layer = await doc.createPixelLayer({ name: layerName(instruction, result.seed) });
    const at = { left: bounds.left, top: bounds.top };
    const pixels = await imaging.createImageDataFromBuffer(fromDepth8(result.rgba, depth), {
      width: width(bounds),
      height: height(bounds),
      components: 4,
      colorSpace: "RGB"
    });
    try {
      await imaging.putPixels({ documentID: doc.id, layerID: layer.id, imageData: pixels, targetBounds: at, replace: true });
    } finally {
      pixels.dispose();
    }
    if (region.mask) {
      const mask = await imaging.createImageDataFromBuffer(fromDepth8(region.mask.data, depth), {
        width: width(bounds),
        height: height(bounds),
        components: 1,
        colorSpace: "Grayscale",
        colorProfile: "Gray Gamma 2.2"
      });
      try {
        await imaging.putLayerMask({ documentID: doc.id, layerID: layer.id, imageData: mask, targetBounds: at, replace: true });
      } finally {
        mask.dispose();
      }
    }
    if (!visible) layer.visible = false;
  }
  async function loadToken() {
    try {
      const v = await uxp.storage.secureStorage.getItem(TOKEN_KEY);
      if (v === null || v === void 0) return "";
      if (typeof v === "string") return v;
      return typeof TextDecoder === "function" ? new TextDecoder().decode(v) : String.fromCharCode(...v);
    } catch {
      return "";
    }
  }
  async function saveToken(token2) {
    const s = uxp.storage.secureStorage;
    if (token2) await s.setItem(TOKEN_KEY, token2);
    else await s.removeItem(TOKEN_KEY);
  }
  function onPanelShow(mount) {
    let mounted = false;
    const show2 = () => {
      if (!mounted) {
        mounted = true;
        mount();
      }
    };
    if (uxp.entrypoints?.setup) uxp.entrypoints.setup({ panels: { ip2pPanel: { show: show2 } } });
    else show2();
  }

  // shared/base64.js
  var ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  var LOOKUP = new Int16Array(128).fill(-1);
  for (let i = 0; i < ALPHABET.length; i++) LOOKUP[ALPHABET.charCodeAt(i)] = i;
  function bytesToBase64(bytes) {
    const parts = [];
    let line = "";
    for (let i = 0; i < bytes.length; i += 3) {
      const a = bytes[i], b = bytes[i + 1], c = bytes[i + 2];
      const n = a << 16 | (b ?? 0) << 8 | (c ?? 0);
      line += ALPHABET[n >> 18 & 63] + ALPHABET[n >> 12 & 63] + (i + 1 < bytes.length ? ALPHABET[n >> 6 & 63] : "=") + (i + 2 < bytes.length ? ALPHABET[n & 63] : "=");
      if (line.length >= 8192) {
        parts.push(line);
        line = "";
      }
    }
    parts.push(line);
    return parts.join("");
  }
  function base64ToBytes(text) {
    const s = text.replace(/^data:[^,]*,/, "").replace(/[\s=]/g, "");
    const out = new Uint8Array(Math.floor(s.length * 3 / 4));
    let bits = 0, acc = 0, j = 0;
    for (let i = 0; i < s.length; i++) {
      const v = s.charCodeAt(i) < 128 ? LOOKUP[s.charCodeAt(i)] : -1;
      if (v < 0) throw new Error(`not base64 at character ${i}`);
      acc = acc << 6 | v;
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        out[j++] = acc >> bits & 255;
      }
    }
    return out.subarray(0, j);
  }

  // shared/request.js
  var counter = 0;
  function newRequestId(now = Date.now()) {
    counter = (counter + 1) % 1e6;
    return `ip2p-${now.toString(36)}-${counter.toString(36)}`;
  }
  function buildEditRequest(image, mask, params2, requestId = newRequestId()) {
    if (image.rgba.length !== image.width * image.height * 4) {
      throw new Error(`image: ${image.rgba.length} bytes for ${image.width}×${image.height} RGBA`);
    }
    const body = {
      image_raw: { pixels: bytesToBase64(image.rgba), width: image.width, height: image.height, format: "rgba8" },
      instruction: params2.instruction ?? "",
      output_format: "raw_rgba",
      request_id: requestId
    };
    if (mask) {
      if (mask.data.length !== mask.width * mask.height) throw new Error("mask: not GRAY8 of its size");
      body.mask_raw = { pixels: bytesToBase64(mask.data), width: mask.width, height: mask.height, format: "gray8" };
    }
    const map = {
      steps: "steps",
      textGuidance: "text_guidance",
      imageGuidance: "image_guidance",
      seed: "seed",
      variations: "variations",
      previewEvery: "preview_every",
      resolution: "resolution",
      negativePrompt: "negative_prompt",
      scheduler: "scheduler"
    };
    for (const [k, field] of Object.entries(map)) {
      if (params2[k] !== void 0 && params2[k] !== null && params2[k] !== "") body[field] = params2[k];
    }
    return body;
  }

  // shared/sse.js
  var SseParser = class {
    /** @param {(ev: {event: string, data: string, id: string}) => void} onEvent */
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buf = "";
      this.afterCR = false;
      this.first = true;
      this.decoder = null;
      this.reset();
      this.lastId = "";
    }
    reset() {
      this.event = "";
      this.data = [];
    }
    /** Bytes as they arrive (UTF-8, split anywhere). */
    pushBytes(bytes) {
      if (!this.decoder) this.decoder = new TextDecoder("utf-8");
      this.push(this.decoder.decode(bytes, { stream: true }));
    }
    /** Text as it arrives. */
    push(text) {
      if (this.first && text.length > 0) {
        if (text.charCodeAt(0) === 65279) text = text.slice(1);
        this.first = false;
      }
      let start = 0;
      for (let i = 0; i < text.length; i++) {
        const c = text[i];
        if (this.afterCR) {
          this.afterCR = false;
          if (c === "\n") {
            start = i + 1;
            continue;
          }
        }
        if (c === "\n" || c === "\r") {
          this.line(this.buf + text.slice(start, i));
          this.buf = "";
          start = i + 1;
          this.afterCR = c === "\r";
        }
      }
      this.buf += text.slice(start);
    }
    /** The stream ended: an unterminated event is dropped, as the standard says. */
    end() {
      if (this.decoder) this.push(this.decoder.decode());
      this.buf = "";
      this.reset();
    }
    line(line) {
      if (line === "") {
        if (this.data.length > 0) {
          this.onEvent({ event: this.event || "message", data: this.data.join("\n"), id: this.lastId });
        }
        this.reset();
        return;
      }
      if (line[0] === ":") return;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id" && !value.includes("\0")) this.lastId = value;
    }
  };

  // shared/errors.js
  var EditError = class extends Error {
    constructor({ status, code, message, field, retryAfter }) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field;
      this.retryAfter = retryAfter;
    }
    /** One line for the panel. */
    display() {
      let s = this.field ? `${this.field}: ${this.message}` : this.message;
      if (this.status === 429 && this.retryAfter) s += ` (retry in ${this.retryAfter} s)`;
      return s;
    }
  };
  function errorFromResponse(status, bodyText, retryAfterHeader) {
    let e = null;
    try {
      e = JSON.parse(bodyText).error ?? null;
    } catch {
      e = null;
    }
    const retry = Number.parseInt(retryAfterHeader ?? "", 10);
    return new EditError({
      status,
      code: e?.code ?? `HTTP ${status}`,
      message: e?.message ?? (bodyText?.trim() || `the server answered ${status}`),
      field: e?.field,
      retryAfter: Number.isFinite(retry) ? retry : void 0
    });
  }
  function errorFromEvent(data) {
    const e = JSON.parse(data).error ?? {};
    return new EditError({ status: 0, code: e.code, message: e.message ?? "edit failed", field: e.field });
  }
  function networkError(cause) {
    return new EditError({ status: 0, code: "unavailable", message: `cannot reach the server (${cause?.message ?? cause})` });
  }

  // shared/transport.js
  function chooseMode(env) {
    const hasStream = typeof env.fetch === "function" && typeof env.ReadableStream === "function" && typeof env.Response === "function" && "body" in env.Response.prototype;
    if (hasStream) return "stream";
    if (typeof env.XMLHttpRequest === "function") return "xhr";
    return "unary";
  }
  function headers(token2) {
    const h = { "content-type": "application/json", accept: "text/event-stream" };
    if (token2) h.authorization = `Bearer ${token2}`;
    return h;
  }
  function startEdit({ server: server2, token: token2, body, onEvent, env = globalThis }) {
    const mode = chooseMode(env);
    const base = server2.replace(/\/+$/, "");
    if (mode === "stream") return viaFetch(env, `${base}/v1/edit/stream`, token2, body, onEvent);
    if (mode === "xhr") return viaXhr(env, `${base}/v1/edit/stream`, token2, body, onEvent);
    return viaUnary(env, `${base}/v1/edit`, token2, body, onEvent);
  }
  function sseSink(onEvent, settle) {
    return new SseParser(({ event, data }) => {
      if (event === "error") return settle.reject(errorFromEvent(data));
      const parsed = JSON.parse(data);
      onEvent(event, parsed);
      if (event === "result") settle.resolve(parsed);
    });
  }
  function deferred() {
    let resolve, reject;
    const promise = new Promise((a, b) => (resolve = a, reject = b));
    let settled = false;
    return {
      promise,
      resolve: (v) => !settled && (settled = true, resolve(v)),
      reject: (e) => !settled && (settled = true, reject(e))
    };
  }
  function viaFetch(env, url, token2, body, onEvent) {
    const ctl = new env.AbortController();
    const d = deferred();
    let cancelled = false;
    (async () => {
      const r = await env.fetch(url, { method: "POST", headers: headers(token2), body: JSON.stringify(body), signal: ctl.signal });
      if (!r.ok) throw errorFromResponse(r.status, await r.text(), r.headers.get("retry-after"));
      const parser = sseSink(onEvent, d);
      const reader = r.body.getReader();
      for (; ; ) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.pushBytes(value);
      }
      parser.end();
      d.reject(networkError("the stream ended before a result"));
    })().catch((e) => cancelled ? d.resolve(null) : d.reject(e.status !== void 0 ? e : networkError(e)));
    return { mode: "stream", done: d.promise, cancel: () => (cancelled = true, ctl.abort(), d.resolve(null)) };
  }
  function viaXhr(env, url, token2, body, onEvent) {
    const xhr = new env.XMLHttpRequest();
    const d = deferred();
    const parser = sseSink(onEvent, d);
    let seen = 0;
    const feed = () => {
      const text = xhr.responseText ?? "";
      if (xhr.status >= 200 && xhr.status < 300 && text.length > seen) {
        parser.push(text.slice(seen));
        seen = text.length;
      }
    };
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(headers(token2))) xhr.setRequestHeader(k, v);
    xhr.onprogress = feed;
    xhr.onload = () => {
      if (xhr.status < 200 || xhr.status >= 300) {
        return d.reject(errorFromResponse(xhr.status, xhr.responseText, xhr.getResponseHeader("retry-after")));
      }
      feed();
      parser.end();
      d.reject(networkError("the stream ended before a result"));
    };
    xhr.onerror = () => d.reject(networkError("connection failed"));
    xhr.send(JSON.stringify(body));
    return { mode: "xhr", done: d.promise, cancel: () => (xhr.abort(), d.resolve(null)) };
  }
  function viaUnary(env, url, token2, body, onEvent) {
    const d = deferred();
    const ctl = env.AbortController ? new env.AbortController() : null;
    let cancelled = false;
    (async () => {
      const h = headers(token2);
      h.accept = "application/json";
      const r = await env.fetch(url, { method: "POST", headers: h, body: JSON.stringify(body), signal: ctl?.signal });
      const text = await r.text();
      if (!r.ok) throw errorFromResponse(r.status, text, r.headers.get("retry-after"));
      const data = JSON.parse(text);
      onEvent("result", data);
      d.resolve(data);
    })().catch((e) => cancelled ? d.resolve(null) : d.reject(e.status !== void 0 ? e : networkError(e)));
    return { mode: "unary", done: d.promise, cancel: () => (cancelled = true, ctl?.abort(), d.resolve(null)) };
  }

  // shared/state.js
  var EditState = class {
    constructor({ historyLimit = 50 } = {}) {
      this.historyLimit = historyLimit;
      this.history = [];
      this.listeners = /* @__PURE__ */ new Set();
      this.toIdle();
    }
    /** Back to idle; `note` ("Cancelled.") says how the last edit ended. */
    toIdle(note) {
      this.set(note ? { phase: "idle", note } : { phase: "idle" });
    }
    set(s) {
      this.current = s;
      for (const l of this.listeners) l(s);
    }
    onChange(f) {
      this.listeners.add(f);
      return () => this.listeners.delete(f);
    }
    get busy() {
      return this.current.phase === "queued" || this.current.phase === "running" || this.current.phase === "submitting";
    }
    /** A new edit was sent; a second one while busy is refused. */
    submit(params2) {
      if (this.busy) throw new Error("an edit is already running; cancel it first");
      this.set({ phase: "submitting", params: params2, results: [] });
    }
    /** A server event (`queued`, `started`, `progress`, `result`, `error`), data parsed. */
    event(name, data) {
      const s = this.current;
      if (!this.busy) return;
      switch (name) {
        case "queued":
          this.set({ ...s, phase: "queued", position: data.position });
          break;
        case "started":
          this.set({ ...s, phase: "running", step: 0, total: s.params?.steps ?? 0 });
          break;
        case "progress":
          this.set({
            ...s,
            phase: "running",
            step: data.step,
            total: data.total,
            variation: data.variation,
            preview: data.preview ?? s.preview
          });
          break;
        case "result":
          this.finish({ ...s, phase: "done", response: data });
          break;
        default:
          break;
      }
    }
    /** The person pressed cancel (queued or running). */
    cancel() {
      if (!this.busy) return false;
      this.set({ ...this.current, phase: "cancelled" });
      return true;
    }
    fail(error) {
      if (this.current.phase === "cancelled") return;
      this.set({ ...this.current, phase: "error", error });
    }
    finish(s) {
      this.history.unshift({ params: s.params, response: s.response, at: Date.now() });
      this.history.length = Math.min(this.history.length, this.historyLimit);
      this.set(s);
    }
    /** The parameters of history entry `i`, to fill the form again. */
    reuse(i) {
      const h = this.history[i];
      return h ? { ...h.params, seed: h.response?.images?.[0]?.seed ?? h.params.seed } : null;
    }
  };

  // photoshop/src/panel.js
  var DEFAULT_SERVER = "http://127.0.0.1:50051";
  function mountPanel({ host, doc = document, env = globalThis }) {
    const $ = (id) => doc.getElementById(id);
    const state = new EditState();
    const ui = { $, state, host, env, info: null, running: null };
    $("server").value = env.localStorage?.getItem("ip2p-server") ?? DEFAULT_SERVER;
    $("server").addEventListener("change", () => {
      env.localStorage?.setItem("ip2p-server", server(ui));
      loadInfo(ui);
    });
    $("token").addEventListener("change", async () => {
      await host.saveToken($("token").value.trim());
      loadInfo(ui);
    });
    for (const id of ["text-guidance", "image-guidance"]) $(id).addEventListener("input", () => showSliders(ui));
    $("edit").addEventListener("click", () => edit(ui));
    $("cancel").addEventListener("click", () => cancel(ui));
    state.onChange((s) => render(ui, s));
    render(ui, state.current);
    host.loadToken().then((t) => {
      $("token").value = t;
      loadInfo(ui);
    });
    return ui;
  }
  var server = (ui) => ui.$("server").value.trim().replace(/\/+$/, "") || DEFAULT_SERVER;
  var token = (ui) => ui.$("token").value.trim();
  async function loadInfo(ui) {
    const { $ } = ui;
    try {
      const h = token(ui) ? { authorization: `Bearer ${token(ui)}` } : {};
      let r;
      try {
        r = await ui.env.fetch(`${server(ui)}/v1/info`, { headers: h });
      } catch (e) {
        throw networkError(e);
      }
      if (!r.ok) throw errorFromResponse(r.status, await r.text(), r.headers.get("retry-after"));
      ui.info = await r.json();
      const d = ui.info.defaults;
      $("model").textContent = `${ui.info.model} · ${ui.info.version}`;
      $("steps").value = d.steps;
      $("text-guidance").value = d.text_guidance;
      $("image-guidance").value = d.image_guidance;
      $("variations").max = ui.info.limits.max_variations || 4;
      showSliders(ui);
      if (!ui.state.busy) ui.state.toIdle();
    } catch (e) {
      ui.info = null;
      say(ui, e.display ? e.display() : String(e.message ?? e), true);
    }
  }
  function showSliders(ui) {
    ui.$("tg-out").textContent = ui.$("text-guidance").value;
    ui.$("ig-out").textContent = ui.$("image-guidance").value;
  }
  function params(ui) {
    const { $ } = ui;
    if (!$("seed-lock").checked) $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    return {
      instruction: $("instruction").value,
      steps: Number($("steps").value),
      textGuidance: Number($("text-guidance").value),
      imageGuidance: Number($("image-guidance").value),
      seed: Number($("seed").value),
      variations: Number($("variations").value),
      previewEvery: 1,
      selectionOnly: $("selection-only").checked,
      padding: Number($("padding").value)
    };
  }
  function fillForm(ui, p) {
    const { $ } = ui;
    $("instruction").value = p.instruction;
    $("steps").value = p.steps;
    $("text-guidance").value = p.textGuidance;
    $("image-guidance").value = p.imageGuidance;
    $("seed").value = p.seed;
    $("seed-lock").checked = true;
    $("variations").value = p.variations;
    $("selection-only").checked = p.selectionOnly;
    $("padding").value = p.padding;
    showSliders(ui);
  }
  async function edit(ui) {
    const { state, host } = ui;
    if (state.busy) return;
    const p = params(ui);
    state.submit(p);
    const ticket = ui.ticket = {};
    try {
      const region = await host.readRegion({
        selectionOnly: p.selectionOnly,
        padding: p.padding,
        maxPixels: ui.info?.limits?.max_pixels
      });
      if (ui.ticket !== ticket) return;
      const sent = forServer(region);
      const body = buildEditRequest(sent.image, sent.mask, p);
      ui.running = startEdit({ server: server(ui), token: token(ui), body, onEvent: (n, d) => state.event(n, d), env: ui.env });
      ui.$("panel").setAttribute("data-mode", ui.running.mode);
      const response = await ui.running.done;
      if (!response) return;
      const results = response.images.map((img) => ({
        seed: img.seed,
        rgba: toRegionSize(base64ToBytes(img.data), img.width, img.height, region)
      }));
      await host.placeResults(region, results, p.instruction);
      say(ui, `Placed ${results.length} layer(s): seed ${results.map((r) => r.seed).join(", ")}.`);
    } catch (e) {
      state.fail(e);
    } finally {
      ui.running = null;
    }
  }
  function cancel(ui) {
    if (!ui.state.cancel()) return;
    ui.ticket = null;
    ui.running?.cancel();
    ui.state.toIdle("Cancelled.");
  }
  function say(ui, text, error = false) {
    ui.$("status").textContent = text;
    ui.$("status").classList.toggle("error", error);
  }
  var STATUS = {
    idle: (s) => s.note ?? "Ready.",
    submitting: () => "Reading the picture…",
    queued: (s) => `Queued: position ${s.position}.`,
    running: (s) => `Step ${s.step ?? 0} of ${s.total ?? "?"}${s.variation ? ` (variation ${s.variation + 1})` : ""}.`,
    done: (s) => `Done: ${s.response?.images?.length ?? 0} result(s); placing…`,
    cancelled: () => "Cancelled.",
    error: (s) => s.error?.display ? s.error.display() : String(s.error?.message ?? s.error)
  };
  function render(ui, s) {
    const { $, state } = ui;
    $("panel").setAttribute("data-phase", s.phase);
    $("edit").disabled = state.busy;
    $("cancel").disabled = !state.busy;
    show($("bar"), s.phase === "running");
    if (s.phase === "running" && s.total) $("bar-fill").style.width = `${Math.round(100 * s.step / s.total)}%`;
    show($("preview"), state.busy && !!s.preview);
    if (s.preview && state.busy) $("preview").src = `data:image/png;base64,${s.preview}`;
    say(ui, STATUS[s.phase](s), s.phase === "error");
    if (s.phase === "done") renderHistory(ui);
  }
  function show(el, on) {
    el.style.display = on ? "" : "none";
  }
  function renderHistory(ui) {
    const list = ui.$("history");
    while (list.firstChild) list.removeChild(list.firstChild);
    ui.state.history.forEach((h, i) => {
      const li = ui.$("history").ownerDocument.createElement("li");
      const seeds = h.response.images.map((img) => img.seed).join(", ");
      li.textContent = `“${h.params.instruction}” · seed ${seeds} · ${h.params.steps} steps · ${h.params.textGuidance}/${h.params.imageGuidance}`;
      li.title = "Use these parameters again";
      li.addEventListener("click", () => fillForm(ui, ui.state.reuse(i)));
      list.appendChild(li);
    });
  }

  // photoshop/src/main.js
  onPanelShow(() => mountPanel({ host: host_exports }));
})();
