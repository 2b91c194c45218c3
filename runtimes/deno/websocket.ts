// `Deno.upgradeWebSocket` for functions (bootstrap.ts installs it): the function's end of a WebSocket whose other
// end is the daemon (worker/function_sockets.py speaks WebSocket to the client; the frames between us are in
// runtimes/deno/protocol.py: `wo` open, `wm` message, `wa` ack, `wc` close).
//
// The socket behaves like the one Deno gives a server: readyState and its constants, on*/addEventListener,
// send(string | ArrayBuffer | ArrayBufferView | Blob), close(code?, reason?), protocol, bufferedAmount, and
// binaryType "arraybuffer" by default (Deno's default for server sockets; "blob" is the browsers').
//
// Bounds: at most WINDOW messages to the client are unacknowledged, and at most `window` bytes of them (or one
// larger message); the daemon acks as the client's connection takes them. What the function sends beyond that
// waits here, up to `maxBuffered` bytes, past which the socket is
// closed with 1011 (the client does not keep up). A message over `maxMessage` bytes closes it with 1009.
//
// Who owns what: the bootstrap owns the sockets (one per upgraded request, found by request id) and feeds them
// the daemon's frames; each socket writes its frames through the `Out` it was given.

export const WINDOW = 16; // messages in flight per socket and direction before waiting for an ack (protocol.py)
const ACK_EVERY = WINDOW / 2;
const CONNECTING = 0, OPEN = 1, CLOSING = 2, CLOSED = 3;
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const dispatch = EventTarget.prototype.dispatchEvent;

/** Queue one frame: `head` is its JSON text, `body` its raw part. */
export type Out = (head: string, body?: Uint8Array) => void;

type Pending = { bytes: Uint8Array | Promise<Uint8Array>; text: boolean; size: number } | {
  close: [number, string];
};

// The bootstrap's end of each socket (`Bridge`) is reachable only through `claimBridge`, which answers once: the
// bootstrap claims it before the function's module loads. User code can import this module again by its URL (the
// module map hands back the same instance), so nothing it exports may lead to a socket's internals; the socket it
// gets has only WebSocket's public surface (its state lives in a `SocketCore` it cannot name).

/** The bootstrap's end of one socket: the daemon's frames go in here; the function never sees it. */
export type Control = {
  readonly id: number;
  readonly protocol: string;
  /** Settles once the socket is closed (the upgraded request is over). */
  readonly closed: Promise<void>;
  /** `wo`: the client's handshake completed (`window`: bytes toward it unacknowledged beyond one message). */
  opened(maxMessage: number, maxBuffered: number, window?: number): void;
  /** `wm`: a message from the client (`body` is a view into the read buffer: copied). */
  message(body: Uint8Array, binary: boolean): void;
  /** `wa`: the daemon passed `n` of the function's messages to the client. */
  acked(n: number): void;
  /** `wc` (or the request cancelled: 1006): the connection is closed, with the code and reason it ended with. */
  ended(code: number, reason: string): void;
  /** The process is stopping (deploy, retire, shutdown): the client is told 1001. */
  goingAway(): void;
};

export type Bridge = {
  /** The daemon sent this request as a WebSocket upgrade (`q` with `w`): it may be upgraded, once. */
  allowUpgrade(req: Request, id: number, out: Out): void;
  /** The socket whose `response` the handler returned, if it did. */
  upgraded(res: Response): Control | undefined;
};

const markers = new WeakMap<Response, SocketCore>();
const upgradable = new WeakMap<Request, { id: number; out: Out; upgraded: boolean }>();
const NEW = Symbol("new socket"); // only this module constructs sockets
let claimed = false;

/** The bootstrap's handle on the sockets: the first call only (made before the function's module is imported). */
export function claimBridge(): Bridge {
  if (claimed) throw new TypeError("the WebSocket bridge is the bootstrap's");
  claimed = true;
  return {
    allowUpgrade(req, id, out) {
      upgradable.set(req, { id, out, upgraded: false });
    },
    upgraded: (res) => markers.get(res),
  };
}

