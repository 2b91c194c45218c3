"""`MemoryBroker`: the in-process Broker (the default). Publications go straight to the bound handlers.

Single node by default. Brokers created with one shared `MemoryBus` behave like nodes of one cluster inside a
single process (tests, benchmarks); nothing ever crosses a process boundary.
"""

from __future__ import annotations

from mbworker.realtime.broker import BrokerHandler, Envelope
from mbworker.realtime.errors import BrokerError

__all__ = ["MemoryBroker", "MemoryBus"]


class MemoryBus:
    """What in-process brokers share: who is subscribed to which key."""

    def __init__(self) -> None:
        self.subscribers: dict[str, list[MemoryBroker]] = {}


class MemoryBroker:
    def __init__(self, bus: MemoryBus | None = None) -> None:
        self._bus = bus if bus is not None else MemoryBus()
        self._handler: BrokerHandler | None = None

    def bind(self, handler: BrokerHandler) -> None:
        if self._handler is not None:
            raise BrokerError("broker is already bound to a handler")
        self._handler = handler

    async def publish(self, key: str, envelope: Envelope) -> None:
        for broker in self._bus.subscribers.get(key, ()):
            if broker._handler is not None:
                broker._handler.handle_publication(key, envelope)

    async def subscribe(self, key: str) -> None:
        if self._handler is None:
            raise BrokerError("bind a handler before subscribing")
        subs = self._bus.subscribers.setdefault(key, [])
        if self not in subs:
            subs.append(self)

    async def unsubscribe(self, key: str) -> None:
        subs = self._bus.subscribers.get(key)
        if subs is not None and self in subs:
            subs.remove(self)
            if not subs:
                del self._bus.subscribers[key]
