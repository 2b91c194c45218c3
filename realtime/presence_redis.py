"""`RedisPresence`: presence shared by every node through Redis (the cluster Presence; memory stays the default).

Owner: the node's `PubSubBus` (lib/redis/bus.py, one pub/sub connection shared with the broker; the daemon
owns and serves it) hands this presence its diffs and connection news, which it queues (bounded) for its own
task: that task applies diffs in order and runs resyncs, which must not interleave with diffs and must not hold
up the bus. `open_redis_presence(redis, settings, node_id=...)` owns that task (and, given no bus, a bus of its
own); leaving the block leaves the node's entries in Redis to expire (a node that stops is a node that died:
its entries go after `ttl`). The `RedisClient` passed in stays owned by the caller.

Data, per topic (a broker key such as `public|realtime:room`), under `prefix` (default `mbw:rt:`):

- `p:<topic>:e`  hash: member id → entry (msgpack `[member_id, key, meta, since, seq]`; opaque to Redis)
- `p:<topic>:x`  sorted set: member id → expires at (seconds on the nodes' clock, `clock`, default wall time)
- `p:index`      sorted set: topic → its earliest expiry, so a sweeper finds expired entries in O(log n)
- `p:<topic>`    the pub/sub channel of the topic's diffs

Every change (track, untrack, sweep) is one Lua script (`presence_*.lua` beside this file) that updates the
keys *and* publishes the diff, so the diffs of a topic are ordered exactly as the changes were applied, on
every node. The entries expire unless their node refreshes them (the service's upkeep calls `refresh` every
`presence_refresh_interval`); `sweep` (called by every node on the same period, safe concurrently) removes
expired entries and publishes their leave diffs, which is how a dead node's users leave everywhere.

Each node keeps (1) its own entries, to restore them when Redis lost them (a restart without persistence, or
a sweep while the node was cut off) and (2) per subscribed topic, a view: the entries as this node last knew
them. Diffs from Redis are delivered as published (and recorded in the view). Outage: track/untrack still reach
this node's own clients (diffs made locally, recorded in the view) and `list` answers from the view; once the
pub/sub connection has resubscribed, the node restores its own entries in Redis and delivers the difference
between its view and Redis. What a resync or a restore repeats (a join or leave with a `phx_ref` the client
already has) is harmless to realtime-js, which applies diffs by `phx_ref`; a missed diff would not be.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]
import trio

from mbworker.lib.redis import (
    EventQueue,
    PubSubBus,
    PubSubDisconnected,
    PubSubEvent,
    PubSubMessage,
    PubSubResubscribed,
    PubSubState,
    Redis,
    RedisError,
    RedisSettings,
    Script,
)
from mbworker.realtime.errors import PresenceError
from mbworker.realtime.presence import PresenceDiff, PresenceHandler, PresenceState
from mbworker.realtime.presence_memory import new_phx_ref

__all__ = ["RedisPresence", "RedisPresenceStatistics", "open_redis_presence"]

log = logging.getLogger("mbworker.realtime.presence")

_TRACK = Script.from_package("mbworker.realtime", "presence_track.lua")
_UNTRACK = Script.from_package("mbworker.realtime", "presence_untrack.lua")
_REFRESH = Script.from_package("mbworker.realtime", "presence_refresh.lua")
_SWEEP = Script.from_package("mbworker.realtime", "presence_sweep.lua")
_LIST = Script.from_package("mbworker.realtime", "presence_list.lua")

_SWEEP_BATCH = 1000
"""Entries removed per sweep script call (bounds the time one script holds Redis)."""
_SWEEP_TOPICS = 100
"""Topics examined per index read."""
_RESYNC_CONCURRENCY = 256
"""Redis calls a resync keeps in flight at once (the client pipelines concurrent calls)."""

T = TypeVar("T")


async def _concurrently(calls: Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Await the calls concurrently, at most `limit` at once; their results in order. A `RedisError` is
    raised as itself (the first one) once every call has finished."""
    calls = list(calls)
    results: list[Any] = [None] * len(calls)
    errors: list[RedisError] = []
    limiter = trio.CapacityLimiter(limit)

    async def run(i: int, call: Callable[[], Awaitable[T]]) -> None:
        async with limiter:
            try:
                results[i] = await call()
            except RedisError as exc:
                errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call)
    if errors:
        raise errors[0]
    return results


