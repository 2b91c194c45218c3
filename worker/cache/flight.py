"""Single flight: concurrent requests for one key share one computation.

The first request for a key becomes the flight's leader and computes; requests that join while it runs are
followers and wait (each with its own timeout) for what the leader publishes. A leader publishes a value, or
`None` to release its followers with nothing ("compute it yourselves": its result turned out unshareable, or
it was cancelled), or an error, which every current follower receives as `FlightFailed` and which nobody after
them sees: a resolved flight leaves the table at once, so the next request starts a new one.

Ownership: a `SingleFlight` belongs to its `ResultCache`; each `Flight` is owned by its leader, who must resolve
it (`publish`, `fail` or `settle` on the way out), and is listed in the table until then. The table holds only
running flights, so its size is bounded by the number of concurrent leaders (i.e. by the front door's
connection limit).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import trio

from mbworker.worker.cache.errors import FlightFailed, FlightTimeout

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flight(Generic[V]):
    """One running computation. Followers `wait`; the leader resolves it exactly once (later calls are no-ops)."""

    __slots__ = ("_done", "_error", "_forget", "_resolved", "_value", "followers", "key")

    def __init__(self, key: Hashable, forget: Callable[[Flight[V]], None]) -> None:
        self.key = key
        self._resolved = False
        self._done: trio.Event | None = None
        """Made by the first follower: most flights (every hit-for-miss one) never have any."""
        self._value: V | None = None
        self._error: BaseException | None = None
        self._forget = forget
        self.followers = 0
        """Requests that joined after the leader (for statistics and tests)."""

    @property
    def resolved(self) -> bool:
        return self._resolved

    def publish(self, value: V | None) -> None:
        """Give `value` to every follower; `None` releases them to compute on their own."""
        if self._resolved:
            return
        self._value = value
        self._resolve()

    def fail(self, error: BaseException) -> None:
        """Every current follower raises `FlightFailed(error)`; the next request for the key starts afresh."""
        if self._resolved:
            return
        self._error = error
        self._resolve()

    def settle(self, error: BaseException | None) -> None:
        """The leader is leaving (`error` is what it leaves with). Unresolved: cancellation or a clean exit
        release the followers, any other error fails them."""
        if self._resolved:
            return
        if error is None or _only_cancelled(error):
            self.publish(None)
        else:
            self.fail(error)

    async def wait(self, timeout: float) -> V | None:
        """The leader's value, or None (compute it yourself). Raises `FlightFailed` or `FlightTimeout`."""
        try:
            with trio.fail_after(timeout):
                if self._resolved:
                    await trio.lowlevel.checkpoint()
                else:
                    if self._done is None:
                        self._done = trio.Event()
                    await self._done.wait()
        except trio.TooSlowError as exc:
            raise FlightTimeout(f"no shared result within {timeout:g}s") from exc
        if self._error is not None:
            raise FlightFailed(self._error) from self._error
        return self._value

    def _resolve(self) -> None:
        self._resolved = True
        self._forget(self)
        if self._done is not None:
            self._done.set()


def _only_cancelled(error: BaseException) -> bool:
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return False


class SingleFlight(Generic[K, V]):
    """The table of running flights, by key. Not thread-safe: use from one trio run."""

    def __init__(self) -> None:
        self._flights: dict[K, Flight[V]] = {}

    def join(self, key: K) -> tuple[Flight[V], bool]:
        """The running flight for `key` and False, or a new one and True (the caller leads it)."""
        running = self._flights.get(key)
        if running is not None:
            running.followers += 1
            return running, False
        flight: Flight[V] = Flight(key, self._forget)
        self._flights[key] = flight
        return flight, True

    def detach(self, matches: Callable[[K], bool]) -> int:
        """Forget the running flights whose key `matches` (after a purge): new requests start new flights,
        while the detached ones still resolve for the followers they already have. Returns how many."""
        stale = [key for key in self._flights if matches(key)]
        for key in stale:
            del self._flights[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._flights)

    def _forget(self, flight: Flight[V]) -> None:
        key: K = flight.key  # type: ignore[assignment]
        if self._flights.get(key) is flight:
            del self._flights[key]
