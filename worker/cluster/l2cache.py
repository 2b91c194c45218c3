"""The L2 result cache: function responses shared by every node through Redis, behind the moka L1.

The L1 (worker/cache/) depends only on the `L2Cache` Protocol: on an L1 miss it calls `get(slug, key)`; when it
stores a cacheable response it calls `set(slug, key, value, ttl_s)` (in the daemon's background nursery: the
response need not wait); on a rollback (an older version live again) or an explicit purge it calls
`purge_prefix(slug)` — other deploys need none, since keys hold the version.
`key` is whatever uniquely names the response within the function (the L1's primary key, serialized, with the
version in it); it is hashed here. `value` is opaque bytes (the L1's own encoding of the response).

Never an error: every failure (Redis down or slow, a corrupt entry) is a miss, or a dropped write, and is
counted in `statistics()`. While Redis is failing, calls skip it for `retry_interval_s` so a hot path never
waits on timeouts; recovery is automatic.

Purges: each slug has a generation counter (`<prefix>l2gen:<slug>`) that is part of every entry's key, so a
purge is one INCR, visible to every node at once, and old entries simply expire by their TTL (no SCAN). A purge
that fails (Redis down) is remembered: that slug's reads are misses until the purge has gone through.

Redis layout: `<prefix>l2:<slug>:<generation>:<digest>` = msgpack `[1, value, stored_at_ms]`, with PX = TTL.
Give the state pillar's Redis a `maxmemory` with an LRU policy so cache entries can be evicted under pressure.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgpack  # type: ignore[import-untyped]  # no stubs; pyproject could add it to the overrides
import trio

from mbworker.lib.redis import Redis, RedisError, Script

_GET = Script.from_package("mbworker.worker.cluster", "l2_get.lua")
_SET = Script.from_package("mbworker.worker.cluster", "l2_set.lua")
_FORMAT = 1

CacheKey = str | bytes


class L2Cache(Protocol):
    """What the L1 result cache needs from a second level. No method raises on a backend failure."""

    async def get(self, slug: str, key: CacheKey) -> bytes | None:
        """The stored value, or None (absent, expired, purged, or the backend failed)."""
        ...

    async def set(self, slug: str, key: CacheKey, value: bytes, ttl_s: float) -> None:
        """Store `value` for `ttl_s` seconds (best effort: may be dropped)."""
        ...

    async def purge_prefix(self, slug: str) -> None:
        """Forget every entry of `slug` (on every node)."""
        ...


@dataclass(frozen=True)
class L2Statistics:
    hits: int
    misses: int
    """Lookups that found nothing (failures are counted here too, and in `errors`)."""
    sets: int
    """Values written."""
    skipped: int
    """Writes not attempted: value over `max_value_bytes`, or TTL under a millisecond, or backend skipped."""
    purges: int
    errors: int
    """Backend failures (timeouts, connection errors, corrupt entries); each was answered as a miss/no-op."""
    pending_purges: int
    """Purges that failed and wait to be retried (their slugs read as misses meanwhile)."""


def key_bytes(parts: Sequence[object]) -> bytes:
    """A stable byte key from a tuple of str/bytes/int/None/nested tuples (e.g. the L1's primary key)."""
    return msgpack.packb(parts, use_bin_type=True)  # type: ignore[no-any-return]


def _digest(key: CacheKey) -> str:
    data = key.encode() if isinstance(key, str) else key
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def encode_entry(value: bytes) -> bytes:
    return msgpack.packb([_FORMAT, value, int(time.time() * 1000)])  # type: ignore[no-any-return]


def decode_entry(raw: bytes) -> bytes:
    """The value inside an entry; ValueError for anything that is not a format-1 entry."""
    try:
        entry = msgpack.unpackb(raw)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"undecodable L2 entry: {exc}") from exc
    if not (isinstance(entry, list) and len(entry) >= 2 and entry[0] == _FORMAT and isinstance(entry[1], bytes)):
        raise ValueError("not an L2 entry")
    return entry[1]


