"""Pub/sub against a real redis-server: delivery, patterns, unsubscribe, resubscribe after a restart."""

from __future__ import annotations

import trio
import trio.testing

from mbworker.lib.redis import (
    EventQueue,
    PubSubDisconnected,
    PubSubEvent,
    PubSubMessage,
    PubSubResubscribed,
    PubSubState,
    open_pubsub,
    open_redis,
    serve_pubsub,
)
from tests.redis_server import RedisServer

TIMEOUT = 10


async def next_event(receive: EventQueue[PubSubEvent]) -> PubSubEvent:
    with trio.fail_after(TIMEOUT):
        return await receive.receive()


async def test_messages_and_patterns_arrive_in_order(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r, open_pubsub(redis_server.url) as ps:
        await ps.subscribe("news", "sport")
        await ps.psubscribe("room:*")
        assert await r.publish("news", "n1") == 1
        await r.execute_many([("PUBLISH", "room:1", f"m{i}") for i in range(100)])
        assert await r.publish("sport", b"\x00bin") == 1
        assert await next_event(ps.messages) == PubSubMessage(b"news", b"n1")
        for i in range(100):
            assert await next_event(ps.messages) == PubSubMessage(b"room:1", f"m{i}".encode(), b"room:*")
        assert await next_event(ps.messages) == PubSubMessage(b"sport", b"\x00bin")
        stats = ps.statistics()
        assert (stats.channels, stats.patterns, stats.messages) == (2, 1, 102)
        assert stats.state is PubSubState.CONNECTED


async def test_unsubscribe_stops_delivery(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r, open_pubsub(redis_server.url) as ps:
        await ps.subscribe("a", "b")
        await ps.psubscribe("p.*")
        await ps.unsubscribe("a")
        await ps.punsubscribe("p.*")
        assert await r.publish("a", "lost") == 0
        assert await r.publish("p.x", "lost") == 0
        assert await r.publish("b", "kept") == 1
        assert await next_event(ps.messages) == PubSubMessage(b"b", b"kept")
        assert ps.statistics().channels == 1


async def test_resubscribes_after_server_restart(redis_server: RedisServer) -> None:
    async with open_pubsub(redis_server.url) as ps:
        await ps.subscribe("chan")
        await ps.psubscribe("pat.*")
        await redis_server.stop()
        event = await next_event(ps.messages)
        assert isinstance(event, PubSubDisconnected)
        await redis_server.start()
        assert await next_event(ps.messages) == PubSubResubscribed(channels=1, patterns=1)
        assert ps.state is PubSubState.CONNECTED
        async with open_redis(redis_server.url) as r:
            assert await r.publish("chan", "after") == 1
            assert await r.publish("pat.1", "p-after") == 1
        assert await next_event(ps.messages) == PubSubMessage(b"chan", b"after")
        assert await next_event(ps.messages) == PubSubMessage(b"pat.1", b"p-after", b"pat.*")
        stats = ps.statistics()
        assert (stats.disconnects, stats.reconnects) == (1, 1)


async def test_subscribe_while_disconnected_completes_after_reconnect(redis_server: RedisServer) -> None:
    async with open_pubsub(redis_server.url) as ps:
        await redis_server.stop()
        assert isinstance(await next_event(ps.messages), PubSubDisconnected)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ps.subscribe, "late")
            await redis_server.start()
        async with open_redis(redis_server.url) as r:
            assert await r.publish("late", "x") == 1
        assert await next_event(ps.messages) == PubSubResubscribed(channels=1, patterns=0)
        assert await next_event(ps.messages) == PubSubMessage(b"late", b"x")


async def test_serve_pubsub_starts_with_task_status(redis_server: RedisServer) -> None:
    async with trio.open_nursery() as nursery:
        ps = await nursery.start(serve_pubsub, redis_server.url)
        await ps.subscribe("s")
        async with open_redis(redis_server.url) as r:
            assert await r.publish("s", "hello") == 1
        assert await next_event(ps.messages) == PubSubMessage(b"s", b"hello")
        nursery.cancel_scope.cancel()


async def test_full_buffer_applies_backpressure_without_loss(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r, open_pubsub(redis_server.url, buffer=4) as ps:
        await ps.subscribe("c")
        await r.execute_many([("PUBLISH", "c", str(i)) for i in range(50)])
        received = [await next_event(ps.messages) for _ in range(50)]
        assert [m.data for m in received if isinstance(m, PubSubMessage)] == [str(i).encode() for i in range(50)]
        assert ps.statistics().buffer_full > 0


async def test_keepalive_pings_a_quiet_connection(redis_server: RedisServer) -> None:
    """PINGs on a quiet connection are answered, so it is not declared dead."""
    async with open_pubsub(redis_server.url, keepalive=0.05) as ps:
        await ps.subscribe("q")
        async with open_redis(redis_server.url) as r:

            async def pings() -> int:
                stats = (await r.execute("INFO", "commandstats")).decode()
                line = next((ln for ln in stats.splitlines() if ln.startswith("cmdstat_ping:")), "calls=0,")
                return int(line.split("calls=")[1].split(",")[0])

            with trio.fail_after(TIMEOUT):  # poll until several keepalive periods have passed
                while True:
                    if await pings() >= 3:
                        break
                    await trio.sleep(0.05)
            assert await r.publish("q", "still") == 1
        assert await next_event(ps.messages) == PubSubMessage(b"q", b"still")
        assert ps.statistics().disconnects == 0


async def test_keepalive_detects_a_silent_server(silent_server: int) -> None:
    async with open_pubsub(f"redis://127.0.0.1:{silent_server}", keepalive=0.05) as ps:
        event = await next_event(ps.messages)
        assert isinstance(event, PubSubDisconnected)
        assert "silent" in event.reason
        assert ps.state is not PubSubState.CONNECTED


async def test_subscriptions_changed_during_an_outage_leave_nothing_pending(redis_server: RedisServer) -> None:
    """Topics joined and left while Redis is down, by callers that don't wait (nowait) or give up at once,
    leave no confirmation behind; only the topic still wanted is subscribed when Redis is back."""
    async with open_pubsub(redis_server.url) as ps:
        await redis_server.stop()
        assert isinstance(await next_event(ps.messages), PubSubDisconnected)
        for i in range(1000):
            with trio.move_on_after(0):
                await ps.subscribe(f"gone{i}")
            await ps.unsubscribe(f"gone{i}")
            ps.subscribe_nowait(f"brief{i}")
            ps.unsubscribe_nowait(f"brief{i}")
        ps.subscribe_nowait("kept")
        stats = ps.statistics()
        assert (stats.channels, stats.pending_confirmations) == (1, 0)
        await redis_server.start()
        assert await next_event(ps.messages) == PubSubResubscribed(channels=1, patterns=0)
        assert ps.statistics().pending_confirmations == 0
        async with open_redis(redis_server.url) as r:
            assert await r.publish("kept", "x") == 1
            assert await r.publish("gone0", "x") == 0
            assert await r.publish("brief0", "x") == 0


async def test_unsubscribe_releases_a_subscribe_waiting_for_the_connection(redis_server: RedisServer) -> None:
    async with open_pubsub(redis_server.url) as ps:
        await redis_server.stop()
        assert isinstance(await next_event(ps.messages), PubSubDisconnected)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ps.subscribe, "late")
            await trio.testing.wait_all_tasks_blocked()
            assert ps.statistics().pending_confirmations == 1
            await ps.unsubscribe("late")  # the waiting subscribe returns: nothing is left to confirm
        assert ps.statistics().pending_confirmations == 0


async def test_nowait_changes_on_a_live_connection_keep_their_order(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r, open_pubsub(redis_server.url) as ps:
        ps.subscribe_nowait("a")
        ps.subscribe_nowait("b")
        ps.unsubscribe_nowait("b")
        await ps.subscribe("c")  # confirmed after everything sent before it
        assert await r.publish("a", "1") == 1
        assert await r.publish("b", "1") == 0
        ps.unsubscribe_nowait("a")
        await ps.subscribe("d")
        assert await r.publish("a", "2") == 0
        assert await next_event(ps.messages) == PubSubMessage(b"a", b"1")
        stats = ps.statistics()
        assert (stats.channels, stats.pending_confirmations) == (2, 0)
