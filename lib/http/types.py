"""The seam between the HTTP server and the application.

The server parses requests (httptools) and calls `HttpApp.handle_http(request, responder)` once per request.
A request that asks to upgrade to WebSocket, and for which `HttpApp.websocket_handler(request)` returns a
handler, is handed over whole: the handler gets the raw stream plus every byte already read from it (the
request head and anything after it) and owns the stream from then on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

Headers = list[tuple[bytes, bytes]]


class RequestBody(Protocol):
    """A request body read in chunks. Reading past `limit` raises `BodyTooLarge` (the app answers 413)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read_all(self, limit: int) -> bytes:
        """Read the whole body; raises `BodyTooLarge` past `limit` bytes."""
        ...


class EmptyBody:
    """A `RequestBody` with nothing in it, for requests built in code (tests, benchmarks) rather than read from a
    connection."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _no_chunks()

    async def read_all(self, limit: int) -> bytes:
        return b""


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


class BodyTooLarge(Exception):
    """The request body is larger than the limit the app set."""


class BadRequestBody(Exception):
    """The request body could not be read: malformed chunked framing (`status` 400), or the client sent it too
    slowly (408: below the minimum rate, or past the total body deadline of `HttpSettings`).

    Raised by `RequestBody` reads. An app that lets it propagate gets `status` (if nothing was sent yet) and the
    connection is closed.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ClientDisconnected(Exception):
    """The client went away. Raised by `Responder.send/start/write/end` when the socket is broken, and by
    `RequestBody` reads when the connection ends before the body does. The app should stop upstream work.

    A client that stalls (does not take writes or send body bytes within the server's timeouts) is not reported
    this way: the server cancels the request's task, so the app sees `trio.Cancelled`.
    """


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    """The raw request target, e.g. `/functions/v1/hello/x?a=1` (not percent-decoded)."""
    path: str
    """`target` up to `?` (not percent-decoded)."""
    query: str
    """`target` after `?`, or ''."""
    headers: Headers
    """Lower-case names, raw values, order and repeats kept."""
    body: RequestBody
    client: tuple[str, int] | None = None
    http_version: str = "1.1"
    scheme: str = "http"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def host(self) -> str:
        h = self.header(b"host")
        return h.decode("latin-1") if h else "localhost"


class Responder(Protocol):
    """Writes one response. Either `send` once, or `start`, any number of `write`, then `end`.

    After `start` the status is on the wire: a later failure can only abort the connection.
    """

    @property
    def started(self) -> bool: ...

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None: ...

    async def start(self, status: int, headers: Headers) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def end(self) -> None: ...


WebSocketHandler = Callable[[trio.abc.Stream, bytes, HttpRequest], Awaitable[None]]
"""(stream, bytes already read including the request head, parsed request). Owns and closes the stream."""


class HttpApp(Protocol):
    async def handle_http(self, request: HttpRequest, responder: Responder) -> None: ...

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None: ...
