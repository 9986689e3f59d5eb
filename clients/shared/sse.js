// An incremental Server-Sent Events parser (the WHATWG "event stream interpretation"):
// chunks may be cut anywhere (inside a line, between CR and LF, inside a UTF-8 sequence);
// lines end in CRLF, LF or CR; `data` lines join with "\n"; comments (":") are skipped; a
// blank line dispatches the event when it has data.

export class SseParser {
  /** @param {(ev: {event: string, data: string, id: string}) => void} onEvent */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buf = "";
    this.afterCR = false;
    this.first = true;
    this.decoder = null;
    this.reset();
    this.lastId = "";
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  /** Bytes as they arrive (UTF-8, split anywhere). */
  pushBytes(bytes) {
    if (!this.decoder) this.decoder = new TextDecoder("utf-8");
    this.push(this.decoder.decode(bytes, { stream: true }));
  }

  /** Text as it arrives. */
  push(text) {
    if (this.first && text.length > 0) {
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      this.first = false;
    }
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (this.afterCR) {
        this.afterCR = false;
        if (c === "\n") {
          start = i + 1;
          continue;
        }
      }
      if (c === "\n" || c === "\r") {
        this.line(this.buf + text.slice(start, i));
        this.buf = "";
        start = i + 1;
        this.afterCR = c === "\r";
      }
    }
    this.buf += text.slice(start);
  }

  /** The stream ended: an unterminated event is dropped, as the standard says. */
  end() {
    if (this.decoder) this.push(this.decoder.decode());
    this.buf = "";
    this.reset();
  }

  line(line) {
    if (line === "") {
      if (this.data.length > 0) {
        this.onEvent({ event: this.event || "message", data: this.data.join("\n"), id: this.lastId });
      }
      this.reset();
      return;
    }
    if (line[0] === ":") return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
  }
}
