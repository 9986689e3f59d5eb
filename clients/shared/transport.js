// Sends an edit and reports its events, with whatever the host has:
//   1. fetch with a readable `Response.body` (browsers): the SSE stream, read as it arrives;
//   2. XMLHttpRequest's partial `responseText` (UXP versions without a streaming body);
//   3. the unary `POST /v1/edit` (no progress, one result).
// Cancel: `AbortController` for fetch, `xhr.abort()` for XHR; the server cancels the edit when
// the connection goes.
import { SseParser } from "./sse.js";
import { errorFromEvent, errorFromResponse, networkError } from "./errors.js";

/** The way this host can talk to the server: "stream", "xhr" or "unary". */
export function chooseMode(env) {
  // UXP versions before 8 have fetch without a readable `Response.body`.
  const hasStream = typeof env.fetch === "function" && typeof env.ReadableStream === "function" &&
    typeof env.Response === "function" && "body" in env.Response.prototype;
  if (hasStream) return "stream";
  if (typeof env.XMLHttpRequest === "function") return "xhr";
  return "unary";
}

function headers(token) {
  const h = { "content-type": "application/json", accept: "text/event-stream" };
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

/**
 * @param {object} o server (base URL), token, body (buildEditRequest's), onEvent(name, data),
 *   env (globalThis, or a fake in tests)
 * @returns {{done: Promise<object>, cancel: () => void, mode: string}} `done` resolves to the
 *   result's data, rejects with an EditError, or resolves to null when cancelled.
 */
export function startEdit({ server, token, body, onEvent, env = globalThis }) {
  const mode = chooseMode(env);
  const base = server.replace(/\/+$/, "");
  if (mode === "stream") return viaFetch(env, `${base}/v1/edit/stream`, token, body, onEvent);
  if (mode === "xhr") return viaXhr(env, `${base}/v1/edit/stream`, token, body, onEvent);
  return viaUnary(env, `${base}/v1/edit`, token, body, onEvent);
}

/** Feeds SSE events to `onEvent`, settling on `result` or `error`. */
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
  const promise = new Promise((a, b) => ((resolve = a), (reject = b)));
  let settled = false;
  return {
    promise,
    resolve: (v) => !settled && ((settled = true), resolve(v)),
    reject: (e) => !settled && ((settled = true), reject(e)),
  };
}

function viaFetch(env, url, token, body, onEvent) {
  const ctl = new env.AbortController();
  const d = deferred();
  let cancelled = false;
  (async () => {
    const r = await env.fetch(url, { method: "POST", headers: headers(token), body: JSON.stringify(body), signal: ctl.signal });
    if (!r.ok) throw errorFromResponse(r.status, await r.text(), r.headers.get("retry-after"));
    const parser = sseSink(onEvent, d);
    const reader = r.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.pushBytes(value);
    }
    parser.end();
    d.reject(networkError("the stream ended before a result"));
  })().catch((e) => (cancelled ? d.resolve(null) : d.reject(e.status !== undefined ? e : networkError(e))));
  return { mode: "stream", done: d.promise, cancel: () => ((cancelled = true), ctl.abort(), d.resolve(null)) };
}

function viaXhr(env, url, token, body, onEvent) {
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
  for (const [k, v] of Object.entries(headers(token))) xhr.setRequestHeader(k, v);
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

function viaUnary(env, url, token, body, onEvent) {
  const d = deferred();
  const ctl = env.AbortController ? new env.AbortController() : null;
  let cancelled = false;
  (async () => {
    const h = headers(token);
    h.accept = "application/json";
    const r = await env.fetch(url, { method: "POST", headers: h, body: JSON.stringify(body), signal: ctl?.signal });
    const text = await r.text();
    if (!r.ok) throw errorFromResponse(r.status, text, r.headers.get("retry-after"));
    const data = JSON.parse(text);
    onEvent("result", data);
    d.resolve(data);
  })().catch((e) => (cancelled ? d.resolve(null) : d.reject(e.status !== undefined ? e : networkError(e))));
  return { mode: "unary", done: d.promise, cancel: () => ((cancelled = true), ctl?.abort(), d.resolve(null)) };
}
