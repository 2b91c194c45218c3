"""The L2 result cache: shared between nodes, purged by generation, and never an error on failure."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from mbworker.lib.redis import RedisClient, open_redis
from mbworker.worker.cluster.l2cache import L2Cache, MemoryL2Cache, RedisL2Cache, decode_entry, encode_entry, key_bytes
from tests.cluster.conftest import fast_settings
from tests.redis_server import RedisServer, start_redis_server


async def test_entries_are_shared_between_nodes(redis: RedisClient, redis2: RedisClient) -> None:
    a, b = RedisL2Cache(redis), RedisL2Cache(redis2)
    assert await b.get("hello", "GET /x") is None
    await a.set("hello", "GET /x", b"\x00response bytes", ttl_s=60)
    assert await b.get("hello", "GET /x") == b"\x00response bytes"
    assert await b.get("hello", b"GET /y") is None
    assert await b.get("other", "GET /x") is None  # keys are per function
    assert b.statistics().hits == 1
    assert b.statistics().misses == 3
    keys = [k async for k in redis.scan_iter(match="mbw:l2:*")]
    assert len(keys) == 1
    ttl_ms = await redis.execute("PTTL", keys[0])
    assert 0 < ttl_ms <= 60_000
    assert decode_entry(await redis.get(keys[0]) or b"") == b"\x00response bytes"  # msgpack entry


async def test_purge_on_one_node_is_seen_by_all(redis: RedisClient, redis2: RedisClient) -> None:
    a, b = RedisL2Cache(redis), RedisL2Cache(redis2)
    await a.set("hello", "k1", b"v1", ttl_s=60)
    await a.set("other", "k1", b"o1", ttl_s=60)
    await b.purge_prefix("hello")
    assert await a.get("hello", "k1") is None
    assert await a.get("other", "k1") == b"o1"
    await a.set("hello", "k1", b"v2", ttl_s=60)  # the new generation fills again
    assert await b.get("hello", "k1") == b"v2"


async def test_bad_entries_and_oversize_values_are_misses(redis: RedisClient) -> None:
    cache = RedisL2Cache(redis, max_value_bytes=10)
    await cache.set("hello", "big", b"x" * 11, ttl_s=60)
    assert cache.statistics().skipped == 1
    assert await cache.get("hello", "big") is None
    await cache.set("hello", "k", b"small", ttl_s=60)
    (key,) = [k async for k in redis.scan_iter(match="mbw:l2:hello:*")]
    await redis.set(key, b"\xc1 not msgpack")
    assert await cache.get("hello", "k") is None
    assert cache.statistics().errors == 1
    await redis.set(key, encode_entry(b"ok"))
    assert await cache.get("hello", "k") == b"ok"


async def test_redis_outage_is_a_miss_and_recovers(redis: RedisClient, redis_server: RedisServer) -> None:
    cache = RedisL2Cache(redis, retry_interval_s=0.0)
    await cache.set("hello", "k", b"v", ttl_s=60)
    await redis_server.stop()
    assert await cache.get("hello", "k") is None
    await cache.set("hello", "k2", b"v2", ttl_s=60)  # dropped, no error
    await cache.purge_prefix("hello")  # remembered
    stats = cache.statistics()
    assert stats.errors >= 3
    assert stats.pending_purges == 1
    await redis_server.start()
    await redis.wait_connected(10)
    # The pending purge goes through before anything of that slug is served again.
    assert await cache.get("hello", "k") is None
    assert cache.statistics().pending_purges == 0
    await cache.set("hello", "k", b"back", ttl_s=60)
    assert await cache.get("hello", "k") == b"back"


async def test_a_purge_missed_during_an_outage_is_applied_before_serving(tmp_path: Path) -> None:
    """With a persistent Redis the old entry survives the restart: the remembered purge must hide it."""
    server = await start_redis_server(tmp_path, args=["--appendonly", "yes", "--appendfsync", "always"])
    try:
        async with open_redis(fast_settings(server.url)) as one, open_redis(fast_settings(server.url)) as two:
            a, b = RedisL2Cache(one, retry_interval_s=0.0), RedisL2Cache(two)
            await a.set("hello", "k", b"old", ttl_s=600)
            await server.stop()
            await a.purge_prefix("hello")  # the deploy happened; Redis did not hear of it
            await server.start()
            await one.wait_connected(10)
            await two.wait_connected(10)
            assert await redis_value_survived(one)
            assert await a.get("hello", "k") is None
            assert a.statistics().pending_purges == 0
            assert await b.get("hello", "k") is None  # the purge reached every node
    finally:
        await server.stop()


async def redis_value_survived(redis: RedisClient) -> bool:
    return bool([k async for k in redis.scan_iter(match="mbw:l2:hello:*")])


def test_memory_l2_ttl_lru_and_purge() -> None:
    async def main() -> None:
        cache: L2Cache = MemoryL2Cache(max_entries=2)
        await cache.set("a", "1", b"one", ttl_s=10)
        await cache.set("a", "2", b"two", ttl_s=10)
        assert await cache.get("a", "1") == b"one"
        await cache.set("b", "1", b"b1", ttl_s=10)  # evicts ("a", "2"), the least recently used
        assert await cache.get("a", "2") is None
        await cache.purge_prefix("a")
        assert await cache.get("a", "1") is None
        assert await cache.get("b", "1") == b"b1"
        await trio.sleep(11)
        assert await cache.get("b", "1") is None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_tuple_keys_from_the_l1(redis: RedisClient) -> None:
    cache = RedisL2Cache(redis)
    k1 = key_bytes(("hello", 3, "/x", "a=1", (("accept", "text/html"),), None))
    k2 = key_bytes(("hello", 3, "/x", "a=1", (("accept", "application/json"),), None))
    assert k1 == key_bytes(["hello", 3, "/x", "a=1", [["accept", "text/html"]], None])  # stable encoding
    await cache.set("hello", k1, b"html", ttl_s=60)
    await cache.set("hello", k2, b"json", ttl_s=60)
    assert await cache.get("hello", k1) == b"html"
    assert await cache.get("hello", k2) == b"json"
