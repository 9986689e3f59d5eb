// A headless Chromium driven over the DevTools protocol, with nothing but Node (≥ 20, run with
// --experimental-websocket where WebSocket is not yet global).
import { spawn } from "node:child_process";
import { accessSync, constants, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function findChromium() {
  const names = [process.env.IP2P_CHROMIUM, "chromium", "chromium-browser", "google-chrome"].filter(Boolean);
  for (const dir of (process.env.PATH ?? "").split(":")) {
    for (const n of names) {
      const p = n.includes("/") ? n : join(dir, n);
      try {
        accessSync(p, constants.X_OK);
        return p;
      } catch {
        // not here
      }
    }
  }
  return null;
}

export async function launch() {
  const exe = findChromium();
  if (!exe) throw new Error("no chromium on the PATH (Debian: apt-get install chromium; or set IP2P_CHROMIUM)");
  const profile = mkdtempSync(join(tmpdir(), "ip2p-chromium-"));
  const proc = spawn(exe, [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
    "--remote-debugging-port=0", `--user-data-dir=${profile}`, "--window-size=1280,900", "about:blank",
  ], { stdio: ["ignore", "ignore", "pipe"] });
  const port = await new Promise((resolve, reject) => {
    let err = "";
    const t = setTimeout(() => reject(new Error(`chromium did not start: ${err}`)), 60000);
    proc.stderr.on("data", (d) => {
      err += d;
      const m = /DevTools listening on ws:\/\/[^:]+:(\d+)\//.exec(err);
      if (m) (clearTimeout(t), resolve(m[1]));
    });
    proc.on("exit", (c) => reject(new Error(`chromium exited ${c}: ${err}`)));
  });
  const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
  const page = list.find((t) => t.type === "page");
  const ws = new WebSocket(page.webSocketDebuggerUrl);
  await new Promise((res, rej) => ((ws.onopen = res), (ws.onerror = rej)));
  let id = 0;
  const pending = new Map();
  const listeners = [];
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.id && pending.has(msg.id)) {
      const { resolve, reject } = pending.get(msg.id);
      pending.delete(msg.id);
      msg.error ? reject(new Error(`${msg.error.message}`)) : resolve(msg.result);
    } else if (msg.method) listeners.forEach((l) => l(msg));
  };
  const send = (method, params = {}) =>
    new Promise((resolve, reject) => {
      pending.set(++id, { resolve, reject });
      ws.send(JSON.stringify({ id, method, params }));
    });
  const evaluate = async (expression) => {
    const r = await send("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true });
    if (r.exceptionDetails) throw new Error(`${expression.slice(0, 80)}…: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
    return r.result.value;
  };
  const waitFor = async (expression, timeoutMs = 60000) => {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const v = await evaluate(expression);
      if (v) return v;
      if (Date.now() > end) throw new Error(`timed out waiting for ${expression}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const close = () => {
    ws.close();
    proc.kill("SIGKILL");
    try { rmSync(profile, { recursive: true, force: true }); } catch {}
  };
  return { send, evaluate, waitFor, close, on: (l) => listeners.push(l) };
}
