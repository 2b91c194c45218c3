"""Hub: this node's connections and its topic → channel index; local fan-out.

The node's broker and presence deliver here (`handle_publication`, `handle_presence_diff`). Each broadcast is
encoded once per wire format (cached on the envelope) and the same `OutFrame` goes to every subscriber.
The hub keeps the broker/presence subscriptions in step with the index: a topic is subscribed while at
least one local channel is on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from mbworker.lib.websocket import OutFrame
from mbworker.realtime.broker import Broker, Envelope
from mbworker.realtime.presence import Presence, PresenceDiff
from mbworker.realtime.protocol import BroadcastPayload, Message, Vsn, encode, encode_broadcast

if TYPE_CHECKING:
    from mbworker.realtime.client import Channel, Client

__all__ = ["Hub"]


class Hub:
    def __init__(self, node_id: str, broker: Broker, presence: Presence) -> None:
        self.node_id = node_id
        self._broker = broker
        self._presence = presence
        self.clients: dict[str, Client] = {}
        self._topics: dict[str, dict[int, Channel]] = {}
        self._subscribed: set[str] = set()
        self._sub_lock = trio.Lock()
        self.deliveries = 0
        self.publications = 0

    # index -----------------------------------------------------------------------------------------

    def add_client(self, client: Client) -> None:
        self.clients[client.id] = client

    def remove_client(self, client: Client) -> None:
        self.clients.pop(client.id, None)

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    def channels(self, key: str) -> list[Channel]:
        return list(self._topics.get(key, {}).values())

    async def add_channel(self, channel: Channel) -> None:
        self._topics.setdefault(channel.key, {})[id(channel)] = channel
        await self._sync_subscription(channel.key)

    async def remove_channel(self, channel: Channel) -> None:
        subs = self._topics.get(channel.key)
        if subs is not None and subs.pop(id(channel), None) is not None and not subs:
            del self._topics[channel.key]
        await self._sync_subscription(channel.key)

    async def _sync_subscription(self, key: str) -> None:
        # One lock for all transitions: subscribe/unsubscribe calls for a key never overtake each other.
        async with self._sub_lock:
            want = key in self._topics
            if want and key not in self._subscribed:
                await self._broker.subscribe(key)
                await self._presence.subscribe(key)
                self._subscribed.add(key)
            elif not want and key in self._subscribed:
                self._subscribed.discard(key)
                await self._broker.unsubscribe(key)
                await self._presence.unsubscribe(key)

    # inbound from broker / presence ----------------------------------------------------------------

    def handle_publication(self, key: str, envelope: Envelope) -> None:
        subs = self._topics.get(key)
        self.publications += 1
        if not subs:
            return
        cache = envelope.cache
        skip = envelope.sender if envelope.origin_node == self.node_id else None
        bp: BroadcastPayload | None = None
        n = 0
        # No copy of the index: nothing below mutates it (overflow only cancels the connection's scope).
        for channel in subs.values():
            client = channel.client
            if skip is not None and client.id == skip and not channel.self_broadcast:
                continue
            vsn = client.vsn
            frame = cache.get(vsn, cache)
            if frame is cache:
                if bp is None:
                    bp = BroadcastPayload(envelope.event, envelope.data, envelope.is_json, envelope.meta)
                data = encode_broadcast(envelope.topic, bp, vsn, binary=envelope.binary)
                frame = cache[vsn] = OutFrame(data) if data is not None else None
            if frame is not None:
                assert isinstance(frame, OutFrame)
                client.transport.send(frame)
                n += 1
        self.deliveries += n

    def handle_presence_diff(self, key: str, diff: PresenceDiff) -> None:
        subs = self._topics.get(key)
        if not subs:
            return
        frames: dict[Vsn, OutFrame] = {}
        payload = diff.to_payload()
        for channel in subs.values():
            if not channel.presence_enabled:
                continue
            vsn = channel.client.vsn
            frame = frames.get(vsn)
            if frame is None:
                msg = Message(None, None, channel.topic, "presence_diff", payload)
                frame = frames[vsn] = OutFrame(encode(msg, vsn))
            channel.client.transport.send(frame)
