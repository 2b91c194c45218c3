"""lib/websocket.py's `Transport` writes on a real socket pair: a whole message larger than the queue budget goes
(`send_whole`), a peer that stops reading is cut by the write timeout, and `send` keeps its budget (realtime)."""

from __future__ import annotations

import socket

import trio
from websockets.server import ServerProtocol

from mbworker.lib.websocket import OutFrame, Transport

BUDGET = 64 << 10
BIG = OutFrame(b"x" * (4 << 20))


def _open_protocol() -> ServerProtocol:
    proto = ServerProtocol(max_size=None)
    proto.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    (request,) = proto.events_received()
    proto.send_response(proto.accept(request))  # type: ignore[arg-type]
    proto.data_to_send()
    return proto


def _pair(nursery: trio.Nursery, write_timeout: float) -> tuple[Transport, trio.SocketStream, trio.Event]:
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport = Transport(trio.SocketStream(ours), _open_protocol(), nursery, BUDGET, write_timeout)
    cut = trio.Event()
    transport.on_overflow = cut.set
    return transport, trio.SocketStream(theirs), cut


async def test_a_whole_message_over_the_budget_arrives() -> None:
    async with trio.open_nursery() as nursery:
        transport, peer, cut = _pair(nursery, write_timeout=30)
        with trio.fail_after(30):
            await transport.send_whole(BIG)
            await transport.send_whole(OutFrame(b"after"))
            got = bytearray()
            want = len(BIG.wire) + len(OutFrame(b"after").wire)
            while len(got) < want:
                got += await peer.receive_some(1 << 20)
        assert bytes(got) == BIG.wire + OutFrame(b"after").wire
        assert not transport.overflowed
        assert not cut.is_set()
        await transport.aclose(timeout=0)
        await peer.aclose()


async def test_a_peer_that_stops_reading_is_cut_by_the_write_timeout() -> None:
    async with trio.open_nursery() as nursery:
        transport, peer, cut = _pair(nursery, write_timeout=0.2)
        await transport.send_whole(BIG)
        assert not transport.overflowed  # over the budget, but the message in flight is not held to it
        with trio.fail_after(30):
            await transport.send_whole(OutFrame(b"next"))  # waits for the writer, which gives up
            await cut.wait()
        assert transport.overflowed
        await transport.aclose(timeout=0)
        await peer.aclose()


async def test_send_keeps_to_the_budget() -> None:
    async with trio.open_nursery() as nursery:
        transport, peer, cut = _pair(nursery, write_timeout=30)
        transport.send(BIG)  # realtime's path: what the socket did not take is over the budget
        assert transport.overflowed
        assert cut.is_set()
        await transport.aclose(timeout=0)
        await peer.aclose()
