// The web page served at `/` by `ip2p serve`: DOM glue over the shared pure modules.
import { buildEditRequest } from "./shared/request.js";
import { startEdit } from "./shared/transport.js";
import { EditState } from "./shared/state.js";
import { base64ToBytes } from "./shared/base64.js";
import { errorFromResponse } from "./shared/errors.js";

const $ = (id) => document.getElementById(id);
const server = location.origin;
const state = new EditState();
let running = null;
let picture = null; // {width, height}

const token = () => $("token").value.trim();
$("token").value = sessionStorage.getItem("ip2p-token") ?? "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("ip2p-token", token());
  loadInfo();
});

async function loadInfo() {
  const h = token() ? { authorization: `Bearer ${token()}` } : {};
  try {
    const r = await fetch(`${server}/v1/info`, { headers: h });
    if (!r.ok) throw errorFromResponse(r.status, await r.text(), r.headers.get("retry-after"));
    const info = await r.json();
    $("model").textContent = `${info.model} · ${info.version}`;
    $("steps").value = info.defaults.steps;
    $("text-guidance").value = info.defaults.text_guidance;
    $("image-guidance").value = info.defaults.image_guidance;
    $("variations").max = info.limits.max_variations || 8;
    showSliders();
    say("Ready.");
  } catch (e) {
    say(e.display ? e.display() : String(e), true);
  }
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function showSliders() {
  $("tg-out").textContent = ` ${$("text-guidance").value}`;
  $("ig-out").textContent = ` ${$("image-guidance").value}`;
}
$("text-guidance").addEventListener("input", showSliders);
$("image-guidance").addEventListener("input", showSliders);

// The picture: chosen or dropped, drawn at its own size; the mask canvas matches it.
async function openPicture(file) {
  const bitmap = await createImageBitmap(file);
  const c = $("picture"), m = $("mask");
  c.width = m.width = bitmap.width;
  c.height = m.height = bitmap.height;
  c.getContext("2d").drawImage(bitmap, 0, 0);
  m.getContext("2d").clearRect(0, 0, m.width, m.height);
  picture = { width: bitmap.width, height: bitmap.height };
  $("drop-hint").hidden = true;
  document.querySelector(".stack").hidden = false;
}
$("file").addEventListener("change", (e) => e.target.files[0] && openPicture(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => (e.preventDefault(), drop.classList.add("over")));
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) openPicture(e.dataTransfer.files[0]);
});

// Mask painting: pointer strokes on the mask canvas (white = may change), erase mode.
let erasing = false, painting = false;
$("erase").addEventListener("click", () => {
  erasing = !erasing;
  $("erase").textContent = erasing ? "Paint" : "Erase";
});
$("clear-mask").addEventListener("click", () => $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height));
function paintAt(e) {
  const m = $("mask"), r = m.getBoundingClientRect();
  const x = ((e.clientX - r.left) * m.width) / r.width, y = ((e.clientY - r.top) * m.height) / r.height;
  const g = m.getContext("2d");
  g.globalCompositeOperation = erasing ? "destination-out" : "source-over";
  g.fillStyle = "#fff";
  g.beginPath();
  g.arc(x, y, ((+$("brush").value / 2) * m.width) / r.width, 0, 2 * Math.PI);
  g.fill();
}
$("mask").addEventListener("pointerdown", (e) => ((painting = true), paintAt(e)));
$("mask").addEventListener("pointermove", (e) => painting && paintAt(e));
window.addEventListener("pointerup", () => (painting = false));

/** The mask canvas's alpha as GRAY8, or null when nothing is painted. */
function maskGray8() {
  const m = $("mask");
  const rgba = m.getContext("2d").getImageData(0, 0, m.width, m.height).data;
  const out = new Uint8Array(m.width * m.height);
  let any = false;
  for (let i = 0; i < out.length; i++) {
    out[i] = rgba[4 * i + 3];
    any ||= out[i] > 0;
  }
  return any ? { data: out, width: m.width, height: m.height } : null;
}

