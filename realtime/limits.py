"""Per-socket and per-channel rate limits (pure; the caller passes the time)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["RateLimit", "WindowLimit"]


class SharedLimiter(Protocol):
    """A rate limiter several nodes share (the daemon adapts its Redis GCRA limiter to this)."""

    async def allow(self, key: str, per_second: int) -> bool:
        """Count one event against `key`; False when over `per_second`. Never raises (degrades to local)."""
        ...


class RateLimit:
    """A token bucket: `rate` events per second, bursts up to `rate`."""

    __slots__ = ("_at", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = float(rate)
        self._tokens = float(rate)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowLimit:
    """At most `calls` events in any sliding `window` seconds (Supabase's client presence limit)."""

    __slots__ = ("_calls", "_times", "_window")

    def __init__(self, calls: int, window: float) -> None:
        self._calls = calls
        self._window = window
        self._times: list[float] | None = None  # allocated on first use: most channels never track presence

    def allow(self, now: float) -> bool:
        if self._times is None:
            self._times = []
        times = self._times
        while times and now - times[0] >= self._window:
            times.pop(0)  # at most `calls` (5) entries
        if len(times) >= self._calls:
            return False
        times.append(now)
        return True
