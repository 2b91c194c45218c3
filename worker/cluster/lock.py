"""Distributed locks: a TTL and an owner token per lock, safe release/extend, auto-extend while held.

    async with locks.lock("migrations", ttl=30, timeout=60) as held:
        ...   # exclusive across every node sharing the backend

`Locks` is the seam. `MemoryLocks` (one process: the single-node default) and `RedisLocks` (every node of the
cluster) implement it. A lock is a key whose value is the owner's random token and which expires after `ttl`
seconds unless extended, so a holder that dies (kill -9, lost network) frees the lock by itself. Release and
extend check the token atomically (Lua in `lock_release.lua` / `lock_extend.lua`), so nobody can release or
extend a lock they no longer own.

Ownership: the `async with lock(...)` block owns a nursery whose one task extends the TTL every `ttl/3`. If an
extension finds the lock gone (expired while Redis was unreachable, or deleted by hand), the block's body is
cancelled and `LockLost` is raised from the `async with`: code that must not run unprotected stops. Acquiring
retries with exponential backoff + jitter until `timeout` (`LockTimeout`); an unreachable Redis raises
`LockUnavailable` at once (contention and outage are different answers).
"""

from __future__ import annotations

import random
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from mbworker.lib.nursery import open_owned_nursery
from mbworker.lib.redis import Redis, RedisError, Script
from mbworker.worker.cluster.errors import LockError, LockLost, LockTimeout, LockUnavailable

_RELEASE = Script.from_package("mbworker.worker.cluster", "lock_release.lua")
_EXTEND = Script.from_package("mbworker.worker.cluster", "lock_extend.lua")

_BACKOFF_INITIAL_S = 0.005
_BACKOFF_MAX_S = 0.25
_RELEASE_TIMEOUT_S = 2.0
"""Bounded wait for the release on the way out (shielded): past it, the lock expires by its TTL."""


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A lock owned by the `async with` block that yielded it."""

    name: str
    token: str
    ttl: float


@dataclass(frozen=True)
class LockStatistics:
    acquired: int
    """Locks taken (by `lock()` or `try_acquire`)."""
    contended: int
    """Attempts that found the lock held by another owner (each retry counts)."""
    timeouts: int
    """`LockTimeout`s raised."""
    unavailable: int
    """Operations that failed because the backend was unreachable."""
    lost: int
    """Held locks that could not be extended (`LockLost`)."""
    held: int
    """Locks held by `lock()` blocks of this instance right now."""


class Locks(Protocol):
    """Named mutual exclusion with expiry. All times are seconds."""

    def lock(
        self, name: str, *, ttl: float = 10.0, timeout: float = 10.0, auto_extend: bool = True
    ) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire `name` (waiting up to `timeout`), hold it for the block (extended every `ttl/3` unless
        `auto_extend` is off), release it on exit. Raises `LockTimeout`, `LockUnavailable`, `LockLost`."""
        ...

    async def try_acquire(self, name: str, ttl: float) -> str | None:
        """Take `name` now if free: the owner token, or None when held. No auto-extend: the caller extends
        or lets it expire. Raises `LockUnavailable`."""
        ...

    async def extend(self, name: str, token: str, ttl: float) -> bool:
        """Reset the TTL to `ttl` if `token` still owns `name`; False if it does not. `LockUnavailable`."""
        ...

    async def release(self, name: str, token: str) -> bool:
        """Free `name` if `token` owns it; False (and nothing changes) otherwise. `LockUnavailable`."""
        ...

    def statistics(self) -> LockStatistics: ...


