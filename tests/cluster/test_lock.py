"""Distributed locks: the same behaviour from MemoryLocks and RedisLocks, plus Redis-only faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from mbworker.lib.redis import RedisClient, open_redis
from mbworker.worker.cluster.errors import LockLost, LockTimeout, LockUnavailable
from mbworker.worker.cluster.lock import Locks, MemoryLocks, RedisLocks
from tests.redis_server import RedisServer, redis_server_running


@pytest.fixture(params=["memory", "redis"])
async def locks_pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Locks, Locks]]:
    """Two lock services that must exclude each other: one memory instance twice, or two Redis "nodes"."""
    if request.param == "memory":
        memory = MemoryLocks()
        yield memory, memory
        return
    async with redis_server_running(tmp_path) as server, open_redis(server.url) as one, open_redis(server.url) as two:
        yield RedisLocks(one), RedisLocks(two)


async def test_mutual_exclusion_between_tasks_and_nodes(locks_pair: tuple[Locks, Locks]) -> None:
    inside = 0
    most = 0
    entered = 0

    async def worker(locks: Locks) -> None:
        nonlocal inside, most, entered
        for _ in range(3):
            async with locks.lock("critical", ttl=5, timeout=20):
                inside += 1
                most = max(most, inside)
                entered += 1
                await trio.lowlevel.checkpoint()  # let the others try while we hold it
                await trio.lowlevel.checkpoint()
                inside -= 1

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(worker, locks_pair[i % 2])
    assert entered == 24
    assert most == 1
    assert locks_pair[0].statistics().held == 0


async def test_timeout_when_held(locks_pair: tuple[Locks, Locks]) -> None:
    a, b = locks_pair
    async with a.lock("busy", ttl=10, timeout=1):
        with pytest.raises(LockTimeout, match="held by another owner"):
            async with b.lock("busy", ttl=10, timeout=0.1):
                pytest.fail("acquired a held lock")
        assert b.statistics().timeouts == 1
    async with b.lock("busy", ttl=10, timeout=1) as held:  # released on exit of the first block
        assert held.name == "busy"


async def test_safe_release_and_extend(locks_pair: tuple[Locks, Locks]) -> None:
    a, b = locks_pair
    token = await a.try_acquire("job", ttl=10)
    assert token is not None
    assert await b.try_acquire("job", ttl=10) is None
    assert not await b.release("job", "not-the-owner")
    assert not await b.extend("job", "not-the-owner", 10)
    assert await b.try_acquire("job", ttl=10) is None  # still held
    assert await a.extend("job", token, 10)
    assert await a.release("job", token)
    assert not await a.release("job", token)  # released once only
    assert await b.try_acquire("job", ttl=10) is not None


async def test_body_errors_pass_through_and_release(locks_pair: tuple[Locks, Locks]) -> None:
    a, b = locks_pair
    with pytest.raises(ValueError, match="inside"):
        async with a.lock("err", ttl=10, timeout=1):
            raise ValueError("inside")
    assert await b.try_acquire("err", ttl=10) is not None


async def test_a_dead_holder_releases_by_ttl(locks_pair: tuple[Locks, Locks]) -> None:
    """A holder that never extends nor releases (killed) frees the lock when its TTL runs out."""
    a, b = locks_pair
    dead = await a.try_acquire("migrations", ttl=0.2)
    assert dead is not None
    with trio.fail_after(10):
        async with b.lock("migrations", ttl=10, timeout=5) as held:
            assert held.token != dead
            assert not await a.release("migrations", dead)  # the dead owner's token no longer releases it
            assert await b.try_acquire("migrations", ttl=1) is None


def test_auto_extend_keeps_a_lock_past_its_ttl() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    locks = MemoryLocks()

    async def main() -> None:
        async with locks.lock("long", ttl=1.0, timeout=1):
            await trio.sleep(5)  # five TTLs
            assert await locks.try_acquire("long", ttl=1) is None
        assert await locks.try_acquire("long", ttl=1) is not None

    trio.run(main, clock=clock)


async def test_auto_extend_on_redis(redis: RedisClient, redis2: RedisClient) -> None:
    a, b = RedisLocks(redis), RedisLocks(redis2)
    async with a.lock("long", ttl=0.3, timeout=1):
        await trio.sleep(1.0)  # time must pass beyond the TTL: the extender keeps the key
        assert await b.try_acquire("long", ttl=1) is None
        assert await redis.execute("PTTL", a.key("long")) > 0


async def test_a_lost_lock_cancels_the_body(redis: RedisClient) -> None:
    locks = RedisLocks(redis)
    reached_end = False

    async def hold() -> None:
        nonlocal reached_end
        async with locks.lock("lost", ttl=0.3, timeout=1):
            await redis.delete(locks.key("lost"))  # e.g. expired during a long pause
            await redis.set(locks.key("lost"), "someone-else")
            await trio.sleep_forever()
            reached_end = True

    with trio.fail_after(10), pytest.raises(LockLost, match="expired or was taken over"):
        await hold()
    assert not reached_end
    assert locks.statistics().lost == 1
    assert await redis.get(locks.key("lost")) == b"someone-else"  # the other owner's lock is untouched


async def test_redis_outage_raises_our_error_then_recovers(redis: RedisClient, redis_server: RedisServer) -> None:
    locks = RedisLocks(redis)
    await redis_server.stop()
    with pytest.raises(LockUnavailable, match="Redis unreachable"):
        async with locks.lock("deploy", ttl=5, timeout=5):
            pytest.fail("acquired without Redis")
    assert locks.statistics().unavailable == 1
    await redis_server.start()
    await redis.wait_connected(10)
    async with locks.lock("deploy", ttl=5, timeout=5) as held:
        assert await redis.get(locks.key("deploy")) == held.token.encode()
    assert await redis.get(locks.key("deploy")) is None


def test_bad_arguments() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="ttl"):
            async with MemoryLocks().lock("x", ttl=0):
                pass

    trio.run(main)


async def test_a_held_lock_is_lost_when_redis_stays_down_for_a_ttl(
    redis: RedisClient, redis_server: RedisServer
) -> None:
    locks = RedisLocks(redis)

    async def hold() -> None:
        async with locks.lock("outage", ttl=0.6, timeout=1):
            await redis_server.stop()
            await trio.sleep_forever()  # cancelled once no extension succeeded for a whole TTL

    with trio.fail_after(10), pytest.raises(LockLost, match="unreachable"):
        await hold()
    assert locks.statistics().held == 0
