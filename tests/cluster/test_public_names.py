"""Guard the package's public names and that every implementation satisfies its Protocol."""

from __future__ import annotations

from pathlib import Path

from mbworker import worker
from mbworker.worker.cluster import (
    L2Cache,
    Locks,
    MemoryL2Cache,
    MemoryLocks,
    MemoryRateLimiter,
    RateLimiter,
    RedisDeploymentStore,
    RedisL2Cache,
    RedisLocks,
    RedisRateLimiter,
)
from mbworker.worker.deployments.store import DeploymentStore


def test_public_names() -> None:
    assert sorted(worker.cluster.__all__) == worker.cluster.__all__
    for name in worker.cluster.__all__:
        assert hasattr(worker.cluster, name), name


def test_implementations_satisfy_protocols() -> None:
    # mypy checks these assignments structurally; at run time they must at least name the same methods.
    locks: tuple[type[Locks], ...] = (MemoryLocks, RedisLocks)
    limiters: tuple[type[RateLimiter], ...] = (MemoryRateLimiter, RedisRateLimiter)
    caches: tuple[type[L2Cache], ...] = (MemoryL2Cache, RedisL2Cache)
    store: type[DeploymentStore] = RedisDeploymentStore
    for lock_cls in locks:
        assert {"lock", "try_acquire", "extend", "release", "statistics"} <= set(dir(lock_cls))
    for limiter_cls in limiters:
        assert {"hit", "require", "statistics"} <= set(dir(limiter_cls))
    for cache_cls in caches:
        assert {"get", "set", "purge_prefix"} <= set(dir(cache_cls))
    protocol_methods = {n for n in dir(DeploymentStore) if not n.startswith("_")}
    assert protocol_methods <= set(dir(store))


def test_lua_scripts_ship_with_the_package() -> None:
    here = Path(worker.cluster.__file__).parent
    for name in ("lock_release.lua", "lock_extend.lua", "gcra.lua", "l2_get.lua", "l2_set.lua"):
        header = (here / name).read_text().splitlines()[0]
        assert header.startswith("-- "), name
