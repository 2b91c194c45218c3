"""The Broker seam: carries broadcasts between nodes (and to this node's own subscribers).

A node subscribes a topic while it has local subscribers, publishes every broadcast to it, and receives
every publication on a subscribed topic (its own included) through `BrokerHandler.handle_publication`, which
the node implements. The broker never imports hub or client code. Implementations: `MemoryBroker`
(single node, the default) and, later, a Redis one: run `tests/realtime/test_broker_contract.py` against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Broker", "BrokerHandler", "Envelope"]


@dataclass(slots=True, eq=False)
class Envelope:
    """One broadcast as it travels between nodes.

    `origin_node` + `sender` (connection id) let the receiving node skip the sender's own channel when it
    joined with `self: false`. `data` is UTF-8 JSON text when `is_json`, else raw bytes; `binary` says the
    message should reach vsn-2 sockets as a kind-4 frame. `cache` holds frames encoded on this node (once per
    wire format); it is never serialized.
    """

    topic: str
    """The wire topic, e.g. `realtime:room1`."""
    private: bool
    event: str
    data: bytes
    is_json: bool
    binary: bool
    origin_node: str
    sender: str | None = None
    meta: dict[str, Any] | None = None
    cache: dict[object, object] = field(default_factory=dict, repr=False)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack/JSON-able dict (without the frame cache) for inter-node brokers."""
        return {
            "t": self.topic,
            "p": self.private,
            "e": self.event,
            "d": self.data,
            "j": self.is_json,
            "b": self.binary,
            "o": self.origin_node,
            "s": self.sender,
            "m": self.meta,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Envelope:
        return cls(d["t"], d["p"], d["e"], d["d"], d["j"], d["b"], d["o"], d["s"], d["m"])


def broker_key(topic: str, private: bool) -> str:
    """The broker topic: public and private channels of one name are separate (as in Supabase)."""
    return ("private|" if private else "public|") + topic


class BrokerHandler(Protocol):
    def handle_publication(self, key: str, envelope: Envelope) -> None:
        """Deliver to local subscribers. Must not block: it only enqueues frames."""
        ...


class Broker(Protocol):
    def bind(self, handler: BrokerHandler) -> None:
        """Set the inbound handler, once, before the first subscribe."""
        ...

    async def publish(self, key: str, envelope: Envelope) -> None:
        """Publish to every node subscribed to `key` (this one included). Order is kept per key."""
        ...

    async def subscribe(self, key: str) -> None: ...

    async def unsubscribe(self, key: str) -> None: ...
