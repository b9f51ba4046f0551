// Server-Sent Events read with fetch(), so that the request carries the API key in its
// Authorization header (EventSource cannot send headers). Like EventSource it reconnects
// after a dropped connection with Last-Event-ID, the id of the last event it saw, so nothing
// is seen twice and nothing is lost; unlike it, it also reconnects when the connection goes
// silent past the server's keep-alives (a half-open socket), and it stops for good on a 4xx
// that retrying cannot fix (a bad key, a deleted sweep).
import { apiKey } from "./common.js";

const SILENT_MS = 60_000;  // the API sends a keep-alive comment every 15 s by default
const MAX_RETRY_MS = 10_000;

// Calls on[event.type](data, id) for each event until on.done has been called or stop() is;
// onError(error, willRetry) on a failed or dropped connection. Returns stop().
export function followEvents(path, on, onError = () => {}) {
  let stopped = false, controller = null, lastId = null, retryMs = 1000, failures = 0;

  async function connect() {
    controller = new AbortController();
    let silence = null;
    const quiet = () => {
      clearTimeout(silence);
      silence = setTimeout(() => controller.abort(new Error("the event stream went silent")), SILENT_MS);
    };
    const headers = { Authorization: `Bearer ${apiKey()}`, Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    try {
      quiet();
      const response = await fetch(path, { headers, signal: controller.signal, cache: "no-store" });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        const error = new Error(`${response.status}: ${(body && body.detail) || response.statusText}`);
        // 4xx: asking again changes nothing (but 429, too many streams open, passes).
        error.fatal = response.status >= 400 && response.status < 500 && response.status !== 429;
        throw error;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new EventParser((type, data, id) => {
        if (id !== null) lastId = id;
        failures = 0;
        if (data === null || stopped) return;  // an id alone moves the cursor only
        const handler = on[type];
        if (handler) handler(JSON.parse(data), id);
        if (type === "done") stopped = true;
      }, (ms) => { retryMs = ms; });
      // After `done` the server ends the response: read on to its end.
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        quiet();
        parser.push(value);
      }
      if (!stopped) throw new Error("the event stream ended before its done event");
    } finally {
      clearTimeout(silence);
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await connect();
      } catch (error) {
        if (stopped) return;
        const fatal = Boolean(error.fatal);
        onError(error, !fatal);
        if (fatal) return;
        failures++;
      }
      if (stopped) return;
      // The server's retry (1 s), longer after failures in a row.
      const wait = Math.min(MAX_RETRY_MS, retryMs * 2 ** Math.max(0, failures - 1));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  })();

  return () => { stopped = true; if (controller) controller.abort(); };
}

// The text/event-stream format (the HTML standard's parsing rules): lines end in CR, LF or
// CRLF; a blank line dispatches the event; ":" starts a comment; an id is kept even for an
// event that has no data (dispatched with data null).
export class EventParser {
  constructor(dispatch, setRetry) {
    this.dispatch = dispatch;
    this.setRetry = setRetry;
    this.buffer = "";
    this.reset();
  }

  reset() { this.type = ""; this.data = []; this.id = null; }

  push(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start), lf = this.buffer.indexOf("\n", start);
      if (cr < 0 && lf < 0) break;
      let end = cr < 0 ? lf : lf < 0 ? cr : Math.min(cr, lf);
      // A CR at the very end may be the first half of a CRLF split across chunks.
      if (end === cr && end === this.buffer.length - 1) break;
      const line = this.buffer.slice(start, end);
      if (end === cr && this.buffer[end + 1] === "\n") end++;
      start = end + 1;
      this.line(line);
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      if (this.data.length || this.id !== null) {
        this.dispatch(this.type || "message", this.data.length ? this.data.join("\n") : null, this.id);
      }
      this.reset();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.setRetry(Number(value));
  }
}
