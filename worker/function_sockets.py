"""WebSocket upgrades to functions (`Deno.upgradeWebSocket`): the client's end of the connection and the relay.

The HTTP server hands an upgrade request to `/functions/v1/<slug>` over whole (the stream and the bytes it read:
lib/http/types.py). The front door (functions.py) then treats it like any function request — routing, the JWT
gate, the rate limit, metrics — answering through a `StreamResponder` on the raw stream, and runs the function
with the upgrade headers. If the function answers with a plain Response, that goes back as plain HTTP (then the
connection closes). If it returns `Deno.upgradeWebSocket`'s response, `Upgrade.respond` completes the handshake
with websockets' Sans-I/O `ServerProtocol` (101, Sec-WebSocket-Accept, the function's subprotocol) and relays
messages both ways (lib/websocket.py's `Transport` on the client side, the runtime's `FunctionSocket` on the
function's) until either side closes.

Who owns what: the connection's task (the HTTP server's, handed over) owns the stream, the `Transport` and the
two relay tasks; the invoke context around the relay holds the function's request slot for the connection's life.
Every wait is bounded: client messages wait for the function's window (its acks come as its event loop runs; a
function that stops running hits its CPU or wall-clock limit), the function's wait for the client's connection
(the transport's write timeout), the closing handshake for `CLOSE_TIMEOUT_S`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from email.utils import formatdate

import trio
from websockets.frames import Frame
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from mbworker.lib.http.response_head import check_head, encode_headers, status_line
from mbworker.lib.http.types import ClientDisconnected, Headers, Responder
from mbworker.lib.websocket import (
    MALFORMED_AFTER,
    OutFrame,
    Transport,
    TransportClosed,
    complete_handshake,
    read_handshake,
)
from mbworker.runtimes import InvocationResult, WorkerError
from mbworker.runtimes.api import FunctionSocket, SocketClosed
from mbworker.worker.responses import send_result

log = logging.getLogger("mbworker.functions")

HANDSHAKE_TIMEOUT_S = 10.0
"""Reading the upgrade request's head from the bytes the server handed over (and the stream, if it is short)."""
CLOSE_TIMEOUT_S = 2.0
"""How long a closing handshake waits for the client's close frame."""
WRITE_TIMEOUT_S = 30.0
"""A client that takes no bytes for this long is cut off (lib/websocket.py's write timeout; `StreamResponder`'s
too, as lib/http's `write_timeout_s` by default)."""
MAX_QUEUED_BYTES = 256 << 10
"""What the transport may queue for a client that pushes back beyond the message in flight (any message up to the
function's `max_message_bytes` goes once nothing is being written: `Transport.send_whole`). Small: the function's
socket holds the backlog, and the daemon's window toward the client (`SOCKET_WINDOW_BYTES`) already lets small
messages flow while one is written."""

UPGRADE_HEADERS: Headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
"""The hop-by-hop headers of an upgrade, which the function must see (`Deno.upgradeWebSocket` checks them)."""


