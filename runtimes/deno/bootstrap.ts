// mbworker Deno bootstrap: runs ONE user function inside a supervised `deno run` process and answers framed
// requests from the Python daemon on a unix socket of its own — never stdout: the function's stdout and stderr
// are its log streams. The wire format is documented in runtimes/deno/protocol.py (keep both in step): each
// frame is [u32 json_len][u32 body_len][json][body], big-endian.
//
// Order matters: the channel and the shims below (Deno.serve, EdgeRuntime, timers) are set up BEFORE the user's
// module is imported, so user code only ever sees the shimmed versions and never the channel.
//
// argv: Deno.args = [entry file URL, node socket path, comma-separated env names to hide from the function,
//                    frame channel (unix socket path)]

import { cancelRequest, makeRequest, wholeStaticResponse } from "./fastpath.ts";
import { FrameQueue } from "./frames.ts";
import { claimBridge, type Control as SocketControl, upgradeWebSocket } from "./websocket.ts";

type Handler = (req: Request, info: unknown) => Response | Promise<Response>;
type ErrorHandler = (err: unknown) => Response | Promise<Response>;

const [ENTRY_URL, NODE_SOCKET, HIDE_ENV, CHANNEL] = Deno.args;
const WINDOW = 16; // response chunks in flight per request before waiting for an ack (see protocol.py)
const COALESCE_MAX = 64 * 1024; // body bytes that may ride in the head frame
const NOT_YET = Symbol("not yet");
// Resolves after two microtask turns: a read of an already-filled stream settles within one (checked on 2.9).
const soon = async () => {
  await null;
  await null;
  return NOT_YET;
};

