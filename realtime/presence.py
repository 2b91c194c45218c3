"""The Presence seam: who is tracked on which topic, across nodes.

An entry is one channel instance (`member_id`, unique per node/connection/join) under a user-chosen
presence key, with a meta dict carrying `phx_ref` (and `phx_ref_prev` after an update). Entries expire
`ttl` seconds after their last track/refresh, so a crashed node's users disappear without cleanup code;
the node refreshes its own members periodically and calls `sweep()` so expired entries produce leave diffs.
Every change is published as a `PresenceDiff` to `PresenceHandler.handle_presence_diff` on every node that
subscribed the topic, in order per topic. Implementations: `MemoryPresence` (single node, the default) and,
later, a Redis one: run `tests/realtime/test_presence_contract.py` against it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Presence", "PresenceDiff", "PresenceHandler", "PresenceState"]

PresenceState = dict[str, list[dict[str, Any]]]
"""presence key → metas (each with `phx_ref`). Wire form wraps each list as `{"metas": [...]}`."""


@dataclass(slots=True)
class PresenceDiff:
    joins: PresenceState = field(default_factory=dict)
    leaves: PresenceState = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "joins": {k: {"metas": v} for k, v in self.joins.items()},
            "leaves": {k: {"metas": v} for k, v in self.leaves.items()},
        }


def state_payload(state: PresenceState) -> dict[str, Any]:
    return {k: {"metas": v} for k, v in state.items()}


class PresenceHandler(Protocol):
    def handle_presence_diff(self, topic: str, diff: PresenceDiff) -> None:
        """Deliver to local subscribers of `topic`. Must not block: it only enqueues frames."""
        ...


class Presence(Protocol):
    def bind(self, handler: PresenceHandler) -> None:
        """Set the diff handler, once, before the first subscribe."""
        ...

    async def track(self, topic: str, member_id: str, key: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        """Add or update `member_id` under `key`; publish the diff. Returns the stored meta (with `phx_ref`),
        or None when the update changed nothing (no diff is published then)."""
        ...

    async def untrack(self, topic: str, member_id: str) -> None:
        """Remove `member_id` (no-op if absent) and publish the leave diff."""
        ...

    async def list(self, topic: str) -> PresenceState:
        """The current state of `topic` (expired entries excluded)."""
        ...

    async def refresh(self, topic: str, member_ids: builtins.list[str]) -> None:
        """Push back the expiry of these members (the node's own)."""
        ...

    async def sweep(self) -> None:
        """Remove expired entries on subscribed topics and publish their leave diffs."""
        ...

    async def subscribe(self, topic: str) -> None: ...

    async def unsubscribe(self, topic: str) -> None: ...
