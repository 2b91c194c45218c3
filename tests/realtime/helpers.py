"""Test helpers: JWTs, a tiny upgrade-only front door, a Phoenix client over websockets' trio client, and a
realtime node on Redis.

The front door here only reads a request head and hands the stream to `RealtimeService.websocket_handler`
(the same seam lib/http uses); the e2e tests go through the real lib/http server instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import jwt
import trio
from websockets.trio.client import ClientConnection, connect

from mbworker.lib.http.types import EmptyBody, HttpRequest
from mbworker.lib.redis import RedisClient, open_pubsub_bus
from mbworker.realtime import RealtimeService, RealtimeSettings, open_realtime
from mbworker.realtime.broker_redis import RedisBroker, open_redis_broker
from mbworker.realtime.presence_redis import RedisPresence, open_redis_presence

SECRET = "test-secret-that-is-long-enough-for-hs256"


def make_jwt(role: str = "anon", *, exp_in: float | None = 3600, secret: str = SECRET, **claims: Any) -> str:
    body: dict[str, Any] = {"role": role, **claims}
    if exp_in is not None:
        body["exp"] = int(time.time() + exp_in)
    return jwt.encode(body, secret, algorithm="HS256")


ANON = make_jwt("anon", exp_in=10 * 365 * 86400)


async def _front_door(service: RealtimeService, stream: trio.SocketStream) -> None:
    buf = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if len(head[0].split(" ")) != 3:
        await stream.aclose()
        return
    method, target, _ = head[0].split(" ")
    headers = [(k.strip().lower().encode(), v.strip().encode()) for k, v in (h.split(":", 1) for h in head[1:])]
    path, _, query = target.partition("?")
    request = HttpRequest(method, target, path, query, headers, EmptyBody())
    handler = service.websocket_handler(request)
    if handler is None:
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()
        return
    await handler(stream, buf, request)


@asynccontextmanager
async def running_realtime(
    settings: RealtimeSettings | None = None, *, node_id: str = "n1", **kw: Any
) -> AsyncIterator[tuple[RealtimeService, int]]:
    """A RealtimeService behind the mini front door on a free loopback port: (service, port)."""
    async with open_realtime(settings or RealtimeSettings(), jwt_secret=SECRET, node_id=node_id, **kw) as svc:  # noqa: SIM117
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, lambda s: _front_door(svc, s), 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            yield svc, port
            nursery.cancel_scope.cancel()


class Phx:
    """A minimal Phoenix client for tests: send frames, wait for matching ones (with a timeout)."""

    def __init__(self, ws: ClientConnection, vsn: str) -> None:
        self.ws = ws
        self.vsn = vsn
        self._ref = 0
        self.seen: list[Any] = []

    def next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    async def send(self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any) -> None:
        if self.vsn == "2.0.0":
            await self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        else:
            await self.ws.send(
                json.dumps({"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload})
            )

    async def recv(self, timeout: float = 5) -> tuple[Any, Any, str, str, Any] | bytes:
        """The next frame as (join_ref, ref, topic, event, payload), or raw bytes for binary frames."""
        with trio.fail_after(timeout):
            data = await self.ws.recv()
        if isinstance(data, bytes):
            self.seen.append(data)
            return data
        doc = json.loads(data)
        if self.vsn == "2.0.0":
            assert isinstance(doc, list)
            msg = tuple(doc)
        else:
            assert "join_ref" not in doc, "v1 server frames carry no join_ref"
            msg = (None, doc["ref"], doc["topic"], doc["event"], doc["payload"])
        self.seen.append(msg)
        return msg

    async def expect(self, event: str, topic: str | None = None, timeout: float = 5) -> tuple[Any, ...]:
        """Skip frames until one with `event` (and `topic`) arrives."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(timeout)
                if isinstance(msg, tuple) and msg[3] == event and (topic is None or msg[2] == topic):
                    return msg

    async def reply_to(self, ref: str, timeout: float = 5) -> tuple[Any, ...]:
        """Skip frames until the phx_reply to `ref`."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.expect("phx_reply", timeout=timeout)
                if msg[1] == ref:
                    return msg

    async def join(self, topic: str, config: dict[str, Any] | None = None, **extra: Any) -> tuple[str, Any]:
        ref = self.next_ref()
        payload = {"config": config or {}, **extra}
        await self.send(ref, ref, topic, "phx_join", payload)
        reply = await self.expect("phx_reply", topic)
        return ref, reply


@asynccontextmanager
async def phx_client(
    port: int, vsn: str = "2.0.0", apikey: str = ANON, path: str = "/realtime/v1/websocket"
) -> AsyncIterator[Phx]:
    url = f"ws://127.0.0.1:{port}{path}?apikey={apikey}&vsn={vsn}"
    async with connect(url, open_timeout=5, ping_interval=None) as ws:
        yield Phx(ws, vsn)


@asynccontextmanager
async def redis_node(
    redis: RedisClient, node_id: str, settings: RealtimeSettings | None = None
) -> AsyncIterator[tuple[RealtimeService, int, RedisBroker, RedisPresence]]:
    """A realtime node on Redis, wired as the daemon does it (broker and presence on one pub/sub bus):
    (service, port, broker, presence)."""
    settings = settings or RealtimeSettings()
    async with (
        open_pubsub_bus(redis.settings) as bus,
        open_redis_broker(redis, redis.settings, node_id=node_id, bus=bus) as broker,
        open_redis_presence(redis, redis.settings, node_id=node_id, ttl=settings.presence_ttl, bus=bus) as presence,
        running_realtime(settings, node_id=node_id, broker=broker, presence=presence) as (service, port),
    ):
        yield service, port, broker, presence
