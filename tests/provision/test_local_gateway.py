"""The local gateway splices bytes both ways (so WebSocket upgrades pass), balances, and skips dead workers."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import trio

from mbworker.lib.http.server import serve_http
from mbworker.lib.http.types import HttpRequest, Responder
from mbworker.provision.local_gateway import serve_gateway
from tests.conftest import free_port


async def echo_server(name: bytes, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(name + b":")
            async for data in stream:
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    with trio.fail_after(5):
        while len(buf) < n:
            chunk = await stream.receive_some(n - len(buf))
            assert chunk, "connection closed early"
            buf += chunk
    return buf


async def test_splices_round_robin_and_skips_dead_backends(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    dead = free_port()  # nothing listens here: refused, skipped
    async with trio.open_nursery() as nursery:
        a = await nursery.start(echo_server, b"A")
        b = await nursery.start(echo_server, b"B")
        backends.write_text(f"127.0.0.1:{a}\n127.0.0.1:{dead}\n# comment\n127.0.0.1:{b}\n")
        port = await nursery.start(serve_gateway, "127.0.0.1", 0, backends)
        seen = set()
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                who = await receive_exactly(stream, 2)
                seen.add(who)
                # a long-lived, two-way exchange, as a WebSocket session is after its upgrade
                for i in range(3):
                    await stream.send_all(b"ping%d" % i)
                    assert await receive_exactly(stream, 5) == b"ping%d" % i
        assert seen == {b"A:", b"B:"}

        backends.write_text("")  # scaled to nothing: the gateway answers 503 itself
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head = await receive_exactly(stream, 12)
            assert head == b"HTTP/1.1 503"
        nursery.cancel_scope.cancel()


class FakeControl:
    """`GET /control/v1/upstreams` as the control plane answers it, for the node token only."""

    def __init__(self) -> None:
        self.upstreams: list[str] = []
        self.pulled = trio.Event()

    def websocket_handler(self, request: HttpRequest) -> None:
        return None

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        if request.header(b"authorization") != b"Bearer node-token" or request.path != "/control/v1/upstreams":
            await responder.send(401, [])
            return
        body = json.dumps([{"name": f"w{i}", "address": a} for i, a in enumerate(self.upstreams)]).encode()
        await responder.send(200, [(b"content-type", b"application/json")], body)
        self.pulled.set()

    async def next_pull(self) -> None:
        self.pulled = trio.Event()
        with trio.fail_after(10):
            await self.pulled.wait()


async def test_upstreams_pulled_from_the_control_plane_win_over_the_file(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    control = FakeControl()
    async with trio.open_nursery() as nursery:
        a = await nursery.start(echo_server, b"A")
        b = await nursery.start(echo_server, b"B")
        backends.write_text(f"127.0.0.1:{a}\n")
        control.upstreams = [f"127.0.0.1:{b}"]
        server = await nursery.start(serve_http, control, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.port}"
        port = await nursery.start(partial(serve_gateway, "127.0.0.1", 0, backends, control=(url, "node-token")))

        async def who() -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                return await receive_exactly(stream, 2)

        await control.next_pull()
        await control.next_pull()  # the first answer has been applied
        assert {await who() for _ in range(3)} == {b"B:"}
        control.upstreams = []  # the control plane knows no ready worker: the file decides
        await control.next_pull()
        await control.next_pull()
        assert {await who() for _ in range(3)} == {b"A:"}
        nursery.cancel_scope.cancel()
