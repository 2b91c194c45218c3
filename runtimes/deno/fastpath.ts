// Two shortcuts through Deno's own fetch classes for the bootstrap's request path (bootstrap.ts), each the same
// object or bytes the public path gives, each falling back to the public path whenever it cannot be sure.
//
// - `wholeStaticResponse(res)`: a Response built from a string or bytes with at most a content-type (status 200,
//   headers untouched since) carries its body and header in the fields `Deno.serve` answers from ("serve fast
//   …"). Reading them skips what `res.headers` and `res.body.getReader()` build for one read (a Headers object,
//   a ReadableStream, its reader, three promises): ~10× less CPU for a static answer (docs/benchmarks.md).
// - `makeRequest(...)`: `new Request(url, {headers, signal})` converts its init through WebIDL, validates every
//   header, makes a Headers object and a signal that follows the given one. The daemon's header names are
//   lower-case tokens from an HTTP parser: when the method and every name and value are ones the public path
//   would store unchanged, a request without a body is made as Deno.serve makes its own (the brand, then an
//   inner record holding the URL and the header pairs), and its Headers object and its signal are made only if
//   the function asks for them; `cancelRequest` aborts that signal, now or when it is made. A request with a body
//   gets its plain headers straight into its header list.
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

/** `body` is a string when the Response was made from one: the frame writer encodes it (UTF-8) in place. */
export type Whole = { status: number; headers: [string, string][]; body: Uint8Array | string };

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
  return typeof body === "string" || body instanceof Uint8Array ? { status, headers, body } : null;
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
    return text?.status === 200 && text.headers[0]?.[1] === TEXT && text.body === "ab" &&
      json?.headers[0]?.[1] === "application/json" && bytes?.headers.length === 0 &&
      bytes.body instanceof Uint8Array && bytes.body[1] === 2 &&
      peek(touched) === null && stream === null && peek(new Response("x", { status: 201 })) === null;
  } catch {
    return false;
  }
}

const staticOn = staticProbesPass();

/** The UTF-8 length of `body`, exact when it matters: a string of at most `max / 3` UTF-16 units cannot encode
 * to more than `max` bytes, and one of more than `max` units always does. */
function byteLength(body: Uint8Array | string, max: number): number {
  if (typeof body !== "string") return body.byteLength;
  if (body.length * 3 <= max || body.length > max) return body.length;
  return encoder.encode(body).byteLength;
}

/** The whole answer of a static Response of at most `maxBytes` (status, headers as `res.headers` iterates
 * them, body), marking its body used as reading it would; null when it is not one (a stream, other headers,
 * another status, a used body, a larger body): then read it the public way. */
export function wholeStaticResponse(res: Response, maxBytes: number): Whole | null {
  if (!staticOn) return null;
  const whole = peek(res);
  if (whole === null || byteLength(whole.body, maxBytes) > maxBytes) return null;
  (res as Any)[F_CONSUMED] = true;
  return whole;
}

