"""`Drain`: the node's one drain state, serving → draining → drained.

Owner: the daemon's `Node` creates it and is the only one that finishes it (once public work is done). Anyone may
start it: a signal, the admin API (the provisioner's scale-in, which then polls until it reads drained: true),
the control plane through the heartbeat, or a test through `Node.drain`. Readers ask `draining`, wait
with `wait_started`, or hand `started` to a wait that must end when the drain begins (a log follower).
"""

from __future__ import annotations

import enum

import trio

__all__ = ["Drain", "DrainState"]


class DrainState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    """No new work is accepted; in-flight requests and WebSockets are finishing."""
    DRAINED = "drained"
    """Public work has finished; the admin listener lingers only for whoever asked to be told."""


class Drain:
    def __init__(self) -> None:
        self.state = DrainState.SERVING
        self.started = trio.Event()
        """Set when the drain starts (for waits that must end then, such as a log follower)."""
        self._asked_by_admin = False
        self._told = trio.Event()  # an admin caller has read drained: true

    @property
    def draining(self) -> bool:
        """True from the start of the drain on (draining or drained)."""
        return self.state is not DrainState.SERVING

    def start(self) -> None:
        """Begin draining (idempotent)."""
        if self.state is DrainState.SERVING:
            self.state = DrainState.DRAINING
            self.started.set()

    def request(self) -> bool:
        """The admin API's drain: start, and say whether public work has finished. Answering True is what the
        asker waits for, so the node may close its admin listener after that (`wait_told`)."""
        self._asked_by_admin = True
        self.start()
        if self.state is DrainState.DRAINED:
            self._told.set()
            return True
        return False

    def finish(self) -> None:
        """Public work has finished (called once, by the owner)."""
        self.state = DrainState.DRAINED

    async def wait_started(self) -> None:
        await self.started.wait()

    async def wait_told(self, timeout: float) -> None:
        """If the drain came through the admin API, wait (at most `timeout`) until the asker read drained: true."""
        if self._asked_by_admin:
            with trio.move_on_after(timeout):
                await self._told.wait()
