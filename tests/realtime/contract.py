"""Implementation factories for the Broker / Presence contract tests.

A new implementation (e.g. Redis) registers a factory here; every contract test then runs against it. A
factory is an async context manager that sets up one backend and yields `make()`, which returns a new, unbound
instance connected to that backend — one per simulated node. Presence factories take the TTL and the clock
(`trio.current_time` under the tests' MockClock; a Redis implementation needs its clock injectable too).

Redis factories start one real redis-server per test (tests/redis_server.py) and give every simulated node its
own `RedisBroker` / `RedisPresence` (own pub/sub connection, own node id) on one shared `RedisClient`.
Implementations doing real I/O can't run under an autojumping clock (a jump fires their I/O timeouts while
they wait on a socket): `clock_for(name)` gives them a clock that runs `FAST_CLOCK_RATE` times faster than
real time instead, with their Redis timeouts scaled to match.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from mbworker.lib.redis import RedisClient, open_redis
from mbworker.realtime.broker import Broker
from mbworker.realtime.broker_memory import MemoryBroker, MemoryBus
from mbworker.realtime.broker_redis import RedisBroker
from mbworker.realtime.presence import Presence
from mbworker.realtime.presence_memory import MemoryPresence, MemoryPresenceStore
from mbworker.realtime.presence_redis import RedisPresence
from tests.redis_server import redis_server_running

Clock = Callable[[], float]


@asynccontextmanager
async def memory_broker() -> AsyncIterator[Callable[[], Broker]]:
    bus = MemoryBus()
    yield lambda: MemoryBroker(bus)


@asynccontextmanager
async def memory_presence(ttl: float, clock: Clock) -> AsyncIterator[Callable[[], Presence]]:
    store = MemoryPresenceStore()
    yield lambda: MemoryPresence(ttl=ttl, clock=clock, store=store)


FAST_CLOCK_RATE = 20.0
"""Virtual seconds per real second for implementations that do real I/O (a 60 s TTL takes 3 s)."""

_node_ids = itertools.count(1)


@asynccontextmanager
async def redis_backend(query: str = "") -> AsyncIterator[RedisClient]:
    """A fresh redis-server (temp dir, free port) and a client for it; both closed on exit."""
    with tempfile.TemporaryDirectory(prefix="mbw-rt-") as tmp:
        async with redis_server_running(Path(tmp)) as server, open_redis(server.url + query) as redis:
            yield redis


@asynccontextmanager
async def redis_broker() -> AsyncIterator[Callable[[], Broker]]:
    async with redis_backend() as redis, trio.open_nursery() as nursery:

        def make() -> Broker:
            broker = RedisBroker(redis, redis.settings, node_id=f"node-{next(_node_ids)}")
            nursery.start_soon(broker.serve)
            return broker

        yield make
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def redis_presence(ttl: float, clock: Clock) -> AsyncIterator[Callable[[], Presence]]:
    # Timeouts are in trio time, which clock_for() runs FAST_CLOCK_RATE times faster: scale them back up.
    timeouts = f"?command_timeout={5 * FAST_CLOCK_RATE}&connect_timeout={5 * FAST_CLOCK_RATE}"
    async with redis_backend(timeouts) as redis, trio.open_nursery() as nursery:

        def make() -> Presence:
            node = f"node-{next(_node_ids)}"
            presence = RedisPresence(redis, redis.settings, node_id=node, ttl=ttl, clock=clock)
            nursery.start_soon(presence.serve)
            return presence

        yield make
        nursery.cancel_scope.cancel()


REAL_IO = {"redis"}
"""Implementations that wait on sockets (see `clock_for`)."""


def clock_for(name: str) -> trio.testing.MockClock:
    """The clock for a contract test that sleeps through TTLs: autojump for in-process implementations, a fast
    real-time clock for those in REAL_IO."""
    if name in REAL_IO:
        return trio.testing.MockClock(rate=FAST_CLOCK_RATE)
    return trio.testing.MockClock(autojump_threshold=0)


BROKERS: dict[str, Callable[[], AbstractAsyncContextManager[Callable[[], Broker]]]] = {
    "memory": memory_broker,
    "redis": redis_broker,
}
PRESENCES: dict[str, Callable[[float, Clock], AbstractAsyncContextManager[Callable[[], Presence]]]] = {
    "memory": memory_presence,
    "redis": redis_presence,
}
