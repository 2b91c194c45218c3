"""Transport: one WebSocket connection's I/O, a thin trio loop over websockets' Sans-I/O `ServerProtocol`.
Shared by realtime (its channels) and the functions front door (`Deno.upgradeWebSocket`, worker/function_sockets.py).

`accept_stream` runs the opening handshake on a stream handed over by the HTTP front door (plus the bytes it
already read) and returns a `Transport`; a caller whose decision is asynchronous (a function answers the upgrade)
uses its two halves, `read_handshake` and `complete_handshake`. websockets does all the WebSocket work — request
parsing, the 101 or refusal, frame parsing and limits, ping → pong, the closing handshake — through its public
Sans-I/O API (`receive_data` / `events_received` / `data_to_send`); no framing is written here. We only move bytes, join
the fragments of a message, and decode text.

Why not `websockets.trio.ServerConnection`: it costs a reader task, a nursery, a lock, a memory channel and an
assembler per connection (~10 KB each idle connection). Here a connection is this object plus its
`ServerProtocol`, read by its owner's one task (`receive`), with no timer or task of its own.

Writes: frames are encoded ONCE per broadcast (`OutFrame.wire` caches the WebSocket frame bytes) and written
straight to the socket (`lib.nonblocking.write_some`) when nothing is queued for it; otherwise they wait in a
bounded queue drained by a writer task that exists only while something is queued (spawned in the node's
nursery, ended by the socket closing or by the write timeout). Overflow or a stalled write calls `on_overflow`
once (the owner disconnects that client). The protocol's own output (pong, close) goes the same way, so the
byte order on the wire is always the order of the calls.

Reaching into websockets: writing pre-built data frames beside the protocol is sound only while its state is
OPEN, no extension is negotiated (we offer none) and we never fragment. `tests/realtime/test_units.py::
test_websockets_internals` pins what we rely on; websockets is pinned to >=16,<18.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

import trio
from websockets.datastructures import Headers as WsHeaders
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from mbworker.lib.nonblocking import write_some

__all__ = [
    "OutFrame",
    "Transport",
    "TransportClosed",
    "accept_stream",
    "complete_handshake",
    "json_response",
    "read_handshake",
]

_READ_SIZE: Final = 65536
_OPEN: Final = State.OPEN
_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT


class TransportClosed(Exception):
    """The WebSocket connection ended (closing handshake, EOF, protocol error or a broken socket)."""


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


RequestCheck = Callable[[Request], Response | None]
"""Decides a handshake: None accepts, a `Response` (see `json_response`) refuses."""


def json_response(status: int, body: bytes) -> Response:
    """An HTTP error response for a refused handshake, with a JSON body (`{"error": ...}`)."""
    headers = WsHeaders()
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}.get(
        status, "Error"
    )
    return Response(status, reason, headers, body)


MALFORMED_AFTER = json_response(400, b'{"error":"malformed data after the upgrade request"}')
"""The answer when bytes pipelined after the upgrade request were not WebSocket frames: websockets has then
already given up on the connection (`protocol.eof_sent`, and asserts if asked to accept it)."""


async def accept_stream(
    stream: trio.abc.Stream,
    buffered: bytes,
    check: RequestCheck,
    *,
    nursery: trio.Nursery,
    max_size: int,
    max_queued_bytes: int,
    handshake_timeout: float,
    write_timeout: float = 30.0,
) -> Transport | None:
    """Run the opening handshake on `stream`; None when `check` refused it or the handshake failed (the
    stream is then closed). On success the caller owns the returned `Transport` and must `aclose` it.

    `nursery` (the node's; it must outlive the connection) runs the transport's writer task while frames are
    queued. No subprotocol is selected and no extension is negotiated; there is no WebSocket-level keepalive
    (the Phoenix heartbeat and the owner's idle timeout replace it).
    """
    protocol = ServerProtocol(max_size=max_size)
    with trio.move_on_after(handshake_timeout):
        try:
            handshake = await read_handshake(stream, buffered, protocol)
            if handshake is not None:
                request, early = handshake
                response = check(request)
                if response is None and protocol.eof_sent:
                    response = MALFORMED_AFTER
                if response is not None:  # refused: the answer is ours, whatever else the client sent
                    await stream.send_all(response.serialize())
                else:
                    response = protocol.accept(request)  # 101, or websockets' own 4xx for a bad upgrade
                    await send_response(stream, protocol, response)
                    # websockets' parser generator keeps the request referenced for the connection's life but
                    # never reads it again: its headers (~1 KB) need not live that long.
                    request.headers.clear()
                    del request, response
                    transport = complete_handshake(
                        stream,
                        protocol,
                        early,
                        nursery=nursery,
                        max_queued_bytes=max_queued_bytes,
                        write_timeout=write_timeout,
                    )
                    if transport is not None:
                        return transport
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)
    return None


async def read_handshake(
    stream: trio.abc.Stream, buffered: bytes, protocol: ServerProtocol, *, answer_malformed: bool = True
) -> tuple[Request, list[Frame]] | None:
    """Read the upgrade request into `protocol` (from `buffered`, then the stream): the request and any frames
    that came with it, or None when the request was malformed (websockets' 400 is sent) or the client left.
    The caller bounds it with its handshake timeout. After it the caller answers: `protocol.accept(request)`
    and `send_response` (unless `protocol.eof_sent`: see `MALFORMED_AFTER`), or an HTTP answer of its own."""
    if buffered:
        protocol.receive_data(buffered)
    while True:
        events = protocol.events_received()
        if events:
            first = events[0]
            assert isinstance(first, Request)
            return first, [e for e in events[1:] if isinstance(e, Frame)]
        if protocol.handshake_exc is not None:  # malformed request: websockets made a 400
            if answer_malformed:  # else the caller answers (`protocol.handshake_exc` says why)
                await _send_protocol_data(stream, protocol)
            return None
        data = await stream.receive_some(_READ_SIZE)
        if not data:
            return None
        protocol.receive_data(data)


async def send_response(stream: trio.abc.Stream, protocol: ServerProtocol, response: Response) -> None:
    """Send the handshake's answer (`protocol.accept`'s 101, or its 4xx) through `protocol`."""
    protocol.send_response(response)
    await _send_protocol_data(stream, protocol)


def complete_handshake(
    stream: trio.abc.Stream,
    protocol: ServerProtocol,
    early: list[Frame],
    *,
    nursery: trio.Nursery,
    max_queued_bytes: int,
    write_timeout: float = 30.0,
) -> Transport | None:
    """The `Transport` of a connection whose 101 went out (`send_response`), or None when the handshake did not
    open it (websockets answered 4xx). The caller owns the stream either way."""
    if protocol.state is not _OPEN:
        return None
    return Transport(stream, protocol, nursery, max_queued_bytes, write_timeout, early)


async def _send_protocol_data(stream: trio.abc.Stream, protocol: ServerProtocol) -> None:
    for data in protocol.data_to_send():
        if data:
            await stream.send_all(data)


def _nothing() -> None:
    pass


class Transport:
    """Owns one open WebSocket connection: reads by its owner's task (`receive`), writes from any code
    (`send` never blocks), and the close (`aclose`, exactly once, by the owner)."""

    __slots__ = (
        "_early",
        "_ended",
        "_fd",
        "_fragments",
        "_head",
        "_max",
        "_nursery",
        "_queue",
        "_queued",
        "_room",
        "_sock",
        "_stream",
        "_write_timeout",
        "_writing",
        "frames_sent",
        "on_overflow",
        "overflowed",
        "protocol",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ServerProtocol,
        nursery: trio.Nursery,
        max_queued_bytes: int,
        write_timeout: float,
        early: list[Frame] | None = None,
    ) -> None:
        self._stream = stream
        self.protocol = protocol
        """websockets' Sans-I/O state machine for this connection (read-only outside this module)."""
        self._nursery = nursery
        self._max = max_queued_bytes
        self._write_timeout = write_timeout
        self._queue: list[bytes] | None = None  # allocated when the socket first pushes back
        self._queued = 0
        self._head = 0  # bytes of a whole message queued first by `send_whole`: outside the budget
        self._writing = False
        self._room: trio.Event | None = None  # set when the writer task took queued bytes (see wait_for_room)
        self._fragments: list[bytes] | None = None  # a fragmented message being received (rare)
        self._early = early or None  # frames that arrived with the handshake request
        self._ended = False
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._fd: int | None = self._sock.fileno() if self._sock is not None else None
        self.on_overflow: Callable[[], None] = _nothing
        """Called once when the send queue overflows or a queued write stalls (set by the owner)."""
        self.overflowed = False
        """True once the queue overflowed; `on_overflow` was called (once) to disconnect this client."""
        self.frames_sent = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued

    # writing ---------------------------------------------------------------------------------------

    def send(self, frame: OutFrame) -> None:
        """Write `frame` now if the socket takes it, else queue it (bounded). Dropped unless the connection
        is OPEN (a closing socket takes no more messages)."""
        if self.overflowed or self._ended or self.protocol.state is not _OPEN:
            return
        self.frames_sent += 1
        self._write(frame.wire)

    async def wait_for_room(self, nbytes: int) -> None:
        """Wait until `nbytes` more fit in the send queue (returns at once when they do, or when the connection
        is failing). For large pushes the client itself asked for (its presence state on join): its own
        earlier pushes must not make it a "slow consumer". Bounded: a writer that stalls fails the connection
        after the write timeout, which ends this wait."""
        while self._writing and self._queued + nbytes > self._max and not (self.overflowed or self._ended):
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    async def send_whole(self, frame: OutFrame) -> None:
        """Send `frame` once it fits the budget or nothing is being written, whatever its size: for messages the
        owner relays one at a time (a function's socket). The budget bounds what is queued beyond the message in
        flight, so one message larger than the budget still goes; a client that stops taking it is cut by the
        write timeout. Returns at once when the connection is failing or not OPEN (the message is dropped)."""
        # Its size from the payload (a str's characters undercount its UTF-8: harmless here), and no frame bytes
        # made while it waits: a connection that pushes back holds one copy of the next message, not two.
        size = len(frame.data) + 14
        while self._writing and self._queued + size > self._max:
            if self.overflowed or self._ended:
                return
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        if self.overflowed or self._ended or self.protocol.state is not _OPEN:
            return
        self.frames_sent += 1
        self._write(frame.wire, whole=True)

    def _wake_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _write(self, data: bytes, *, whole: bool = False) -> None:
        if not self._writing and self._fd is not None:  # nothing queued: straight to the socket
            try:
                n = write_some(self._fd, data)
            except OSError:
                return  # the reader sees the broken socket and ends the connection
            if n == len(data):
                return
            data = data[n:]  # the rest of this frame must go before anything else
        if self._queue is None:
            self._queue = []
        if whole and not self._queue:
            self._head = len(data)
        self._queue.append(data)
        self._queued += len(data)
        if self._queued - self._head > self._max:
            self._fail()
            return
        if not self._writing:
            try:
                self._nursery.start_soon(self._drain)
            except RuntimeError:  # the node is shutting down: nothing will be written anyway
                self._queue = None
                self._queued = self._head = 0
                return
            self._writing = True

    def _flush_protocol(self) -> None:
        """Write what websockets wants sent (pong, close frame); b"" means it wants the TCP connection closed."""
        for data in self.protocol.data_to_send():
            if data:
                self._write(data)
            else:
                self._ended = True  # the owner closes the stream

    def _fail(self) -> None:
        self._queue = None
        self._queued = self._head = 0
        if not self.overflowed:
            self.overflowed = True
            self.on_overflow()

    async def _drain(self) -> None:
        """The writer task: send queued bytes until the queue is empty, the socket fails or a write stalls."""
        try:
            while self._queue:
                chunks, self._queue = self._queue, None
                self._queued = self._head = 0
                self._wake_room()  # the queue was just emptied into this write
                with trio.move_on_after(self._write_timeout) as stalled:
                    await self._stream.send_all(b"".join(chunks))
                if stalled.cancelled_caught:  # a client that stopped reading: same fate as overflow
                    self._fail()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queue = None
            self._queued = self._head = 0
        finally:
            self._writing = False
            self._wake_room()

    # reading ---------------------------------------------------------------------------------------

    async def receive(self) -> list[str | bytes]:
        """Wait for one read from the socket and return the complete messages it carried (often one, maybe
        none). Only the owner's task calls this. Raises `TransportClosed` once the connection has ended."""
        if self._ended:
            raise TransportClosed("connection closed")
        protocol = self.protocol
        events = self._early
        if events is not None:
            self._early = None
        else:
            data: bytes | bytearray
            try:
                if self._sock is not None:
                    # The trio socket, not SocketStream.receive_some: same syscall, but an idle connection's
                    # stack then holds no error-translating context manager (~0.6 KB).
                    data = await self._sock.recv(_READ_SIZE)
                else:
                    data = await self._stream.receive_some(_READ_SIZE)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
                self._ended = True
            events = cast(list[Frame], protocol.events_received())  # frames only, once the handshake is done
        messages: list[str | bytes] = []
        for frame in events:
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                if frame.fin:
                    payload = bytes(frame.data)
                else:
                    self._fragments = [bytes([opcode is _TEXT]), bytes(frame.data)]
                    continue
            elif opcode is _CONT and self._fragments is not None:
                self._fragments.append(bytes(frame.data))
                if not frame.fin:
                    continue
                kind, *parts = self._fragments
                self._fragments = None
                payload = b"".join(parts)
                opcode = _TEXT if kind == b"\x01" else _BINARY
            else:
                continue  # ping (websockets queued the pong), pong, close (handled by websockets)
            if opcode is _TEXT:
                try:
                    messages.append(payload.decode())
                except UnicodeDecodeError:
                    protocol.fail(1007, "invalid UTF-8 in a text message")
                    break
            else:
                messages.append(payload)
        self._flush_protocol()
        if protocol.state is not _OPEN:
            self._ended = True
        return messages

    # closing ---------------------------------------------------------------------------------------

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame now, without waiting for the client's: for code that does not read the connection
        (the owner's `receive` sees the client's answer and raises `TransportClosed`). A no-op unless OPEN."""
        if self.protocol.state is _OPEN and not self.overflowed and not self._ended:
            self.protocol.send_close(code, reason)
            self._flush_protocol()

    async def aclose(self, code: int = 1000, reason: str = "", *, timeout: float = 1.0) -> None:
        """Closing handshake (send a close frame, wait up to `timeout` for the client's), then close the stream.
        A slow consumer gets no handshake: its socket would not take the frame. Idempotent; owner only."""
        protocol = self.protocol
        try:
            if protocol.state is _OPEN and not self.overflowed:
                protocol.send_close(code, reason)
                self._flush_protocol()
                with trio.move_on_after(timeout):
                    while not self._ended:
                        await self.receive()
        except TransportClosed:
            pass
        finally:
            self._ended = True
            self._fd = None  # the number may soon belong to another socket: never write to it again
            await trio.aclose_forcefully(self._stream)
