// A fake Photoshop + UXP for the plugin's browser harness (classic script, loaded before the
// plugin's bundle): `require("photoshop")` and `require("uxp")` answer with an in-memory 320×240
// document whose composite reads are trimmed to its pixels (the bottom 20 rows are empty), a
// feathered elliptic selection near the bottom-left corner, layers with masks, history
// suspension, and modal scopes that refuse to nest. `window.__ps.inspect()` reports what the
// plugin did. URL parameters: `mode=uxp` removes Response.body, FormData, btoa and atob (as UXP
// before 8); `mode=unary` removes XMLHttpRequest as well; `depth=16` makes a 16-bit document.
(() => {
  const q = new URLSearchParams(location.search);
  const mode = q.get("mode") ?? "browser", depth = Number(q.get("depth") ?? 8);
  if (mode === "uxp" || mode === "unary") {
    delete Response.prototype.body;
    delete window.FormData;
    delete window.btoa;
    delete window.atob;
  }
  if (mode === "unary") delete window.XMLHttpRequest;

  const W = 320, H = 240, CONTENT_H = 220;
  const base = new Uint8Array(W * H * 4);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const i = (y * W + x) * 4;
    base.set([Math.round((x * 255) / (W - 1)), Math.round((y * 255) / (H - 1)), ((x >> 4) + (y >> 4)) & 1 ? 200 : 40, y < CONTENT_H ? 255 : 0], i);
  }
  // Feathered ellipse: 255 inside, a linear ramp over its outer 15 %.
  const sel = new Uint8Array(W * H);
  const sb = { left: W, top: H, right: 0, bottom: 0 };
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const t = Math.hypot((x + 0.5 - 70) / 44, (y + 0.5 - 190) / 30);
    const v = t <= 0.85 ? 255 : t >= 1 ? 0 : Math.round((255 * (1 - t)) / 0.15);
    sel[y * W + x] = v;
    if (v > 0) {
      sb.left = Math.min(sb.left, x); sb.top = Math.min(sb.top, y);
      sb.right = Math.max(sb.right, x + 1); sb.bottom = Math.max(sb.bottom, y + 1);
    }
  }

  const log = { modal: [], network: 0, networkWhileModal: 0, reads: [], errors: [] };
  let inModal = false, nextId = 100;
  const layers = [], history = [];

  const need = (what) => {
    if (!inModal) {
      log.errors.push(`${what} outside executeAsModal`);
      throw new Error(`${what}: the document can only change inside executeAsModal`);
    }
  };
  const intersect = (a, b) => ({ left: Math.max(a.left, b.left), top: Math.max(a.top, b.top), right: Math.min(a.right, b.right), bottom: Math.min(a.bottom, b.bottom) });
  const norm = (b) => ({ left: b.left, top: b.top, right: b.right ?? b.left + b.width, bottom: b.bottom ?? b.top + b.height });

  class ImageData {
    constructor(data, { width, height, components, colorSpace = "RGB" }) {
      Object.assign(this, { _data: data, width, height, components, colorSpace, hasAlpha: components === 4 || components === 2 });
      this.componentSize = data instanceof Uint16Array ? 16 : data instanceof Float32Array ? 32 : 8;
      this.disposed = false;
    }
    async getData() {
      if (this.disposed) throw new Error("image data used after dispose");
      return this._data;
    }
    dispose() {
      this.disposed = true;
    }
  }
  const to8 = (a) => (a instanceof Uint16Array ? Uint8Array.from(a, (v) => Math.round((v * 255) / 32768)) : a);

  function composite() {
    const out = Uint8Array.from(base);
    for (const l of layers) {
      if (!l.visible || !l.pixels) continue;
      const b = l.bounds, w = b.right - b.left;
      for (let y = b.top; y < b.bottom; y++) for (let x = b.left; x < b.right; x++) {
        const li = ((y - b.top) * w + (x - b.left)) * 4, o = (y * W + x) * 4;
        const m = l.mask ? l.mask[(y - b.top) * w + (x - b.left)] / 255 : 1;
        const a = (l.pixels[li + 3] / 255) * m;
        for (let c = 0; c < 3; c++) out[o + c] = Math.round(a * l.pixels[li + c] + (1 - a) * out[o + c]);
        out[o + 3] = Math.round(a * 255 + (1 - a) * out[o + 3]);
      }
    }
    return out;
  }

  const doc = {
    id: 7, title: "harness.psd", width: W, height: H, bitsPerChannel: `bitDepth${depth}`,
    selection: { get bounds() { return { ...sb }; } },
    layers,
    async createPixelLayer({ name }) {
      need("createPixelLayer");
      const l = { id: nextId++, name, visible: true, bounds: null, pixels: null, mask: null };
      layers.push(l);
      return l;
    },
  };

  const imaging = {
    async getPixels({ documentID, sourceBounds, componentSize }) {
      if (documentID !== doc.id) throw new Error("no such document");
      const want = norm(sourceBounds ?? { left: 0, top: 0, right: W, bottom: H });
      const c = composite();
      // Trimmed to the rows that hold pixels, as Photoshop does.
      const got = intersect(want, { left: 0, top: 0, right: W, bottom: CONTENT_H });
      const w = got.right - got.left, h = got.bottom - got.top;
      const data = new Uint8Array(w * h * 4);
      for (let y = 0; y < h; y++) data.set(c.subarray(((got.top + y) * W + got.left) * 4, ((got.top + y) * W + got.right) * 4), y * w * 4);
      log.reads.push({ kind: "pixels", asked: want, returned: got, componentSize, inModal });
      return { imageData: new ImageData(data, { width: w, height: h, components: 4 }), sourceBounds: got, level: 0 };
    },
    async getSelection({ documentID, sourceBounds }) {
      if (documentID !== doc.id) throw new Error("no such document");
      const want = norm(sourceBounds ?? { left: 0, top: 0, right: W, bottom: H });
      const got = intersect(want, sb);
      const w = got.right - got.left, h = got.bottom - got.top;
      const data = depth === 16 ? new Uint16Array(w * h) : new Uint8Array(w * h);
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        const v = sel[(got.top + y) * W + got.left + x];
        data[y * w + x] = depth === 16 ? Math.round((v * 32768) / 255) : v;
      }
      log.reads.push({ kind: "selection", asked: want, returned: got, inModal });
      return { imageData: new ImageData(data, { width: w, height: h, components: 1, colorSpace: "Grayscale" }), sourceBounds: got };
    },
    async createImageDataFromBuffer(data, opts) {
      if (data.length !== opts.width * opts.height * opts.components) throw new Error("createImageDataFromBuffer: wrong length");
      return new ImageData(data, opts);
    },
    async putPixels({ documentID, layerID, imageData, targetBounds }) {
      need("putPixels");
      const l = layers.find((x) => x.id === layerID);
      if (documentID !== doc.id || !l) throw new Error("putPixels: no such layer");
      if (imageData.componentSize !== depth) throw new Error(`putPixels: ${imageData.componentSize}-bit data into a ${depth}-bit document`);
      const t = targetBounds ?? { left: 0, top: 0 };
      l.bounds = { left: t.left, top: t.top, right: t.left + imageData.width, bottom: t.top + imageData.height };
      l.pixels = to8(imageData._data);
    },
    async putLayerMask({ documentID, layerID, imageData, targetBounds }) {
      need("putLayerMask");
      const l = layers.find((x) => x.id === layerID);
      if (documentID !== doc.id || !l) throw new Error("putLayerMask: no such layer");
      if (imageData.components !== 1) throw new Error("putLayerMask: one component expected");
      const t = targetBounds ?? { left: 0, top: 0 };
      if (!l.bounds || t.left !== l.bounds.left || t.top !== l.bounds.top) throw new Error("harness: mask not at the layer's offset");
      l.mask = to8(imageData._data);
    },
  };

  const hostControl = {
    async suspendHistory({ documentID, name }) {
      need("suspendHistory");
      if (documentID !== doc.id) throw new Error("no such document");
      return { name, layersBefore: layers.length };
    },
    async resumeHistory(s, commit = true) {
      need("resumeHistory");
      if (!commit) layers.splice(s.layersBefore);
      else if (layers.length !== s.layersBefore) history.push(s.finalName ?? s.name);
    },
  };

  const core = {
    async executeAsModal(fn, opts) {
      if (inModal) throw new Error("executeAsModal: another modal scope is active");
      if (!opts?.commandName) throw new Error("executeAsModal: commandName is required");
      inModal = true;
      const t0 = performance.now();
      try {
        return await fn({ hostControl, isCancelled: false }, opts.descriptor);
      } finally {
        inModal = false;
        log.modal.push({ name: opts.commandName, ms: performance.now() - t0 });
      }
    },
  };

  const secret = new Map();
  const uxp = {
    storage: {
      secureStorage: {
        async getItem(k) { return secret.has(k) ? new TextEncoder().encode(secret.get(k)) : null; },
        async setItem(k, v) { secret.set(k, typeof v === "string" ? v : new TextDecoder().decode(v)); },
        async removeItem(k) { secret.delete(k); },
      },
    },
    entrypoints: { setup({ panels }) { setTimeout(() => panels.ip2pPanel.show({}), 0); } },
  };

  // Network calls are counted, and those made while a modal scope is held.
  const count = () => { log.network++; if (inModal) log.networkWhileModal++; };
  const realFetch = window.fetch.bind(window);
  window.fetch = (...a) => (count(), realFetch(...a));
  if (window.XMLHttpRequest) {
    const send = XMLHttpRequest.prototype.send;
    XMLHttpRequest.prototype.send = function (...a) { count(); return send.apply(this, a); };
  }

  const photoshop = { app: { get activeDocument() { return doc; }, documents: [doc] }, core, imaging, constants: {} };
  window.require = (name) => {
    if (name === "photoshop") return photoshop;
    if (name === "uxp") return uxp;
    throw new Error(`require: no module ${name}`);
  };

  /** What the plugin did, as numbers the driver asserts. */
  function inspect() {
    const c = composite();
    const layerStats = layers.map((l) => {
      const b = l.bounds, w = b ? b.right - b.left : 0;
      let layerOutside = 0, maskDiff = 0;
      if (b) for (let y = b.top; y < b.bottom; y++) for (let x = b.left; x < b.right; x++) {
        const li = (y - b.top) * w + (x - b.left), o = y * W + x;
        if (l.mask) maskDiff = Math.max(maskDiff, Math.abs(l.mask[li] - sel[o]));
        if (sel[o] === 0 && base[o * 4 + 3] === 255) {
          for (let k = 0; k < 3; k++) layerOutside = Math.max(layerOutside, Math.abs(l.pixels[li * 4 + k] - base[o * 4 + k]));
        }
      }
      return { name: l.name, visible: l.visible, bounds: b, hasMask: !!l.mask, maskMaxDiffFromSelection: l.mask ? maskDiff : null, layerMaxDiffOutsideSelection: layerOutside };
    });
    let outside = 0, inside = 0, nIn = 0;
    for (let i = 0; i < W * H; i++) {
      const d = Math.max(...[0, 1, 2, 3].map((k) => Math.abs(c[i * 4 + k] - base[i * 4 + k])));
      if (sel[i] === 0) outside = Math.max(outside, d);
      else if (sel[i] === 255 && base[i * 4 + 3] === 255) (inside += d), nIn++;
    }
    return {
      mode, depth, canvas: { width: W, height: H }, selectionBounds: { ...sb }, layers: layerStats, history: [...history],
      compositeMaxDiffOutsideSelection: outside, compositeMeanDiffInsideSelection: nIn ? inside / nIn : 0,
      log: JSON.parse(JSON.stringify(log)), token: secret.get("ip2p-token") ?? null,
      apis: { responseBody: "body" in Response.prototype, formData: typeof FormData, btoa: typeof btoa, xhr: typeof XMLHttpRequest },
    };
  }
  window.__ps = { inspect, reset: () => { layers.length = 0; history.length = 0; } };
})();
