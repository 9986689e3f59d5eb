// What the plugin reads and where its result goes, from the document's facts alone (no
// Photoshop here: the host module supplies the numbers, the node tests check the choices).
import { cropBox, resize, width, height } from "../../shared/pixels.js";

/**
 * The region to send: the selection's box grown by `padding` ("selection only"), or the whole
 * canvas; either shrunk to the server's `maxPixels` (`scale` < 1: read smaller, place scaled up).
 * @param {{width: number, height: number}} canvas the document, pixels
 * @param {{left, top, right, bottom} | null} selection the selection's bounds, if any
 * @returns {{bounds: object, scale: number, target: {width, height} | null, masked: boolean}}
 */
export function planRegion({ canvas, selection, selectionOnly, padding, maxPixels }) {
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
  const target = box.scale < 1
    ? { width: Math.max(1, Math.floor(width(bounds) * box.scale)), height: Math.max(1, Math.floor(height(bounds) * box.scale)) }
    : null;
  return { bounds, scale: box.scale, target, masked: sel !== null };
}

function clampTo(b, canvas) {
  return {
    left: Math.max(0, b.left), top: Math.max(0, b.top),
    right: Math.min(canvas.width, b.right), bottom: Math.min(canvas.height, b.bottom),
  };
}

/** The new layer's name: the instruction (shortened) and the seed, so each result says what made it. */
export function layerName(instruction, seed) {
  const text = instruction.trim().replace(/\s+/g, " ");
  const short = text.length > 60 ? `${text.slice(0, 59)}…` : text;
  return `${short || "edit"} · seed ${seed}`;
}

/** The percentage `Layer.scale` needs to bring a `target`-sized result back to `bounds`. */
export function upscalePercent(bounds, target) {
  return { width: (100 * width(bounds)) / target.width, height: (100 * height(bounds)) / target.height };
}

/** The picture and mask as sent: the region's, shrunk to `target` when the server needs it. */
export function forServer(region) {
  if (!region.target) return { image: region.image, mask: region.mask };
  const { width: tw, height: th } = region.target;
  const { image: im, mask: m } = region;
  return {
    image: { rgba: resize(im.rgba, im.width, im.height, 4, tw, th), width: tw, height: th },
    mask: m ? { data: resize(m.data, m.width, m.height, 1, tw, th), width: tw, height: th } : null,
  };
}

/** A result (RGBA8, the size sent) brought back to the region's size for its layer. */
export function toRegionSize(rgba, w, h, region) {
  return resize(rgba, w, h, 4, width(region.bounds), height(region.bounds));
}
