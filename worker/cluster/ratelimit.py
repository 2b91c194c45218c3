"""Cluster-wide rate limits: GCRA (a token bucket without a refill timer), one atomic step per decision.

`RateLimiter` is the seam: `await limiter.hit(key, rate)` returns a `RateDecision`; `limiter.require(...)`
raises `RateLimited` (429) instead. Implementations:

- `MemoryRateLimiter`: this process only (the single-node default), bounded number of keys (LRU).
- `RedisRateLimiter`: every node shares one budget per key (`gcra.lua`, the server's clock).

GCRA keeps one number per key, the theoretical arrival time (TAT): each admitted request pushes it forward by
`period/limit`; a request is admitted while TAT stays within `burst * period/limit` of now. So `Rate(100, 1.0)`
admits a burst of 100, then 100 per second, smoothly.

Redis outage: `RedisRateLimiter` degrades to its local `MemoryRateLimiter` (decisions carry `degraded=True`,
counted in `statistics()`): each node then enforces the full limit on its own, so the cluster admits up to
nodes × limit until Redis is back. It retries Redis at most every `retry_interval_s` (so an outage costs no
timeouts on the hot path) and recovers by itself on the first successful call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from mbworker.lib.redis import Redis, RedisError, Script
from mbworker.worker.cluster.errors import RateLimited

_GCRA = Script.from_package("mbworker.worker.cluster", "gcra.lua")
_EPSILON_S = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` requests per `period_s` seconds, with bursts of up to `burst` (default: `limit`) at once."""

    limit: int
    period_s: float = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("a rate needs limit >= 1 and period_s > 0")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be >= 1")

    @property
    def emission_s(self) -> float:
        """Seconds one request "costs": period / limit."""
        return self.period_s / self.limit

    @property
    def tolerance_s(self) -> float:
        return self.emission_s * (self.burst if self.burst is not None else self.limit)


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    remaining: int
    """Requests that could still be admitted right now."""
    retry_after_s: float
    """0 when allowed; else the wait until this request would be admitted (the `Retry-After`)."""
    reset_after_s: float
    """Until the key is back to a full burst."""
    degraded: bool = False
    """Decided by the local fallback because Redis was unreachable."""


@dataclass(frozen=True)
class RateLimiterStatistics:
    allowed: int
    rejected: int
    degraded: int
    """Decisions made by the local fallback during a Redis outage."""
    backend_errors: int
    """Redis calls that failed (each switches to the fallback for `retry_interval_s`)."""
    keys: int
    """Keys tracked in memory (the memory limiter's own, or the fallback's)."""


class RateLimiter(Protocol):
    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """Count `cost` requests against `key` if admitted (nothing is counted when rejected)."""
        ...

    async def require(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """`hit`, raising `RateLimited` when rejected."""
        ...

    def statistics(self) -> RateLimiterStatistics: ...


def gcra_step(tat: float | None, now: float, rate: Rate, cost: int = 1) -> tuple[RateDecision, float | None]:
    """One GCRA decision (pure): the decision and the new TAT to store (None: unchanged, nothing admitted)."""
    if cost < 1:
        raise ValueError("cost must be >= 1")
    emission, tolerance = rate.emission_s, rate.tolerance_s
    tat = now if tat is None or tat < now else tat
    new_tat = tat + emission * cost
    allow_at = new_tat - tolerance
    if allow_at - now > _EPSILON_S:  # not `now < allow_at`: float sums of intervals drift by ~1e-14
        remaining = max(0, math.floor((now + tolerance - tat) / emission + 1e-9))
        return RateDecision(False, remaining, allow_at - now, tat - now), None
    remaining = max(0, math.floor((now + tolerance - new_tat) / emission + 1e-9))
    return RateDecision(True, remaining, 0.0, new_tat - now), new_tat


class _Counting(ABC):
    """Counting and `require` for both limiters, which supply `hit`."""

    def __init__(self) -> None:
        self._allowed = 0
        self._rejected = 0

    def _count(self, decision: RateDecision) -> RateDecision:
        if decision.allowed:
            self._allowed += 1
        else:
            self._rejected += 1
        return decision

    @abstractmethod
    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """See `RateLimiter`."""

    async def require(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        decision = await self.hit(key, rate, cost)
        if not decision.allowed:
            raise RateLimited(key, decision.retry_after_s)
        return decision


class MemoryRateLimiter(_Counting):
    """`RateLimiter` for this process (the single-node default). At most `max_keys` keys are tracked: the least
    recently used one is forgotten first (forgetting a key can only admit more, never wrongly reject).
    Uses trio's clock, so tests can use `MockClock`."""

    def __init__(self, *, max_keys: int = 100_000) -> None:
        super().__init__()
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys

    def decide(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """The decision, synchronously (no checkpoint): for callers on a hot path."""
        now = trio.current_time()
        tat = self._tats.get(key)
        decision, new_tat = gcra_step(tat, now, rate, cost)
        if new_tat is not None:
            self._tats[key] = new_tat
            self._tats.move_to_end(key)
            while len(self._tats) > self._max_keys:
                self._tats.popitem(last=False)
        return self._count(decision)

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        await trio.lowlevel.checkpoint()
        return self.decide(key, rate, cost)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(self._allowed, self._rejected, 0, 0, len(self._tats))


class RedisRateLimiter(_Counting):
    """`RateLimiter` shared by every node: key `<prefix>rl:<key>`, one `gcra.lua` call per decision.

    `timeout_s` bounds each Redis call (a slow Redis counts as down). See the module docstring for outages.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mbw:",
        fallback: MemoryRateLimiter | None = None,
        timeout_s: float = 0.5,
        retry_interval_s: float = 1.0,
    ) -> None:
        super().__init__()
        self._redis = redis
        self._prefix = prefix
        self.fallback = fallback or MemoryRateLimiter()
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self._retry_at = -math.inf
        self._degraded = 0
        self._errors = 0

    @property
    def degraded(self) -> bool:
        """True while decisions come from the local fallback."""
        return trio.current_time() < self._retry_at

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        if cost < 1:
            raise ValueError("cost must be >= 1")
        if trio.current_time() >= self._retry_at:
            reply = None
            try:
                with trio.move_on_after(self._timeout_s):
                    reply = await self._redis.eval_script(
                        _GCRA,
                        [f"{self._prefix}rl:{key}"],
                        [_us(rate.emission_s), _us(rate.tolerance_s), cost],
                    )
            except RedisError:
                reply = None
            if reply is not None:
                self._retry_at = -math.inf
                allowed, remaining, retry_us, reset_us = (int(x) for x in reply)
                return self._count(RateDecision(bool(allowed), remaining, retry_us / 1e6, reset_us / 1e6))
            self._errors += 1
            self._retry_at = trio.current_time() + self._retry_interval_s
        self._degraded += 1
        local = self.fallback.decide(key, rate, cost)
        return self._count(
            RateDecision(local.allowed, local.remaining, local.retry_after_s, local.reset_after_s, degraded=True)
        )

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            self._allowed, self._rejected, self._degraded, self._errors, self.fallback.statistics().keys
        )


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


if TYPE_CHECKING:
    _memory: RateLimiter = MemoryRateLimiter()
    _redis: RateLimiter = RedisRateLimiter(...)  # type: ignore[arg-type]
