"""The cluster bus (lib/redis/bus.py): one pub/sub connection, members by channel prefix, gap news to all."""

from __future__ import annotations

import pytest
import trio

from mbworker.lib.redis import (
    EventQueue,
    PubSubDisconnected,
    PubSubEvent,
    PubSubMessage,
    PubSubResubscribed,
    open_pubsub_bus,
    open_redis,
    parse_redis_url,
)
from tests.redis_server import RedisServer


class Member:
    """Records what the bus tells it, for the test to wait on."""

    def __init__(self) -> None:
        self.events: EventQueue[PubSubEvent] = EventQueue(100)

    def on_message(self, message: PubSubMessage) -> None:
        self.events.put_nowait(message)

    def on_disconnected(self, event: PubSubDisconnected) -> None:
        self.events.put_nowait(event)

    def on_resubscribed(self, event: PubSubResubscribed) -> None:
        self.events.put_nowait(event)

    async def next(self) -> PubSubEvent:
        with trio.fail_after(10):
            return await self.events.receive()


async def test_members_share_one_connection_and_hear_every_gap(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r, open_pubsub_bus(parse_redis_url(redis_server.url)) as bus:
        a, b = Member(), Member()
        bus.register("app:a:", a)
        bus.register("app:b:", b)
        with pytest.raises(ValueError, match="overlaps"):
            bus.register("app:", Member())
        await bus.pubsub.subscribe("app:a:1", "app:b:1")
        assert isinstance(await a.next(), PubSubResubscribed)  # the first connection is announced to all
        assert isinstance(await b.next(), PubSubResubscribed)
        assert await r.publish("app:a:1", "to a") == 1  # one connection: one receiver per message
        assert await r.publish("app:b:1", "to b") == 1
        assert await a.next() == PubSubMessage(b"app:a:1", b"to a")
        assert await b.next() == PubSubMessage(b"app:b:1", b"to b")
        late = Member()
        bus.register("app:late:", late)  # registering later: told at once that the bus is up
        assert isinstance(await late.next(), PubSubResubscribed)
        await redis_server.stop()
        for member in (a, b, late):
            assert isinstance(await member.next(), PubSubDisconnected)
        await redis_server.start()
        for member in (a, b, late):
            assert await member.next() == PubSubResubscribed(channels=2, patterns=0)
        assert bus.pubsub.statistics().channels == 2
