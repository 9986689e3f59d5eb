// The only module that touches Photoshop and UXP. The picture and the selection are read in one
// short `executeAsModal`; the network never runs inside a modal scope (the panel calls the server
// between `readRegion` and `placeResults`); the results go in as new layers, masked by the
// selection, in one history step.
import { padToBounds, rgbToRgba, selectionToGray8, fromDepth8, width, height } from "../../shared/pixels.js";
import { planRegion, layerName } from "./region.js";

// UXP's `require` (esbuild leaves these two to the host).
const { app, core, imaging } = require("photoshop");
const uxp = require("uxp");

const TOKEN_KEY = "ip2p-token";

/** The document's bit depth from `bitsPerChannel` ("bitDepth16" → 16). */
function depthOf(doc) {
  const m = /(\d+)/.exec(String(doc.bitsPerChannel ?? "8"));
  const d = m ? Number(m[1]) : 8;
  return d === 16 || d === 32 ? d : 8;
}

/**
 * Reads what the edit needs, inside one short modal scope: the region's RGBA8 pixels (trimmed
 * reads padded back to the region), and the selection there as GRAY8 when there is one.
 * @returns {Promise<{documentID, bounds, depth, scale, target, image: {rgba, width, height}, mask}>}
 */
export async function readRegion({ selectionOnly, padding, maxPixels }) {
  const doc = app.activeDocument;
  if (!doc) throw new Error("Open a document first.");
  return core.executeAsModal(() => readInScope(doc, { selectionOnly, padding, maxPixels }), {
    commandName: "ip2p: read the picture",
  });
}

async function readInScope(doc, opts) {
  const canvas = { width: Math.round(doc.width), height: Math.round(doc.height) };
  const plan = planRegion({ canvas, selection: doc.selection?.bounds ?? null, ...opts });
  const { bounds } = plan;
  const px = await imaging.getPixels({
    documentID: doc.id, sourceBounds: bounds, componentSize: 8, colorSpace: "RGB",
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

/**
 * Puts each result (RGBA8 at the region's size) in a new layer at the region's offset, named
 * after the instruction and its seed, masked by the selection; all of them one history step.
 * The first is shown, the others hidden (variations to compare).
 */
export async function placeResults(region, results, instruction) {
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
    width: width(bounds), height: height(bounds), components: 4, colorSpace: "RGB",
  });
  try {
    await imaging.putPixels({ documentID: doc.id, layerID: layer.id, imageData: pixels, targetBounds: at, replace: true });
  } finally {
    pixels.dispose();
  }
  if (region.mask) {
    const mask = await imaging.createImageDataFromBuffer(fromDepth8(region.mask.data, depth), {
      width: width(bounds), height: height(bounds), components: 1,
      colorSpace: "Grayscale", colorProfile: "Gray Gamma 2.2",
    });
    try {
      await imaging.putLayerMask({ documentID: doc.id, layerID: layer.id, imageData: mask, targetBounds: at, replace: true });
    } finally {
      mask.dispose();
    }
  }
  if (!visible) layer.visible = false;
}

/** The token from UXP's secure storage ("" when none or unreadable). */
export async function loadToken() {
  try {
    const v = await uxp.storage.secureStorage.getItem(TOKEN_KEY);
    if (v === null || v === undefined) return "";
    if (typeof v === "string") return v;
    return typeof TextDecoder === "function" ? new TextDecoder().decode(v) : String.fromCharCode(...v);
  } catch {
    return "";
  }
}

export async function saveToken(token) {
  const s = uxp.storage.secureStorage;
  if (token) await s.setItem(TOKEN_KEY, token);
  else await s.removeItem(TOKEN_KEY);
}

/** Calls `mount` once, when Photoshop first shows the panel. */
export function onPanelShow(mount) {
  let mounted = false;
  const show = () => {
    if (!mounted) {
      mounted = true;
      mount();
    }
  };
  if (uxp.entrypoints?.setup) uxp.entrypoints.setup({ panels: { ip2pPanel: { show } } });
  else show();
}