function concat(parts: Uint8Array[], len: number): Uint8Array | undefined {
  if (!parts.length) return undefined;
  const out = new Uint8Array(len);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

// Frames travel on a unix socket of their own (CHANNEL: the daemon listens on it, accepts exactly one connection,
// this one, then closes the listener). Connected before the user's module is imported, so its code can never reach
// the framing; the function's stdout and stderr are plain log streams. The permissions that connecting needed
// (read, write and net on that path) are revoked at once.
const channel = await Deno.connect({ transport: "unix", path: CHANNEL });
Deno.permissions.revokeSync({ name: "net", host: `unix:${CHANNEL}` });
Deno.permissions.revokeSync({ name: "read", path: CHANNEL });
Deno.permissions.revokeSync({ name: "write", path: CHANNEL });
const writeFrames = (p: Uint8Array) => channel.write(p);
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------- output frames
// Frames made while JavaScript runs go out together, in one write once it is done (a microtask).
const frames = new FrameQueue();
let flushing = false;

function queued(): void {
  if (!flushing) {
    flushing = true;
    queueMicrotask(flush);
  }
}

function frame(head: Record<string, unknown>, body?: Uint8Array): void {
  frames.push(JSON.stringify(head), body);
  queued();
}

// A WebSocket's frames (websocket.ts): heads it writes as JSON text itself.
function socketFrame(head: string, body?: Uint8Array): void {
  frames.push(head, body);
  queued();
}

// The `h` array of a response head as JSON; most responses have no header or one content-type, a few kinds each.
const typeHeads = new Map<string, string>();
function headersJson(h: [string, string][]): string {
  if (h.length === 0) return "[]";
  if (h.length !== 1 || h[0][0] !== "content-type") return JSON.stringify(h);
  let json = typeHeads.get(h[0][1]);
  if (json === undefined) {
    json = JSON.stringify(h);
    if (typeHeads.size < 64) typeHeads.set(h[0][1], json);
  }
  return json;
}

async function flush(): Promise<void> {
  try {
    while (frames.length) {
      const buf = frames.take();
      let off = 0;
      while (off < buf.byteLength) off += await writeFrames(buf.subarray(off));
      frames.release(buf);
    }
  } catch {
    // The daemon is gone (channel closed): nothing left to serve.
    Deno.exit(1);
  } finally {
    flushing = false;
  }
}

// ------------------------------------------------------------------------------------------ timers, errors
// Supabase's edge-runtime gives global setTimeout/setInterval numeric ids, and functions written for it check
// `typeof id === "number"` before clearing. Deno 2.9's globals are node:timers' (Timeout objects); their numeric
// id clears them too. node:timers itself stays Node's (reassigning the globals does not change its exports).
// The globals are lazy getters that load node:timers (3.5–6 ms at boot, docs/benchmarks.md): the getters are kept
// and called on the first timer, so a function that sets none never pays for that module.
{
  // deno-lint-ignore no-explicit-any
  type Timer = (cb: unknown, ms?: number, ...args: unknown[]) => any;
  const lazy = (name: "setTimeout" | "setInterval"): () => Timer => {
    const get = Object.getOwnPropertyDescriptor(globalThis, name)?.get;
    let fn: Timer | undefined = get ? undefined : (globalThis[name] as Timer);
    return () => (fn ??= get!.call(globalThis) as Timer);
  };
  const nodeSetTimeout = lazy("setTimeout");
  const nodeSetInterval = lazy("setInterval");
  // deno-lint-ignore no-explicit-any
  (globalThis as any).setTimeout = function setTimeout(cb: unknown, ms?: number, ...args: unknown[]): number {
    return Number(nodeSetTimeout()(cb, ms, ...args));
  };
  // deno-lint-ignore no-explicit-any
  (globalThis as any).setInterval = function setInterval(cb: unknown, ms?: number, ...args: unknown[]): number {
    return Number(nodeSetInterval()(cb, ms, ...args));
  };
}
// One request's stray callback (a timer writing to a stream its client left, a rejected promise nobody awaits)
// must not take the process, and every other request on it, down: it goes to the function's log instead.
globalThis.addEventListener("error", (ev) => {
  ev.preventDefault();
  console.error("Uncaught", (ev as ErrorEvent).error ?? (ev as ErrorEvent).message);
});
globalThis.addEventListener("unhandledrejection", (ev) => {
  ev.preventDefault();
  console.error("Uncaught (in promise)", ev.reason);
});

for (const name of (HIDE_ENV ?? "").split(",")) if (name) Deno.env.delete(name);

// ------------------------------------------------------------------------------------------ the user's server
let handler: Handler | null = null;
let onError: ErrorHandler | null = null;
let moduleLoaded = false;
let readySent = false;
let finishedResolve: () => void = () => {};
const finished = new Promise<void>((r) => (finishedResolve = r));

function register(h: Handler, err?: ErrorHandler): void {
  if (handler) return; // one function, one handler: later calls are ignored like extra listeners
  handler = h;
  onError = err ?? null;
  maybeReady();
}

function maybeReady(): void {
  if (handler && moduleLoaded && !readySent) {
    readySent = true;
    frame({ t: "r" });
  }
}

const fakeAddr = { transport: "tcp", hostname: "0.0.0.0", port: 8000 };

// Deno.serve(handler) | Deno.serve(opts, handler) | Deno.serve({handler, ...}): ports and hosts are ignored.
// deno-lint-ignore no-explicit-any
(Deno as any).serve = function serve(a: any, b?: any) {
  let opts: any = {};
  let h: Handler | undefined;
  if (typeof a === "function") h = a;
  else {
    opts = a ?? {};
    h = typeof b === "function" ? b : opts.handler;
  }
  if (typeof h !== "function") throw new TypeError("Deno.serve: a handler function is required");
  register(h, opts.onError);
  try {
    opts.onListen?.(fakeAddr);
  } catch (e) {
    console.error(e);
  }
  return {
    finished,
    addr: fakeAddr,
    shutdown: () => Promise.resolve(),
    ref() {},
    unref() {},
    [Symbol.asyncDispose]: () => Promise.resolve(),
  };
};

// Deno.upgradeWebSocket(req, { protocol }): a socket whose other end is the daemon (websocket.ts).
// deno-lint-ignore no-explicit-any
(Deno as any).upgradeWebSocket = upgradeWebSocket;
// Claimed now, before the function's module loads: its code can import websocket.ts too, and gets no bridge.
const sockets = claimBridge();

// EdgeRuntime.waitUntil keeps the process alive until the promise settles (the daemon waits for these on a
// planned shutdown, within its grace period).
const pending = new Set<Promise<unknown>>();
// deno-lint-ignore no-explicit-any
(globalThis as any).EdgeRuntime = {
  waitUntil(p: Promise<unknown>) {
    const q = Promise.resolve(p).catch((e) => console.error("waitUntil promise rejected:", e));
    pending.add(q);
    q.finally(() => pending.delete(q));
    return p;
  },
};

// ------------------------------------------------------------------------------------------ requests
type Req = {
  ctrl: ReadableStreamDefaultController<Uint8Array> | null;
  request: Request | null;
  reader: ReadableStreamDefaultReader<Uint8Array> | null;
  credit: number;
  wake: (() => void) | null;
  done: boolean;
  ws: SocketControl | null;
};
const reqs = new Map<number, Req>();

function errorText(e: unknown): string {
  if (e instanceof Error) return e.stack ?? `${e.name}: ${e.message}`;
  return String(e);
}

async function serveRequest(id: number, head: any): Promise<void> {
  const state: Req = {
    ctrl: null,
    request: null,
    reader: null,
    credit: WINDOW,
    wake: null,
    done: false,
    ws: null,
  };
  reqs.set(id, state);
  const hasBody = !head.e && head.m !== "GET" && head.m !== "HEAD";
  let body: ReadableStream<Uint8Array> | null = null;
  if (hasBody) {
    body = new ReadableStream<Uint8Array>({ start: (c) => void (state.ctrl = c) });
  }
  let done: () => void = () => {};
  const completed = new Promise<void>((r) => (done = r));
  try {
    const request = state.request = makeRequest(head.u, head.m, head.h, body);
    if (head.w) sockets.allowUpgrade(request, id, socketFrame);
    let res: Response;
    try {
      const r = handler!(request, { remoteAddr: fakeAddr, completed });
      res = r instanceof Response ? r : await r; // a Response as it is: no turn through the microtask queue
    } catch (e) {
      if (!onError) throw e;
      console.error(e);
      res = await onError(e);
    }
    if (!(res instanceof Response)) {
      frame({ t: "f", i: id, k: "invalid", m: "handler did not return a Response" });
      return;
    }
    const ws = head.w ? sockets.upgraded(res) : undefined;
    if (ws !== undefined && ws.id === id) {
      // The upgrade: the daemon answers the client's handshake (101) and then sends `wo`. The request lasts as
      // long as the socket is open.
      state.ws = ws;
      const out: Record<string, unknown> = { t: "h", i: id, s: 101, h: [] };
      if (ws.protocol) out.p = ws.protocol;
      frame(out);
      await ws.closed;
      return;
    }
    if (res.status < 200 || res.status > 599) {
      frame({ t: "f", i: id, k: "invalid", m: `invalid response status ${res.status}` });
      return;
    }
    // A string or bytes body: no Headers, stream or reader (fastpath.ts); the same head frame as below.
    const whole = wholeStaticResponse(res, COALESCE_MAX);
    if (whole !== null) {
      frames.push(`{"t":"h","i":${id},"s":${whole.status},"h":${headersJson(whole.headers)},"e":1}`, whole.body);
      queued();
      return;
    }
    const headers: [string, string][] = [];
    for (const kv of res.headers) headers.push(kv);
    // Coalesce: whatever body is already available (a static body, a stream whose chunks are queued) goes in the
    // head frame, with e=1 if that was all of it. A stream that is not ready yet (SSE) gets its head at once.
    const reader = res.body?.getReader();
    let next = reader?.read();
    const first: Uint8Array[] = [];
    let firstLen = 0;
    let ended = !reader;
    while (next && firstLen < COALESCE_MAX) {
      const r = await Promise.race([next, soon()]);
      if (r === NOT_YET) break;
      const { value, done: end } = r as ReadableStreamReadResult<Uint8Array>;
      if (end) {
        ended = true;
        next = undefined;
        break;
      }
      if (value && value.byteLength) {
        first.push(value);
        firstLen += value.byteLength;
      }
      next = reader!.read();
    }
    const out: Record<string, unknown> = { t: "h", i: id, s: res.status, h: headers };
    if (ended) out.e = 1;
    frame(out, first.length === 1 ? first[0] : concat(first, firstLen));
    if (reader && !ended) {
      state.reader = reader; // cancelled with the request
      while (true) {
        const { value, done: end } = await (next ?? reader.read());
        next = undefined;
        if (end || state.done) break;
        if (!value || value.byteLength === 0) continue;
        while (state.credit <= 0 && !state.done) await new Promise<void>((r) => (state.wake = r));
        if (state.done) break;
        state.credit--;
        frame({ t: "b", i: id }, value);
      }
      if (!state.done) frame({ t: "e", i: id });
    }
  } catch (e) {
    if (state.done) return; // cancelled by the daemon: nobody is listening
    console.error(e);
    frame({ t: "f", i: id, k: "error", m: errorText(e) });
  } finally {
    reqs.delete(id);
    done();
  }
}

function onFrame(head: any, body: Uint8Array): void {
  switch (head.t) {
    case "q":
      if (!handler) {
        frame({ t: "f", i: head.i, k: "error", m: "no handler registered" });
        return;
      }
      void serveRequest(head.i, head);
      return;
    case "b": {
      const r = reqs.get(head.i);
      // copy: `body` is a view into the read buffer, which is reused
      if (r?.ctrl) r.ctrl.enqueue(body.slice());
      return;
    }
    case "e": {
      const r = reqs.get(head.i);
      if (r?.ctrl) {
        try {
          r.ctrl.close();
        } catch {
          /* already closed or errored */
        }
      }
      return;
    }
    case "a": {
      const r = reqs.get(head.i);
      if (r) {
        r.credit += head.n;
        const w = r.wake;
        r.wake = null;
        w?.();
      }
      return;
    }
    case "wm":
      reqs.get(head.i)?.ws?.message(body, head.b === 1);
      return;
    case "wa":
      reqs.get(head.i)?.ws?.acked(head.n);
      return;
    case "wo":
      reqs.get(head.i)?.ws?.opened(head.m, head.q, head.w);
      return;
    case "wc":
      reqs.get(head.i)?.ws?.ended(head.c, head.r ?? "");
      return;
    case "c": {
      const r = reqs.get(head.i);
      if (r) {
        r.ws?.ended(1006, "");
        r.done = true;
        reqs.delete(head.i); // nobody waits for it any more, not even a planned shutdown
        try {
          r.ctrl?.error(new DOMException("request cancelled", "AbortError"));
        } catch {
          /* closed */
        }
        if (r.request !== null) cancelRequest(r.request);
        r.reader?.cancel().catch(() => {});
        const w = r.wake;
        r.wake = null;
        w?.();
      }
      return;
    }
    case "s":
      void shutdown(head.r ?? "shutdown");
      return;
  }
}

let shuttingDown = false;
async function shutdown(reason: string): Promise<void> {
  if (shuttingDown) return;
  shuttingDown = true;
  try {
    globalThis.dispatchEvent(new CustomEvent("beforeunload", { detail: { reason } }));
  } catch (e) {
    console.error(e);
  }
  for (const r of reqs.values()) r.ws?.goingAway(); // the daemon closes their clients (1001), then `wc`
  // In-flight requests and waitUntil promises finish (the daemon kills us after its grace period).
  // A timer each turn, never only settled promises: with no waitUntil pending, `allSettled([])` is already
  // resolved, and racing it alone would spin in microtasks, starving the I/O those requests wait for.
  while (reqs.size || pending.size) {
    const tick = new Promise((r) => setTimeout(r, 20));
    await (pending.size ? Promise.race([Promise.allSettled([...pending]), tick]) : tick);
  }
  finishedResolve();
  await flushAndExit(0);
}

async function flushAndExit(code: number): Promise<never> {
  while (flushing || frames.length) await new Promise((r) => setTimeout(r, 1));
  Deno.exit(code);
}

async function readLoop(): Promise<void> {
  const chunk = new Uint8Array(256 * 1024);
  let rest: Uint8Array | null = null; // an incomplete frame left from the previous read (copied)
  while (true) {
    const n = await channel.read(chunk);
    if (n === null) break; // daemon closed the channel: we are done
    let buf: Uint8Array;
    if (rest) {
      buf = new Uint8Array(rest.byteLength + n);
      buf.set(rest, 0);
      buf.set(chunk.subarray(0, n), rest.byteLength);
    } else {
      buf = chunk.subarray(0, n); // parsed in place: onFrame copies what it keeps
    }
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    let start = 0;
    while (buf.byteLength - start >= 8) {
      const jlen = dv.getUint32(start);
      const blen = dv.getUint32(start + 4);
      const end = start + 8 + jlen + blen;
      if (end > buf.byteLength) break;
      const head = JSON.parse(decoder.decode(buf.subarray(start + 8, start + 8 + jlen)));
      onFrame(head, buf.subarray(start + 8 + jlen, end));
      start = end;
    }
    rest = start < buf.byteLength ? buf.slice(start) : null;
  }
  await shutdown("channel closed");
}

// ------------------------------------------------------------------------------------------ boot
// Let node:http / Express `listen()` work: the daemon sets DENO_SERVE_ADDRESS=unix:<NODE_SOCKET>, which Deno's
// node:http honours; if the module started no Deno.serve and exported no fetch, wait for that socket and proxy.
// A function that registers nothing at all within NO_HANDLER_MS of loading is reported as a boot error then,
// not at the boot timeout.
const NO_HANDLER_MS = 1500;
async function nodeServerFallback(): Promise<void> {
  const giveUp = Date.now() + NO_HANDLER_MS;
  for (let i = 0; !handler; i++) {
    try {
      const st = await Deno.stat(NODE_SOCKET);
      if (st.isSocket) break;
    } catch {
      /* not yet */
    }
    if (Date.now() > giveUp) {
      const m = "no handler registered: call Deno.serve(handler), export default { fetch }, or listen() a node:http server";
      frame({ t: "x", k: "no_handler", m });
      console.error(`mbworker: ${m}`);
      await flushAndExit(1);
    }
    await new Promise((r) => setTimeout(r, Math.min(50, 2 + i)));
  }
  if (handler) return;
  // deno-lint-ignore no-explicit-any
  const client = (Deno as any).createHttpClient({ proxy: { transport: "unix", path: NODE_SOCKET } });
  register((req: Request) => {
    const u = new URL(req.url);
    // The host is never resolved (the client goes to the unix socket), but Deno still checks net permission on
    // it: `localhost` is denied to functions, this reserved name is allowed (runtimes/deno/permissions.py).
    // deno-lint-ignore no-explicit-any
    return fetch(new Request(`http://mbworker-node.invalid${u.pathname}${u.search}`, req), { client } as any);
  });
}

readLoop().catch((e) => {
  console.error("mbworker bootstrap: frame reader failed:", e);
  Deno.exit(70);
});

try {
  const mod = await import(ENTRY_URL);
  moduleLoaded = true;
  const def = mod?.default;
  if (!handler && def && typeof def.fetch === "function") register((req, info) => def.fetch(req, info));
  maybeReady();
  if (!handler) void nodeServerFallback();
} catch (e) {
  frame({ t: "x", m: errorText(e) });
  console.error(errorText(e));
  await flushAndExit(1);
}
