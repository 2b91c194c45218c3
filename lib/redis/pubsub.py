"""Pub/sub on a dedicated connection, delivered to its owner through a bounded memory channel.

Owner: `open_pubsub()` (async context manager) or `serve_pubsub()` (for `nursery.start`) owns the connection
and its supervisor task. The owner reads `pubsub.messages` (an `EventQueue`: `async for`, `receive()`, or
`receive_batch()` for everything buffered at once), bounded, events in arrival order:

- `PubSubMessage`: a message on a subscribed channel (or matching a pattern).
- `PubSubDisconnected`: the connection was lost; messages published from now on may be missed.
- `PubSubResubscribed`: reconnected and Redis confirmed every subscription again; the gap is over, so
  resync any state that messages would have updated (messages after the first confirmations may precede it).
  A pub/sub that starts without a connection (`serve()` with nothing to adopt, `require_connection=False`)
  is in a gap from the start: its first connection is announced too.

A slow owner applies backpressure: the reader waits when the channel is full, Redis buffers, and if Redis
drops us (client-output-buffer-limit) we reconnect and report the gap as above.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import hiredis
import trio

from mbworker.lib.nursery import open_owned_nursery

from ._queue import EventQueue
from .backoff import backoff_delay
from .commands import Key
from .config import RedisSettings, parse_redis_url
from .connection import NOT_ENOUGH, connect, pack_command
from .errors import RedisConnectionError, RedisError, RedisProtocolError, RedisTimeout, map_errors

_READ_SIZE = 256 * 1024


class PubSubMessage(NamedTuple):
    """A published message (a NamedTuple: the cheapest immutable record to build at 500k/s)."""

    channel: bytes
    data: bytes
    pattern: bytes | None = None
    """The pattern that matched, for PSUBSCRIBE deliveries."""


@dataclass(frozen=True, slots=True)
class PubSubDisconnected:
    """The connection was lost: messages may be missed until `PubSubResubscribed`."""

    reason: str


@dataclass(frozen=True, slots=True)
class PubSubResubscribed:
    """(Re)connected and every subscription confirmed: what was published during the gap (since the
    `PubSubDisconnected`, or since the start for a pub/sub that started unconnected) is lost."""

    channels: int
    patterns: int


PubSubEvent = PubSubMessage | PubSubDisconnected | PubSubResubscribed


class PubSubState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class PubSubStatistics:
    state: PubSubState
    channels: int
    """Channels subscribed to (as requested by the owner)."""
    patterns: int
    messages: int
    """Messages received since start."""
    buffered: int
    """Events waiting in the channel for the owner: the delivery lag, in events."""
    buffer_full: int
    """Times the reader had to wait because the owner was behind."""
    disconnects: int
    reconnects: int
    pending_confirmations: int
    """(Un)subscriptions whose Redis confirmation a caller is (or was, until it gave up) waiting for."""


_CONFIRMS = {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe"}
_UNDOES = {b"unsubscribe": b"subscribe", b"punsubscribe": b"psubscribe"}


class PubSub:
    """Subscriptions on one connection that survive reconnects. Created by `open_pubsub`/`serve_pubsub`."""

    def __init__(self, settings: RedisSettings, buffer: int, keepalive: float) -> None:
        self.settings = settings
        self._keepalive = keepalive
        self.messages: EventQueue[PubSubEvent] = EventQueue(buffer)
        """Events for the owner (one reader). Ends (EndOfChannel) when the pub/sub is closed."""
        self._channels: set[bytes] = set()
        self._patterns: set[bytes] = set()
        self._confirms: dict[tuple[bytes, bytes], trio.Event] = {}
        self._resubscribing: set[tuple[bytes, bytes]] = set()
        """Subscriptions re-sent on this connection whose confirmation has not arrived yet."""
        self._announce_resubscribed = False
        self._stream: trio.abc.Stream | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._outbox: list[tuple[Any, ...]] = []
        """Commands for the current connection, in call order; its writer task sends them."""
        self._outbox_ready = trio.Event()
        self._state = PubSubState.CONNECTING
        self._state_changed = trio.Event()
        self._last_error: RedisError | None = None
        self._messages = 0
        self._buffer_full = 0
        self._disconnects = 0
        self._reconnects = 0

    # -- owner API ----------------------------------------------------------------------------------------------

    @property
    def state(self) -> PubSubState:
        return self._state

    async def subscribe(self, *channels: Key) -> None:
        """Subscribe and wait for Redis to confirm. While disconnected this waits for the reconnect; on
        `RedisTimeout` the channels stay requested and are subscribed when the connection comes back."""
        await self._change(b"subscribe", self._channels, channels, add=True)

    async def psubscribe(self, *patterns: Key) -> None:
        await self._change(b"psubscribe", self._patterns, patterns, add=True)

    async def unsubscribe(self, *channels: Key) -> None:
        """Unsubscribe; once this returns, no message for these channels is delivered any more."""
        await self._change(b"unsubscribe", self._channels, channels, add=False)

    async def punsubscribe(self, *patterns: Key) -> None:
        await self._change(b"punsubscribe", self._patterns, patterns, add=False)

    def subscribe_nowait(self, *channels: Key) -> None:
        """Request the channels without waiting: sent now if connected, else by the next connection. Nothing
        confirms them to the caller (for an owner that is not waiting for Redis, e.g. during an outage)."""
        self._request(b"subscribe", self._channels, channels, add=True)

    def unsubscribe_nowait(self, *channels: Key) -> None:
        """Drop the channels without waiting: sent now if connected; messages already on the way may follow."""
        self._request(b"unsubscribe", self._channels, channels, add=False)

    async def wait_connected(self, timeout: float) -> None:
        """Return once connected (subscriptions sent); `RedisTimeout` after `timeout` seconds."""
        with trio.move_on_after(timeout):
            while self._state is not PubSubState.CONNECTED:
                await self._state_changed.wait()
            return
        raise RedisTimeout(f"pub/sub not connected after {timeout}s (last error: {self._last_error})")

    def statistics(self) -> PubSubStatistics:
        return PubSubStatistics(
            state=self._state,
            channels=len(self._channels),
            patterns=len(self._patterns),
            messages=self._messages,
            buffered=len(self.messages),
            buffer_full=self._buffer_full,
            disconnects=self._disconnects,
            reconnects=self._reconnects,
            pending_confirmations=len(self._confirms),
        )

    # -- internals ----------------------------------------------------------------------------------------------

    def _set_state(self, state: PubSubState) -> None:
        if state is not self._state:
            self._state = state
            self._state_changed.set()
            self._state_changed = trio.Event()

    def _request(self, verb: bytes, names: set[bytes], given: Iterable[Key], *, add: bool) -> list[bytes]:
        """Update the wanted set and queue the command if connected; returns the names (as bytes)."""
        wanted = [n.encode() if isinstance(n, str) else bytes(n) for n in given]
        if not wanted:
            return wanted
        if add:
            names.update(wanted)
        else:
            names.difference_update(wanted)
            # A subscribe still waiting for its confirmation is superseded: release its caller now, else a
            # subscribe made while disconnected would keep its event until a confirmation that never comes.
            undone = _UNDOES[verb]
            for name in wanted:
                event = self._confirms.pop((undone, name), None)
                if event is not None:
                    event.set()
        self._queue([(verb, *wanted)])
        return wanted

    async def _change(self, verb: bytes, names: set[bytes], given: Iterable[Key], *, add: bool) -> None:
        wanted = self._request(verb, names, given, add=add)
        if not wanted or (not add and self._stream is None):
            return  # nothing to undo while disconnected: the next connection will not subscribe them
        events = [self._confirms.setdefault((verb, name), trio.Event()) for name in wanted]
        with trio.move_on_after(self.settings.command_timeout):
            for event in events:
                await event.wait()
            return
        raise RedisTimeout(f"Redis did not confirm {verb.decode()} within {self.settings.command_timeout}s")

    def _queue(self, commands: list[tuple[Any, ...]]) -> None:
        """Queue commands for the connection's writer if connected (else the next connection's resubscribe
        covers them). One writer keeps them in call order, and a cancelled caller never leaves half a command."""
        if self._stream is None or not commands:
            return
        self._outbox.extend(commands)
        self._outbox_ready.set()

    async def _write(self, stream: trio.abc.Stream) -> None:
        """Send queued commands until the connection is torn down; a failed write ends the connection."""
        while True:
            if not self._outbox:
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()
                continue
            commands, self._outbox = self._outbox, []
            data = b"".join(pack_command(cmd) for cmd in commands)
            try:
                with map_errors("pub/sub write"), trio.fail_after(self.settings.command_timeout):
                    await stream.send_all(data)
            except RedisError as exc:
                self._last_error = exc
                if self._conn_scope is not None:
                    self._conn_scope.cancel()
                return

    async def _deliver(self, event: PubSubEvent) -> None:
        if not self.messages.put_nowait(event):
            self._buffer_full += 1
            await self.messages.put(event)

    async def serve(
        self,
        first: tuple[trio.abc.Stream, hiredis.Reader] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Supervise the connection until cancelled; `started()` at once (after adopting `first`)."""
        failures = 0
        ever_connected = False
        announce = first is None  # started unconnected: the first connection ends a gap too
        task_status.started()
        while True:
            if first is not None:
                stream, reader = first
                first = None
            else:
                try:
                    stream, reader, _ = await connect(self.settings)
                except RedisError as exc:
                    self._last_error = exc
                    self._set_state(PubSubState.DEGRADED)
                    failures += 1
                    await trio.sleep(backoff_delay(failures, self.settings.backoff_initial, self.settings.backoff_max))
                    continue
            failures = 0
            self._last_error = None
            reason = "connection closed"
            try:
                with trio.CancelScope() as self._conn_scope:
                    self._stream = stream
                    self._outbox = []
                    if self._channels:
                        self._outbox.append((b"subscribe", *self._channels))
                    if self._patterns:
                        self._outbox.append((b"psubscribe", *self._patterns))
                    self._resubscribing = {(b"subscribe", n) for n in self._channels}
                    self._resubscribing.update((b"psubscribe", n) for n in self._patterns)
                    self._announce_resubscribed = announce
                    announce = True
                    if ever_connected:
                        self._reconnects += 1
                    ever_connected = True
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._write, stream)
                        await self._resubscribed_if_done()
                        self._set_state(PubSubState.CONNECTED)
                        try:
                            await self._read(stream, reader)
                        except RedisError as exc:
                            self._last_error = exc
                        finally:
                            nursery.cancel_scope.cancel()
                if self._last_error is not None:
                    reason = str(self._last_error)
            finally:
                self._stream = None
                self._conn_scope = None
                self._outbox = []
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            self._disconnects += 1
            self._set_state(PubSubState.DEGRADED)
            # Unsubscribes in flight are done: the next connection only subscribes what is still wanted.
            for (verb, name), event in list(self._confirms.items()):
                if verb in (b"unsubscribe", b"punsubscribe"):
                    event.set()
                    del self._confirms[(verb, name)]
            await self._deliver(PubSubDisconnected(reason))
            await trio.sleep(backoff_delay(0, self.settings.backoff_initial, self.settings.backoff_max))

    async def _resubscribed_if_done(self) -> None:
        if self._announce_resubscribed and not self._resubscribing:
            self._announce_resubscribed = False
            await self._deliver(PubSubResubscribed(len(self._channels), len(self._patterns)))

    async def _read(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> None:
        """Dispatch replies until the connection fails. A quiet connection is probed with PING every
        `keepalive` seconds; no bytes for two periods means it is dead (half-open TCP, hung server)."""
        ping_sent = False
        gets = reader.gets
        put_nowait = self.messages.put_nowait
        with map_errors("pub/sub read"):
            while True:
                reply = gets()
                if reply is NOT_ENOUGH:
                    with trio.move_on_after(self._keepalive) as quiet:
                        data = await stream.receive_some(_READ_SIZE)
                    if quiet.cancelled_caught:
                        if ping_sent:
                            raise RedisTimeout(f"pub/sub connection silent for {2 * self._keepalive}s")
                        ping_sent = True
                        self._queue([(b"PING",)])
                        continue
                    if not data:
                        raise RedisConnectionError("Redis closed the pub/sub connection")
                    ping_sent = False
                    reader.feed(data)  # type: ignore[arg-type]  # bytes at runtime; stubs lack bytearray
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    raise RedisProtocolError(f"pub/sub error reply: {reply}")
                kind = reply[0]
                if kind == b"message":
                    self._messages += 1
                    message = PubSubMessage(reply[1], reply[2])
                    if not put_nowait(message):
                        await self._deliver(message)
                elif kind == b"pmessage":
                    self._messages += 1
                    message = PubSubMessage(reply[2], reply[3], reply[1])
                    if not put_nowait(message):
                        await self._deliver(message)
                elif kind in _CONFIRMS:
                    event = self._confirms.pop((kind, reply[1]), None)
                    if event is not None:
                        event.set()
                    if self._resubscribing:
                        self._resubscribing.discard((kind, reply[1]))
                        await self._resubscribed_if_done()
                # b"pong": the keepalive's answer; any bytes already reset it.

    def close(self) -> None:
        self.messages.close()


@asynccontextmanager
async def open_pubsub(
    settings: RedisSettings | str,
    *,
    buffer: int = 4096,
    keepalive: float = 15.0,
    require_connection: bool = True,
) -> AsyncIterator[PubSub]:
    """A pub/sub connection owned by the block. `buffer` bounds the events waiting for the owner.

    With `require_connection`, an unreachable server raises `RedisConnectionError` here; otherwise it starts
    `DEGRADED` and reconnects in the background (subscribe() then waits for the connection)."""
    if isinstance(settings, str):
        settings = parse_redis_url(settings)
    pubsub = PubSub(settings, buffer, keepalive)
    first = None
    if require_connection:
        stream, reader, _ = await connect(settings)
        first = (stream, reader)
    try:
        async with open_owned_nursery() as nursery:
            await nursery.start(pubsub.serve, first)
            try:
                yield pubsub
            finally:
                nursery.cancel_scope.cancel()
    finally:
        pubsub.close()


async def serve_pubsub(
    settings: RedisSettings | str,
    *,
    buffer: int = 4096,
    keepalive: float = 15.0,
    task_status: trio.TaskStatus[PubSub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`pubsub = await nursery.start(serve_pubsub, url)`: runs until the nursery is cancelled."""
    async with open_pubsub(settings, buffer=buffer, keepalive=keepalive) as pubsub:
        task_status.started(pubsub)
        await trio.sleep_forever()
