"""WebSocket handoff: the front door gives the stream and the bytes it read to a handler; websockets' trio
server side completes the handshake against a real client."""

from __future__ import annotations

import base64
import os

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response
from websockets.trio.client import connect
from websockets.trio.server import ServerConnection

from mbworker.lib.http.types import HttpRequest, Responder
from mbworker.lib.http.websocket import WebSocketHandshakeError, WebSocketOptions, open_websocket
from tests.lib_http._support import App, RawClient, running


def echo_app(seen: list[bytes], failures: list[BaseException], done: trio.Event | None = None) -> App:
    app = App()

    async def handler(stream: trio.abc.Stream, buffered: bytes, request: HttpRequest) -> None:
        seen.append(buffered)
        try:
            async with open_websocket(stream, buffered, request, WebSocketOptions(open_timeout=5)) as ws:
                async for message in ws:
                    await ws.send(message if isinstance(message, bytes) else f"echo:{message}")
        except WebSocketHandshakeError as exc:
            failures.append(exc)
        finally:
            if done is not None:
                done.set()

    @app.route("/hello")
    async def hello(request: HttpRequest, responder: Responder) -> None:
        await responder.send(200, [], b"hello")

    app.ws = handler
    return app


async def test_handoff_completes_a_real_handshake() -> None:
    seen: list[bytes] = []
    failures: list[BaseException] = []
    async with running(echo_app(seen, failures)) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/ws?token=x") as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
        assert server.statistics().websocket_handoffs == 1
    assert seen[0].startswith(b"GET /ws?token=x HTTP/1.1\r\n")
    assert seen[0].endswith(b"\r\n\r\n")
    assert failures == []


def upgrade_request(path: bytes, key: bool = True) -> bytes:
    lines = [b"GET %s HTTP/1.1" % path, b"Host: t", b"Upgrade: websocket", b"Connection: Upgrade"]
    if key:
        lines.append(b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)))
    lines.append(b"Sec-WebSocket-Version: 13")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_upgrade_pipelined_behind_a_request_is_still_handed_off() -> None:
    seen: list[bytes] = []
    async with running(echo_app(seen, [])) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n" + upgrade_request(b"/ws"))
        raw = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in raw.partition(b"hello")[2]:
                raw += await c.stream.receive_some(65536)
        hello, _, switching = raw.partition(b"hello")
        assert hello.startswith(b"HTTP/1.1 200 OK")
        assert switching.startswith(b"HTTP/1.1 101 Switching Protocols")
    assert seen[0].startswith(b"GET /ws HTTP/1.1\r\n")


async def test_refused_handshake_is_answered_and_reported() -> None:
    failures: list[BaseException] = []
    done = trio.Event()
    async with running(echo_app([], failures, done)) as server:
        async with RawClient.connect(server.port) as c:
            await c.send(upgrade_request(b"/ws", key=False))
            response = await c.response()
            assert response.status == 400
            await c.wait_closed()
        with trio.fail_after(10):
            await done.wait()
    assert len(failures) == 1
    assert isinstance(failures[0], WebSocketHandshakeError)


async def test_upgrade_without_a_handler_is_plain_http_then_closed() -> None:
    async with running(echo_app([], [])) as server, RawClient.connect(server.port) as c:
        await c.send(upgrade_request(b"/hello"))
        response = await c.response()
        assert (response.status, response.body) == (200, b"hello")
        assert response.header(b"connection") == b"close"
        await c.wait_closed()
        assert server.statistics().websocket_handoffs == 0


async def test_process_request_can_refuse_the_upgrade() -> None:
    app = App()
    failures: list[BaseException] = []
    done = trio.Event()

    def refuse(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(401, "no token\n")

    async def handler(stream: trio.abc.Stream, buffered: bytes, request: HttpRequest) -> None:
        try:
            async with open_websocket(stream, buffered, request, process_request=refuse):
                raise AssertionError("refused connections never open")
        except WebSocketHandshakeError as exc:
            failures.append(exc)
        finally:
            done.set()

    app.ws = handler
    async with running(app) as server:
        with pytest.raises(InvalidStatus, match="401"):
            async with connect(f"ws://127.0.0.1:{server.port}/ws"):
                pass
        with trio.fail_after(10):
            await done.wait()
    assert len(failures) == 1
