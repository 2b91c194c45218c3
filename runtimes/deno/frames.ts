// The bootstrap's outgoing frames (format: runtimes/deno/protocol.py): each frame is written into one buffer as it
// is made, so a batch goes out as one write with no copy in between, and short ASCII texts (frame heads, small
// string bodies) are written by a loop here: a TextEncoder call is an op into Rust, several times the cost of
// the loop for a few dozen bytes (docs/benchmarks.md, "Function path", round 7). Anything else is encoded by
// `TextEncoder.encodeInto`, the same UTF-8 bytes.
//
// Who owns what: the bootstrap owns one `FrameQueue`; `take()` hands the queued bytes to its one writer, which
// gives the buffer back (`release`) once the bytes are written, to be reused.

const SHORT = 256; // texts up to this many UTF-16 units are tried as ASCII first
const KEEP = 1 << 20; // a buffer grown past this is not kept for reuse
const encoder = new TextEncoder();

export class FrameQueue {
  #buf: Uint8Array = new Uint8Array(16 * 1024);
  #view: DataView = new DataView(this.#buf.buffer);
  #len = 0;
  #spare: Uint8Array | null = null;

  /** Bytes queued. */
  get length(): number {
    return this.#len;
  }

  /** Queue one frame: `head` is its JSON text, `body` its raw part (a string is UTF-8 encoded). */
  push(head: string, body?: Uint8Array | string): void {
    // Room for the worst case: 3 bytes per UTF-16 unit.
    const bodyMax = body === undefined ? 0 : typeof body === "string" ? body.length * 3 : body.byteLength;
    this.#reserve(8 + head.length * 3 + bodyMax);
    const start = this.#len;
    let off = this.#text(head, start + 8);
    const jlen = off - start - 8;
    if (body !== undefined) off = typeof body === "string" ? this.#text(body, off) : this.#bytes(body, off);
    this.#view.setUint32(start, jlen);
    this.#view.setUint32(start + 4, off - start - 8 - jlen);
    this.#len = off;
  }

  /** The queued bytes, to be written; the queue starts a new buffer. Give it back with `release` once written. */
  take(): Uint8Array {
    const out = this.#buf.subarray(0, this.#len);
    const next = this.#spare ?? new Uint8Array(16 * 1024);
    this.#spare = null;
    this.#buf = next;
    this.#view = new DataView(next.buffer);
    this.#len = 0;
    return out;
  }

  /** A buffer `take` returned, now written: reused by a later `take`. */
  release(written: Uint8Array): void {
    if (written.buffer.byteLength <= KEEP) this.#spare = new Uint8Array(written.buffer);
  }

  #reserve(n: number): void {
    if (this.#len + n <= this.#buf.byteLength) return;
    const grown = new Uint8Array(Math.max(this.#buf.byteLength * 2, this.#len + n));
    grown.set(this.#buf.subarray(0, this.#len));
    this.#buf = grown;
    this.#view = new DataView(grown.buffer);
  }

  #text(s: string, off: number): number {
    const buf = this.#buf;
    const n = s.length;
    if (n <= SHORT) {
      let i = 0;
      for (; i < n; i++) {
        const c = s.charCodeAt(i);
        if (c > 0x7f) break;
        buf[off + i] = c;
      }
      if (i === n) return off + n;
    }
    return off + encoder.encodeInto(s, buf.subarray(off)).written;
  }

  #bytes(b: Uint8Array, off: number): number {
    this.#buf.set(b, off);
    return off + b.byteLength;
  }
}
