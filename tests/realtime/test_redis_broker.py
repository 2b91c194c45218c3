"""RedisBroker beyond the contract: realtime nodes sharing one real redis-server (websocket clients), one
order per topic on every node, and a Redis restart (local delivery meanwhile, recovery, no duplicates)."""

from __future__ import annotations

from typing import Any

import trio

from mbworker.lib.redis import RedisClient, open_redis
from mbworker.realtime.broker import Envelope, broker_key
from mbworker.realtime.broker_redis import RedisBroker
from tests.realtime.helpers import Phx, phx_client, redis_node
from tests.redis_server import RedisServer

T = "realtime:room"


async def say(client: Phx, join_ref: str, event: str) -> None:
    await client.send(join_ref, None, T, "broadcast", {"type": "broadcast", "event": event, "payload": {}})


async def next_broadcast(client: Phx) -> Any:
    return (await client.expect("broadcast", T))[4]["event"]


async def test_broadcast_crosses_nodes_and_self_false_skips_only_the_sender(redis: RedisClient) -> None:
    async with (
        redis_node(redis, "A") as (_, port_a, _, _),
        redis_node(redis, "B") as (_, port_b, _, _),
        phx_client(port_a) as a1,
        phx_client(port_a) as a2,
        phx_client(port_b, "1.0.0") as b1,
    ):
        config = {"broadcast": {"self": False}}
        j1, _ = await a1.join(T, config)
        j2, _ = await a2.join(T, config)
        jb, _ = await b1.join(T, config)
        await say(a1, j1, "from-a1")
        assert await next_broadcast(a2) == "from-a1"  # same node, another connection
        assert await next_broadcast(b1) == "from-a1"  # other node, other wire format
        await say(b1, jb, "from-b1")
        assert await next_broadcast(a1) == "from-b1"  # a1 never got its own message: this is its first
        assert await next_broadcast(a2) == "from-b1"
        await say(a2, j2, "from-a2")
        assert await next_broadcast(a1) == "from-a2"
        assert await next_broadcast(b1) == "from-a2"


class Sink:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.changed = trio.Event()

    def handle_publication(self, key: str, envelope: Envelope) -> None:
        self.events.append(envelope.event)
        self.changed.set()

    async def wait_count(self, n: int) -> None:
        with trio.fail_after(10):
            while len(self.events) < n:
                self.changed = trio.Event()
                await self.changed.wait()


async def test_one_order_per_topic_on_every_node(redis: RedisClient) -> None:
    """Two nodes publish concurrently: both see the same sequence, and each publisher's own order."""
    n = 300
    key = broker_key(T, False)
    async with trio.open_nursery() as nursery:
        nodes = [RedisBroker(redis, redis.settings, node_id=name) for name in ("A", "B")]
        sinks = [Sink(), Sink()]
        for node, sink in zip(nodes, sinks, strict=True):
            node.bind(sink)
            await nursery.start(node.serve)
            await node.subscribe(key)

        async def publish_all(node: RedisBroker) -> None:
            for i in range(n):
                env = Envelope(T, False, f"{node.node_id}{i}", b"{}", True, False, node.node_id, sender="c")
                await node.publish(key, env)

        async with trio.open_nursery() as publishers:
            for node in nodes:
                publishers.start_soon(publish_all, node)
        for sink in sinks:
            await sink.wait_count(2 * n)
        assert sinks[0].events == sinks[1].events
        for name in ("A", "B"):
            assert [e for e in sinks[0].events if e.startswith(name)] == [f"{name}{i}" for i in range(n)]
        assert nodes[0].statistics().local_fallbacks == 0
        nursery.cancel_scope.cancel()


async def test_redis_restart_local_delivery_then_recovery_without_duplicates(
    redis_server: RedisServer, redis: RedisClient
) -> None:
    async with (
        redis_node(redis, "A") as (_, port_a, broker_a, _),
        redis_node(redis, "B") as (_, port_b, broker_b, _),
        phx_client(port_a) as a1,
        phx_client(port_a) as a2,
        phx_client(port_b) as b1,
    ):
        config = {"broadcast": {"self": False}}
        j1, _ = await a1.join(T, config)
        await a2.join(T, config)
        jb, _ = await b1.join(T, config)
        await say(a1, j1, "before")
        assert await next_broadcast(a2) == "before"
        assert await next_broadcast(b1) == "before"

        await redis_server.stop()
        await say(a1, j1, "during")  # Redis is down: node A's own subscribers still get it
        assert await next_broadcast(a2) == "during"
        assert broker_a.statistics().local_fallbacks >= 1

        await redis_server.start()
        await broker_a.wait_connected(10)
        await broker_b.wait_connected(10)
        await redis.wait_connected(10)  # the command connections reconnect on their own schedule
        await say(a1, j1, "after")
        assert await next_broadcast(a2) == "after"
        assert await next_broadcast(b1) == "after"  # "during" never crossed (lost with Redis); "after" does
        await say(b1, jb, "last")
        assert await next_broadcast(a2) == "last"  # "after" reached a2 exactly once
        assert await next_broadcast(a1) == "last"  # and a1 never saw its own messages, before or after


async def test_broker_started_without_redis_delivers_locally_then_joins(redis_server: RedisServer) -> None:
    url = redis_server.url
    await redis_server.stop()  # a known free port with nothing listening yet
    async with open_redis(url + "?connect_timeout=0.5&command_timeout=1", require_connection=False) as redis:
        key = broker_key(T, False)
        sink_a, sink_b = Sink(), Sink()
        async with trio.open_nursery() as nursery:
            a = RedisBroker(redis, redis.settings, node_id="A")
            b = RedisBroker(redis, redis.settings, node_id="B")
            a.bind(sink_a)
            b.bind(sink_b)
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            await a.subscribe(key)
            await b.subscribe(key)
            await a.publish(key, Envelope(T, False, "local", b"{}", True, False, "A"))
            await sink_a.wait_count(1)
            await redis_server.start()
            await a.wait_connected(10)
            await b.wait_connected(10)
            await redis.wait_connected(10)
            await a.publish(key, Envelope(T, False, "shared", b"{}", True, False, "A"))
            await sink_b.wait_count(1)
            await sink_a.wait_count(2)
            assert sink_a.events == ["local", "shared"]
            assert sink_b.events == ["shared"]
            nursery.cancel_scope.cancel()
