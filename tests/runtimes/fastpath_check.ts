// Run by tests/runtimes/test_deno_fastpath.py: each shortcut of runtimes/deno/fastpath.ts is on with this Deno,
// and gives what the public path gives (or declines, and the public path runs). Prints one JSON line.
import { cancelRequest, fastPaths, makeRequest, wholeStaticResponse } from "../../runtimes/deno/fastpath.ts";

const failures: string[] = [];
const check = (ok: boolean, what: string) => void (ok || failures.push(what));
const dec = new TextDecoder();
const enc = new TextEncoder();

// The public path, as bootstrap.ts reads a response it cannot shortcut.
async function publicWhole(res: Response) {
  const headers: [string, string][] = [...res.headers];
  return { status: res.status, headers, body: new Uint8Array(await res.arrayBuffer()) };
}

const statics: [string, () => Response][] = [
  ["text", () => new Response("héllo")],
  ["text + text/plain", () => new Response("hello", { headers: { "content-type": "text/plain" } })],
  ["text + Content-Type json", () => new Response("{}", { headers: { "Content-Type": "application/json" } })],
  ["bytes", () => new Response(new Uint8Array([0, 1, 255]))],
  ["bytes + content-type", () => new Response(new Uint8Array([7]), { headers: { "content-type": "text/plain" } })],
  ["empty", () => new Response("")],
  ["Response.json", () => Response.json({ a: 1 })],
  ["status 200 given", () => new Response("x", { status: 200 })],
  ["statusText (frames carry none)", () => new Response("x", { statusText: "Fine" })],
];
for (const [name, make] of statics) {
  const res = make();
  const whole = wholeStaticResponse(res, 1 << 16);
  const ref = await publicWhole(make());
  check(whole !== null, `${name}: not taken`);
  if (whole === null) continue;
  check(whole.status === ref.status, `${name}: status ${whole.status} != ${ref.status}`);
  check(JSON.stringify(whole.headers) === JSON.stringify(ref.headers), `${name}: headers ${JSON.stringify(whole.headers)} != ${JSON.stringify(ref.headers)}`);
  const body = typeof whole.body === "string" ? enc.encode(whole.body) : whole.body; // encoded by the frame writer
  check(dec.decode(body) === dec.decode(ref.body) && body.byteLength === ref.body.byteLength, `${name}: body`);
  check(res.bodyUsed, `${name}: body not marked used`);
}

const declined: [string, () => Response | Promise<Response>][] = [
  ["stream", () => new Response(new ReadableStream({ start: (c) => (c.enqueue(new Uint8Array(1)), c.close()) }))],
  ["status 201", () => new Response("x", { status: 201 })],
  ["two headers", () => new Response("x", { headers: { "content-type": "text/plain", "x-a": "1" } })],
  ["other header", () => new Response("x", { headers: { "x-a": "1" } })],
  ["headers looked at", () => { const r = new Response("x"); r.headers.get("content-type"); return r; }],
  ["headers changed", () => { const r = new Response("x"); r.headers.set("x-a", "1"); return r; }],
  ["body read", async () => { const r = new Response("x"); await r.text(); return r; }],
  ["over the size", () => new Response("x".repeat(100))],
  ["no body", () => new Response(null)],
  ["redirect", () => Response.redirect("http://localhost/x", 302)],
  ["error", () => Response.error()],
];
for (const [name, make] of declined) {
  const res = await make();
  check(wholeStaticResponse(res, 64) === null, `${name}: taken`);
  check(name === "body read" || !res.bodyUsed, `${name}: body marked used though declined`);
}

