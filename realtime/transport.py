"""Transport: one WebSocket connection's writes, over the `websockets` library's trio implementation.

`accept_stream` turns a stream handed over by the HTTP front door (plus the bytes it already read) into a
`websockets.trio.server.ServerConnection` — no WebSocket framing is written here. `Transport` owns the
outbound side: frames are encoded ONCE per broadcast (`OutFrame.wire` caches the WebSocket frame bytes) and
written straight to the socket when nothing is queued for it; otherwise they wait in a bounded per-connection
queue drained by a writer task that exists only while something is queued (idle connections carry no task
for it). Overflow calls `on_overflow` once (the owner disconnects that client).

Reaching into websockets: we write pre-built frames ourselves, serialized with the connection's `send_lock`
(the lock websockets holds around every `send_all`) and only while `protocol.state is OPEN` and no extension
is negotiated (we offer none). `tests/realtime/test_transport.py::test_websockets_internals` pins what we
rely on; websockets is pinned to >=16,<18.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

import trio
from websockets.datastructures import Headers as WsHeaders
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.trio.server import Server, ServerConnection

__all__ = ["OutFrame", "Transport", "accept_stream"]


class OutFrame:
    """A server → client message encoded once: `data` (str → text frame, bytes → binary) and its wire bytes."""

    __slots__ = ("_wire", "data")

    def __init__(self, data: str | bytes) -> None:
        self.data = data
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            if isinstance(self.data, str):
                frame = Frame(Opcode.TEXT, self.data.encode())
            else:
                frame = Frame(Opcode.BINARY, self.data)
            self._wire = frame.serialize(mask=False)
        return self._wire


class _NoServer:
    """ServerConnection wants its Server only to ask whether it is closing; the front door owns that."""

    closing = False


_HANDSHAKE_DONE = Request("/", WsHeaders())
"""Shared stand-in for a finished handshake's request (see `accept_stream`)."""

RequestCheck = Callable[[ServerConnection, Request], Response | None]


async def accept_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    buffered: bytes,
    check: RequestCheck,
    *,
    max_size: int,
    handshake_timeout: float,
    close_timeout: float = 2.0,
) -> ServerConnection | None:
    """Run the opening handshake on `stream`; None when `check` rejected it or the handshake failed.

    `nursery` runs websockets' reader task and must outlive the connection (the caller owns it). No
    subprotocol is selected, no extension is negotiated, websockets' own keepalive is off (the Phoenix
    heartbeat and our idle timeout replace it).
    """
    protocol = ServerProtocol(max_size=max_size)
    conn = ServerConnection(
        nursery,
        stream,
        protocol,
        cast(Server, _NoServer()),
        ping_interval=None,
        ping_timeout=None,
        close_timeout=close_timeout,
        max_queue=16,
    )
    if buffered:
        # The reader task has not run yet, so the request head is parsed before anything read later.
        protocol.receive_data(buffered)
        for event in protocol.events_received():
            conn.process_event(event)
    with trio.move_on_after(handshake_timeout):
        await conn.handshake(check, None, None)
        if conn.protocol.state is State.OPEN:
            # The handshake request/response are never read again; dropping their headers saves ~2 KB per
            # idle connection. `request` must stay non-None (websockets uses it to tell handshake from frames).
            conn.request = _HANDSHAKE_DONE
            conn.response = None
            return conn
    await trio.aclose_forcefully(stream)
    return None


def json_response(conn: ServerConnection, status: int, body: bytes) -> Response:
    """An HTTP error response for a refused handshake, with a JSON body (`{"error": ...}`)."""
    headers = WsHeaders()
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}.get(
        status, "Error"
    )
    return Response(status, reason, headers, body)


class Transport:
    """Owns writes of one connection. `send` never blocks; a writer task exists only while frames are queued."""

    def __init__(
        self,
        ws: ServerConnection,
        max_queued_bytes: int,
        on_overflow: Callable[[], None],
        nursery: trio.Nursery,
        write_timeout: float = 30.0,
    ) -> None:
        self._ws = ws
        self._max = max_queued_bytes
        self._queue: list[bytes] = []  # a list, not a deque: an empty deque costs ~600 B per connection
        self._queued = 0
        self._nursery = nursery
        self._writing = False
        self._on_overflow = on_overflow
        self._write_timeout = write_timeout
        self.overflowed = False
        """True once the queue overflowed; `on_overflow` was called (once) to disconnect this client."""
        stream: Any = ws.stream
        self._fd: int | None = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self.frames_sent = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def send(self, frame: OutFrame) -> None:
        """Write `frame` now if the socket takes it, else queue it (bounded)."""
        if self.overflowed:
            return
        ws = self._ws
        if ws.protocol.state is not State.OPEN:
            return
        wire = frame.wire
        self.frames_sent += 1
        if not self._queue and not self._writing and self._fd is not None and not ws.send_lock.locked():
            try:
                n = os.write(self._fd, wire)
            except BlockingIOError:
                n = 0
            except OSError:
                return  # the reader sees the broken socket and ends the connection
            if n == len(wire):
                return
            wire = wire[n:]  # the rest of this frame must go before anything else
        self._queue.append(wire)
        self._queued += len(wire)
        if self._queued > self._max:
            self._fail()
            return
        if not self._writing:
            try:
                self._nursery.start_soon(self._drain)
            except RuntimeError:  # the connection's nursery is closing: nothing will be written anyway
                return
            self._writing = True

    def _fail(self) -> None:
        self._queue.clear()
        self._queued = 0
        if not self.overflowed:
            self.overflowed = True
            self._on_overflow()

    async def _drain(self) -> None:
        """Write queued frames under websockets' send lock until the queue is empty or the socket fails."""
        ws = self._ws
        try:
            while self._queue:
                async with ws.send_lock:
                    if ws.protocol.state is not State.OPEN:
                        return
                    chunks, self._queue = self._queue, []
                    self._queued = 0
                    with trio.move_on_after(self._write_timeout) as stalled:
                        await ws.stream.send_all(b"".join(chunks))
                    if stalled.cancelled_caught:  # a client that stopped reading: same fate as overflow
                        self._fail()
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queue.clear()
            self._queued = 0
        finally:
            self._writing = False
