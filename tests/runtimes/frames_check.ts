// Run by tests/runtimes/test_deno_frames.py: runtimes/deno/frames.ts writes exactly the bytes the plain encoding
// gives ([u32 json_len][u32 body_len][UTF-8 json][body], big-endian), whatever the texts hold and however large the
// batch grows, and reuses a released buffer. Prints one JSON line.
import { FrameQueue } from "../../runtimes/deno/frames.ts";

const failures: string[] = [];
const check = (ok: boolean, what: string) => void (ok || failures.push(what));
const enc = new TextEncoder();

function plain(head: string, body?: Uint8Array | string): Uint8Array {
  const json = enc.encode(head);
  const raw = body === undefined ? new Uint8Array(0) : typeof body === "string" ? enc.encode(body) : body;
  const out = new Uint8Array(8 + json.byteLength + raw.byteLength);
  const view = new DataView(out.buffer);
  view.setUint32(0, json.byteLength);
  view.setUint32(4, raw.byteLength);
  out.set(json, 8);
  out.set(raw, 8 + json.byteLength);
  return out;
}

const same = (a: Uint8Array, b: Uint8Array) => a.byteLength === b.byteLength && a.every((x, i) => x === b[i]);

const cases: [string, string, (Uint8Array | string)?][] = [
  ["head only", '{"t":"r"}'],
  ["ascii body", '{"t":"h","i":1,"s":200,"h":[],"e":1}', "hello"],
  ["bytes body", '{"t":"b","i":1}', new Uint8Array([0, 1, 255, 128])],
  ["empty string body", '{"t":"h","i":2,"s":200,"h":[],"e":1}', ""],
  ["latin-1 header in head", JSON.stringify({ t: "h", i: 3, s: 200, h: [["x-a", "caf\u00e9"]] })],
  ["non-ascii error text", JSON.stringify({ t: "f", i: 4, k: "error", m: "Error: \u20ac \ud83d\ude00 broke" })],
  ["non-ascii body", '{"t":"h","i":5,"s":200,"h":[],"e":1}', "h\u00e9llo \ud83d\ude00"],
  ["long ascii body", '{"t":"h","i":6,"s":200,"h":[],"e":1}', "x".repeat(5000)],
  ["long non-ascii body", '{"t":"h","i":7,"s":200,"h":[],"e":1}', "\u00e9".repeat(40000)],
  ["large bytes", '{"t":"b","i":8}', new Uint8Array(100_000).fill(7)],
];

// One batch holding every case (it grows past the first buffer), then each alone (buffers reused).
const q = new FrameQueue();
for (const [, head, body] of cases) q.push(head, body);
const batch = q.take();
const parts = cases.map(([, head, body]) => plain(head, body));
const expected = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
let off = 0;
for (const p of parts) {
  expected.set(p, off);
  off += p.byteLength;
}
check(same(batch, expected), "one batch of every case");
check(q.length === 0, "a taken queue is empty");
q.release(batch);
for (const [name, head, body] of cases) {
  q.push(head, body);
  check(q.length === plain(head, body).byteLength, `${name}: length`);
  const out = q.take();
  check(same(out, plain(head, body)), name);
  q.release(out);
}
// A buffer taken but not yet released is never written into by later frames.
q.push('{"t":"r"}');
const held = q.take();
const copy = held.slice();
q.push('{"t":"x","m":"later"}');
check(same(held, copy), "a taken buffer is left alone until released");

console.log(JSON.stringify({ failures }));
