"""`open_backends`: what a node shares with its cluster, or keeps to itself.

Without a Redis URL (the embedded default) every backend is a memory twin or the local directory store; with one,
the same seams are served by the state pillar's Redis. Owner: the daemon's `Node` enters this context once; it owns the
Redis client, the node's one pub/sub connection (the cluster bus) and everything registered on it, and closes them
in reverse order (broker and presence last in, first out: clients' last untracks still reach Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from mbworker.lib.redis import RedisClient, open_pubsub_bus, open_redis
from mbworker.lib.revocation import MemoryRevocationList, RevocationList, open_redis_revocations
from mbworker.realtime.broker import Broker
from mbworker.realtime.broker_redis import open_redis_broker
from mbworker.realtime.presence import Presence
from mbworker.realtime.presence_redis import open_redis_presence
from mbworker.worker.cluster import (
    L2Cache,
    MemoryRateLimiter,
    RateLimiter,
    RedisL2Cache,
    RedisLocks,
    RedisRateLimiter,
    open_redis_deployment_store,
)
from mbworker.worker.config import WorkerSettings
from mbworker.worker.deployments.store import DeploymentStore, LocalDeploymentStore
from mbworker.worker.metrics import PUBSUB_STATS, REDIS_STATS, Metrics
from mbworker.worker.readiness import Readiness, redis_check

__all__ = ["Backends", "open_backends"]


@dataclass(frozen=True)
class Backends:
    store: DeploymentStore
    limiter: RateLimiter
    """Request rates; in a cluster shared by every node (each enforces them alone while Redis is away)."""
    revocations: RevocationList
    """Sessions the control plane revoked (memory: nothing is ever revoked on a single node)."""
    l2: L2Cache | None = None
    """The shared result cache (functions opt in with `[cache] l2 = true`); None on a single node."""
    broker: Broker | None = None
    """None: realtime uses its memory broker and presence."""
    presence: Presence | None = None
    redis: RedisClient | None = None


@asynccontextmanager
async def open_backends(
    settings: WorkerSettings, data_dir: Path, *, node_id: str, metrics: Metrics, readiness: Readiness
) -> AsyncIterator[Backends]:
    deployments = data_dir / "deployments"
    if not settings.redis_url:
        yield Backends(LocalDeploymentStore(deployments), MemoryRateLimiter(), MemoryRevocationList())
        return
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings.redis_url))
        readiness.add("redis", redis_check(redis), cluster=True)
        metrics.add_statistics(REDIS_STATS, redis.statistics)
        store = await stack.enter_async_context(
            open_redis_deployment_store(redis, deployments, node_id=node_id, locks=RedisLocks(redis))
        )
        # One pub/sub connection for the node (the cluster bus): revocations, broker and presence register on it,
        # and its gap detection (lost, then resubscribed) is the one they react to.
        bus = await stack.enter_async_context(open_pubsub_bus(redis.settings))
        metrics.add_statistics(PUBSUB_STATS, bus.pubsub.statistics)
        revocations = await stack.enter_async_context(open_redis_revocations(redis, bus=bus))
        broker = await stack.enter_async_context(open_redis_broker(redis, redis.settings, node_id=node_id, bus=bus))
        presence = await stack.enter_async_context(
            open_redis_presence(redis, redis.settings, node_id=node_id, ttl=settings.realtime.presence_ttl, bus=bus)
        )
        yield Backends(
            store,
            RedisRateLimiter(redis, fallback=MemoryRateLimiter()),
            revocations,
            l2=RedisL2Cache(redis),
            broker=broker,
            presence=presence,
            redis=redis,
        )