class _LockBase(ABC):
    """The acquire loop and the held-lock block, shared by both implementations (which supply the three
    primitives below)."""

    def __init__(self) -> None:
        self._acquired = 0
        self._contended = 0
        self._timeouts = 0
        self._unavailable = 0
        self._lost = 0
        self._held = 0

    @abstractmethod
    async def try_acquire(self, name: str, ttl: float) -> str | None:
        """See `Locks`."""

    @abstractmethod
    async def extend(self, name: str, token: str, ttl: float) -> bool:
        """See `Locks`."""

    @abstractmethod
    async def release(self, name: str, token: str) -> bool:
        """See `Locks`."""

    async def _wait_retry(self, name: str, delay: float, left: float) -> None:
        """Wait before the next attempt: `delay` (the backoff), never past `left` (the deadline)."""
        await trio.sleep(min(delay, left))

    def statistics(self) -> LockStatistics:
        return LockStatistics(
            acquired=self._acquired,
            contended=self._contended,
            timeouts=self._timeouts,
            unavailable=self._unavailable,
            lost=self._lost,
            held=self._held,
        )

    async def acquire(self, name: str, ttl: float, timeout: float) -> str:
        """Retry `try_acquire` with backoff until `timeout`; the owner token (no auto-extend)."""
        token, _ = await self._acquire(name, ttl, timeout)
        return token

    async def _acquire(self, name: str, ttl: float, timeout: float) -> tuple[str, float]:
        """(token, when the successful attempt was sent): the lock is ours until at least that + ttl."""
        _check_times(ttl, timeout)
        deadline = trio.current_time() + timeout
        delay = _BACKOFF_INITIAL_S
        while True:
            sent = trio.current_time()
            token = await self.try_acquire(name, ttl)
            if token is not None:
                return token, sent
            self._contended += 1
            left = deadline - trio.current_time()
            if left <= 0:
                self._timeouts += 1
                raise LockTimeout(f"lock {name!r} is held by another owner (waited {timeout}s)")
            # Half fixed, half random: waiters that collided do not retry in step.
            await self._wait_retry(name, delay / 2 + random.uniform(0, delay / 2), left)
            delay = min(_BACKOFF_MAX_S, delay * 2)

    def lock(
        self, name: str, *, ttl: float = 10.0, timeout: float = 10.0, auto_extend: bool = True
    ) -> AbstractAsyncContextManager[HeldLock]:
        return self._hold(name, ttl, timeout, auto_extend)

    @asynccontextmanager
    async def _hold(self, name: str, ttl: float, timeout: float, auto_extend: bool) -> AsyncIterator[HeldLock]:
        token, sent = await self._acquire(name, ttl, timeout)
        held = HeldLock(name, token, ttl)
        lost: list[LockError] = []
        self._held += 1
        try:
            async with open_owned_nursery() as nursery:
                if auto_extend:
                    nursery.start_soon(self._keep_extended, held, sent + ttl, lost, nursery.cancel_scope)
                yield held
                nursery.cancel_scope.cancel()
        finally:
            self._held -= 1
            if not lost:
                with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_TIMEOUT_S):
                    try:
                        await self.release(name, token)
                    except LockError:
                        pass  # unreachable: the key expires by its TTL
        if lost:
            raise lost[0]

    async def _keep_extended(
        self, held: HeldLock, valid_until: float, lost: list[LockError], scope: trio.CancelScope
    ) -> None:
        """Extend every ttl/3. A refusal, or no successful extension before `valid_until` (counted from when
        the last successful request was sent, so never later than the server's expiry), means the lock may be
        someone else's now: record `LockLost` and cancel the block."""
        interval = held.ttl / 3
        while True:
            await trio.sleep(interval)
            try:
                sent = trio.current_time()
                with trio.move_on_after(max(0.0, valid_until - sent)) as waited:
                    extended = await self.extend(held.name, held.token, held.ttl)
                if waited.cancelled_caught:
                    reason = "no extension was answered within the TTL"
                elif extended:
                    valid_until = sent + held.ttl
                    continue
                else:
                    reason = "it expired or was taken over"
            except LockUnavailable as exc:
                if trio.current_time() < valid_until:
                    continue  # keep trying while the last extension still covers us
                reason = f"the lock service was unreachable for the whole TTL ({exc})"
            self._lost += 1
            lost.append(LockLost(f"lock {held.name!r} lost: {reason}"))
            scope.cancel()
            return