function hasToken(value: string | null, token: string): boolean {
  return value !== null && value.split(",").some((t) => t.trim().toLowerCase() === token);
}

/** Deno.upgradeWebSocket(req, { protocol? }): the same checks and messages as Deno's. */
export function upgradeWebSocket(
  req: Request,
  options: { protocol?: string; idleTimeout?: number } = {},
): { socket: WebSocket; response: Response } {
  if (!hasToken(req.headers.get("upgrade"), "websocket")) {
    throw new TypeError("Invalid Header: 'upgrade' header must contain 'websocket'");
  }
  if (!hasToken(req.headers.get("connection"), "upgrade")) {
    throw new TypeError("Invalid Header: 'connection' header must contain 'Upgrade'");
  }
  if (!req.headers.get("sec-websocket-key")) {
    throw new TypeError("Invalid Header: 'sec-websocket-key' header must be set");
  }
  const entry = upgradable.get(req);
  if (entry === undefined) throw new TypeError("Deno.upgradeWebSocket: the request did not come from Deno.serve");
  if (entry.upgraded) throw new TypeError("Deno.upgradeWebSocket: the request was already upgraded");
  entry.upgraded = true;
  const protocol = options.protocol ?? "";
  const core = new SocketCore(entry.id, protocol, entry.out);
  const headers: [string, string][] = [["connection", "Upgrade"], ["upgrade", "websocket"]];
  if (protocol) headers.push(["sec-websocket-protocol", protocol]);
  let response: Response;
  try {
    response = new Response(null, { status: 101, headers });
  } catch {
    // A Deno that refuses a 101 Response: a 200 that says 101 to code that looks (the marker is what counts).
    response = new Response(null, { status: 200, headers });
    Object.defineProperty(response, "status", { value: 101 });
  }
  markers.set(response, core);
  // Typed as Deno's WebSocket: what the function may use of it is what that type declares.
  return { socket: core.socket as unknown as WebSocket, response };
}

type Handler = ((ev: Event) => unknown) | null;

/** A socket's state and its bridge to the daemon (the `Control` the bootstrap holds); `socket` is the function's
 * view of it. Not exported, and not reachable from the socket. */
class SocketCore implements Control {
  readonly socket: ServerWebSocket;
  readonly id: number;
  readonly protocol: string;
  readonly closed: Promise<void>;
  state = CONNECTING;
  binaryType: BinaryType = "arraybuffer";
  buffered = 0;
  handlers: Record<string, Handler> = { open: null, message: null, close: null, error: null };
  #out: Out;
  #queue: Pending[] = [];
  #credit = WINDOW;
  #window = Infinity; // bytes that may be unacknowledged beyond one message (`wo`'s `w`)
  #inFlight: number[] = []; // the sizes of our unacknowledged messages, oldest first
  #inFlightBytes = 0;
  #unackedIn = 0;
  #maxMessage = Infinity;
  #maxBuffered = Infinity;
  #pumping = false;
  #weClosed = false;
  #resolveClosed: () => void = () => {};

