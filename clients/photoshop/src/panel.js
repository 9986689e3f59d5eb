// The panel: DOM glue over the shared pure modules and the host module (passed in, so this file
// never touches Photoshop). The flow of one edit: read the region (a short modal scope) → send it
// (no modal scope held) → place the results (another short modal scope).
import { buildEditRequest } from "../../shared/request.js";
import { startEdit } from "../../shared/transport.js";
import { EditState } from "../../shared/state.js";
import { base64ToBytes } from "../../shared/base64.js";
import { errorFromResponse, networkError } from "../../shared/errors.js";
import { forServer, toRegionSize } from "./region.js";

const DEFAULT_SERVER = "http://127.0.0.1:50051";

export function mountPanel({ host, doc = document, env = globalThis }) {
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

const server = (ui) => ui.$("server").value.trim().replace(/\/+$/, "") || DEFAULT_SERVER;
const token = (ui) => ui.$("token").value.trim();

/** GetInfo: the model's name, the defaults of the form, the limits (max_pixels, variations). */
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
    padding: Number($("padding").value),
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
  const ticket = (ui.ticket = {}); // cancel clears it: a read finishing after a cancel sends nothing
  try {
    const region = await host.readRegion({
      selectionOnly: p.selectionOnly, padding: p.padding, maxPixels: ui.info?.limits?.max_pixels,
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
      rgba: toRegionSize(base64ToBytes(img.data), img.width, img.height, region),
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

const STATUS = {
  idle: (s) => s.note ?? "Ready.",
  submitting: () => "Reading the picture…",
  queued: (s) => `Queued: position ${s.position}.`,
  running: (s) => `Step ${s.step ?? 0} of ${s.total ?? "?"}${s.variation ? ` (variation ${s.variation + 1})` : ""}.`,
  done: (s) => `Done: ${s.response?.images?.length ?? 0} result(s); placing…`,
  cancelled: () => "Cancelled.",
  error: (s) => (s.error?.display ? s.error.display() : String(s.error?.message ?? s.error)),
};

function render(ui, s) {
  const { $, state } = ui;
  $("panel").setAttribute("data-phase", s.phase);
  $("edit").disabled = state.busy;
  $("cancel").disabled = !state.busy;
  show($("bar"), s.phase === "running");
  if (s.phase === "running" && s.total) $("bar-fill").style.width = `${Math.round((100 * s.step) / s.total)}%`;
  show($("preview"), state.busy && !!s.preview);
  if (s.preview && state.busy) $("preview").src = `data:image/png;base64,${s.preview}`;
  say(ui, STATUS[s.phase](s), s.phase === "error");
  if (s.phase === "done") renderHistory(ui);
}

// Shown or not by style (UXP does not style the `hidden` attribute in every version).
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