def _check_times(ttl: float, timeout: float) -> None:
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if timeout < 0:
        raise ValueError("timeout must be >= 0")


def _new_token() -> str:
    return secrets.token_hex(16)


@dataclass
class _MemoryEntry:
    token: str
    expires_at: float


class MemoryLocks(_LockBase):
    """`Locks` inside one process: the single-node default (no Redis). Uses trio's clock (MockClock works)."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, _MemoryEntry] = {}
        self._released: dict[str, trio.Event] = {}

    def _live(self, name: str) -> _MemoryEntry | None:
        entry = self._entries.get(name)
        if entry is not None and entry.expires_at <= trio.current_time():
            del self._entries[name]
            return None
        return entry

    async def try_acquire(self, name: str, ttl: float) -> str | None:
        await trio.lowlevel.checkpoint()
        if self._live(name) is not None:
            return None
        token = _new_token()
        self._entries[name] = _MemoryEntry(token, trio.current_time() + ttl)
        self._acquired += 1
        return token

    async def extend(self, name: str, token: str, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        entry = self._live(name)
        if entry is None or entry.token != token:
            return False
        entry.expires_at = trio.current_time() + ttl
        return True

    async def release(self, name: str, token: str) -> bool:
        await trio.lowlevel.checkpoint()
        entry = self._live(name)
        if entry is None or entry.token != token:
            return False
        del self._entries[name]
        event = self._released.pop(name, None)
        if event is not None:
            event.set()
        return True

    async def _wait_retry(self, name: str, delay: float, left: float) -> None:
        # No polling needed in one process: wake on release, on the holder's expiry, or at the deadline.
        entry = self._live(name)
        if entry is None:  # freed meanwhile: try again at once
            await trio.lowlevel.checkpoint()
            return
        wait = min(left, max(0.0, entry.expires_at - trio.current_time()))
        event = self._released.setdefault(name, trio.Event())
        with trio.move_on_after(wait):
            await event.wait()


class RedisLocks(_LockBase):
    """`Locks` shared by every node using one Redis: key `<prefix>lock:<name>` = owner token, with PX expiry.

    Single Redis (or a Sentinel-managed master): a failover that loses the last writes can let two owners
    hold one lock briefly; locks here guard against double work, not against data corruption on their own.
    """

    def __init__(self, redis: Redis, *, prefix: str = "mbw:") -> None:
        super().__init__()
        self._redis = redis
        self._prefix = prefix

    def key(self, name: str) -> str:
        return f"{self._prefix}lock:{name}"

    def _unavailable_error(self, what: str, exc: RedisError) -> LockUnavailable:
        self._unavailable += 1
        return LockUnavailable(f"can't {what}: Redis unreachable ({exc})")

    async def try_acquire(self, name: str, ttl: float) -> str | None:
        token = _new_token()
        try:
            taken = await self._redis.set(self.key(name), token, px=_ms(ttl), nx=True)
        except RedisError as exc:
            raise self._unavailable_error(f"acquire lock {name!r}", exc) from exc
        if not taken:
            return None
        self._acquired += 1
        return token

    async def extend(self, name: str, token: str, ttl: float) -> bool:
        try:
            return bool(await self._redis.eval_script(_EXTEND, [self.key(name)], [token, _ms(ttl)]))
        except RedisError as exc:
            raise self._unavailable_error(f"extend lock {name!r}", exc) from exc

    async def release(self, name: str, token: str) -> bool:
        try:
            return bool(await self._redis.eval_script(_RELEASE, [self.key(name)], [token]))
        except RedisError as exc:
            raise self._unavailable_error(f"release lock {name!r}", exc) from exc


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


if TYPE_CHECKING:
    _memory: Locks = MemoryLocks()
    _redis: Locks = RedisLocks(...)  # type: ignore[arg-type]