  constructor(id: number, protocol: string, out: Out) {
    this.id = id;
    this.protocol = protocol;
    this.#out = out;
    this.closed = new Promise((r) => (this.#resolveClosed = r));
    this.socket = new ServerWebSocket(NEW, this);
  }

  #dispatch(ev: Event): void {
    dispatch.call(this.socket, ev); // EventTarget's own: a `dispatchEvent` the function set on its socket is not ours
  }

  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void {
    if (this.state === CONNECTING) throw new DOMException("'readyState' not OPEN", "InvalidStateError");
    if (this.state !== OPEN) return; // as Deno: no error once closing, the data goes nowhere
    let entry: Pending;
    if (typeof data === "string") {
      const bytes = encoder.encode(data);
      entry = { bytes, text: true, size: bytes.byteLength };
    } else if (data instanceof Blob) {
      entry = { bytes: data.arrayBuffer().then((b) => new Uint8Array(b)), text: false, size: data.size };
    } else if (ArrayBuffer.isView(data)) {
      // A copy: the function may reuse its buffer as soon as send returns.
      const bytes = new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
      entry = { bytes, text: false, size: bytes.byteLength };
    } else if (data instanceof ArrayBuffer || data instanceof SharedArrayBuffer) {
      const bytes = new Uint8Array(data.slice(0));
      entry = { bytes, text: false, size: bytes.byteLength };
    } else {
      const bytes = encoder.encode(String(data));
      entry = { bytes, text: true, size: bytes.byteLength };
    }
    if (entry.size > this.#maxMessage) {
      this.#fail(1009, `message of ${entry.size} bytes is over the ${this.#maxMessage} byte limit`, false);
      return;
    }
    if (this.buffered + entry.size > this.#maxBuffered) {
      this.#fail(1011, "the client is not keeping up (send buffer full)", true);
      return;
    }
    this.buffered += entry.size;
    this.#queue.push(entry);
    void this.#pump();
  }

  close(code?: number, reason?: string): void {
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(
        `The close code must be either 1000 or in the range of 3000 to 4999. Received ${code}`,
        "InvalidAccessError",
      );
    }
    const why = reason ?? "";
    if (encoder.encode(why).byteLength > 123) {
      throw new DOMException("The close reason may not be longer than 123 bytes", "SyntaxError");
    }
    if (this.state === CLOSING || this.state === CLOSED) return;
    this.#startClose(code ?? 1000, why, false);
  }

  // ------------------------------------------------------------------------------------ from the daemon

  opened(maxMessage: number, maxBuffered: number, window?: number): void {
    this.#window = window ?? Infinity;
    this.#maxMessage = maxMessage;
    this.#maxBuffered = maxBuffered;
    if (this.state === CONNECTING) {
      this.state = OPEN;
      this.#dispatch(new Event("open"));
    }
    void this.#pump();
  }

  message(body: Uint8Array, binary: boolean): void {
    if (++this.#unackedIn >= ACK_EVERY) {
      this.#out(`{"t":"wa","i":${this.id},"n":${this.#unackedIn}}`);
      this.#unackedIn = 0;
    }
    if (this.state !== OPEN) return;
    let data: string | ArrayBuffer | Blob;
    if (!binary) data = decoder.decode(body);
    else if (this.binaryType === "arraybuffer") data = body.slice().buffer;
    else data = new Blob([body.slice()]);
    this.#dispatch(new MessageEvent("message", { data }));
  }

  acked(n: number): void {
    this.#credit += n;
    for (let i = 0; i < n && this.#inFlight.length; i++) this.#inFlightBytes -= this.#inFlight.shift()!;
    void this.#pump();
  }

  ended(code: number, reason: string): void {
    if (this.state === CLOSED) return;
    const wasClean = code !== 1006;
    if (!this.#weClosed && (code === 1006 || code === 1011)) {
      this.#dispatch(new ErrorEvent("error", { message: reason || "WebSocket connection closed abnormally" }));
    }
    this.state = CLOSED;
    this.#queue = [];
    this.buffered = 0;
    this.#dispatch(new CloseEvent("close", { code, reason, wasClean }));
    this.#resolveClosed();
  }

  goingAway(): void {
    if (this.state === CONNECTING || this.state === OPEN) this.#startClose(1001, "the function is shutting down", true);
  }

  // ------------------------------------------------------------------------------------ internals

  #fail(code: number, reason: string, drop: boolean): void {
    this.#dispatch(new ErrorEvent("error", { message: reason }));
    if (this.state === OPEN) this.#startClose(code, reason, drop);
  }

