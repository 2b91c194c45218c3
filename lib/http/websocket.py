"""Finish a WebSocket opening handshake on a stream the HTTP server handed over, with websockets' trio layer.

The front door has already read the upgrade request (and maybe more); `accept_websocket` feeds those bytes to
a `websockets.server.ServerProtocol`, builds a `websockets.trio.server.ServerConnection` on the same stream and
runs the handshake exactly as `websockets.trio.server.serve` would. Framing, ping/pong, close handshake and
limits are websockets' own.

    async def handler(stream, buffered, request):          # a `WebSocketHandler`
        async with open_websocket(stream, buffered, request) as ws:
            async for message in ws:
                await ws.send(message)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.trio.server import Server, ServerConnection
from websockets.typing import Origin, Subprotocol

from mbworker.lib.http.types import HttpRequest
from mbworker.lib.nursery import open_owned_nursery

__all__ = ["WebSocketHandshakeError", "WebSocketOptions", "accept_websocket", "open_websocket"]


ProcessRequest = Callable[[ServerConnection, Request], Awaitable[Response | None] | Response | None]
"""websockets' `process_request` hook: None accepts, a `Response` refuses (e.g. 401/403)."""


class WebSocketHandshakeError(Exception):
    """The opening handshake did not complete (bad request, refused origin, timeout, client gone).

    websockets has already answered the client (400/403/426...) where it could; the stream is closed.
    """


async def _no_handler(stream: trio.abc.Stream) -> None:  # pragma: no cover - never called
    raise AssertionError


@dataclass(frozen=True, slots=True)
class WebSocketOptions:
    """websockets' knobs, with its meaning (see `websockets.trio.server.serve`)."""

    open_timeout: float = 10.0
    """Seconds for the client to complete the opening handshake."""
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 10.0
    max_size: int | None = 2**20
    """Largest incoming message in bytes."""
    max_queue: int = 16
    """Incoming frames buffered before reading pauses."""
    subprotocols: Sequence[Subprotocol] | None = None
    origins: Sequence[Origin | None] | None = None
    compression: bool = True
    """Offer permessage-deflate."""
    server_header: str | None = "mbworker"


async def accept_websocket(
    stream: trio.abc.Stream,
    buffered: bytes,
    request: HttpRequest,
    *,
    nursery: trio.Nursery,
    options: WebSocketOptions | None = None,
    process_request: ProcessRequest | None = None,
) -> ServerConnection:
    """Complete the handshake and return the open connection.

    `buffered` is every byte the HTTP server read (the request head and anything after it). The connection's
    reader (and keepalive) tasks run in `nursery`, which must outlive it; the caller owns the connection and
    must `aclose()` it (or use `open_websocket`). On failure the stream is closed and `WebSocketHandshakeError`
    raised. `request` is the front door's parse of the same head (for messages; websockets re-parses the bytes).
    `process_request` is websockets' hook: return a `Response` (e.g. `connection.respond(401, ...)`) to refuse.
    """
    o = options or WebSocketOptions()
    extensions = enable_server_permessage_deflate(None) if o.compression else None
    protocol = ServerProtocol(
        origins=o.origins, extensions=extensions, subprotocols=o.subprotocols, max_size=o.max_size
    )
    # Parse what the front door already read before the connection starts reading the stream itself.
    protocol.receive_data(buffered)
    events = protocol.events_received()
    # `ServerConnection` consults its server only for `closing` (refuse with 503 while shutting down).
    connection = ServerConnection(
        nursery,
        stream,
        protocol,
        Server([], _no_handler),
        ping_interval=o.ping_interval,
        ping_timeout=o.ping_timeout,
        close_timeout=o.close_timeout,
        max_queue=o.max_queue,
    )
    try:
        for event in events:
            connection.process_event(event)
        await connection.send_data()  # a rejection websockets produced while parsing, if any
        with trio.fail_after(o.open_timeout):
            await connection.handshake(process_request, server_header=o.server_header)
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise WebSocketHandshakeError(f"no complete handshake within {o.open_timeout} s on {request.path}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    if connection.protocol.state is not OPEN:
        await connection.close_stream()
        raise WebSocketHandshakeError(
            f"WebSocket handshake refused on {request.path}: {protocol.handshake_exc}"
        ) from protocol.handshake_exc
    connection.start_keepalive()
    return connection


@asynccontextmanager
async def open_websocket(
    stream: trio.abc.Stream,
    buffered: bytes,
    request: HttpRequest,
    options: WebSocketOptions | None = None,
    process_request: ProcessRequest | None = None,
) -> AsyncIterator[ServerConnection]:
    """`accept_websocket` with its own nursery; closes the connection (1000, or 1011 on error) on exit.

    Raises `WebSocketHandshakeError` when the handshake fails. An exception from the body comes out as itself,
    not wrapped in an exception group (the nursery only runs websockets' reader and keepalive tasks, which
    handle their own errors).
    """
    async with open_owned_nursery() as nursery:
        connection = await accept_websocket(
            stream, buffered, request, nursery=nursery, options=options, process_request=process_request
        )
        async with connection:
            yield connection