class RedisL2Cache:
    """`L2Cache` on Redis. Share one per daemon; safe for concurrent use."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mbw:",
        timeout_s: float = 0.25,
        retry_interval_s: float = 1.0,
        max_value_bytes: int = 1024 * 1024,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self.max_value_bytes = max_value_bytes
        self._skip_until = -math.inf
        self._pending_purges: set[str] = set()
        self._hits = 0
        self._misses = 0
        self._sets = 0
        self._skipped = 0
        self._purges = 0
        self._errors = 0

    def _gen_key(self, slug: str) -> str:
        return f"{self._prefix}l2gen:{slug}"

    def _entry_prefix(self, slug: str) -> str:
        return f"{self._prefix}l2:{slug}:"

    def _failed(self) -> None:
        self._errors += 1
        self._skip_until = trio.current_time() + self._retry_interval_s

    async def _call(self, script: Script, slug: str, args: list[str | bytes | int]) -> tuple[bool, object]:
        """(ok, reply): ok is False when Redis failed or was skipped (never raises)."""
        if trio.current_time() < self._skip_until:
            return False, None
        try:
            with trio.move_on_after(self._timeout_s) as waited:
                reply = await self._redis.eval_script(script, [self._gen_key(slug)], args)
        except RedisError:
            self._failed()
            return False, None
        if waited.cancelled_caught:
            self._failed()
            return False, None
        self._skip_until = -math.inf
        return True, reply

    async def _retry_purge(self, slug: str) -> bool:
        """True if `slug` has no purge pending (any more)."""
        if slug not in self._pending_purges:
            return True
        if trio.current_time() < self._skip_until:
            return False
        await self.purge_prefix(slug)
        return slug not in self._pending_purges

    async def get(self, slug: str, key: CacheKey) -> bytes | None:
        if not await self._retry_purge(slug):
            self._misses += 1
            return None
        ok, reply = await self._call(_GET, slug, [self._entry_prefix(slug), _digest(key)])
        if not ok or reply is None:
            self._misses += 1
            return None
        try:
            value = decode_entry(reply)  # type: ignore[arg-type]
        except ValueError:
            self._errors += 1
            self._misses += 1
            return None
        self._hits += 1
        return value

    async def set(self, slug: str, key: CacheKey, value: bytes, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        if len(value) > self.max_value_bytes or ttl_ms < 1 or not await self._retry_purge(slug):
            self._skipped += 1
            return
        ok, _ = await self._call(_SET, slug, [self._entry_prefix(slug), _digest(key), encode_entry(value), ttl_ms])
        if ok:
            self._sets += 1
        else:
            self._skipped += 1

    async def purge_prefix(self, slug: str) -> None:
        failed = False
        try:
            with trio.move_on_after(self._timeout_s) as waited:
                await self._redis.incr(self._gen_key(slug))
            failed = waited.cancelled_caught
        except RedisError:
            failed = True
        if failed:
            # An INCR that timed out may still have been applied: one more later is harmless.
            self._failed()
            self._pending_purges.add(slug)
            return
        self._skip_until = -math.inf
        self._pending_purges.discard(slug)
        self._purges += 1

    def statistics(self) -> L2Statistics:
        return L2Statistics(
            self._hits,
            self._misses,
            self._sets,
            self._skipped,
            self._purges,
            self._errors,
            len(self._pending_purges),
        )


class MemoryL2Cache:
    """`L2Cache` in this process (for tests of the L1 and for single-node setups that want one). Bounded by
    `max_entries` (least recently used first out); uses trio's clock for TTLs."""

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[tuple[str, int, str], tuple[bytes, float]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._max_entries = max_entries
        self._hits = 0
        self._misses = 0
        self._sets = 0
        self._purges = 0

    def _key(self, slug: str, key: CacheKey) -> tuple[str, int, str]:
        return (slug, self._generations.get(slug, 0), _digest(key))

    async def get(self, slug: str, key: CacheKey) -> bytes | None:
        await trio.lowlevel.checkpoint()
        k = self._key(slug, key)
        found = self._entries.get(k)
        if found is None or found[1] <= trio.current_time():
            self._entries.pop(k, None)
            self._misses += 1
            return None
        self._entries.move_to_end(k)
        self._hits += 1
        return found[0]

    async def set(self, slug: str, key: CacheKey, value: bytes, ttl_s: float) -> None:
        await trio.lowlevel.checkpoint()
        k = self._key(slug, key)
        self._entries[k] = (value, trio.current_time() + ttl_s)
        self._entries.move_to_end(k)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        self._sets += 1

    async def purge_prefix(self, slug: str) -> None:
        await trio.lowlevel.checkpoint()
        self._generations[slug] = self._generations.get(slug, 0) + 1
        for k in [k for k in self._entries if k[0] == slug]:
            del self._entries[k]
        self._purges += 1

    def statistics(self) -> L2Statistics:
        return L2Statistics(self._hits, self._misses, self._sets, 0, self._purges, 0, 0)


if TYPE_CHECKING:
    _memory: L2Cache = MemoryL2Cache()
    _redis: L2Cache = RedisL2Cache(...)  # type: ignore[arg-type]