const Q = symbols(new Request("http://x/"));
const BRAND = Q["[[webidl.brand]]"];
const REQUEST = Q["request"];
const HEADERS_GUARD = Q["headers guard"];
const SIGNAL = Q["signalCache"];
const HEADER_LIST = symbols(new Headers())["header list"];
// Header names the daemon sends (lower-case tokens) and values the public path stores as they are: no leading
// or trailing whitespace, no NUL/CR/LF, nothing past U+00FF. Anything else takes the public path (and its errors).
const NAME = /^[!#$%&'*+\-.^_`|~0-9a-z]+$/;
const VALUE = /^(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?$/;
// Methods the public path stores as they are (upper case, neither forbidden nor needing normalization).
const METHODS = new Set(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]);

/** A request's inner record as Deno's fetch classes read it (Deno.serve makes its own the same way): the fields
 * and methods of 2.9's `newInnerRequest`, plus `onCancel`, through which Request.signal, when first asked for,
 * learns how to abort. The optional fields (mode, cache, referrer, …) are left out: their getters give the
 * defaults, as for Deno.serve's requests. */
class InnerRequest {
  methodInner: string;
  headerListInner: [string, string][];
  body = null;
  redirectMode = "follow";
  redirectCount = 0;
  urlList: (() => string)[];
  urlListProcessed: string[];
  clientRid = null;
  blobUrlEntry = null;
  abortSignal: (() => void) | null = null;

  constructor(method: string, url: string, headers: [string, string][]) {
    this.methodInner = method;
    this.headerListInner = headers;
    this.urlList = [() => url];
    this.urlListProcessed = [url];
  }
  get method(): string {
    return this.methodInner;
  }
  set method(value: string) {
    this.methodInner = value;
  }
  get headerList(): [string, string][] {
    return this.headerListInner;
  }
  set headerList(value: [string, string][]) {
    this.headerListInner = value;
  }
  url(): string {
    if (this.urlListProcessed[0] === undefined) this.urlListProcessed[0] = this.urlList[0]();
    return this.urlListProcessed[0];
  }
  currentUrl(): string {
    const i = this.urlList.length - 1;
    if (this.urlListProcessed[i] === undefined) this.urlListProcessed[i] = this.urlList[i]();
    return this.urlListProcessed[i];
  }
  onCancel(abort: () => void): void {
    this.abortSignal = abort;
  }
}

// The public path's requests (and those with a body) get a controller of their own, found again on cancel.
const controllers = new WeakMap<Request, AbortController>();

function bodiless(method: string, url: string, headers: [string, string][]): Request {
  // Constructed as Deno.serve constructs its requests: the brand alone, then the inner record. Its Headers
  // object and its signal are made only if the function asks for them.
  const req = new Request(BRAND as Any) as Any;
  req[REQUEST] = new InnerRequest(method, new URL(url).href, headers);
  req[HEADERS_GUARD] = "request";
  return req;
}

function withBody(
  url: string,
  method: string,
  headers: [string, string][],
  body: ReadableStream<Uint8Array>,
  signal: AbortSignal,
): Request {
  const req = new Request(url, { method, body, duplex: "half" } as Any);
  const list = (req.headers as Any)[HEADER_LIST] as [string, string][];
  for (const h of headers) list.push(h);
  (req as Any)[SIGNAL] = signal;
  return req;
}

function requestProbesPass(): boolean {
  if (![BRAND, REQUEST, HEADERS_GUARD, SIGNAL, HEADER_LIST].every((s) => typeof s === "symbol")) return false;
  try {
    const early = bodiless("POST", "http://x/p", [["a", "1"], ["b", "2"]]);
    const late = bodiless("GET", "http://x/q", []);
    const signal = early.signal;
    const clone = early.clone();
    cancelRequest(early);
    cancelRequest(late);
    const ctrl = new AbortController();
    const body = new ReadableStream<Uint8Array>();
    const posted = withBody("http://x/p", "POST", [["a", "1"]], body, ctrl.signal);
    ctrl.abort();
    return early.headers.get("b") === "2" && [...early.headers].length === 2 && early.method === "POST" &&
      early.url === "http://x/p" && early.body === null && signal.aborted && clone.signal.aborted &&
      late.signal.aborted && (late.signal.reason as DOMException).message === CANCELLED &&
      late.url === "http://x/q" && posted.headers.get("a") === "1" &&
      posted.signal === ctrl.signal && posted.body !== null;
  } catch {
    return false;
  }
}

// The reason Deno.serve gives a cancelled request's signal.
const CANCELLED = "The request has been cancelled.";

/** Abort the signal of a request `makeRequest` made (the daemon cancelled it: its client left). */
export function cancelRequest(req: Request): void {
  const r = req as Any;
  const inner = r[REQUEST];
  if (inner instanceof InnerRequest) {
    if (inner.abortSignal !== null) inner.abortSignal();
    else if (r[SIGNAL] === undefined) r[SIGNAL] = false; // made later, it is made aborted (Deno's getter)
    return;
  }
  controllers.get(req)?.abort(new DOMException(CANCELLED, "AbortError"));
}

const requestOn = requestProbesPass();

/** `new Request(url, { method, headers, body, duplex: "half" })` with a signal that `cancelRequest` aborts;
 * cheaper when the method and every header are ones the public path would store unchanged (see the module
 * comment). Takes ownership of `headers`' pairs. */
export function makeRequest(
  url: string,
  method: string,
  headers: [string, string][],
  body: ReadableStream<Uint8Array> | null,
): Request {
  if (requestOn) {
    let plain = true;
    for (const h of headers) {
      if (!NAME.test(h[0]) || !VALUE.test(h[1])) {
        plain = false;
        break;
      }
    }
    if (plain) {
      if (body === null && METHODS.has(method)) return bodiless(method, url, headers);
      if (body !== null) {
        const ctrl = new AbortController();
        const req = withBody(url, method, headers, body, ctrl.signal);
        controllers.set(req, ctrl);
        return req;
      }
    }
  }
  const ctrl = new AbortController();
  const req = new Request(url, { method, headers, body, signal: ctrl.signal, duplex: "half" } as Any);
  controllers.set(req, ctrl);
  return req;
}

/** Which shortcuts this Deno allows (both are expected on the Deno mbworker ships). */
export const fastPaths = { staticResponse: staticOn, request: requestOn };
