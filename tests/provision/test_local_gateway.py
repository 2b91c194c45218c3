"""The local gateway splices bytes both ways (so WebSocket upgrades pass), balances, and skips dead workers."""

from __future__ import annotations

from pathlib import Path

import trio

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
