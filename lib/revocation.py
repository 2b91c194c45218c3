"""Revoked auth sessions: a deny-list of JWT `session_id`s that every token check consults.

`RevocationList` is the seam; it is the `RevocationCheck` the node's `JwtVerifier` (lib/jwt.py) consults on every
token, so the functions' JWT gate and realtime's joins refuse a revoked session. Checks (`is_revoked`) are a dict
lookup on the caller's thread; revocations arrive asynchronously.

- `MemoryRevocationList`: one process (the embedded default, and the local half of the Redis twin).
- `open_redis_revocations(redis)`: the cluster's list. Entries live in a sorted set `<p>revoked` (member: the
  session id, score: until when, epoch seconds) and are announced on `<p>revoked:changes`; every node keeps a
  local copy, loaded on start and again after every pub/sub gap (what was announced during a gap is in the set).
  A revocation reaches every node within one pub/sub delivery. Redis unreachable: the local copy keeps answering
  and the reload after reconnecting brings what was missed.

Who owns what: the Redis twin's context owns its pub/sub connection and its task; the caller owns the client.
Listeners (`add_listener`) are called once per newly revoked session on the list's task: realtime closes the
channels joined with it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from mbworker.lib.nursery import open_owned_nursery
from mbworker.lib.redis import (
    PubSub,
    PubSubBus,
    PubSubDisconnected,
    PubSubMessage,
    PubSubResubscribed,
    RedisClient,
    RedisError,
)

log = logging.getLogger("mbworker.revocation")

Listener = Callable[[str], Awaitable[None]]
"""Called with a session id when it becomes revoked on this node."""

QUEUE_SIZE = 256
"""Announcements waiting for the follower; past that it reloads the whole list from Redis instead."""

LISTENER_TIMEOUT_S = 5.0
"""A listener that takes longer is cancelled: the next revocation must not wait behind it."""


class RevocationList(Protocol):
    def is_revoked(self, session_id: object) -> bool:
        """Whether `session_id` (a claim value: anything, usually a str or None) is revoked now."""
        ...

    async def revoke(self, session_id: str, until: float) -> None:
        """Deny `session_id` until `until` (epoch seconds): its tokens' latest possible expiry."""
        ...

    def add_listener(self, listener: Listener) -> None: ...

    async def listed(self) -> dict[str, float]:
        """Every session revoked now: session id → until."""
        ...


