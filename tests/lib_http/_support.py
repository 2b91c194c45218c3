"""Test support: a scriptable app, a running server, and a raw HTTP client over trio sockets."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httptools
import trio

from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.settings import HttpSettings
from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler

Route = Callable[[HttpRequest, Responder], Awaitable[None]]


class App:
    """Routes by path; `ws` answers WebSocket upgrades on /ws when set."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.ws: WebSocketHandler | None = None
        self.seen: list[HttpRequest] = []

    def route(self, path: str) -> Callable[[Route], Route]:
        def register(fn: Route) -> Route:
            self.routes[path] = fn
            return fn

        return register

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        self.seen.append(request)
        route = self.routes.get(request.path)
        if route is None:
            await responder.send(404, [(b"content-type", b"text/plain")], b"no route")
            return
        await route(request, responder)

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return self.ws if request.path == "/ws" else None


@asynccontextmanager
async def running(app: App, **settings: object) -> AsyncIterator[HttpServer]:
    """serve_http on 127.0.0.1 and a free port; cancelled on exit."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_http, settings=HttpSettings.model_validate(settings))
        server: HttpServer = await nursery.start(serve, app, "127.0.0.1", 0)
        yield server
        nursery.cancel_scope.cancel()


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class RawClient:
    """Writes raw bytes, parses responses with httptools' response parser (pipelined ones too)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.responses: deque[Response] = deque()
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[RawClient]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            yield cls(stream)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self._current.body += data

    def on_message_complete(self) -> None:
        self.responses.append(self._current)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self, timeout: float = 10) -> Response:
        with trio.fail_after(timeout):
            while not self.responses:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("connection closed before a complete response")
                self._parser.feed_data(data)
        return self.responses.popleft()

    async def read_raw(self, timeout: float = 10) -> bytes:
        """Everything until the server closes the connection."""
        parts = []
        with trio.fail_after(timeout):
            while data := await self.stream.receive_some(65536):
                parts.append(data)
        return b"".join(parts)

    async def wait_until_closed(self, timeout: float = 10) -> None:
        """Read and discard until the server closes the connection (EOF or reset)."""
        with trio.fail_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                return

    async def wait_closed(self, timeout: float = 10) -> None:
        """Wait for the server to close (EOF or reset); unexpected data fails the test."""
        with trio.fail_after(timeout):
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
        assert data == b"", f"expected the connection to close, got {data!r}"