@dataclass(slots=True)
class _Entry:
    """One decoded entry. `raw` is its msgpack form, byte-identical wherever it travels."""

    raw: bytes
    member_id: str
    key: str
    meta: dict[str, Any]
    order: tuple[float, int]

    @property
    def ref(self) -> Any:
        return self.meta.get("phx_ref")

    @classmethod
    def build(cls, member_id: str, key: str, meta: dict[str, Any], order: tuple[float, int]) -> _Entry:
        raw = msgpack.packb([member_id, key, meta, order[0], order[1]], use_bin_type=True)
        return cls(raw, member_id, key, meta, order)

    @classmethod
    def decode(cls, obj: Any, raw: bytes) -> _Entry:
        member_id, key, meta, since, seq = obj
        if not (isinstance(member_id, str) and isinstance(key, str) and isinstance(meta, dict)):
            raise ValueError("bad presence entry")
        return cls(raw, member_id, key, meta, (float(since), int(seq)))


def _decode_one(raw: bytes) -> _Entry:
    return _Entry.decode(msgpack.unpackb(raw, raw=False), raw)


def _decode_diff(data: bytes) -> tuple[list[_Entry], list[_Entry]]:
    """A diff message (see presence_track.lua): int n, then n leave entries, then the join entries."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    n_leaves = unpacker.unpack()
    if not isinstance(n_leaves, int):
        raise ValueError("bad presence diff")
    entries: list[_Entry] = []
    start = unpacker.tell()
    for obj in unpacker:
        end = unpacker.tell()
        entries.append(_Entry.decode(obj, data[start:end]))
        start = end
    return entries[:n_leaves], entries[n_leaves:]


@dataclass(slots=True)
class _View:
    """What this node's clients of one topic were told: member id → entry. `pending` buffers diffs that
    arrive while the first snapshot is being read."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    pending: list[tuple[list[_Entry], list[_Entry]]] | None = None


@dataclass(frozen=True, slots=True)
class RedisPresenceStatistics:
    topics: int
    """Topics subscribed on this node."""
    own_entries: int
    """Entries this node tracks (and refreshes) across all topics."""
    diffs: int
    """Diffs handed to the handler (from Redis, local fallbacks and resyncs)."""
    local_fallbacks: int
    """Track/untrack calls served locally because Redis was unavailable."""
    resyncs: int
    """Times the node restored its entries and reconciled its view with Redis."""
    restored: int
    """Own entries added again because Redis had lost them."""
    swept: int
    """Expired entries this node's sweeps removed (any node's)."""
    undecodable: int
    """Messages on our channels that were not valid diffs (dropped)."""
    connected: bool