function params() {
  if (!$("seed-lock").checked) $("seed").value = Math.floor(Math.random() * 2 ** 31);
  return {
    instruction: $("instruction").value,
    steps: +$("steps").value,
    textGuidance: +$("text-guidance").value,
    imageGuidance: +$("image-guidance").value,
    seed: +$("seed").value,
    variations: +$("variations").value,
    previewEvery: 1,
  };
}

function fillForm(p) {
  $("instruction").value = p.instruction;
  $("steps").value = p.steps;
  $("text-guidance").value = p.textGuidance;
  $("image-guidance").value = p.imageGuidance;
  $("seed").value = p.seed;
  $("seed-lock").checked = true;
  $("variations").value = p.variations;
  showSliders();
}

$("edit").addEventListener("click", () => {
  if (!picture) return say("Choose a picture first.", true);
  const p = params();
  const c = $("picture");
  const rgba = new Uint8Array(c.getContext("2d").getImageData(0, 0, c.width, c.height).data.buffer);
  const body = buildEditRequest({ rgba, width: c.width, height: c.height }, maskGray8(), p);
  state.submit(p);
  running = startEdit({ server, token: token(), body, onEvent: (n, d) => state.event(n, d) });
  // Every transport reports the result through onEvent; only failures arrive here.
  running.done.catch((e) => state.fail(e));
});
$("cancel").addEventListener("click", () => {
  if (state.cancel()) running?.cancel();
});

function rawToUrl(img) {
  const c = document.createElement("canvas");
  c.width = img.width;
  c.height = img.height;
  const data = new ImageData(new Uint8ClampedArray(base64ToBytes(img.data).buffer), img.width, img.height);
  c.getContext("2d").putImageData(data, 0, 0);
  return c.toDataURL("image/png");
}

function showResults(s) {
  const grid = $("results");
  grid.replaceChildren();
  for (const img of s.response.images) {
    const fig = document.createElement("figure");
    const el = document.createElement("img");
    el.src = rawToUrl(img);
    el.width = img.width;
    el.height = img.height;
    el.dataset.seed = img.seed;
    const cap = document.createElement("figcaption");
    const p = s.params;
    cap.textContent = `seed ${img.seed} · ${p.steps} steps · text ${p.textGuidance} · image ${p.imageGuidance} · ${img.width}×${img.height} `;
    const a = document.createElement("a");
    a.href = el.src;
    a.download = `${p.instruction.slice(0, 40).replace(/[^\w-]+/g, "_")}-${img.seed}.png`;
    a.textContent = "download";
    cap.append(a);
    fig.append(el, cap);
    grid.append(fig);
  }
  const li = document.createElement("li");
  li.textContent = `“${s.params.instruction}” · seed ${s.params.seed} · ${s.params.steps} steps · ${s.params.textGuidance}/${s.params.imageGuidance}`;
  const reuse = { ...s.params, seed: s.response.images[0]?.seed ?? s.params.seed };
  li.addEventListener("click", () => fillForm(reuse));
  $("history").prepend(li);
}

state.onChange((s) => {
  const busy = state.busy;
  $("edit").disabled = busy;
  $("cancel").disabled = !busy;
  $("progress").hidden = s.phase !== "running";
  if (s.phase === "running" && s.total) {
    $("progress").max = s.total;
    $("progress").value = s.step;
  }
  if (s.preview) {
    $("preview").src = `data:image/png;base64,${s.preview}`;
    $("preview").hidden = !busy;
  } else {
    $("preview").hidden = true;
  }
  const text = {
    idle: "Ready.",
    submitting: "Sending…",
    queued: `Queued: position ${s.position}.`,
    running: `Step ${s.step ?? 0} of ${s.total ?? "?"}${s.variation ? ` (variation ${s.variation + 1})` : ""}.`,
    done: `Done: ${s.response?.images?.length ?? 0} picture(s) in ${s.response?.timings?.total_seconds?.toFixed?.(1) ?? "?"} s.`,
    cancelled: "Cancelled.",
    error: s.error?.display ? s.error.display() : String(s.error),
  }[s.phase];
  say(text, s.phase === "error");
  if (s.phase === "done") showResults(s);
});

showSliders();
loadInfo();
