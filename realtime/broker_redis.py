"""`RedisBroker`: broadcasts between nodes over Redis pub/sub (the cluster Broker; memory stays the default).

Owner: the node's `PubSubBus` (lib/redis/bus.py, one pub/sub connection shared with presence) delivers this
broker's messages and connection news; the daemon owns and serves it. Without a bus, `open_redis_broker(redis,
node_id=...)` makes and owns one for the broker alone. The `RedisClient` passed in stays owned by the caller.

Scheme. One Redis channel per broker key, `<prefix>b:<key>`, SUBSCRIBEd while this node has a local subscriber
(the hub calls `subscribe` on the first local channel of a key and `unsubscribe` after the last). Why not a
pattern: PSUBSCRIBE would make every node receive and decode every topic's traffic; per-key channels let Redis
deliver only where there is a subscriber. Why not sharded pub/sub: the state pillar is a Sentinel-managed
single master, where SSUBSCRIBE buys nothing; with Redis Cluster, swap the verbs, the channel names stay.

Each broadcast is published once, as a msgpack map (`Envelope.to_wire()` plus `q`, a per-node sequence
number): the payload travels as the bytes the client already sent (never re-encoded), with the origin node and
sender connection so that `self: false` skips only the sender. A node's own publications come back through
Redis like everybody else's, so every node sees one order per topic. WebSocket frames are *not* shipped: each
node encodes a message once per wire format it actually has subscribers for (the hub caches them on the
envelope), which costs less than carrying up to three encodings of every payload through Redis to every node.

Outage. If PUBLISH fails (Redis down, timeout) or the pub/sub connection is known to be down, the envelope is
delivered to this node's own subscribers directly: local delivery continues and cross-node delivery resumes
when the pub/sub client has resubscribed (it does so on its own). Sequence numbers of locally delivered
envelopes are remembered (bounded) so a publication that did reach Redis is not delivered twice.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped]
import trio

from mbworker.lib.redis import (
    PubSubBus,
    PubSubDisconnected,
    PubSubMessage,
    PubSubResubscribed,
    PubSubState,
    Redis,
    RedisError,
    RedisSettings,
)
from mbworker.realtime.broker import BrokerHandler, Envelope
from mbworker.realtime.errors import BrokerError

__all__ = ["RedisBroker", "RedisBrokerStatistics", "open_redis_broker"]

log = logging.getLogger("mbworker.realtime.broker")

_LOCAL_SEQS = 10_000
"""How many locally delivered sequence numbers to remember (an outage's worth of own broadcasts)."""


@dataclass(frozen=True, slots=True)
class RedisBrokerStatistics:
    keys: int
    """Broker keys this node is subscribed to."""
    published: int
    """Envelopes published to Redis."""
    received: int
    """Envelopes received from Redis and handed to the handler."""
    local_fallbacks: int
    """Envelopes delivered locally because Redis (or the pub/sub connection) was unavailable."""
    duplicates_dropped: int
    """Own envelopes that came back from Redis after a local fallback had already delivered them."""
    undecodable: int
    """Messages on our channels that were not valid envelopes (dropped)."""
    connected: bool
    """The pub/sub connection is up and every subscription confirmed."""


class RedisBroker:
    """A `Broker` over Redis pub/sub, one per node: `open_redis_broker(...)`, or construct it and run
    `await nursery.start(broker.serve)` (the nursery's owner owns the pub/sub connection)."""

    def __init__(
        self,
        redis: Redis,
        settings: RedisSettings,
        *,
        node_id: str,
        prefix: str = "mbw:rt:",
        buffer: int = 4096,
        keepalive: float = 15.0,
        bus: PubSubBus | None = None,
    ) -> None:
        """`redis` publishes (caller-owned). Messages arrive through `bus`, the node's shared pub/sub connection
        (caller-owned and served); without one, `settings` (use `redis.settings`) make this instance's own bus,
        which `serve()` runs. `node_id` must be unique in the cluster."""
        self._redis = redis
        self._own_bus = bus is None
        self._bus = bus if bus is not None else PubSubBus(settings, buffer=buffer, keepalive=keepalive)
        self._pubsub = self._bus.pubsub
        self.node_id = node_id
        self._prefix = prefix + "b:"
        self._handler: BrokerHandler | None = None
        self._keys: dict[bytes, str] = {}
        """Subscribed channel → broker key (the hub's keys with a local subscriber)."""
        self._seq = itertools.count(1)
        self._local_seqs: set[int] = set()
        self._local_order: deque[int] = deque()
        self._gap = False
        """Between a `PubSubDisconnected` and the `PubSubResubscribed` that ends it."""
        self._confirmed = False
        """The pub/sub client announced its first connection (`PubSubResubscribed`: subscriptions confirmed)."""
        self._changed = trio.Event()
        self._publish_failing = False
        self._published = 0
        self._received = 0
        self._fallbacks = 0
        self._duplicates = 0
        self._undecodable = 0
        self._bus.register(self._prefix, self)

    def channel(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def bind(self, handler: BrokerHandler) -> None:
        if self._handler is not None:
            raise BrokerError("broker is already bound to a handler")
        self._handler = handler

    def statistics(self) -> RedisBrokerStatistics:
        return RedisBrokerStatistics(
            keys=len(self._keys),
            published=self._published,
            received=self._received,
            local_fallbacks=self._fallbacks,
            duplicates_dropped=self._duplicates,
            undecodable=self._undecodable,
            connected=self._connected,
        )

    @property
    def _connected(self) -> bool:
        return self._pubsub.state is PubSubState.CONNECTED and self._confirmed and not self._gap

    @property
    def _down(self) -> bool:
        """Known to be cut off (not merely still connecting): don't wait for Redis."""
        return self._pubsub.state is PubSubState.DEGRADED or self._gap

    # Broker ----------------------------------------------------------------------------------------

    async def publish(self, key: str, envelope: Envelope) -> None:
        seq = next(self._seq)
        wire = envelope.to_wire()
        wire["q"] = seq
        packed = msgpack.packb(wire, use_bin_type=True)
        try:
            await self._redis.publish(self.channel(key), packed)
        except RedisError as exc:
            if not self._publish_failing:  # once per outage, not once per broadcast
                self._publish_failing = True
                log.warning("broker publish failed, delivering locally only until Redis is back: %s", exc)
            self._deliver_locally(key, envelope, seq)
            return
        if self._publish_failing:
            self._publish_failing = False
            log.info("broker publishes to Redis again")
        self._published += 1
        if not self._connected:
            # Published, but our own pub/sub connection is down: it will not bring the message back.
            self._deliver_locally(key, envelope, seq)

    async def subscribe(self, key: str) -> None:
        if self._handler is None:
            raise BrokerError("bind a handler before subscribing")
        channel = self.channel(key)
        self._keys[channel] = key
        await self._change(channel, subscribe=True)

    async def unsubscribe(self, key: str) -> None:
        channel = self.channel(key)
        if self._keys.pop(channel, None) is None:
            return
        await self._change(channel, subscribe=False)

    async def _change(self, channel: bytes, *, subscribe: bool) -> None:
        # While the pub/sub connection is down, don't wait for it: the channel stays requested and the client
        # (un)subscribes it on reconnect; meanwhile delivery is local (see publish).
        if self._down:
            if subscribe:
                self._pubsub.subscribe_nowait(channel)
            else:
                self._pubsub.unsubscribe_nowait(channel)
            return
        try:
            if subscribe:
                await self._pubsub.subscribe(channel)
            else:
                await self._pubsub.unsubscribe(channel)
        except RedisError as exc:
            log.warning("broker (un)subscribe not confirmed, it is retried on reconnect: %s", exc)

    # inbound ---------------------------------------------------------------------------------------

    def _deliver_locally(self, key: str, envelope: Envelope, seq: int) -> None:
        if self._handler is None or self.channel(key) not in self._keys:
            return
        self._fallbacks += 1
        self._local_seqs.add(seq)
        self._local_order.append(seq)
        if len(self._local_order) > _LOCAL_SEQS:
            self._local_seqs.discard(self._local_order.popleft())
        self._handler.handle_publication(key, envelope)

    def on_message(self, message: PubSubMessage) -> None:
        key = self._keys.get(message.channel)
        if key is None or self._handler is None:
            return  # unsubscribed meanwhile
        try:
            wire = msgpack.unpackb(message.data, raw=False)
            envelope = Envelope.from_wire(wire)
            seq = wire.get("q")
        except Exception:  # any malformed payload: msgpack, shape or type errors
            self._undecodable += 1
            log.warning("dropped an undecodable broker message on %r", key)
            return
        if envelope.origin_node == self.node_id and seq in self._local_seqs:
            self._local_seqs.discard(seq)
            self._duplicates += 1
            return
        self._received += 1
        self._handler.handle_publication(key, envelope)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this broker's own bus (when it was given none) until cancelled; `started()` at once (subscribe
        waits for the first connection, bounded by the command timeout)."""
        if self._own_bus:
            await self._bus.serve(task_status=task_status)
        else:
            task_status.started()  # the bus's owner serves it

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_connected(self, timeout: float) -> None:
        """Return once cross-node delivery works (connected, subscriptions confirmed); `BrokerError` after
        `timeout` seconds."""
        try:
            with trio.fail_after(timeout):
                while not self._connected:
                    if self._pubsub.state is not PubSubState.CONNECTED:
                        await self._pubsub.wait_connected(timeout)
                    else:  # connected: wait for the confirmation (or the loss) that our events announce
                        await self._changed.wait()
        except (trio.TooSlowError, RedisError) as exc:
            raise BrokerError(f"broker not connected to Redis after {timeout}s") from exc

    # bus events (on the bus's reader task, in arrival order) ---------------------------------------

    def on_disconnected(self, event: PubSubDisconnected) -> None:
        if not self._gap:
            log.warning("broker lost Redis (%s): local delivery only until it is back", event.reason)
        self._gap = True
        self._notify()

    def on_resubscribed(self, event: PubSubResubscribed) -> None:
        if self._confirmed:
            log.info("broker resubscribed %d channels: cross-node delivery resumed", event.channels)
        self._gap = False
        self._confirmed = True
        self._notify()


@asynccontextmanager
async def open_redis_broker(
    redis: Redis, settings: RedisSettings, *, node_id: str, prefix: str = "mbw:rt:", bus: PubSubBus | None = None
) -> AsyncIterator[RedisBroker]:
    """A served `RedisBroker` owned by the block (see `RedisBroker.__init__` for the arguments).

    Waits (bounded by `settings.connect_timeout`) for the pub/sub connection; if Redis is not up, the broker
    starts with local delivery only and joins the cluster when it connects. Bind the handler (e.g. pass the
    broker to `open_realtime`) before the first subscribe."""
    broker = RedisBroker(redis, settings, node_id=node_id, prefix=prefix, bus=bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        try:
            await broker.wait_connected(settings.connect_timeout)
        except BrokerError as exc:
            log.warning("broker starts without Redis (local delivery until it connects): %s", exc)
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()
