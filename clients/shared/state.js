// One edit's life, as the panel and the page show it:
//   idle → queued(position) → running(step/total, preview) → done | cancelled | error
// plus the history of finished edits with their parameters (click to reuse).

export class EditState {
  constructor({ historyLimit = 50 } = {}) {
    this.historyLimit = historyLimit;
    this.history = [];
    this.listeners = new Set();
    this.toIdle();
  }

  /** Back to idle; `note` ("Cancelled.") says how the last edit ended. */
  toIdle(note) {
    this.set(note ? { phase: "idle", note } : { phase: "idle" });
  }

  set(s) {
    this.current = s;
    for (const l of this.listeners) l(s);
  }

  onChange(f) {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  get busy() {
    return this.current.phase === "queued" || this.current.phase === "running" || this.current.phase === "submitting";
  }

  /** A new edit was sent; a second one while busy is refused. */
  submit(params) {
    if (this.busy) throw new Error("an edit is already running; cancel it first");
    this.set({ phase: "submitting", params, results: [] });
  }

  /** A server event (`queued`, `started`, `progress`, `result`, `error`), data parsed. */
  event(name, data) {
    const s = this.current;
    if (!this.busy) return;
    switch (name) {
      case "queued":
        this.set({ ...s, phase: "queued", position: data.position });
        break;
      case "started":
        this.set({ ...s, phase: "running", step: 0, total: s.params?.steps ?? 0 });
        break;
      case "progress":
        this.set({
          ...s, phase: "running", step: data.step, total: data.total,
          variation: data.variation, preview: data.preview ?? s.preview,
        });
        break;
      case "result":
        this.finish({ ...s, phase: "done", response: data });
        break;
      default:
        break;
    }
  }

  /** The person pressed cancel (queued or running). */
  cancel() {
    if (!this.busy) return false;
    this.set({ ...this.current, phase: "cancelled" });
    return true;
  }

  fail(error) {
    if (this.current.phase === "cancelled") return;
    this.set({ ...this.current, phase: "error", error });
  }

  finish(s) {
    this.history.unshift({ params: s.params, response: s.response, at: Date.now() });
    this.history.length = Math.min(this.history.length, this.historyLimit);
    this.set(s);
  }

  /** The parameters of history entry `i`, to fill the form again. */
  reuse(i) {
    const h = this.history[i];
    return h ? { ...h.params, seed: h.response?.images?.[0]?.seed ?? h.params.seed } : null;
  }
}