class StreamResponder:
    """A `Responder` on a stream the HTTP server handed over: one answer, then the connection closes (the
    stream's owner closes it). A 101 is written as given (the handshake's headers); anything else with
    `connection: close`, its body sized (`send`) or delimited by the close (`start`/`write`)."""

    __slots__ = ("_started", "_stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def _head(self, status: int, headers: Headers, length: int | None) -> bytes:
        parts: list[bytes] = []
        if status == 101:  # the handshake's own headers (websockets' Date among them), as they are
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
            lines = len(headers)
        else:
            _, lines, flags = encode_headers(headers, parts)
            parts.append(b"connection: close\r\n")
            lines += 1
            if not flags & 1:  # no Date of the app's
                parts.append(b"date: %s\r\n" % formatdate(time.time(), usegmt=True).encode())
                lines += 1
            if length is not None:
                parts.append(b"content-length: %d\r\n" % length)
                lines += 1
        head = b"".join(parts)
        check_head(head, lines)
        return status_line(status) + head + b"\r\n"

    async def _send(self, data: bytes) -> None:
        try:
            # a client that stops reading is cut off, as on any connection: it holds the function's slot meanwhile
            with trio.fail_after(WRITE_TIMEOUT_S):
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected(str(exc)) from exc
        except trio.TooSlowError:
            raise ClientDisconnected(f"the client took nothing for {WRITE_TIMEOUT_S:g} s") from None

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self._started = True
        await self._send(self._head(status, headers, None if status == 101 else len(body)) + body)

    async def start(self, status: int, headers: Headers) -> None:
        self._started = True
        await self._send(self._head(status, headers, None))

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._send(chunk)

    async def end(self) -> None:
        pass


class Upgrade:
    """One WebSocket upgrade request to a function, from its handover to the connection's end (`respond`)."""

    __slots__ = (
        "_buffered",
        "_choice",
        "_early",
        "_protocol",
        "_relay_scope",
        "_request",
        "_stream",
        "_transport",
        "max_message",
    )

    def __init__(self, stream: trio.abc.Stream, buffered: bytes) -> None:
        self._stream = stream
        self._buffered = buffered
        self._protocol: ServerProtocol | None = None
        self._request: WsRequest | None = None
        self._early: list[Frame] = []
        self._choice: str | None = None
        self._transport: Transport | None = None
        self._relay_scope: trio.CancelScope | None = None
        self.max_message = 0

    def _chosen(self) -> Subprotocol | None:
        """The subprotocol is the function's choice, offered or not (as Deno: it sets the header it was given)."""
        return None if self._choice is None else Subprotocol(self._choice)

    async def read(self, max_message: int) -> tuple[int, str] | None:
        """Parse and check the upgrade request (websockets' parser and handshake checks, on the bytes handed over)
        before any function runs: None when websockets would accept it, else the status and reason to refuse it
        with (status 0: the client left)."""
        self.max_message = max_message
        # A function, not a bound method: websockets binds it to the protocol (it is called with the offers only).
        self._protocol = protocol = ServerProtocol(
            max_size=max_message, select_subprotocol=lambda _protocol, _offered: self._chosen()
        )
        buffered, self._buffered = self._buffered, b""
        handshake = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            try:
                handshake = await read_handshake(self._stream, buffered, protocol, answer_malformed=False)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                handshake = None
        if handshake is None:
            exc = protocol.handshake_exc
            return (0, "") if exc is None else (400, f"Invalid WebSocket upgrade: {exc}")
        self._request, self._early = handshake
        if protocol.eof_sent:
            return 400, "Invalid WebSocket upgrade: malformed data after the upgrade request"
        # websockets' checks (method, version, key) now, so a function never runs for an upgrade they refuse;
        # `_handshake` asks again with the function's subprotocol.
        verdict = protocol.accept(self._request)
        if verdict.status_code != 101:
            return verdict.status_code, f"Invalid WebSocket upgrade: {protocol.handshake_exc}"
        return None

    async def respond(
        self,
        responder: Responder,
        run: Callable[[], AbstractAsyncContextManager[InvocationResult]],
    ) -> None:
        """Run the function; relay its socket if it accepted the upgrade, else send its answer as plain HTTP."""
        async with run() as result:
            socket = result.socket
            if socket is None:
                if result.status == 101:
                    raise WorkerError("the function answered 101 without Deno.upgradeWebSocket")
                await send_result(responder, result)
                return
            self._choice = socket.protocol
            if await self._handshake(responder, socket):
                await self._relay(socket)

    async def _handshake(self, responder: Responder, socket: FunctionSocket) -> bool:
        """Answer the client's handshake for the function: True once the connection is open."""
        protocol, request = self._protocol, self._request
        assert protocol is not None
        assert request is not None
        self._request = None
        # websockets' 101 (or its own 4xx for a bad upgrade), with the function's subprotocol (`_select`).
        response = MALFORMED_AFTER if protocol.eof_sent else protocol.accept(request)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.raw_items()]
        if response.status_code != 101:
            await socket.close(1006, "the WebSocket handshake failed")
            await responder.send(response.status_code, headers, bytes(response.body or b""))
            return False
        # The 101 goes out through the responder (metrics see it); websockets' own copy of the same bytes is
        # dropped once it has moved the protocol to OPEN.
        try:
            await responder.send(101, headers)
        except ClientDisconnected:
            await socket.close(1006, "the client left during the handshake")
            return False
        protocol.send_response(response)
        protocol.data_to_send()
        return True

    async def _relay(self, socket: FunctionSocket) -> None:
        """Messages both ways until either side closes; then the function's socket gets the close the connection
        ended with, and the client's connection is closed."""
        protocol = self._protocol
        assert protocol is not None
        code, reason = 1006, ""
        transport: Transport | None = None
        try:
            async with trio.open_nursery() as nursery:  # runs the transport's writer task too: outlives it
                transport = complete_handshake(
                    self._stream,
                    protocol,
                    self._early,
                    nursery=nursery,
                    max_queued_bytes=MAX_QUEUED_BYTES,
                    write_timeout=WRITE_TIMEOUT_S,
                )
                self._early = []
                if transport is None:
                    return
                transport.on_overflow = nursery.cancel_scope.cancel  # a client that stopped reading
                self._transport, self._relay_scope = transport, nursery.cancel_scope
                await socket.opened(self.max_message)
                client_done = trio.Event()
                nursery.start_soon(self._to_function, transport, socket, client_done, nursery.cancel_scope)
                nursery.start_soon(self._to_client, transport, socket, client_done, nursery.cancel_scope)
        finally:
            self._transport = self._relay_scope = None
            closed = protocol.close_rcvd or protocol.close_sent
            if closed is not None:
                code, reason = int(closed.code), closed.reason
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await socket.close(code, reason)
            if transport is not None:
                with trio.CancelScope(shield=True):
                    # Still open here only when this task was cancelled (the daemon is stopping): going away.
                    await transport.aclose(1001, "the server is shutting down", timeout=CLOSE_TIMEOUT_S / 2)

    def going_away(self, code: int, reason: str) -> None:
        """Close the client's connection with `code` (the node drains); the relay ends when the client answers,
        or `CLOSE_TIMEOUT_S` from now. A connection not open yet finishes like any request."""
        transport, scope = self._transport, self._relay_scope
        if transport is None or scope is None:
            return
        transport.start_close(code, reason)
        scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_TIMEOUT_S)

    async def _to_function(
        self, transport: Transport, socket: FunctionSocket, done: trio.Event, scope: trio.CancelScope
    ) -> None:
        """The connection's reader: client messages to the function, within its window."""
        try:
            while True:
                for message in await transport.receive():
                    await socket.send(message)
        except TransportClosed:
            pass
        finally:
            done.set()
        scope.cancel()  # the client's side is over (it closed, left, or sent too much: 1009)

    async def _to_client(
        self, transport: Transport, socket: FunctionSocket, client_done: trio.Event, scope: trio.CancelScope
    ) -> None:
        """The function's messages to the client, each once the client's connection has room for it."""
        while True:
            event = await socket.receive()
            if isinstance(event, SocketClosed):
                # The function closed (or its process is gone): close the client with its code and wait for the
                # client's answer, which the reader sees.
                transport.start_close(event.code, event.reason)
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await client_done.wait()
                scope.cancel()
                return
            await transport.send_whole(OutFrame(event))
