"""`Deno.upgradeWebSocket` in functions, through `mbworker serve` with the websockets client: Supabase's docs example
as written, binary messages, subprotocols, closes both ways, the message cap, a function killed mid-connection,
the JWT gate, a redeploy and the daemon's shutdown."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import httpx
import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.daemon.fixtures import write_function
from tests.daemon.test_ops_e2e import _sample
from tests.worker_process import RunningWorker

# Supabase's docs example, unmodified (docs: guides/functions/websockets).
DOCS_EXAMPLE = """
Deno.serve((req) => {
  const upgrade = req.headers.get("upgrade") || "";
  if (upgrade.toLowerCase() != "websocket") {
    return new Response("request isn't trying to upgrade to websocket.", { status: 400 });
  }
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onopen = () => console.log("socket opened");
  socket.onmessage = (e) => {
    console.log("socket message:", e.data);
    socket.send(new Date().toString());
  };
  socket.onerror = (e) => console.log("socket errored:", e.message);
  socket.onclose = () => console.log("socket closed");
  return response;
});
"""

TRICKS = """
Deno.serve((req) => {
  if (!req.headers.get("upgrade")) {
    try {
      Deno.upgradeWebSocket(req);
      return new Response("upgraded a plain request", { status: 500 });
    } catch (e) {
      return new Response(`${e.name}: ${e.message}`, { status: 400 });
    }
  }
  if (new URL(req.url).searchParams.has("refuse")) return new Response("no socket for you", { status: 403 });
  const offered = (req.headers.get("sec-websocket-protocol") || "").split(",").map((p) => p.trim());
  const protocol = offered.includes("chat.v2") ? "chat.v2" : undefined;
  const { socket, response } = Deno.upgradeWebSocket(req, { protocol });
  let count = 0;
  if (response.status !== 101) throw new Error("the upgrade response says " + response.status);
  socket.addEventListener("open", () => {
    socket.send(`open ${socket.readyState} ${socket.binaryType} ${socket.protocol}`);
  });
  socket.onmessage = (e) => {
    const d = e.data;
    if (d instanceof ArrayBuffer) socket.send(new Uint8Array(d).reverse());
    else if (d === "blob") socket.send(new Blob(["from a blob"]));
    else if (d === "close me") socket.close(4001, "bye now");
    else if (d === "too big") socket.send("x".repeat(5000));
    else if (d === "spin") { while (true) {} }
    else if (d === "count?") socket.send(`count ${count}`);
    else if (d === "flood") for (let i = 0; i < 100; i++) socket.send("z".repeat(900));
    else if (d.startsWith("n ")) count++;
    else socket.send(`echo ${d}`);
  };
  socket.onclose = (e) => console.log(`tricks closed ${e.code} ${e.wasClean}`);
  return response;
});
"""
TRICKS_TOML = "[limits]\ncpu_time_ms = 1000\nmax_message_bytes = 1000\nmax_processes = 1\n"

DATE = re.compile(r"^\w{3} \w{3} \d{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def ws_url(worker: RunningWorker, path: str) -> str:
    return worker.public_url.replace("http", "ws", 1) + path


async def closed_with(ws: ClientConnection, got: list[str | bytes] | None = None) -> tuple[int, str]:
    """Read until the server closes (the messages into `got`); its close code and reason."""
    with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
        await _read_forever(ws, [] if got is None else got)
    assert closed.value.rcvd is not None, closed.value
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def _read_forever(ws: ClientConnection, got: list[str | bytes]) -> None:
    while True:
        got.append(await ws.recv())


async def test_function_websockets(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    await worker.deploy(write_function(tmp_path, "echo", DOCS_EXAMPLE), "--no-verify-jwt")
    await worker.deploy(write_function(tmp_path, "tricks", TRICKS, toml=TRICKS_TOML))

    # The docs example: a plain GET is its 400, as plain HTTP.
    r = await http.get(f"{worker.public_url}/functions/v1/echo")
    assert r.status_code == 400
    assert r.text == "request isn't trying to upgrade to websocket."

    # ... and a WebSocket gets a timestamp for each message; the function sees open, messages and the close.
    async with connect(ws_url(worker, "/functions/v1/echo/sub/path?x=1")) as ws:
        await worker.wait_for_output("socket opened")
        for i in range(3):
            await ws.send(f"hello {i}")
            with trio.fail_after(20):
                assert DATE.match(str(await ws.recv()))
            await worker.wait_for_output(f"socket message: hello {i}")
    await worker.wait_for_output("socket closed")  # the client closed: the function's onclose ran

    # An upgrade websockets refuses (not a GET): its status with the reason, before any function code.
    host, port = worker.public_url.removeprefix("http://").split(":")
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"POST /functions/v1/echo HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer
    assert b"Invalid WebSocket upgrade: unsupported HTTP method: POST" in answer
    assert answer.lower().count(b"\r\ndate: ") == 1
    assert b"\r\nallow: GET\r\n" in answer

    # The JWT gate runs before any function code: no token, 401 and no socket.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(worker, "/functions/v1/tricks")):
            pass
    assert refused.value.response.status_code == 401
    assert b"UNAUTHORIZED_NO_AUTH_HEADER" in refused.value.response.body

    auth = worker.auth()
    url = ws_url(worker, "/functions/v1/tricks")
    # Deno.upgradeWebSocket on a request that is not an upgrade throws as Deno's does.
    r = await http.get(f"{worker.public_url}/functions/v1/tricks", headers=auth)
    assert (r.status_code, r.text) == (400, "TypeError: Invalid Header: 'upgrade' header must contain 'websocket'")

    # An upgrade the function answers with a plain Response: that response, as plain HTTP.
    with pytest.raises(InvalidStatus) as answered:
        async with connect(url + "?refuse", additional_headers=auth):
            pass
    assert (answered.value.response.status_code, answered.value.response.body) == (403, b"no socket for you")

    # A client that just leaves (no close frame): the function's socket closes with 1006.
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(host, int(port))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        await stream.send_all(
            f"GET /functions/v1/tricks HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: {auth['authorization']}\r\n\r\n".encode()
        )
        head = b""
        while b"open 1" not in head:  # the 101, then the function's first message
            head += await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455's example key
        assert head.lower().count(b"\r\ndate: ") == 1
        await stream.aclose()
    await worker.wait_for_output("tricks closed 1006 false")

    chat = [Subprotocol("chat.v1"), Subprotocol("chat.v2")]
    async with connect(url, additional_headers=auth, subprotocols=chat) as ws:
        assert ws.subprotocol == "chat.v2"
        with trio.fail_after(20):
            assert await ws.recv() == "open 1 arraybuffer chat.v2"  # `open` fired after the handshake
            await ws.send("text")
            assert await ws.recv() == "echo text"
            await ws.send(bytes(range(200)))  # binary round trip (the function reverses it)
            assert await ws.recv() == bytes(reversed(range(200)))
            await ws.send("blob")
            assert await ws.recv() == b"from a blob"
        await ws.send("close me")  # the function closes: the client gets its code and reason
        assert await closed_with(ws) == (4001, "bye now")
    await worker.wait_for_output("tricks closed 4001 true")

    async with connect(url, additional_headers=auth) as ws:
        assert ws.subprotocol is None
        with trio.fail_after(20):
            assert await ws.recv() == "open 1 arraybuffer "
        await ws.send("y" * 2000)  # over max_message_bytes from the client: 1009
        assert (await closed_with(ws))[0] == 1009
    await worker.wait_for_output("tricks closed 1009")

    async with connect(url, additional_headers=auth) as ws:
        with trio.fail_after(20):
            await ws.recv()
        await ws.send("too big")  # over max_message_bytes from the function: 1009 too
        assert (await closed_with(ws))[0] == 1009

    # Many client messages at once pass through the windows in order and all arrive.
    async with connect(url, additional_headers=auth) as ws:
        with trio.fail_after(60):
            await ws.recv()
            for i in range(500):
                await ws.send(f"n {i}")
            await ws.send("count?")
            assert await ws.recv() == "count 500"

    # A function that sends more than its client takes, beyond what it may have waiting (16 × 1000 bytes here):
    # its socket closes with 1011, after the messages that fit.
    async with connect(url, additional_headers=auth) as ws:
        with trio.fail_after(20):
            await ws.recv()
        await ws.send("flood")
        got: list[str | bytes] = []
        assert (await closed_with(ws, got))[0] == 1011
        assert 0 < len(got) < 100
        assert set(got) == {"z" * 900}

    # A function that spins on a message is killed at its CPU limit: its client gets 1011, and other functions
    # (and the same function, on a new process) keep serving.
    async with connect(url, additional_headers=auth) as ws, connect(url, additional_headers=auth) as bystander:
        with trio.fail_after(20):
            await ws.recv()
            await bystander.recv()
        await ws.send("spin")
        assert (await closed_with(ws))[0] == 1011
        assert (await closed_with(bystander))[0] == 1011  # the same process: gone with it
    async with connect(ws_url(worker, "/functions/v1/echo")) as ws:
        await ws.send("still here")
        with trio.fail_after(20):
            assert DATE.match(str(await ws.recv()))
    async with connect(url, additional_headers=auth) as ws:
        with trio.fail_after(30):
            assert await ws.recv() == "open 1 arraybuffer "

    admin = {"authorization": f"Bearer {worker.admin_token}"}
    metrics = (await http.get(f"{worker.admin_url}/metrics", headers=admin)).text
    # Each connection is one request, counted with its status (101) once it ends; the 401 too.
    assert _sample(metrics, "mbworker_invocations_total", function="echo", status="101") >= 2
    assert _sample(metrics, "mbworker_invocations_total", function="tricks", status="401") == 1


# A function that goes for the socket's internals: the bridge's hooks (`acked` would lift its window, `opened` its
# caps), its prototype, its constructor, and the bootstrap's websocket.ts imported by URL.
PRYING = """
const boot = crypto.randomUUID();  // one per process: the same answer means the same process
let release = () => {};
const gate = new Promise((r) => (release = r));
Deno.serve(async (req) => {
  if (!req.headers.get("upgrade")) {
    if (new URL(req.url).searchParams.has("wait")) {
      console.log("plain request waiting");
      await gate;
    }
    return new Response(boot);
  }
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = async (e) => {
    if (e.data === "pry") {
      // Every name the socket shows, less what an EventTarget of this Deno has (its methods, its own symbols).
      const names = (o) => {
        const all = [...Object.getOwnPropertyNames(Object.getPrototypeOf(o)), ...Object.getOwnPropertyNames(o),
          ...Object.getOwnPropertySymbols(o).map(String)];
        for (const k in o) all.push(k);
        return all;
      };
      const target = new EventTarget();
      target.addEventListener("open", () => {});  // Deno keeps listeners under a symbol of the target's own
      const base = new Set(names(target));
      const seen = new Set(names(socket).filter((k) => !base.has(k)));
      socket.acked?.(1000);
      socket.opened?.(1e12, 1e12);
      const hooks = ["opened", "acked", "ended", "message", "goingAway", "id", "closed"].filter((k) => k in socket);
      let made = "constructed";
      try { new socket.constructor(Symbol("new socket"), {}); } catch (err) { made = String(err); }
      let bridge = "claimed";
      try {
        const mod = await import(new URL("./websocket.ts", Deno.mainModule).href);
        mod.claimBridge();
      } catch (err) { bridge = String(err); }
      socket.send(JSON.stringify({ seen: [...seen].sort(), hooks, keys: Object.keys(socket), made, bridge,
        tag: Object.prototype.toString.call(socket) }));
      for (let i = 0; i < 200; i++) socket.send(`m ${i}`);  // past the window: it holds them, as ever
      release();
    } else if (e.data === "big") {
      socket.send("x".repeat(5000));
    } else if (e.data === "liar") {
      // A Blob that says it is small (Deno's Blob then cannot read it): the socket ends, nothing wedges.
      class Liar extends Blob { get size() { return 1; } }
      socket.send(new Liar(["x".repeat(5000)]));
    }
  };
  socket.onclose = (e) => console.log(`prying closed ${e.code}`);
  return response;
});
"""
PUBLIC = {
    "constructor", "readyState", "protocol", "extensions", "url", "bufferedAmount", "binaryType",
    "onopen", "onmessage", "onclose", "onerror", "send", "close", "CONNECTING", "OPEN", "CLOSING", "CLOSED",
}  # fmt: skip


async def test_functions_reach_nothing_of_the_sockets_internals(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    toml = "[limits]\nmax_message_bytes = 1000\nmax_processes = 1\n"
    await worker.deploy(write_function(tmp_path, "prying", PRYING, toml=toml), "--no-verify-jwt")
    url = f"{worker.public_url}/functions/v1/prying"
    boot = (await http.get(url)).text
    async with trio.open_nursery() as nursery:
        plain: list[httpx.Response] = []

        async def request() -> None:
            plain.append(await http.get(url + "?wait"))

        nursery.start_soon(request)
        await worker.wait_for_output("plain request waiting")  # in flight on the process the socket uses
        async with connect(ws_url(worker, "/functions/v1/prying")) as ws:
            await ws.send("pry")
            with trio.fail_after(30):
                report = json.loads(str(await ws.recv()))
                got = [await ws.recv() for _ in range(200)]
            assert set(report["seen"]) <= PUBLIC, report
            assert report["hooks"] == [], report
            assert report["keys"] == [], report
            assert report["made"] == "TypeError: Illegal constructor"
            assert report["bridge"] == "TypeError: the WebSocket bridge is the bootstrap's"
            assert report["tag"] == "[object WebSocket]"
            assert got == [f"m {i}" for i in range(200)]  # all of them, in order: the window held
            await ws.send("ping")  # still open
    assert [(r.status_code, r.text) for r in plain] == [(200, boot)]  # the concurrent request: served, same process

    # A message over max_message_bytes from the function: that socket closes with 1009 (the function is told), and
    # the process keeps serving.
    async with connect(ws_url(worker, "/functions/v1/prying")) as ws:
        await ws.send("big")
        assert (await closed_with(ws))[0] == 1009
    await worker.wait_for_output("prying closed 1009")
    async with connect(ws_url(worker, "/functions/v1/prying")) as ws:
        await ws.send("liar")
        assert await closed_with(ws) == (1011, "the Blob could not be read")
    r = await http.get(url)
    assert (r.status_code, r.text) == (200, boot)


async def test_redeploy_and_shutdown_close_function_websockets(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    source = write_function(tmp_path, "echo", DOCS_EXAMPLE)
    await worker.deploy(source, "--no-verify-jwt")
    async with connect(ws_url(worker, "/functions/v1/echo")) as ws:
        await ws.send("before")
        with trio.fail_after(20):
            await ws.recv()
        await worker.deploy(source, "--no-verify-jwt")  # a new version: the old one's sockets go away (1001)
        assert (await closed_with(ws))[0] == 1001
    await worker.wait_for_output("socket closed")

    # Supabase caps a connection by the function's wall clock: the process ends, its clients get 1001.
    await worker.deploy(write_function(tmp_path, "brief", DOCS_EXAMPLE, toml="[limits]\nwall_clock_s = 4\n"))
    async with connect(ws_url(worker, "/functions/v1/brief"), additional_headers=worker.auth()) as ws:
        await ws.send("hi")
        with trio.fail_after(20):
            await ws.recv()
        assert await closed_with(ws) == (1001, "the function reached its wall clock limit")

    async with connect(ws_url(worker, "/functions/v1/echo")) as ws:
        await ws.send("after")
        with trio.fail_after(20):
            assert DATE.match(str(await ws.recv()))
        worker.process.send_signal(15)  # the daemon stops: the connection is closed, nothing hangs
        assert (await closed_with(ws))[0] == 1001
    with trio.fail_after(60):
        assert await worker.process.wait() == 0


BIG = """
Deno.serve((req) => {
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = (e) => {
    const [what, n, size] = String(e.data).split(" ");
    for (let i = 0; i < Number(n); i++) socket.send(what.repeat(Number(size)));
    console.log(`sent ${n} of ${size}`);
  };
  return response;
});
"""


async def test_function_websocket_large_messages(worker: RunningWorker, tmp_path: Path) -> None:
    """Messages as large as the function's max_message_bytes arrive whole, even past the daemon's 1 MiB queue
    budget toward the client (the budget bounds what waits beyond the message in flight)."""
    await worker.deploy(write_function(tmp_path, "big", BIG), "--no-verify-jwt")  # the default 1 MiB cap
    async with connect(ws_url(worker, "/functions/v1/big")) as ws:
        await ws.send(f"y 3 {1 << 20}")
        with trio.fail_after(30):
            for _ in range(3):
                assert await ws.recv() == "y" * (1 << 20)
            await ws.send("z 1 5")  # still open
            assert await ws.recv() == "zzzzz"

    toml = f"[limits]\nmax_message_bytes = {8 << 20}\n"
    await worker.deploy(write_function(tmp_path, "huge", BIG, toml=toml), "--no-verify-jwt")
    async with connect(ws_url(worker, "/functions/v1/huge"), max_size=None) as ws:
        await ws.send("x 2 4000000")
        with trio.fail_after(60):
            for _ in range(2):
                assert await ws.recv() == "x" * 4_000_000


FLOOD = """
Deno.serve((req) => {
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = () => {
    for (let i = 0; i < 12; i++) socket.send("m".repeat(1_000_000));
    // Blocked: what the socket holds stopped changing (the daemon stopped acking: its client takes nothing).
    let last = -1, same = 0;
    const tick = setInterval(() => {
      same = socket.bufferedAmount === last ? same + 1 : 0;
      last = socket.bufferedAmount;
      if (same === 20) {
        clearInterval(tick);
        console.log(`blocked holding ${last}`);
      }
    }, 50);
  };
  return response;
});
"""


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_function_websocket_slow_readers_cost_the_daemon_little(worker: RunningWorker, tmp_path: Path) -> None:
    """Clients that stop reading while their function sends 1 MB messages: the backlog stays in the function (its
    socket's buffer), the daemon holds about one message per socket (its window toward the client is bounded in
    bytes, and acked only when the client's connection took a message)."""
    await worker.deploy(
        write_function(tmp_path, "flood", FLOOD, toml="[limits]\nmax_processes = 1\n"), "--no-verify-jwt"
    )
    async with connect(ws_url(worker, "/functions/v1/flood")):
        pass  # the function's process is up: its cost is not counted below
    host, port = worker.public_url.removeprefix("http://").split(":")
    before = _rss_bytes(worker.process.pid)
    clients = 10
    streams: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            for _ in range(clients):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's kernel takes little
                await sock.connect((host, int(port)))
                stream = trio.SocketStream(sock)
                streams.append(stream)
                await stream.send_all(
                    f"GET /functions/v1/flood HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(1)
                assert head.startswith(b"HTTP/1.1 101 "), head
                await stream.send_all(b"\x81\x82\x00\x00\x00\x00go")  # a masked text frame: "go"; then no reads
        await worker.wait_for_output("blocked holding", timeout=120, count=clients)
        grown = _rss_bytes(worker.process.pid) - before
        held = [int(m[1]) for line in worker.output if (m := re.search(r"blocked holding (\d+)", line))]
        print(f"daemon RSS grew {grown >> 10} KiB for {clients} stalled clients; the function holds {held}")
        assert grown < clients * (4 << 20), f"the daemon grew {grown} bytes for {clients} stalled clients"
        assert all(h > 0 for h in held), held  # the function holds the backlog, not the daemon
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
