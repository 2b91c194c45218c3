"""RedisClient against a real redis-server: commands, pipelines, concurrency, errors, timeouts, recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from mbworker.lib.redis import (
    RedisConnectionError,
    RedisResponseError,
    RedisState,
    RedisTimeout,
    open_redis,
    parse_redis_url,
    serve_redis,
)
from tests.conftest import free_port
from tests.redis_server import RedisServer


async def test_basic_commands(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        assert await r.ping() == b"PONG"
        assert await r.get("missing") is None
        assert await r.set("k", "v") is True
        assert await r.get("k") == b"v"
        assert await r.set("k", "w", nx=True) is False
        assert await r.get("k") == b"v"
        assert await r.set("tmp", b"\x00\xff", px=60_000) is True
        assert 0 < await r.execute("PTTL", "tmp") <= 60_000
        assert await r.incr("n") == 1
        assert await r.incrby("n", 41) == 42
        assert await r.expire("n", 100) is True
        assert await r.pexpire("nope", 100) is False
        assert await r.hset("h", {"a": 1, "b": "two"}) == 2
        assert await r.hget("h", "a") == b"1"
        assert await r.hgetall("h") == {b"a": b"1", b"b": b"two"}
        assert await r.hdel("h", "a", "zz") == 1
        assert await r.zadd("z", {"x": 1.5, "y": 2, "w": 3}) == 3
        assert await r.zrangebyscore("z", 1, 2) == [b"x", b"y"]
        assert await r.zrangebyscore("z", "-inf", "+inf", withscores=True, offset=1, count=1) == [(b"y", 2.0)]
        assert await r.zrem("z", "x", "nope") == 1
        assert await r.publish("nobody-listens", "m") == 0
        assert await r.delete("k", "tmp", "missing") == 2


async def test_scan_iter_yields_every_matching_key(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        await r.execute_many([("SET", f"scan:{i}", i) for i in range(250)] + [("SET", "other", 1)])
        keys = {k async for k in r.scan_iter(match="scan:*", count=20)}
        assert keys == {f"scan:{i}".encode() for i in range(250)}


async def test_pipeline_results_in_order(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        async with r.pipeline() as p:
            was_set, incremented, got = p.set("a", 1), p.incr("a"), p.get("a")
            p.hset("h", {"f": "v"})
            fields = p.hgetall("h")
            p.delete("a")
            counts = [p.incr("counter") for _ in range(100)]
            assert len(p) == 106
            results = await p.execute()
        assert results[:6] == [True, 2, b"2", 1, {b"f": b"v"}, 1]
        assert results[6:] == list(range(1, 101))
        # Each queued command's slot holds its own typed result.
        assert (await was_set, await incremented, await got, await fields) == (True, 2, b"2", {b"f": b"v"})
        assert [await c for c in counts] == list(range(1, 101))
        assert await r.execute_many([("PING",), ("ECHO", "x"), ("GET", "counter")]) == [b"PONG", b"x", b"100"]


async def test_pipeline_error_reply_raises_or_is_returned(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        await r.set("str", "x")
        async with r.pipeline() as p:
            first, wrong, last = p.incr("n"), p.hset("str", {"f": 1}), p.incr("n")
            with pytest.raises(RedisResponseError) as info:
                await p.execute()
        assert info.value.code == "WRONGTYPE"
        assert (await first, await last) == (1, 2)
        with pytest.raises(RedisResponseError, match="WRONGTYPE"):
            await wrong
        assert await r.get("n") == b"2"  # the commands around the error still ran
        results = await r.execute_many([("INCR", "n"), ("HSET", "str", "f", 1)], raise_on_error=False)
        assert results[0] == 3
        assert isinstance(results[1], RedisResponseError)
        assert results[1].code == "WRONGTYPE"


async def test_concurrent_callers_get_their_own_replies(redis_server: RedisServer) -> None:
    """1000 concurrent commands share (and are pipelined over) the pool; each caller gets its own answer."""
    results: dict[int, bytes | None] = {}
    async with open_redis(redis_server.url) as r:
        await r.execute_many([("SET", f"c:{i}", f"value-{i}") for i in range(1000)])

        async def one(i: int) -> None:
            results[i] = await r.get(f"c:{i}")

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        stats = r.statistics()
    assert results == {i: f"value-{i}".encode() for i in range(1000)}
    assert stats.commands == 2000
    assert stats.inflight == 0
    assert stats.state is RedisState.CONNECTED


async def test_error_reply_maps_to_response_error(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        with pytest.raises(RedisResponseError) as info:
            await r.execute("NOSUCHCOMMAND", "x")
        assert info.value.code == "ERR"
        assert "unknown command" in str(info.value)
        assert info.value.__cause__ is not None  # chained from the hiredis ReplyError
        assert await r.ping() == b"PONG"  # the connection is still fine
        assert r.statistics().response_errors == 1


async def test_connection_refused_is_a_connection_error() -> None:
    port = free_port()
    with pytest.raises(RedisConnectionError) as info:
        async with open_redis(f"redis://127.0.0.1:{port}?connect_timeout=2"):
            pass
    assert isinstance(info.value.__cause__, OSError)
    assert f"127.0.0.1:{port}" in str(info.value)


async def test_command_timeout_on_a_server_that_never_answers(silent_server: int) -> None:
    settings = parse_redis_url(f"redis://127.0.0.1:{silent_server}", command_timeout=0.2, pool_size=1)
    async with open_redis(settings) as r:
        with pytest.raises(RedisTimeout) as info:
            await r.ping()
        assert isinstance(info.value.__cause__, RedisTimeout)  # the connection's error, from trio's
        assert isinstance(info.value.__cause__.__cause__, trio.TooSlowError)
        assert r.statistics().timeouts == 1


async def test_connect_timeout_in_handshake(silent_server: int) -> None:
    """The TCP connect succeeds but AUTH never gets an answer: the connect timeout applies."""
    with pytest.raises(RedisTimeout):
        async with open_redis(f"redis://:pw@127.0.0.1:{silent_server}?connect_timeout=0.2"):
            pass


async def test_not_required_connection_starts_degraded_then_connects(tmp_path: Path) -> None:
    from tests.redis_server import start_redis_server

    port = free_port()
    url = f"redis://127.0.0.1:{port}?connect_timeout=1"
    async with open_redis(url, require_connection=False) as r:
        assert r.state in (RedisState.CONNECTING, RedisState.DEGRADED)
        with pytest.raises(RedisConnectionError):
            await r.ping()
        server = await start_redis_server(tmp_path, port=port)
        try:
            await r.wait_connected(timeout=10)
            assert await r.ping() == b"PONG"
        finally:
            await server.stop()


async def test_server_restart_fails_in_flight_then_recovers(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        await r.set("before", 1)
        await redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await r.get("before")
        await redis_server.start()
        await r.wait_connected(timeout=10)
        assert await r.set("after", 2) is True
        assert await r.get("after") == b"2"
        stats = r.statistics()
        assert stats.reconnects >= 1
        assert stats.connection_errors >= 1
        assert stats.state is RedisState.CONNECTED


async def test_cancelled_caller_does_not_shift_replies(redis_server: RedisServer) -> None:
    """A caller cancelled while its reply is pending leaves its slot in the FIFO: the next caller on the same
    connection gets its own reply, not the late one."""
    async with open_redis(f"{redis_server.url}?pool_size=1") as r, open_redis(redis_server.url) as other:
        await r.set("x", "mine")
        async with trio.open_nursery() as nursery:
            blocked = trio.CancelScope()

            async def blpop() -> None:
                with blocked:
                    await r.execute("BLPOP", "q", 5)

            nursery.start_soon(blpop)
            with trio.fail_after(10):  # poll until the server holds the BLPOP
                while True:
                    if b"blocked_clients:1" in await other.execute("INFO", "clients"):
                        break
                    await trio.sleep(0.01)
            blocked.cancel()
        async with trio.open_nursery() as nursery:
            result: list[bytes | None] = []

            async def get() -> None:
                result.append(await r.get("x"))

            nursery.start_soon(get)
            await trio.testing.wait_all_tasks_blocked()
            await other.execute("RPUSH", "q", "late")  # releases the BLPOP; its reply is discarded
        assert result == [b"mine"]
        assert r.statistics().inflight == 0


async def test_serve_redis_starts_with_task_status(redis_server: RedisServer) -> None:
    async with trio.open_nursery() as nursery:
        client = await nursery.start(serve_redis, redis_server.url)
        assert await client.ping() == b"PONG"
        assert client.statistics().connections >= 1
        nursery.cancel_scope.cancel()
    with pytest.raises(RedisConnectionError):
        await client.ping()  # closed with its nursery
