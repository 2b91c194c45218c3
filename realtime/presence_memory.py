"""`MemoryPresence`: the in-process Presence (the default). Diffs go straight to the bound handlers.

Single node by default. Instances created with one shared `MemoryPresenceStore` behave like nodes of one
cluster inside a single process (tests): they see each other's entries, and an instance that stops refreshing
(a "dead node") loses its entries after `ttl`, with leave diffs published by whoever sweeps. `clock` defaults
to `trio.current_time` (tests use trio's MockClock).
"""

from __future__ import annotations

import base64
import builtins
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from mbworker.realtime.errors import PresenceError
from mbworker.realtime.presence import PresenceDiff, PresenceHandler, PresenceState

__all__ = ["MemoryPresence", "MemoryPresenceStore", "new_phx_ref"]

_counter = itertools.count(1)
_node_salt = os.urandom(4)


def new_phx_ref() -> str:
    """An opaque unique presence ref (base64, like Phoenix's)."""
    return base64.b64encode(_node_salt + next(_counter).to_bytes(4, "big")).decode()


@dataclass(slots=True)
class _Entry:
    key: str
    meta: dict[str, Any]
    expires_at: float


class MemoryPresenceStore:
    """What in-process presence instances share: entries per topic and who is subscribed to each topic."""

    def __init__(self) -> None:
        self.topics: dict[str, dict[str, _Entry]] = {}
        self.subscribers: dict[str, list[MemoryPresence]] = {}


class MemoryPresence:
    def __init__(
        self,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = trio.current_time,
        store: MemoryPresenceStore | None = None,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._handler: PresenceHandler | None = None
        self._store = store if store is not None else MemoryPresenceStore()
        self._topics = self._store.topics

    def bind(self, handler: PresenceHandler) -> None:
        if self._handler is not None:
            raise PresenceError("presence is already bound to a handler")
        self._handler = handler

    def _publish(self, topic: str, diff: PresenceDiff) -> None:
        for instance in self._store.subscribers.get(topic, ()):
            if instance._handler is not None:
                instance._handler.handle_presence_diff(topic, diff)

    async def track(self, topic: str, member_id: str, key: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        entries = self._topics.setdefault(topic, {})
        old = entries.get(member_id)
        expires = self._clock() + self._ttl
        if old is not None and old.key == key:
            bare = {k: v for k, v in old.meta.items() if k not in ("phx_ref", "phx_ref_prev")}
            if bare == meta:  # Supabase skips unchanged updates
                old.expires_at = expires
                return None
        stored = {**meta, "phx_ref": new_phx_ref()}
        diff = PresenceDiff()
        if old is not None:
            stored["phx_ref_prev"] = old.meta["phx_ref"]
            diff.leaves[old.key] = [old.meta]
        entries[member_id] = _Entry(key, stored, expires)
        diff.joins[key] = [stored]
        self._publish(topic, diff)
        return stored

    async def untrack(self, topic: str, member_id: str) -> None:
        entries = self._topics.get(topic)
        if not entries or member_id not in entries:
            return
        old = entries.pop(member_id)
        if not entries:
            del self._topics[topic]
        self._publish(topic, PresenceDiff(leaves={old.key: [old.meta]}))

    async def list(self, topic: str) -> PresenceState:
        now = self._clock()
        state: PresenceState = {}
        for entry in self._topics.get(topic, {}).values():
            if entry.expires_at > now:
                state.setdefault(entry.key, []).append(entry.meta)
        return state

    async def refresh(self, topic: str, member_ids: builtins.list[str]) -> None:
        entries = self._topics.get(topic, {})
        expires = self._clock() + self._ttl
        for member_id in member_ids:
            entry = entries.get(member_id)
            if entry is not None:
                entry.expires_at = expires

    async def sweep(self) -> None:
        now = self._clock()
        for topic in list(self._topics):
            entries = self._topics[topic]
            gone = [m for m, e in entries.items() if e.expires_at <= now]
            if not gone:
                continue
            diff = PresenceDiff()
            for member_id in gone:
                entry = entries.pop(member_id)
                diff.leaves.setdefault(entry.key, []).append(entry.meta)
            if not entries:
                del self._topics[topic]
            self._publish(topic, diff)

    async def subscribe(self, topic: str) -> None:
        if self._handler is None:
            raise PresenceError("bind a handler before subscribing")
        subs = self._store.subscribers.setdefault(topic, [])
        if self not in subs:
            subs.append(self)

    async def unsubscribe(self, topic: str) -> None:
        subs = self._store.subscribers.get(topic)
        if subs is not None and self in subs:
            subs.remove(self)
            if not subs:
                del self._store.subscribers[topic]
