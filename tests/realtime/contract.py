"""Implementation factories for the Broker / Presence contract tests.

A new implementation (e.g. Redis) registers a factory here; every contract test then runs against it. A
factory is an async context manager that sets up one backend and yields `make()`, which returns a new, unbound
instance connected to that backend — one per simulated node. Presence factories take the TTL and the clock
(`trio.current_time` under the tests' MockClock; a Redis implementation needs its clock injectable too).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from realtime.broker import Broker
from realtime.broker_memory import MemoryBroker, MemoryBus
from realtime.presence import Presence
from realtime.presence_memory import MemoryPresence, MemoryPresenceStore

Clock = Callable[[], float]


@asynccontextmanager
async def memory_broker() -> AsyncIterator[Callable[[], Broker]]:
    bus = MemoryBus()
    yield lambda: MemoryBroker(bus)


@asynccontextmanager
async def memory_presence(ttl: float, clock: Clock) -> AsyncIterator[Callable[[], Presence]]:
    store = MemoryPresenceStore()
    yield lambda: MemoryPresence(ttl=ttl, clock=clock, store=store)


BROKERS: dict[str, Callable[[], AbstractAsyncContextManager[Callable[[], Broker]]]] = {"memory": memory_broker}
PRESENCES: dict[str, Callable[[float, Clock], AbstractAsyncContextManager[Callable[[], Presence]]]] = {
    "memory": memory_presence
}
