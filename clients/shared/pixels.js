// Pixel helpers for the Photoshop plugin and the web page: no Photoshop, no DOM.
// Bounds are {left, top, right, bottom} in document pixels, right/bottom exclusive.

export const width = (b) => b.right - b.left;
export const height = (b) => b.bottom - b.top;

/**
 * `imaging.getPixels` returns only the layer's non-empty part (`sourceBounds`) of what was asked
 * (`bounds`): puts `data` (`components` per pixel) back at its place in a buffer of `bounds`,
 * zero (transparent) elsewhere. The parts of `data` outside `bounds` are dropped.
 */
export function padToBounds(data, dataBounds, bounds, components) {
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

/** RGB → RGBA with a constant alpha. */
export function rgbToRgba(rgb, alpha = 255) {
  const n = rgb.length / 3, out = new Uint8Array(n * 4);
  for (let i = 0; i < n; i++) {
    out[4 * i] = rgb[3 * i];
    out[4 * i + 1] = rgb[3 * i + 1];
    out[4 * i + 2] = rgb[3 * i + 2];
    out[4 * i + 3] = alpha;
  }
  return out;
}

/** RGBA → RGB (alpha dropped). */
export function rgbaToRgb(rgba) {
  const n = rgba.length / 4, out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    out[3 * i] = rgba[4 * i];
    out[3 * i + 1] = rgba[4 * i + 1];
    out[3 * i + 2] = rgba[4 * i + 2];
  }
  return out;
}

/**
 * 16-bit component values → 8-bit, rounding. Photoshop's 16-bit documents hold 0..32768
 * (`max`, its default); other sources 0..65535.
 */
export function to8bit(data, max = 32768) {
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) {
    out[i] = Math.min(255, Math.round((data[i] * 255) / max));
  }
  return out;
}

/** Any component depth → 8-bit by the document's bit depth (8, 16 or 32 as 0..1 floats). */
export function toDepth8(data, bitDepth) {
  if (bitDepth === 8) return data instanceof Uint8Array ? data : Uint8Array.from(data);
  if (bitDepth === 16) return to8bit(data, 32768);
  const out = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) out[i] = Math.round(Math.min(1, Math.max(0, data[i])) * 255);
  return out;
}

/** 8-bit component values → a document's depth (16: Photoshop's 0..32768; 32: 0..1 floats). */
export function fromDepth8(data, bitDepth) {
  if (bitDepth === 8) return data;
  if (bitDepth === 16) return Uint16Array.from(data, (v) => Math.round((v * 32768) / 255));
  return Float32Array.from(data, (v) => v / 255);
}

/**
 * A selection (`imaging.getSelection`: one component, feathered values, trimmed to its own
 * bounds, 8- or 16-bit) → a GRAY8 mask of `bounds`: 255 edits fully, 0 keeps.
 */
export function selectionToGray8(data, dataBounds, bounds, bitDepth = 8) {
  return padToBounds(toDepth8(data, bitDepth), dataBounds, bounds, 1);
}

/**
 * The region sent for a "selection only" edit: the selection's bounds grown by `padding` on
 * every side for context, clamped to the canvas. When it holds more than `maxPixels` (the
 * server's limit from GetInfo), the padding shrinks first; a selection larger than the limit
 * by itself is sent downscaled by `scale` (< 1).
 */
export function cropBox(selection, padding, canvas, maxPixels) {
  const grow = (p) => ({
    left: Math.max(0, selection.left - p),
    top: Math.max(0, selection.top - p),
    right: Math.min(canvas.width, selection.right + p),
    bottom: Math.min(canvas.height, selection.bottom + p),
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

/**
 * Resamples `components`-per-pixel 8-bit data from w×h to tw×th: the mean of the covered source
 * area when shrinking (no aliasing), bilinear when growing.
 */
export function resize(data, w, h, components, tw, th) {
  if (tw === w && th === h) return data;
  const out = new Uint8Array(tw * th * components);
  const sx = w / tw, sy = h / th;
  for (let y = 0; y < th; y++) {
    for (let x = 0; x < tw; x++) {
      const o = (y * tw + x) * components;
      for (let c = 0; c < components; c++) {
        out[o + c] = sx >= 1 && sy >= 1
          ? areaMean(data, w, components, c, x * sx, y * sy, sx, sy)
          : bilinear(data, w, h, components, c, (x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5);
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
