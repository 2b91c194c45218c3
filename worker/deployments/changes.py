"""The change feed of a deployment store: every `watch()` gets its own bounded queue of `StoreChange`s.

Owner: the store that creates the `ChangeFeed`; each reader owns its subscription (the `watch()` block). A reader
that falls behind is never blocked on and never blocks the store: its queue overflows, the queued changes are
dropped and it gets one `resync` instead (reload everything).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import trio


@dataclass(frozen=True, slots=True)
class StoreChange:
    """One change. `kind == "resync"` means this watcher fell behind and must reload everything; `secrets`: the
    project secrets changed (no slug)."""

    kind: Literal["put", "activate", "rollback", "delete", "failed", "secrets", "resync"]
    slug: str | None
    version: int | None


RESYNC = StoreChange("resync", None, None)


@dataclass
class _Watcher:
    send: trio.MemorySendChannel[StoreChange]
    lagged: bool = False


class ChangeReader:
    """The reader side of one subscription: `async for change in reader` until the `watch()` block ends."""

    def __init__(self, watcher: _Watcher, recv: trio.MemoryReceiveChannel[StoreChange]) -> None:
        self._watcher = watcher
        self._recv = recv

    def __aiter__(self) -> ChangeReader:
        return self

    async def __anext__(self) -> StoreChange:
        try:
            change = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        if not self._watcher.lagged:
            return change
        self._watcher.lagged = False
        while True:  # drop what is queued: the reader reloads everything anyway
            try:
                self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return RESYNC


class ChangeFeed:
    """Fan-out of a store's changes to its watchers. `notify` never waits."""

    def __init__(self, buffer: int = 64) -> None:
        self._buffer = buffer
        self._watchers: list[_Watcher] = []

    def __len__(self) -> int:
        return len(self._watchers)

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[ChangeReader]:
        send, recv = trio.open_memory_channel[StoreChange](self._buffer)
        watcher = _Watcher(send)
        self._watchers.append(watcher)
        try:
            with send, recv:
                yield ChangeReader(watcher, recv)
        finally:
            self._watchers.remove(watcher)

    def notify(self, change: StoreChange) -> None:
        for watcher in self._watchers:
            try:
                watcher.send.send_nowait(change)
            except trio.WouldBlock:
                watcher.lagged = True
            except trio.ClosedResourceError:
                pass
