"""`/ready`: whether this node should be sent new work, and if not, why.

Owned by the daemon, which registers one check per dependency a request needs: the cluster's Redis (a ping,
bounded), each runtime (can it start a process?), and the drain state. Each check answers None when fine or a
short reason; `/ready` answers 503 with every reason while any check fails and 200 again once all pass, so a
load balancer takes the node out while it cannot serve and back when it recovers.

A check of something shared by the whole cluster (Redis) is marked `cluster`: when it fails, it fails on every
node at once, and functions are still served from each node's own table. `/ready/local` leaves those out (the
node's own checks and the drain only): the proxy sends to a node on it only while no node passes `/ready`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from mbworker.lib.redis import Redis

Check = Callable[[], Awaitable[str | None]]
"""None when the dependency is fine, else a one-line reason."""

PING_TIMEOUT_S = 1.0
"""How long `/ready` waits for Redis: a load balancer's health check must get its answer well within its own."""


@dataclass
class Readiness:
    """The named checks; `check()` runs them all, one after the other (each is bounded)."""

    checks: dict[str, Check] = field(default_factory=dict)
    cluster: set[str] = field(default_factory=set)
    """The names of checks of a dependency every node shares (left out of `check(local=True)`)."""

    def add(self, name: str, check: Check, *, cluster: bool = False) -> None:
        self.checks[name] = check
        if cluster:
            self.cluster.add(name)

    async def check(self, *, local: bool = False) -> dict[str, str]:
        """Every failing check's name → reason (empty: ready); `local`: this node's own checks only."""
        problems: dict[str, str] = {}
        for name, check in self.checks.items():
            if local and name in self.cluster:
                continue
            reason = await check()
            if reason is not None:
                problems[name] = reason
        return problems


def redis_check(redis: Redis, timeout: float = PING_TIMEOUT_S) -> Check:
    async def ping() -> str | None:
        with trio.move_on_after(timeout):
            try:
                await redis.ping()
            except Exception as exc:  # any failure of the ping is the reason, whatever the client calls it
                return f"unreachable: {exc}"
            return None
        return f"no answer to PING within {timeout:g}s"

    return ping


def executable_check(path: str) -> Check:
    """A runtime that starts processes is down when its binary is gone or not executable (e.g. mid-upgrade)."""

    async def check() -> str | None:
        ok = await trio.to_thread.run_sync(os.access, path, os.X_OK)
        return None if ok else f"cannot start processes: {path} is missing or not executable"

    return check
