// A parser for server-sent events (the `data:` part of the WHATWG event-stream format).
//
// The network splits a stream wherever it likes: an event, a line, a multi-byte character or
// the two halves of a CRLF can straddle two chunks. Bytes are decoded with a streaming
// TextDecoder and unfinished lines wait in a buffer until the rest arrives.

const LINE_END = /\r\n|\r|\n/g;

export class SseParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";
    this.data = [];
  }

  // Feed a chunk (Uint8Array or string); returns the data of every event it completed.
  push(chunk) {
    this.buffer += typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    return this.drain(false);
  }

  // The stream ended. A last event without its closing blank line is dropped, as the
  // standard says: it may be cut short.
  end() {
    this.buffer += this.decoder.decode();
    const events = this.drain(true);
    this.buffer = "";
    this.data = [];
    return events;
  }

  drain(final) {
    const events = [];
    let start = 0;
    LINE_END.lastIndex = 0;
    let match;
    while ((match = LINE_END.exec(this.buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF still on its way.
      if (!final && match[0] === "\r" && match.index === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, match.index), events);
      start = LINE_END.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(text, events) {
    if (text === "") {
      if (this.data.length > 0) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (text.startsWith(":")) return; // a comment, e.g. a keep-alive
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}
