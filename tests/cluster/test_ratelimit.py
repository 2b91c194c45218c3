"""Rate limits: the pure GCRA step, the memory limiter on a mock clock, the Redis limiter across two nodes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mbworker.lib.redis import RedisClient
from mbworker.worker.cluster.errors import RateLimited
from mbworker.worker.cluster.ratelimit import MemoryRateLimiter, Rate, RedisRateLimiter, gcra_step
from tests.redis_server import RedisServer


def test_gcra_admits_a_burst_then_one_per_interval() -> None:
    rate = Rate(limit=5, period_s=1.0)  # burst 5, then one every 0.2 s
    tat = None
    for expected_remaining in (4, 3, 2, 1, 0):
        decision, tat = gcra_step(tat, 100.0, rate)
        assert decision.allowed
        assert decision.remaining == expected_remaining
    rejected, unchanged = gcra_step(tat, 100.0, rate)
    assert not rejected.allowed
    assert unchanged is None
    assert rejected.retry_after_s == pytest.approx(0.2)
    assert rejected.reset_after_s == pytest.approx(1.0)
    later, _ = gcra_step(tat, 100.0 + rejected.retry_after_s, rate)
    assert later.allowed
    assert later.remaining == 0
    refilled, _ = gcra_step(tat, 200.0, rate)
    assert refilled.remaining == 4


def test_gcra_burst_and_cost() -> None:
    rate = Rate(limit=10, period_s=1.0, burst=2)
    d1, tat = gcra_step(None, 0.0, rate, cost=2)
    assert d1.allowed
    d2, _ = gcra_step(tat, 0.0, rate)
    assert not d2.allowed
    too_big, _ = gcra_step(None, 0.0, rate, cost=3)  # more than the burst can ever be admitted at once
    assert not too_big.allowed
    with pytest.raises(ValueError, match="limit"):
        Rate(limit=0)


def test_memory_limiter_refills_with_time() -> None:
    async def main() -> None:
        limiter = MemoryRateLimiter(max_keys=2)
        rate = Rate(limit=3, period_s=60.0)
        assert [(await limiter.hit("k", rate)).allowed for _ in range(4)] == [True, True, True, False]
        with pytest.raises(RateLimited) as info:
            await limiter.require("k", rate)
        assert info.value.retry_after_s == pytest.approx(20.0)
        assert info.value.status == 429
        await trio.sleep(20.0)
        assert (await limiter.require("k", rate)).allowed
        assert (await limiter.hit("other", rate)).allowed  # keys are independent
        await limiter.hit("third", rate)
        assert limiter.statistics().keys == 2  # bounded: the least recently used key was forgotten
        assert limiter.statistics().rejected == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_redis_limiter_shares_one_budget_across_nodes(redis: RedisClient, redis2: RedisClient) -> None:
    a, b = RedisRateLimiter(redis), RedisRateLimiter(redis2)
    rate = Rate(limit=10, period_s=60.0)
    decisions = []
    for i in range(10):
        decisions.append(await (a if i % 2 else b).hit("fn:hello", rate))
    assert all(d.allowed and not d.degraded for d in decisions)
    assert sorted(d.remaining for d in decisions) == list(range(10))
    for limiter in (a, b):
        rejected = await limiter.hit("fn:hello", rate)
        assert not rejected.allowed
        assert 0 < rejected.retry_after_s <= 6.0
    with pytest.raises(RateLimited):
        await a.require("fn:hello", rate)
    assert (await b.hit("fn:other", rate)).allowed
    assert a.statistics().rejected == 2
    assert a.statistics().degraded == 0


async def test_redis_outage_degrades_to_local_and_recovers(redis: RedisClient, redis_server: RedisServer) -> None:
    limiter = RedisRateLimiter(redis, retry_interval_s=0.0)
    rate = Rate(limit=2, period_s=60.0)
    assert (await limiter.hit("k", rate)).allowed
    await redis_server.stop()
    local = [await limiter.hit("k", rate) for _ in range(3)]
    assert all(d.degraded for d in local)
    assert [d.allowed for d in local] == [True, True, False]  # the local fallback enforces the limit alone
    assert limiter.statistics().backend_errors >= 1
    await redis_server.start()
    await redis.wait_connected(10)
    back = await limiter.hit("k", rate)
    assert not back.degraded
    assert back.allowed  # a fresh server: the cluster budget starts over
    assert not limiter.degraded


async def test_degraded_mode_skips_redis_until_the_retry_interval(
    redis: RedisClient, redis_server: RedisServer
) -> None:
    limiter = RedisRateLimiter(redis, retry_interval_s=3600.0)
    await redis_server.stop()
    for _ in range(5):
        assert (await limiter.hit("k", Rate(100))).degraded
    assert limiter.statistics().backend_errors == 1  # one failed call, then no more attempts
    assert limiter.degraded
