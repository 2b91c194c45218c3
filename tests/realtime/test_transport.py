"""The transport's own WebSocket work, seen from a raw socket: our frames, parsed with websockets' client side."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.realtime.helpers import ANON, running_realtime


def frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True)


HEARTBEAT = json.dumps([None, "7", "phoenix", "heartbeat", {}]).encode()


class Raw:
    """A TCP client writing hand-made frames; what the server sends is parsed by a websockets ClientProtocol."""

    def __init__(self, stream: trio.SocketStream, parser: ClientProtocol) -> None:
        self.stream = stream
        self.parser = parser
        self.eof = False
        self.frames: list[Frame] = []

    async def next_frame(self) -> Frame | None:
        """The server's next frame, or None once it closed the TCP connection."""
        with trio.fail_after(5):
            while True:
                self.frames += [e for e in self.parser.events_received() if isinstance(e, Frame)]
                if self.frames:
                    return self.frames.pop(0)
                if self.eof:
                    return None
                data = await self.stream.receive_some(65536)
                if data:
                    self.parser.receive_data(data)
                else:
                    self.eof = True
                    self.parser.receive_eof()


@asynccontextmanager
async def raw_client(port: int, early: bytes = b"") -> AsyncIterator[Raw]:
    """Handshake with `early` bytes sent in the same write as the request."""
    parser = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={ANON}&vsn=2.0.0"))
    parser.send_request(parser.connect())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"".join(parser.data_to_send()) + early)
        raw = Raw(stream, parser)
        with trio.fail_after(5):
            while True:
                events = parser.events_received()
                if events:
                    assert isinstance(events[0], Response)
                    assert events[0].status_code == 101
                    raw.frames += [e for e in events[1:] if isinstance(e, Frame)]  # may come in the same read
                    break
                parser.receive_data(await stream.receive_some(65536))
        yield raw


async def test_early_frame_fragments_and_ping() -> None:
    async with running_realtime() as (_, port), raw_client(port, early=frame(Opcode.TEXT, HEARTBEAT)) as c:
        # a frame that came in the same packet as the upgrade request is not lost
        reply = await c.next_frame()
        assert reply is not None
        assert json.loads(bytes(reply.data))[1:4] == ["7", "phoenix", "phx_reply"]
        # a fragmented message with a ping between its fragments: the pong first, then the joined message
        half = len(HEARTBEAT) // 2
        await c.stream.send_all(
            frame(Opcode.TEXT, HEARTBEAT[:half], fin=False)
            + frame(Opcode.PING, b"hi")
            + frame(Opcode.CONT, HEARTBEAT[half:])
        )
        pong = await c.next_frame()
        assert pong is not None
        assert (pong.opcode, pong.data) == (Opcode.PONG, b"hi")
        reply = await c.next_frame()
        assert reply is not None
        assert json.loads(bytes(reply.data))[3] == "phx_reply"


async def test_invalid_utf8_text_closes_with_1007() -> None:
    async with running_realtime() as (svc, port), raw_client(port) as c:
        await c.stream.send_all(frame(Opcode.TEXT, b'["\xff"]'))
        close = await c.next_frame()
        assert close is not None
        assert close.opcode is Opcode.CLOSE
        assert Close.parse(close.data).code == 1007
        assert await c.next_frame() is None  # then the server closes the TCP connection,
        assert svc.statistics().connections == 0  # after releasing the connection


async def test_client_close_is_answered_and_connection_released() -> None:
    async with running_realtime() as (svc, port), raw_client(port) as c:
        await c.stream.send_all(frame(Opcode.TEXT, HEARTBEAT))
        assert await c.next_frame() is not None
        assert svc.statistics().connections == 1
        await c.stream.send_all(frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
        close = await c.next_frame()
        assert close is not None
        assert Close.parse(close.data).code == 1000
        assert await c.next_frame() is None
        assert svc.statistics().connections == 0