class MemoryRevocationList:
    """Revoked sessions of this process: session id → until (epoch seconds). Expired entries go on lookup/add."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._until: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._clock = clock

    def __len__(self) -> int:
        return len(self._until)

    def is_revoked(self, session_id: object) -> bool:
        if not self._until or not isinstance(session_id, str):
            return False
        until = self._until.get(session_id)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[session_id]
            return False
        return True

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def revoke(self, session_id: str, until: float) -> None:
        await self.apply(session_id, until)

    async def listed(self) -> dict[str, float]:
        now = self._clock()
        return {k: v for k, v in self._until.items() if v > now}

    async def apply(self, session_id: str, until: float) -> None:
        """Record a revocation (from this node or announced by another) and tell listeners if it is new."""
        now = self._clock()
        if until <= now:
            return
        new = not self.is_revoked(session_id)
        self._until[session_id] = max(until, self._until.get(session_id, 0.0))
        if len(self._until) > 1024:
            self._until = {k: v for k, v in self._until.items() if v > now}
        if new:
            for listener in list(self._listeners):
                with trio.move_on_after(LISTENER_TIMEOUT_S):
                    try:
                        await listener(session_id)
                    except Exception:
                        log.exception("revocation listener failed for a session")


class RedisRevocationList:
    """The cluster's deny-list; get one from `open_redis_revocations`. Checks answer from the local copy.

    Announcements arrive on the node's pub/sub bus (a `BusMember`: callbacks only queue, the follower task does
    the work) or, without a bus (the control plane), on a connection of its own."""

    def __init__(self, redis: RedisClient, prefix: str = "mbw:") -> None:
        self._redis = redis
        self.key = f"{prefix}revoked"
        self.channel = f"{prefix}revoked:changes"
        self.local = MemoryRevocationList()
        self._send, self._receive = trio.open_memory_channel[tuple[str, float] | None](QUEUE_SIZE)
        """Announcements (session id, until) for the follower; None asks for a reload from Redis."""
        self._reload_asked = False

    def is_revoked(self, session_id: object) -> bool:
        return self.local.is_revoked(session_id)

    def add_listener(self, listener: Listener) -> None:
        self.local.add_listener(listener)

    async def revoke(self, session_id: str, until: float) -> None:
        """Store, announce, and apply here. Raises `RedisError` when Redis can't take it (nothing announced)."""
        now = time.time()
        await self._redis.execute_many(
            [
                ("ZREMRANGEBYSCORE", self.key, "-inf", now),
                ("ZADD", self.key, "GT", until, session_id),  # a later expiry never shortens
                ("PUBLISH", self.channel, json.dumps({"session_id": session_id, "until": until})),
            ]
        )
        await self.local.apply(session_id, until)

    async def listed(self) -> dict[str, float]:
        """Every session revoked now, from Redis (raises `RedisError`)."""
        rows = await self._redis.zrangebyscore(self.key, time.time(), "+inf", withscores=True)
        return {member.decode(): float(score) for member, score in rows}

    async def reload(self) -> None:
        for session_id, until in (await self.listed()).items():
            await self.local.apply(session_id, until)

    # BusMember: called on the pub/sub reader's task; they only queue --------------------------------------------

    def on_message(self, message: PubSubMessage) -> None:
        try:
            doc = json.loads(message.data)
            item: tuple[str, float] | None = (str(doc["session_id"]), float(doc["until"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed revocation announcement")
            return
        self._queue(item)

    def on_disconnected(self, event: PubSubDisconnected) -> None:
        pass  # the local copy keeps answering; the reload after reconnecting brings what was missed

    def on_resubscribed(self, event: PubSubResubscribed) -> None:
        self._queue(None)

    def _queue(self, item: tuple[str, float] | None) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._reload_asked = True  # too many at once: read them all back from Redis instead

    # the follower ---------------------------------------------------------------------------------------------

    async def serve(
        self, bus: PubSubBus | None = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow announcements until cancelled; `started()` once loaded (or Redis is away: then it catches up
        after reconnecting)."""
        try:
            await self.reload()
        except RedisError as exc:
            log.warning("revocations not loaded yet (%s): loaded after reconnecting", exc)
        async with trio.open_nursery() as nursery:
            if bus is None:
                pubsub = await nursery.start(self._own_connection)
            else:
                bus.register(self.channel, self)
                pubsub = bus.pubsub
            pubsub.subscribe_nowait(self.channel)
            task_status.started()
            async for item in self._receive:
                if item is None or self._reload_asked:
                    self._reload_asked = False
                    await self._reload_until_done()
                if item is not None:
                    await self.local.apply(*item)

    async def _own_connection(self, *, task_status: trio.TaskStatus[PubSub] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._redis.pubsub(buffer=QUEUE_SIZE) as pubsub:
            task_status.started(pubsub)
            async for event in pubsub.messages:
                if isinstance(event, PubSubMessage):
                    self.on_message(event)
                elif isinstance(event, PubSubResubscribed):
                    self.on_resubscribed(event)

    async def _reload_until_done(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.reload()
                return
            except RedisError as exc:
                log.warning("revocations reload failed, retry in %.1fs: %s", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)


@asynccontextmanager
async def open_redis_revocations(
    redis: RedisClient, *, bus: PubSubBus | None = None, prefix: str = "mbw:"
) -> AsyncIterator[RedisRevocationList]:
    """The cluster deny-list on `redis` (owned by the caller, as `bus` is: a node passes its cluster bus); the
    block owns the follower task."""
    revocations = RedisRevocationList(redis, prefix)
    async with open_owned_nursery() as nursery:
        await nursery.start(revocations.serve, bus)
        try:
            yield revocations
        finally:
            nursery.cancel_scope.cancel()
