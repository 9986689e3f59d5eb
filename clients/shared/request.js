// The JSON body of `POST /v1/edit` and `/v1/edit/stream` (the server's `EditJson`).
import { bytesToBase64 } from "./base64.js";

let counter = 0;

/** A request id unique enough to find one edit in the server's logs. */
export function newRequestId(now = Date.now()) {
  counter = (counter + 1) % 1e6;
  return `ip2p-${now.toString(36)}-${counter.toString(36)}`;
}

/**
 * @param {{rgba: Uint8Array, width: number, height: number}} image raw RGBA8 pixels
 * @param {{data: Uint8Array, width: number, height: number} | null} mask GRAY8, or null
 * @param {object} params instruction, steps, textGuidance, imageGuidance, seed, variations,
 *   previewEvery, resolution, negativePrompt (undefined ones are left to the server)
 */
export function buildEditRequest(image, mask, params, requestId = newRequestId()) {
  if (image.rgba.length !== image.width * image.height * 4) {
    throw new Error(`image: ${image.rgba.length} bytes for ${image.width}×${image.height} RGBA`);
  }
  const body = {
    image_raw: { pixels: bytesToBase64(image.rgba), width: image.width, height: image.height, format: "rgba8" },
    instruction: params.instruction ?? "",
    output_format: "raw_rgba",
    request_id: requestId,
  };
  if (mask) {
    if (mask.data.length !== mask.width * mask.height) throw new Error("mask: not GRAY8 of its size");
    body.mask_raw = { pixels: bytesToBase64(mask.data), width: mask.width, height: mask.height, format: "gray8" };
  }
  const map = {
    steps: "steps", textGuidance: "text_guidance", imageGuidance: "image_guidance", seed: "seed",
    variations: "variations", previewEvery: "preview_every", resolution: "resolution",
    negativePrompt: "negative_prompt", scheduler: "scheduler",
  };
  for (const [k, field] of Object.entries(map)) {
    if (params[k] !== undefined && params[k] !== null && params[k] !== "") body[field] = params[k];
  }
  return body;
}
