// The server's errors as a person reads them: its own words, the field it names, and for a full
// queue (429) when to retry.

export class EditError extends Error {
  constructor({ status, code, message, field, retryAfter }) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter;
  }

  /** One line for the panel. */
  display() {
    let s = this.field ? `${this.field}: ${this.message}` : this.message;
    if (this.status === 429 && this.retryAfter) s += ` (retry in ${this.retryAfter} s)`;
    return s;
  }
}

/** From an HTTP error: the body's `{"error": {code, message, field}}` when it is JSON. */
export function errorFromResponse(status, bodyText, retryAfterHeader) {
  let e = null;
  try {
    e = JSON.parse(bodyText).error ?? null;
  } catch {
    e = null;
  }
  const retry = Number.parseInt(retryAfterHeader ?? "", 10);
  return new EditError({
    status,
    code: e?.code ?? `HTTP ${status}`,
    message: e?.message ?? (bodyText?.trim() || `the server answered ${status}`),
    field: e?.field,
    retryAfter: Number.isFinite(retry) ? retry : undefined,
  });
}

/** From an SSE `error` event's data. */
export function errorFromEvent(data) {
  const e = JSON.parse(data).error ?? {};
  return new EditError({ status: 0, code: e.code, message: e.message ?? "edit failed", field: e.field });
}

/** A network failure (server down, connection refused, CORS refused). */
export function networkError(cause) {
  return new EditError({ status: 0, code: "unavailable", message: `cannot reach the server (${cause?.message ?? cause})` });
}
