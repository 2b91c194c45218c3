// Run by tests/runtimes/test_deno_fastpath.py: each shortcut of runtimes/deno/fastpath.ts is on with this Deno,
// and gives what the public path gives (or declines, and the public path runs). Prints one JSON line.
import { fastPaths, makeRequest, wholeStaticResponse } from "../../runtimes/deno/fastpath.ts";

const failures: string[] = [];
const check = (ok: boolean, what: string) => void (ok || failures.push(what));
const dec = new TextDecoder();

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
  check(dec.decode(whole.body) === dec.decode(ref.body) && whole.body.byteLength === ref.body.byteLength, `${name}: body`);
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

// Requests: the same method, URL, headers (as iterated and as stored), body and signal as the public path.
async function same(name: string, method: string, headers: [string, string][], body: string | null) {
  const stream = () => body === null ? null : new ReadableStream<Uint8Array>({
    start: (c) => (c.enqueue(new TextEncoder().encode(body)), c.close()),
  });
  const ours = new AbortController();
  let a: Request | Error, b: Request | Error;
  try {
    a = makeRequest("http://localhost/fn/x?q=1", method, headers.map(([k, v]) => [k, v]), stream(), ours.signal);
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
  check(JSON.stringify([...clone.headers]) === JSON.stringify([...a.headers]), `${name}: clone`);
  check((await a.text()) === (await b.text()), `${name}: body`);
  check(!a.signal.aborted, `${name}: aborted early`);
  ours.abort();
  check(a.signal.aborted && (a.signal.reason as DOMException).name === "AbortError", `${name}: signal does not follow`);
  check(clone.signal.aborted, `${name}: the clone's signal does not follow`);
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

console.log(JSON.stringify({ fastPaths, failures }));
