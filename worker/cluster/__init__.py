"""Cluster shared state on Redis: distributed locks, rate limits, the deployment store, the L2 result cache.

Each part is a small `typing.Protocol` with a memory implementation (one node: the default without
`MBWORKER_REDIS_URL`) and a Redis one (every node sharing the state pillar's Redis):

- `lock`: `Locks` — `MemoryLocks`, `RedisLocks` (`async with locks.lock(name, ttl=, timeout=)`).
- `ratelimit`: `RateLimiter` — `MemoryRateLimiter`, `RedisRateLimiter` (GCRA; degrades to local on outage).
- `deployments_redis`: `RedisDeploymentStore` (the `DeploymentStore` of worker.deployments for a cluster).
- `l2cache`: `L2Cache` — `MemoryL2Cache`, `RedisL2Cache` (never raises; misses on failure).

Realtime's `RedisBroker` / `RedisPresence` live with realtime/, on the same Redis client.
"""

from mbworker.worker.cluster.deployments_redis import (
    RedisDeploymentStore,
    RedisStoreStatistics,
    open_redis_deployment_store,
)
from mbworker.worker.cluster.errors import (
    ClusterError,
    ClusterStoreUnavailable,
    LockError,
    LockLost,
    LockTimeout,
    LockUnavailable,
    RateLimited,
)
from mbworker.worker.cluster.l2cache import L2Cache, L2Statistics, MemoryL2Cache, RedisL2Cache
from mbworker.worker.cluster.lock import HeldLock, Locks, LockStatistics, MemoryLocks, RedisLocks
from mbworker.worker.cluster.ratelimit import (
    MemoryRateLimiter,
    Rate,
    RateDecision,
    RateLimiter,
    RateLimiterStatistics,
    RedisRateLimiter,
    gcra_step,
)

__all__ = [
    "ClusterError",
    "ClusterStoreUnavailable",
    "HeldLock",
    "L2Cache",
    "L2Statistics",
    "LockError",
    "LockLost",
    "LockStatistics",
    "LockTimeout",
    "LockUnavailable",
    "Locks",
    "MemoryL2Cache",
    "MemoryLocks",
    "MemoryRateLimiter",
    "Rate",
    "RateDecision",
    "RateLimited",
    "RateLimiter",
    "RateLimiterStatistics",
    "RedisDeploymentStore",
    "RedisL2Cache",
    "RedisLocks",
    "RedisRateLimiter",
    "RedisStoreStatistics",
    "gcra_step",
    "open_redis_deployment_store",
]