class RedisPresence:
    """A `Presence` over Redis, one per node: `open_redis_presence(...)`, or construct it and run
    `await nursery.start(presence.serve)` (the nursery's owner owns the pub/sub connection)."""

    def __init__(
        self,
        redis: Redis,
        settings: RedisSettings,
        *,
        node_id: str,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        prefix: str = "mbw:rt:",
        poll: float = 1.0,
        buffer: int = 4096,
        keepalive: float = 15.0,
        bus: PubSubBus | None = None,
    ) -> None:
        """`redis` runs the scripts (caller-owned). Diffs arrive through `bus`, the node's shared pub/sub
        connection (caller-owned and served); without one, `settings` (use `redis.settings`) make this
        instance's own bus, which `serve()` runs. `buffer` bounds the events queued for this presence's task.
        `ttl` must match `RealtimeSettings.presence_ttl` and exceed its refresh interval; `clock` must agree
        across nodes (wall time; tests inject trio's clock). After a gap the node resyncs, checked at least
        every `poll` seconds."""
        self._redis = redis
        self._own_bus = bus is None
        self._bus = bus if bus is not None else PubSubBus(settings, buffer=buffer, keepalive=keepalive)
        self._pubsub = self._bus.pubsub
        self._events: EventQueue[PubSubEvent] = EventQueue(buffer)
        self._late: PubSubDisconnected | PubSubResubscribed | None = None
        """Connection news that found the queue full (the latest wins; applied after the queue)."""
        self._lost = False
        """Events were dropped on a full queue: resync, as after a gap."""
        self.node_id = node_id
        self._ttl = ttl
        self._keep_ms = max(1000, int(ttl * 3000))
        self._clock = clock
        self._poll = poll
        self._prefix = prefix + "p:"
        self._index = self._prefix + "index"
        self._handler: PresenceHandler | None = None
        self._own: dict[str, dict[str, _Entry]] = {}
        self._views: dict[str, _View] = {}
        self._channels: dict[bytes, str] = {}
        self._seq = itertools.count(1)
        self._gap = False
        """Between a `PubSubDisconnected` and the `PubSubResubscribed` that ends it."""
        self._confirmed = False
        """The pub/sub client announced its first connection (`PubSubResubscribed`: subscriptions confirmed)."""
        self._need_resync = False
        self._diffs = 0
        self._fallbacks = 0
        self._resyncs = 0
        self._restored = 0
        self._swept = 0
        self._undecodable = 0
        self._bus.register(self._prefix, self)

    # keys ------------------------------------------------------------------------------------------

    def _keys(self, topic: str) -> tuple[str, str, str]:
        base = self._prefix + topic
        return base + ":e", base + ":x", self._index

    def _channel(self, topic: str) -> str:
        return self._prefix + topic

    @property
    def _connected(self) -> bool:
        return self._pubsub.state is PubSubState.CONNECTED and self._confirmed and not self._gap

    @property
    def _down(self) -> bool:
        """Known to be cut off (not merely still connecting): don't wait for Redis."""
        return self._pubsub.state is PubSubState.DEGRADED or self._gap

    def bind(self, handler: PresenceHandler) -> None:
        if self._handler is not None:
            raise PresenceError("presence is already bound to a handler")
        self._handler = handler

    def statistics(self) -> RedisPresenceStatistics:
        return RedisPresenceStatistics(
            topics=len(self._views),
            own_entries=sum(len(m) for m in self._own.values()),
            diffs=self._diffs,
            local_fallbacks=self._fallbacks,
            resyncs=self._resyncs,
            restored=self._restored,
            swept=self._swept,
            undecodable=self._undecodable,
            connected=self._connected,
        )

    # Presence --------------------------------------------------------------------------------------

    async def track(self, topic: str, member_id: str, key: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        own = self._own.setdefault(topic, {})
        old = own.get(member_id)
        if old is not None and old.key == key:
            bare = {k: v for k, v in old.meta.items() if k not in ("phx_ref", "phx_ref_prev")}
            if bare == meta:  # Supabase skips unchanged updates
                with contextlib.suppress(PresenceError):  # only a refresh: the next upkeep retries it
                    await self.refresh(topic, [member_id])
                return None
        stored = {**meta, "phx_ref": new_phx_ref()}
        if old is not None:
            stored["phx_ref_prev"] = old.meta["phx_ref"]
        order = old.order if old is not None else (self._clock(), next(self._seq))
        entry = _Entry.build(member_id, key, stored, order)
        own[member_id] = entry
        try:
            await self._run_track(topic, entry)
        except RedisError as exc:
            log.info("presence track on %r served locally (Redis unavailable): %s", topic, exc)
            self._fallbacks += 1
            self._need_resync = True
            self._reconcile(topic, [old] if old is not None else [], [entry])
        return stored

    async def _run_track(self, topic: str, entry: _Entry) -> int:
        expires = self._clock() + self._ttl
        args = (topic, entry.member_id, entry.raw, repr(expires), self._channel(topic), self._keep_ms)
        published: int = await self._redis.eval_script(_TRACK, self._keys(topic), args)
        return published

    async def untrack(self, topic: str, member_id: str) -> None:
        own = self._own.get(topic)
        old = own.pop(member_id, None) if own is not None else None
        if own is not None and not own:
            del self._own[topic]
        try:
            await self._redis.eval_script(_UNTRACK, self._keys(topic), (topic, member_id, self._channel(topic)))
        except RedisError as exc:
            # This node's clients hear the leave now; Redis drops the entry by expiry (nobody refreshes it).
            log.info("presence untrack on %r served locally (Redis unavailable): %s", topic, exc)
            if old is not None:
                self._fallbacks += 1
                self._reconcile(topic, [old], [])

    async def list(self, topic: str) -> PresenceState:
        try:
            entries = await self._list_entries(topic)
        except RedisError as exc:
            view = self._views.get(topic)
            if view is None:
                raise PresenceError(f"presence list failed: {exc}") from exc
            entries = list(view.entries.values())  # this node's last knowledge of the cluster
        state: PresenceState = {}
        for entry in sorted(entries, key=lambda e: e.order):
            state.setdefault(entry.key, []).append(entry.meta)
        return state

    async def _list_entries(self, topic: str) -> builtins.list[_Entry]:
        keys = self._keys(topic)
        raws = await self._redis.eval_script(_LIST, keys[:2], (repr(self._clock()),))
        entries = []
        for raw in raws:
            try:
                entries.append(_decode_one(raw))
            except Exception:  # a foreign or corrupt value: skip it, don't fail the join
                self._undecodable += 1
        return entries

    async def refresh(self, topic: str, member_ids: builtins.list[str]) -> None:
        if not member_ids:
            return
        expires = self._clock() + self._ttl
        args: list[str | int] = [topic, repr(expires), self._keep_ms, *member_ids]
        try:
            missing = await self._redis.eval_script(_REFRESH, self._keys(topic), args)
            own = self._own.get(topic, {})
            for member in missing:
                entry = own.get(member.decode())
                if entry is not None:
                    self._restored += await self._run_track(topic, entry)
        except RedisError as exc:
            raise PresenceError(f"presence refresh failed: {exc}") from exc

    async def sweep(self) -> None:
        try:
            now = repr(self._clock())
            topics = await self._redis.zrangebyscore(self._index, "-inf", now, count=_SWEEP_TOPICS)
            for raw_topic in topics:
                topic = raw_topic.decode()
                while True:
                    args = (topic, now, self._channel(topic), _SWEEP_BATCH)
                    removed: int = await self._redis.eval_script(_SWEEP, self._keys(topic), args)
                    self._swept += removed
                    if removed < _SWEEP_BATCH:
                        break
        except RedisError as exc:
            raise PresenceError(f"presence sweep failed: {exc}") from exc

    async def subscribe(self, topic: str) -> None:
        if self._handler is None:
            raise PresenceError("bind a handler before subscribing")
        if topic in self._views:
            return
        channel = self._channel(topic).encode()
        view = self._views[topic] = _View(pending=[])
        self._channels[channel] = topic
        if self._down:
            self._pubsub.subscribe_nowait(channel)  # subscribed (and resynced) on reconnect
            view.pending = None
            self._need_resync = True
            return
        try:
            await self._pubsub.subscribe(channel)
            entries = await self._list_entries(topic)
        except RedisError as exc:
            log.warning("presence subscribe of %r incomplete, resyncing later: %s", topic, exc)
            view.pending = None
            self._need_resync = True
            return
        if self._views.get(topic) is not view or view.pending is None:
            return  # unsubscribed meanwhile, or a resync already filled the view
        pending, view.pending = view.pending, None
        view.entries = {e.member_id: e for e in entries}
        for leaves, joins in pending:  # diffs that raced the snapshot (already delivered): replay them
            self._update_view(view, leaves, joins)

    async def unsubscribe(self, topic: str) -> None:
        if self._views.pop(topic, None) is None:
            return
        channel = self._channel(topic).encode()
        self._channels.pop(channel, None)
        if self._down:
            self._pubsub.unsubscribe_nowait(channel)
            return
        try:
            await self._pubsub.unsubscribe(channel)
        except RedisError as exc:
            log.warning("presence unsubscribe of %r not confirmed, done on reconnect: %s", topic, exc)

    # inbound ---------------------------------------------------------------------------------------

    @staticmethod
    def _update_view(view: _View, leaves: Iterable[_Entry], joins: Iterable[_Entry]) -> builtins.list[_Entry]:
        """Apply a diff to the view; returns the entries its joins replaced without a leave (a member has one
        entry: e.g. a node restoring an entry that changed while Redis was away, whose old entry was lost)."""
        for entry in leaves:
            known = view.entries.get(entry.member_id)
            if known is not None and known.ref == entry.ref:
                del view.entries[entry.member_id]
        replaced = []
        for entry in joins:
            known = view.entries.get(entry.member_id)
            if known is not None and known.ref != entry.ref:
                replaced.append(known)
            view.entries[entry.member_id] = entry
        return replaced

    def _deliver(self, topic: str, leaves: builtins.list[_Entry], joins: builtins.list[_Entry]) -> None:
        """A diff from Redis: record it in the view and hand it to the handler as published. Never filtered:
        a client that joined later got its state from Redis, not from the view, and a repeated join or leave
        (same `phx_ref`) is harmless to realtime-js, while a missing one would never be repaired."""
        view = self._views.get(topic)
        if view is None or self._handler is None:
            return
        if view.pending is not None:
            view.pending.append((leaves, joins))  # the snapshot being read decides; replayed onto it after
        else:
            leaves = leaves + self._update_view(view, leaves, joins)  # clients must drop the replaced ones
        diff = PresenceDiff()
        for entry in leaves:
            diff.leaves.setdefault(entry.key, []).append(entry.meta)
        for entry in joins:
            diff.joins.setdefault(entry.key, []).append(entry.meta)
        self._diffs += 1
        self._handler.handle_presence_diff(topic, diff)

    def _reconcile(self, topic: str, leaves: Iterable[_Entry], joins: Iterable[_Entry]) -> None:
        """A change this node learnt without a message (a local fallback, a resync): hand the handler only
        what the view did not know yet, and record it."""
        view = self._views.get(topic)
        if view is None or self._handler is None:
            return
        diff = PresenceDiff()
        for entry in leaves:
            known = view.entries.get(entry.member_id)
            if known is not None and known.ref == entry.ref:
                del view.entries[entry.member_id]
                diff.leaves.setdefault(entry.key, []).append(entry.meta)
        for entry in joins:
            known = view.entries.get(entry.member_id)
            if known is None or known.ref != entry.ref:
                if known is not None:  # replaced without a leave we saw (e.g. during a gap)
                    diff.leaves.setdefault(known.key, []).append(known.meta)
                view.entries[entry.member_id] = entry
                diff.joins.setdefault(entry.key, []).append(entry.meta)
        if diff.joins or diff.leaves:
            self._diffs += 1
            self._handler.handle_presence_diff(topic, diff)

    # bus events (on the bus's reader task): queued for this presence's task, in arrival order --------

    def _enqueue(self, event: PubSubEvent) -> None:
        if self._events.put_nowait(event):
            if not isinstance(event, PubSubMessage):
                self._late = None  # superseded: the queue now holds newer news
        else:  # behind by a whole queue: what a gap costs, a resync repairs
            self._lost = True
            if not isinstance(event, PubSubMessage):
                self._late = event

    on_message = on_disconnected = on_resubscribed = _enqueue

    def _on_message(self, message: PubSubMessage) -> None:
        topic = self._channels.get(message.channel)
        if topic is None:
            return
        try:
            leaves, joins = _decode_diff(message.data)
        except Exception:  # any malformed payload: msgpack, shape or type errors
            self._undecodable += 1
            log.warning("dropped an undecodable presence diff on %r", topic)
            return
        self._deliver(topic, leaves, joins)

    async def resync(self) -> None:
        """Restore this node's entries in Redis, then deliver the difference between each subscribed topic's
        view and Redis. Runs in the reader task (so no diff is applied concurrently), once the pub/sub client
        has confirmed every subscription: diffs published after that are queued behind this snapshot."""
        self._resyncs += 1
        own = [(topic, entry) for topic, entries in self._own.items() for entry in entries.values()]
        restores = [functools.partial(self._run_track, topic, entry) for topic, entry in own]
        self._restored += sum(await _concurrently(restores, _RESYNC_CONCURRENCY))
        topics = list(self._views)
        lists = [functools.partial(self._list_entries, topic) for topic in topics]
        for topic, listed in zip(topics, await _concurrently(lists, _RESYNC_CONCURRENCY), strict=True):
            entries = {e.member_id: e for e in listed}
            view = self._views.get(topic)
            if view is None:
                continue
            view.pending = None
            leaves = [e for m, e in view.entries.items() if m not in entries or entries[m].ref != e.ref]
            joins = [e for m, e in entries.items() if m not in view.entries or view.entries[m].ref != e.ref]
            self._reconcile(topic, leaves, joins)
        self._need_resync = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply diffs (and run this presence's own bus, when it was given none) until cancelled; `started()` at
        once (subscribe waits for the first connection, bounded by the command timeout). Cancelling leaves this
        node's entries in Redis to expire."""
        async with trio.open_nursery() as nursery:
            if self._own_bus:
                await nursery.start(self._bus.serve)
            nursery.start_soon(self._serve_inbound)
            task_status.started()

    async def _serve_inbound(self) -> None:
        """Read pub/sub events: apply diffs in arrival order, follow the connection, resync after a gap."""
        poll = self._poll
        events = self._events
        while True:
            batch: list[Any] = []
            with trio.move_on_after(poll):
                batch = await events.receive_batch()
            if self._late is not None:  # news that found the queue full (nothing newer was queued after it)
                batch.append(self._late)
                self._late = None
            if self._lost:
                self._lost = False
                self._need_resync = True
            for event in batch:
                if isinstance(event, PubSubMessage):
                    self._on_message(event)
                elif isinstance(event, PubSubDisconnected):
                    if not self._gap:
                        log.warning("presence lost Redis (%s): local diffs only until it is back", event.reason)
                    self._gap = self._need_resync = True
                elif isinstance(event, PubSubResubscribed):
                    self._gap = False
                    self._confirmed = True
            if self._need_resync and self._connected:
                try:
                    await self.resync()
                    log.info("presence %s resynced with Redis (%d topics)", self.node_id, len(self._views))
                except RedisError as exc:
                    log.warning("presence %s resync failed, retrying: %s", self.node_id, exc)


@asynccontextmanager
async def open_redis_presence(
    redis: Redis,
    settings: RedisSettings,
    *,
    node_id: str,
    ttl: float = 60.0,
    clock: Callable[[], float] = time.time,
    prefix: str = "mbw:rt:",
    bus: PubSubBus | None = None,
) -> AsyncIterator[RedisPresence]:
    """A served `RedisPresence` owned by the block (see `RedisPresence.__init__` for the arguments).

    Waits (bounded by `settings.connect_timeout`) for the pub/sub connection; if Redis is not up, presence
    starts local-only and resyncs when it connects."""
    presence = RedisPresence(redis, settings, node_id=node_id, ttl=ttl, clock=clock, prefix=prefix, bus=bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.serve)
        try:
            await presence._pubsub.wait_connected(settings.connect_timeout)
        except RedisError as exc:
            log.warning("presence starts without Redis (local only until it connects): %s", exc)
        try:
            yield presence
        finally:
            nursery.cancel_scope.cancel()
