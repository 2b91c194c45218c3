"""One pub/sub connection shared by several members, each owning the channels under its own prefix.

A node has one cluster bus: what each subsystem needs from pub/sub (messages on its channels, and the news
that the connection dropped and came back, i.e. that messages may have been missed) is the same, so one
connection and one reader serve them all, and gap detection lives here, once.

Who owns what: the bus owns its `PubSub` (the connection, reconnects, resubscribes) and the one reader task
(`serve`); members own their channels (they subscribe and unsubscribe through `bus.pubsub`, under the prefix
they registered) and their reaction to a gap. Member callbacks run on the reader task, in arrival order, and
must not block: a member with slow work (a resync) hands it to its own task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from mbworker.lib.nursery import open_owned_nursery

from .config import RedisSettings
from .pubsub import PubSub, PubSubDisconnected, PubSubMessage, PubSubResubscribed

__all__ = ["BusMember", "PubSubBus", "open_pubsub_bus"]


class BusMember(Protocol):
    def on_message(self, message: PubSubMessage) -> None:
        """A message on one of this member's channels."""
        ...

    def on_disconnected(self, event: PubSubDisconnected) -> None:
        """The connection was lost: messages may be missed until `on_resubscribed`."""
        ...

    def on_resubscribed(self, event: PubSubResubscribed) -> None:
        """Connected again and every subscription confirmed: resync what the gap may have cost."""
        ...


class PubSubBus:
    """Routes one `PubSub`'s events to registered members (by channel prefix; gaps to every member)."""

    def __init__(self, settings: RedisSettings, *, buffer: int = 4096, keepalive: float = 15.0) -> None:
        self.pubsub = PubSub(settings, buffer, keepalive)
        """The shared connection: members (un)subscribe their channels and read its state through it."""
        self._members: list[tuple[bytes, BusMember]] = []
        self._confirmed: PubSubResubscribed | None = None
        """The last confirmation, while no gap followed it: what a member registering late is told."""

    def register(self, prefix: str | bytes, member: BusMember) -> None:
        """Deliver messages on channels starting with `prefix` to `member`. Prefixes must not overlap.

        A member may register at any time: if the bus is connected and confirmed, it hears that at once."""
        p = prefix.encode() if isinstance(prefix, str) else prefix
        for other, _ in self._members:
            if other.startswith(p) or p.startswith(other):
                raise ValueError(f"bus prefix {p!r} overlaps {other!r}")
        self._members.append((p, member))
        if self._confirmed is not None:
            member.on_resubscribed(self._confirmed)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the connection and deliver to members until cancelled; `started()` at once."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pubsub.serve)
                nursery.start_soon(self._dispatch)
                task_status.started()
        finally:
            self.pubsub.close()

    async def _dispatch(self) -> None:
        messages = self.pubsub.messages
        members = self._members
        while True:
            try:
                batch = await messages.receive_batch()
            except trio.EndOfChannel:
                return
            for event in batch:
                if isinstance(event, PubSubMessage):
                    channel = event.channel
                    for prefix, member in members:  # a handful of members: a scan beats a lookup structure
                        if channel.startswith(prefix):
                            member.on_message(event)
                            break
                elif isinstance(event, PubSubDisconnected):
                    self._confirmed = None
                    for _, member in members:
                        member.on_disconnected(event)
                elif isinstance(event, PubSubResubscribed):
                    self._confirmed = event
                    for _, member in members:
                        member.on_resubscribed(event)


@asynccontextmanager
async def open_pubsub_bus(
    settings: RedisSettings, *, buffer: int = 4096, keepalive: float = 15.0
) -> AsyncIterator[PubSubBus]:
    """A served bus owned by the block; it connects in the background (members wait as they need)."""
    bus = PubSubBus(settings, buffer=buffer, keepalive=keepalive)
    async with open_owned_nursery() as nursery:
        await nursery.start(bus.serve)
        try:
            yield bus
        finally:
            nursery.cancel_scope.cancel()