// Requests: the same method, URL, headers (as iterated and as stored), body and signal as the public path; the
// signal aborted by `cancelRequest` whether the function asked for it before the cancel or only after.
const CANCELLED = "The request has been cancelled."; // Deno.serve's reason
async function same(name: string, method: string, headers: [string, string][], body: string | null) {
  const stream = () => body === null ? null : new ReadableStream<Uint8Array>({
    start: (c) => (c.enqueue(new TextEncoder().encode(body)), c.close()),
  });
  const url = "http://localhost/fn/x?q=1";
  let a: Request | Error, b: Request | Error;
  try {
    a = makeRequest(url, method, headers.map(([k, v]) => [k, v]), stream());
  } catch (e) {
    a = e as Error;
  }
  try {
    const init = { method, headers, body: stream(), signal: new AbortController().signal, duplex: "half" };
    // deno-lint-ignore no-explicit-any
    b = new Request("http://localhost/fn/x?q=1", init as any);
  } catch (e) {
    b = e as Error;
  }
  if (a instanceof Error || b instanceof Error) {
    check(a instanceof Error && b instanceof Error && a.message === b.message, `${name}: ${a} vs ${b}`);
    return;
  }
  check(a.method === b.method && a.url === b.url, `${name}: method/url`);
  check(JSON.stringify([...a.headers]) === JSON.stringify([...b.headers]), `${name}: headers ${JSON.stringify([...a.headers])} vs ${JSON.stringify([...b.headers])}`);
  for (const [k] of headers) check(a.headers.get(k) === b.headers.get(k), `${name}: get(${k})`);
  const clone = a.clone();
  const rewrapped = body === null ? new Request(a) : a.clone(); // new Request(a) would take a's body
  check(JSON.stringify([...clone.headers]) === JSON.stringify([...a.headers]), `${name}: clone`);
  check((await a.text()) === (await b.text()), `${name}: body`);
  check(!a.signal.aborted, `${name}: aborted early`);
  check(a.redirect === b.redirect && a.mode === b.mode && a.cache === b.cache && a.referrer === b.referrer,
    `${name}: defaults`);
  check(rewrapped.url === b.url && rewrapped.method === b.method, `${name}: new Request(request)`);
  cancelRequest(a);
  const reason = a.signal.reason as DOMException;
  check(a.signal.aborted && reason.name === "AbortError" && reason.message === CANCELLED, `${name}: signal does not follow`);
  check(clone.signal.aborted && rewrapped.signal.aborted, `${name}: the clone's signal does not follow`);
  // Cancelled before anyone asked for the signal: it is made aborted.
  const late = makeRequest(url, method, headers.map(([k, v]) => [k, v]), stream());
  if (late instanceof Request) {
    cancelRequest(late);
    check(late.signal.aborted && (late.signal.reason as DOMException).message === CANCELLED, `${name}: late signal`);
  }
}
const plain: [string, string][] = [["host", "localhost"], ["accept", "*/*"], ["x-forwarded-for", "127.0.0.1"]];
await same("GET", "GET", plain, null);
await same("POST with body", "POST", [...plain, ["content-type", "application/json"]], '{"a":1}');
await same("repeated header", "GET", [["x-a", "1"], ["x-a", "2"], ["cookie", "a=b; c=d"]], null);
await same("latin-1 value", "GET", [["x-a", "caf\u00e9"]], null);
await same("empty value", "GET", [["x-a", ""]], null);
await same("value with spaces", "GET", [["x-a", " padded\t"]], null); // normalized by the public path
await same("upper-case name", "GET", [["X-A", "1"], ["x-a", "2"]], null);
await same("bad name", "GET", [["bad name", "1"]], null);
await same("bad value", "GET", [["x-a", "a\u0000b"]], null);
await same("value past latin-1", "GET", [["x-a", "\u20ac"]], null);
await same("no headers", "DELETE", [], null);
await same("POST without body", "POST", plain, null);
await same("HEAD", "HEAD", plain, null);
await same("unusual method", "PROPFIND", plain, null);
await same("lower-case method", "get", plain, null);
await same("forbidden method", "TRACE", plain, null);

console.log(JSON.stringify({ fastPaths, failures }));
