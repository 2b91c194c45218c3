// Two shortcuts through Deno's own fetch classes for the bootstrap's request path (bootstrap.ts), each the same
// object or bytes the public path gives, each falling back to the public path whenever it cannot be sure.
//
// - `wholeStaticResponse(res)`: a Response built from a string or bytes with at most a content-type (status 200,
//   headers untouched since) carries its body and header in the fields `Deno.serve` answers from ("serve fast
//   …"). Reading them skips what `res.headers` and `res.body.getReader()` build for one read (a Headers object,
//   a ReadableStream, its reader, three promises): ~10× less CPU for a static answer (docs/benchmarks.md).
// - `makeRequest(...)`: `new Request(url, {headers, signal})` validates every header through WebIDL and makes a
//   signal that follows the given one (a WeakRef and a registry entry per request). The daemon's header names
//   are lower-case tokens from an HTTP parser: when every name and value is one the public path would store
//   unchanged, they go straight into the Request's header list, and the request's signal is the caller's own.
//
// Both find the fields by their descriptions at load and check them on probes (`fastPaths` says which are on):
// on a Deno whose internals differ, each is simply off. tests/runtimes/test_deno_fastpath.py checks that both
// are on with the Deno we ship, and that each gives what the public path gives.

// deno-lint-ignore no-explicit-any
type Any = any;

function symbols(o: object): Record<string, symbol> {
  const out: Record<string, symbol> = {};
  for (const s of Object.getOwnPropertySymbols(o)) if (s.description) out[s.description] = s;
  return out;
}

export type Whole = { status: number; headers: [string, string][]; body: Uint8Array };

const encoder = new TextEncoder();
const KIND_NONE = 0; // Deno 2.9's SERVE_FAST_HEADER_* (checked on probes below)
const KIND_TEXT = 1;
const KIND_CONTENT_TYPE = 2;
const TEXT = "text/plain;charset=UTF-8";

const R = symbols(new Response("x"));
const F_STATUS = R["serve fast status"];
const F_BODY = R["serve fast body"];
const F_KIND = R["serve fast header kind"];
const F_TYPE = R["serve fast content type"];
const F_CONSUMED = R["serve fast consumed"];
const F_LAZY = R["lazy static body"];

function peek(res: Response): Whole | null {
  const r = res as Any;
  const status = r[F_STATUS];
  const body = r[F_BODY];
  if (!status || body === null || body === undefined || r[F_CONSUMED] !== false) return null;
  // A read body keeps its fast fields: ask as Deno.serve does (a lazy static body is unread by definition).
  if ((r[F_LAZY] === null || r[F_LAZY] === undefined) && res.bodyUsed) return null;
  const kind = r[F_KIND];
  let headers: [string, string][];
  if (kind === KIND_NONE) headers = [];
  else if (kind === KIND_TEXT) headers = [["content-type", TEXT]];
  else if (kind === KIND_CONTENT_TYPE && typeof r[F_TYPE] === "string") headers = [["content-type", r[F_TYPE]]];
  else return null;
  if (typeof body === "string") return { status, headers, body: encoder.encode(body) };
  return body instanceof Uint8Array ? { status, headers, body } : null;
}

function staticProbesPass(): boolean {
  if (![F_STATUS, F_BODY, F_KIND, F_TYPE, F_CONSUMED, F_LAZY].every((s) => typeof s === "symbol")) return false;
  try {
    const text = peek(new Response("ab"));
    const json = peek(new Response("{}", { headers: { "content-type": "application/json" } }));
    const bytes = peek(new Response(new Uint8Array([1, 2])));
    const touched = new Response("ab");
    void touched.headers; // any look at the headers drops the fast fields
    const stream = peek(new Response(new ReadableStream()));
    return text?.status === 200 && text.headers[0]?.[1] === TEXT && text.body.byteLength === 2 &&
      json?.headers[0]?.[1] === "application/json" && bytes?.headers.length === 0 && bytes.body[1] === 2 &&
      peek(touched) === null && stream === null && peek(new Response("x", { status: 201 })) === null;
  } catch {
    return false;
  }
}

const staticOn = staticProbesPass();

/** The whole answer of a static Response of at most `maxBytes` (status, headers as `res.headers` iterates
 * them, body), marking its body used as reading it would; null when it is not one (a stream, other headers,
 * another status, a used body, a larger body): then read it the public way. */
export function wholeStaticResponse(res: Response, maxBytes: number): Whole | null {
  if (!staticOn) return null;
  const whole = peek(res);
  if (whole === null || whole.body.byteLength > maxBytes) return null;
  (res as Any)[F_CONSUMED] = true;
  return whole;
}

const Q = symbols(new Request("http://x/"));
const SIGNAL = Q["signalCache"];
const HEADER_LIST = symbols(new Headers())["header list"];
// Header names the daemon sends (lower-case tokens) and values the public path stores as they are: no leading
// or trailing whitespace, no NUL/CR/LF, nothing past U+00FF. Anything else takes the public path (and its errors).
const NAME = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;
const VALUE = /^(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?$/;

function requestProbesPass(): boolean {
  if (typeof SIGNAL !== "symbol" || typeof HEADER_LIST !== "symbol") return false;
  try {
    const ctrl = new AbortController();
    const req = build("http://x/p", "POST", [["a", "1"], ["b", "2"]], null, ctrl.signal);
    ctrl.abort();
    return req.headers.get("b") === "2" && [...req.headers].length === 2 && req.signal === ctrl.signal &&
      req.signal.aborted && req.method === "POST";
  } catch {
    return false;
  }
}

function build(
  url: string,
  method: string,
  headers: [string, string][],
  body: ReadableStream<Uint8Array> | null,
  signal: AbortSignal,
): Request {
  // GET is the default: no init dictionary at all (its WebIDL conversion is a good part of a Request's cost).
  const req = body !== null
    ? new Request(url, { method, body, duplex: "half" } as Any)
    : method === "GET"
    ? new Request(url)
    : new Request(url, { method });
  const list = (req.headers as Any)[HEADER_LIST] as [string, string][];
  for (const h of headers) list.push(h);
  (req as Any)[SIGNAL] = signal;
  return req;
}

const requestOn = requestProbesPass();

/** `new Request(url, { method, headers, body, signal, duplex: "half" })`, cheaper when every header is one the
 * public path would store unchanged (see the module comment). Takes ownership of `headers`' pairs. */
export function makeRequest(
  url: string,
  method: string,
  headers: [string, string][],
  body: ReadableStream<Uint8Array> | null,
  signal: AbortSignal,
): Request {
  if (requestOn) {
    let plain = true;
    for (const h of headers) {
      if (!NAME.test(h[0]) || !VALUE.test(h[1])) {
        plain = false;
        break;
      }
    }
    if (plain) return build(url, method, headers, body, signal);
  }
  return new Request(url, { method, headers, body, signal, duplex: "half" } as Any);
}

/** Which shortcuts this Deno allows (both are expected on the Deno mbworker ships). */
export const fastPaths = { staticResponse: staticOn, request: requestOn };