  #startClose(code: number, reason: string, drop: boolean): void {
    this.#weClosed = true;
    this.state = CLOSING;
    if (drop) {
      this.#queue = [];
      this.buffered = 0;
    }
    this.#queue.push({ close: [code, reason] });
    void this.#pump();
  }

  async #pump(): Promise<void> {
    if (this.#pumping || this.#maxMessage === Infinity) return; // not open yet: `opened` pumps
    this.#pumping = true;
    try {
      while (this.#queue.length && this.state !== CLOSED) {
        const next = this.#queue[0];
        if ("close" in next) {
          this.#queue.shift();
          const [code, reason] = next.close;
          this.#out(JSON.stringify({ t: "wc", i: this.id, c: code, r: reason }));
          return;
        }
        if (this.#credit <= 0) return; // `acked` pumps again
        if (this.#inFlightBytes > 0 && this.#inFlightBytes + next.size > this.#window) return; // so does this
        let bytes: Uint8Array | null;
        try {
          bytes = next.bytes instanceof Promise ? await next.bytes : next.bytes;
        } catch {
          bytes = null; // a Blob that cannot be read (a subclass whose `size` lies): it would wedge the queue
        }
        if (this.#queue[0] !== next) continue; // dropped while the Blob was read
        this.#queue.shift();
        this.buffered -= next.size;
        if (bytes === null || bytes.byteLength > this.#maxMessage) {
          if (bytes === null) this.#fail(1011, "the Blob could not be read", true);
          else this.#fail(1009, `message of ${bytes.byteLength} bytes is over the ${this.#maxMessage} byte limit`, false);
          continue; // to the close `#fail` queued
        }
        this.#credit--;
        this.#inFlight.push(bytes.byteLength); // what the daemon counts (a Blob may not be the size it said)
        this.#inFlightBytes += bytes.byteLength;
        this.#out(next.text ? `{"t":"wm","i":${this.id}}` : `{"t":"wm","i":${this.id},"b":1}`, bytes);
      }
    } finally {
      this.#pumping = false;
    }
  }
}

/** The function's socket: Deno's WebSocket surface (readyState and its constants, on* and the EventTarget methods,
 * send, close, binaryType, bufferedAmount, protocol, extensions, url) and nothing else; its state is its core's. */
class ServerWebSocket extends EventTarget {
  static readonly CONNECTING = CONNECTING;
  static readonly OPEN = OPEN;
  static readonly CLOSING = CLOSING;
  static readonly CLOSED = CLOSED;
  declare readonly CONNECTING: 0;
  declare readonly OPEN: 1;
  declare readonly CLOSING: 2;
  declare readonly CLOSED: 3;
  #core: SocketCore;

  constructor(token: symbol, core: SocketCore) {
    if (token !== NEW) throw new TypeError("Illegal constructor");
    super();
    this.#core = core;
    for (const type of Object.keys(core.handlers)) {
      this.addEventListener(type, (ev) => core.handlers[type]?.call(this, ev));
    }
  }

  get readyState(): number {
    return this.#core.state;
  }
  get protocol(): string {
    return this.#core.protocol;
  }
  get extensions(): string {
    return "";
  }
  get url(): string {
    return "";
  }
  get bufferedAmount(): number {
    return this.#core.buffered;
  }
  get binaryType(): BinaryType {
    return this.#core.binaryType;
  }
  set binaryType(v: BinaryType) {
    if (v === "blob" || v === "arraybuffer") this.#core.binaryType = v;
  }
  get onopen(): Handler {
    return this.#core.handlers.open;
  }
  set onopen(h: Handler) {
    this.#core.handlers.open = typeof h === "function" ? h : null;
  }
  get onmessage(): Handler {
    return this.#core.handlers.message;
  }
  set onmessage(h: Handler) {
    this.#core.handlers.message = typeof h === "function" ? h : null;
  }
  get onclose(): Handler {
    return this.#core.handlers.close;
  }
  set onclose(h: Handler) {
    this.#core.handlers.close = typeof h === "function" ? h : null;
  }
  get onerror(): Handler {
    return this.#core.handlers.error;
  }
  set onerror(h: Handler) {
    this.#core.handlers.error = typeof h === "function" ? h : null;
  }

  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void {
    this.#core.send(data);
  }

  close(code?: number, reason?: string): void {
    this.#core.close(code, reason);
  }

  get [Symbol.toStringTag](): string {
    return "WebSocket";
  }
}

// The constants on the prototype, as WebIDL puts them (read-only, not own properties of each socket).
for (const [name, value] of [["CONNECTING", CONNECTING], ["OPEN", OPEN], ["CLOSING", CLOSING], ["CLOSED", CLOSED]]) {
  Object.defineProperty(ServerWebSocket.prototype, name, { value, enumerable: true });
}
