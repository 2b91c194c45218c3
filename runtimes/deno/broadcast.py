"""`Broadcast`: wake every task waiting for the next change; no trio.Event made while nobody waits."""

from __future__ import annotations

import trio


class Broadcast:
    """`await wait()` returns at the next `notify()`. Waiters re-check whatever they wait for, so a notify with
    nobody waiting is simply dropped — and costs nothing, which matters where it runs once per request (a pool
    slot freed, stdin drained). Owned by the object whose state it announces."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def notify(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()
