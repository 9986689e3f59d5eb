// node --test clients/test/ — the plugin's pure region logic (no Photoshop).
import test from "node:test";
import assert from "node:assert/strict";
import { planRegion, layerName, forServer, toRegionSize, upscalePercent } from "../photoshop/src/region.js";
import { resize, fromDepth8, toDepth8 } from "../shared/pixels.js";

const canvas = { width: 400, height: 300 };

test("planRegion: the selection's box plus padding, clamped at the canvas edges", () => {
  const p = planRegion({ canvas, selection: { left: 10, top: 250, right: 60, bottom: 290 }, selectionOnly: true, padding: 32, maxPixels: 1e6 });
  assert.deepEqual(p.bounds, { left: 0, top: 218, right: 92, bottom: 300 });
  assert.equal(p.scale, 1);
  assert.equal(p.target, null);
  assert.equal(p.masked, true);
});

test("planRegion: no selection or not 'selection only' → the whole canvas", () => {
  const whole = { left: 0, top: 0, right: 400, bottom: 300 };
  assert.deepEqual(planRegion({ canvas, selection: null, selectionOnly: true, padding: 8 }).bounds, whole);
  const s = planRegion({ canvas, selection: { left: 5, top: 5, right: 9, bottom: 9 }, selectionOnly: false, padding: 8 });
  assert.deepEqual(s.bounds, whole);
  assert.equal(s.masked, true, "the selection still masks the edit");
  // An empty selection is no selection.
  assert.equal(planRegion({ canvas, selection: { left: 5, top: 5, right: 5, bottom: 9 }, selectionOnly: true, padding: 8 }).masked, false);
});

test("planRegion: the server's max_pixels shrinks the padding first, then scales", () => {
  const sel = { left: 100, top: 100, right: 200, bottom: 200 };
  const p = planRegion({ canvas, selection: sel, selectionOnly: true, padding: 100, maxPixels: 150 * 150 });
  assert.equal(p.scale, 1);
  assert.ok((p.bounds.right - p.bounds.left) * (p.bounds.bottom - p.bounds.top) <= 150 * 150);
  assert.equal(p.bounds.left, 75);
  const big = planRegion({ canvas, selection: null, selectionOnly: false, padding: 0, maxPixels: 30000 });
  assert.ok(big.scale < 1);
  assert.ok(big.target.width * big.target.height <= 30000, JSON.stringify(big.target));
  assert.deepEqual(big.target, { width: 200, height: 150 });
  const up = upscalePercent(big.bounds, big.target);
  assert.deepEqual(up, { width: 200, height: 200 });
});

test("forServer/toRegionSize: the sent picture shrunk to the target, the result grown back", () => {
  const region = {
    bounds: { left: 0, top: 0, right: 4, bottom: 2 }, target: { width: 2, height: 1 },
    image: { rgba: Uint8Array.from({ length: 32 }, (_, i) => (i % 4 === 3 ? 255 : (i >> 2) * 10)), width: 4, height: 2 },
    mask: { data: Uint8Array.from([0, 255, 255, 255, 0, 255, 255, 255]), width: 4, height: 2 },
  };
  const s = forServer(region);
  assert.equal(s.image.width, 2);
  assert.equal(s.image.rgba.length, 8);
  // Pixels 0,1,4,5 (values 0,10,40,50) average to 25; alpha stays 255.
  assert.deepEqual(Array.from(s.image.rgba.subarray(0, 4)), [25, 25, 25, 255]);
  assert.deepEqual(Array.from(s.mask.data), [128, 255]);
  const back = toRegionSize(s.image.rgba, 2, 1, region);
  assert.equal(back.length, 4 * 2 * 4);
  assert.equal(forServer({ ...region, target: null }).image, region.image);
});

test("resize: a constant picture stays constant both ways; a ramp stays monotone", () => {
  const flat = new Uint8Array(7 * 5 * 3).fill(77);
  assert.ok(resize(flat, 7, 5, 3, 3, 2).every((v) => v === 77));
  assert.ok(resize(flat, 7, 5, 3, 20, 11).every((v) => v === 77));
  const ramp = Uint8Array.from({ length: 8 }, (_, i) => i * 30);
  const up = resize(ramp, 8, 1, 1, 16, 1);
  for (let i = 1; i < up.length; i++) assert.ok(up[i] >= up[i - 1]);
});

test("fromDepth8 inverts toDepth8 at 16 bits for every 8-bit value", () => {
  const all = Uint8Array.from({ length: 256 }, (_, i) => i);
  const d16 = fromDepth8(all, 16);
  assert.ok(d16 instanceof Uint16Array);
  assert.equal(d16[255], 32768);
  assert.deepEqual(Array.from(toDepth8(d16, 16)), Array.from(all));
  assert.equal(fromDepth8(all, 32)[255], 1);
});

test("layerName: the instruction, shortened, and the seed", () => {
  assert.equal(layerName("  turn the   sunflowers into roses ", 5), "turn the sunflowers into roses · seed 5");
  const long = layerName("x".repeat(100), 1);
  assert.equal(long, `${"x".repeat(59)}… · seed 1`);
  assert.equal(layerName("", 2), "edit · seed 2");
});
