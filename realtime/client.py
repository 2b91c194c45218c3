"""Client: one WebSocket connection's channel state and the handling of its messages.

The connection's task (service.py) feeds every received frame to `Client.handle_frame`, in order, and calls
`Client.teardown` exactly once when the socket ends. Outgoing frames go through `Client.transport`.
Semantics follow /work/shared/reference/realtime-protocol.md §3–§7.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from mbworker.lib.websocket import OutFrame, Transport
from mbworker.realtime.auth import Authenticator
from mbworker.realtime.broker import Broker, Envelope, broker_key
from mbworker.realtime.errors import AuthError
from mbworker.realtime.hub import Hub
from mbworker.realtime.limits import RateLimit, SharedLimiter, WindowLimit
from mbworker.realtime.presence import Presence, state_payload
from mbworker.realtime.protocol import BroadcastPayload, Message, ProtocolError, Vsn, decode_binary, decode_text, encode
from mbworker.realtime.settings import RealtimeSettings

__all__ = ["Channel", "Client", "NodeContext"]

log = logging.getLogger("mbworker.realtime")

TOPIC_PREFIX = "realtime:"


@dataclass(slots=True)
class NodeContext:
    """What a client needs from its node. The node (service.py) owns all of it."""

    node_id: str
    settings: RealtimeSettings
    auth: Authenticator
    hub: Hub
    broker: Broker
    presence: Presence
    shared_limiter: SharedLimiter | None = None


POSTGRES_CHANGES_UNAVAILABLE = "postgres_changes is not available on this server: no database changes are streamed"


def postgres_bindings(value: Any) -> list[dict[str, Any]]:
    """The join reply's `postgres_changes`: each binding the client asked for, echoed with an `id`.

    realtime-js checks the reply entry by entry against its bindings (`event`, and `schema`/`table`/`filter`
    with null meaning absent) and keeps the ids; anything that is not a binding object is left out. The id is
    stable per binding, as Supabase's hash of the parameters is."""
    if not isinstance(value, list):
        return []
    out: list[dict[str, Any]] = []
    for binding in value:
        if not isinstance(binding, dict):
            continue
        entry = {k: binding.get(k) for k in ("event", "schema", "table", "filter")}
        digest = hashlib.blake2b(json.dumps(entry, sort_keys=True, default=str).encode(), digest_size=4)
        out.append({"id": int.from_bytes(digest.digest(), "big"), **entry})
    return out


def _flag(value: Any, default: bool = False) -> bool:
    """Supabase's "flexible booleans": true/"true" are true."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


@dataclass(slots=True, eq=False)
class Channel:
    """One joined channel instance (one per topic per socket; a rejoin makes a new one)."""

    client: Client
    topic: str
    name: str
    private: bool
    join_ref: str | None
    self_broadcast: bool
    ack: bool
    presence_enabled: bool
    presence_key: str
    claims: dict[str, Any]
    token: str | None
    expires_at: float | None
    """trio clock time when the channel's token expires (None: never)."""
    presence_calls: WindowLimit
    tracked: bool = False
    phx_ref: str | None = None
    """The `phx_ref` of this channel's presence entry while tracked."""
    member_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def key(self) -> str:
        return broker_key(self.topic, self.private)


class Client:
    """One connection's channels and counters. Owned by the connection's task (service.py)."""

    __slots__ = (
        "_events",
        "_key_limit",
        "apikey",
        "apikey_claims",
        "channels",
        "ctx",
        "id",
        "joins",
        "messages_in",
        "transport",
        "vsn",
    )

    def __init__(
        self, ctx: NodeContext, transport: Transport, vsn: Vsn, apikey: str, apikey_claims: dict[str, Any]
    ) -> None:
        self.id = uuid.uuid4().hex
        self.ctx = ctx
        self.transport = transport
        self.vsn = vsn
        self.apikey = apikey
        self.apikey_claims = apikey_claims
        self.channels: dict[str, Channel] = {}
        self._events = RateLimit(ctx.settings.max_events_per_second)
        per_key = ctx.settings.max_events_per_second_per_key
        self._key_limit = (
            ("rt:key:" + hashlib.blake2b(apikey.encode(), digest_size=12).hexdigest(), per_key)
            if per_key is not None and ctx.shared_limiter is not None
            else None
        )
        self.messages_in = 0
        self.joins = 0
        """Channel joins this connection had accepted."""

    # output ----------------------------------------------------------------------------------------

    def push(self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any) -> None:
        self.transport.send(OutFrame(encode(Message(join_ref, ref, topic, event, payload), self.vsn)))

    def reply(self, msg: Message, status: str = "ok", response: Any = None, *, join_ref: Any = ...) -> None:
        jr = msg.join_ref if join_ref is ... else join_ref
        body = {"status": status, "response": {} if response is None else response}
        self.push(jr, msg.ref, msg.topic, "phx_reply", body)

    # input -----------------------------------------------------------------------------------------

    async def handle_frame(self, data: str | bytes) -> None:
        """Handle one frame. Raises `ProtocolError` when the socket must be closed."""
        msg = decode_text(data, self.vsn) if isinstance(data, str) else decode_binary(data, self.vsn)
        self.messages_in += 1
        if msg.topic == "phoenix":
            if msg.event == "heartbeat":
                self.reply(msg, join_ref=None)
            elif msg.ref is not None:
                self.reply(msg, "error", {"reason": "unknown phoenix event"})
            return
        now = trio.current_time()
        if not self._events.allow(now) or (
            self._key_limit is not None
            and self.ctx.shared_limiter is not None
            and not await self.ctx.shared_limiter.allow(*self._key_limit)
        ):
            channel = self.channels.get(msg.topic)
            if msg.event == "phx_join":
                self.reply(msg, "error", {"reason": "Too many messages per second"})
            elif channel is not None:
                await self.end_channel(channel, "Too many messages per second")
            return
        if msg.event == "phx_join":
            await self.join(msg)
            return
        channel = self.channels.get(msg.topic)
        if channel is None:
            self.reply(msg, "error", {"reason": "unmatched topic"}, join_ref=None)
            return
        if msg.join_ref is not None and msg.join_ref != channel.join_ref:
            return  # stale: from before a rejoin
        try:
            await self._dispatch(channel, msg)
        except ProtocolError:
            raise
        except RecursionError:  # a payload that parsed but nests too deeply to re-encode: the sender's fault
            raise ProtocolError("JSON nested too deeply") from None
        except Exception:
            log.exception("channel %s crashed", msg.topic)
            await self._drop_channel(channel)
            self.push(channel.join_ref, channel.join_ref, channel.topic, "phx_error", {"reason": "channel_crash"})

    async def _dispatch(self, channel: Channel, msg: Message) -> None:
        if msg.event == "phx_leave":
            await self._drop_channel(channel)
            self.reply(msg)
            self.push(channel.join_ref, channel.join_ref, channel.topic, "phx_close", {})
        elif msg.event == "broadcast":
            await self.broadcast(channel, msg)
        elif msg.event == "presence":
            await self.presence(channel, msg)
        elif msg.event == "access_token":
            await self.refresh_token(channel, msg)
        elif msg.ref is not None:
            self.reply(msg, "error", {"reason": f"unknown event {msg.event!r}"})

    # join / leave ----------------------------------------------------------------------------------

    async def join(self, msg: Message) -> None:
        ctx = self.ctx
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        config = payload.get("config")
        if not isinstance(config, dict):
            config = {}
        name = msg.topic[len(TOPIC_PREFIX) :] if msg.topic.startswith(TOPIC_PREFIX) else msg.topic
        if not name:
            self.reply(msg, "error", {"reason": "You must provide a topic name"})
            return
        pg_changes = postgres_bindings(config.get("postgres_changes"))
        broadcast: dict[str, Any] = config["broadcast"] if isinstance(config.get("broadcast"), dict) else {}
        presence: dict[str, Any] = config["presence"] if isinstance(config.get("presence"), dict) else {}
        private = _flag(config.get("private"))
        token = payload.get("access_token")
        claims = self.apikey_claims
        if isinstance(token, str) and token and not token.startswith("sb_") and token != self.apikey:
            try:
                claims = ctx.auth.verify_access_token(token)
            except AuthError as exc:
                self.reply(msg, "error", {"reason": exc.reason})
                return
        else:
            token = None
        if not ctx.auth.may_access(name, private, claims):
            reason = f"Unauthorized: You do not have permissions to read from this Channel topic: {name}"
            self.reply(msg, "error", {"reason": reason})
            return
        old = self.channels.get(msg.topic)
        if old is not None:  # duplicate join: close the old instance first (Phoenix)
            await self._drop_channel(old)
            self.push(old.join_ref, old.join_ref, old.topic, "phx_close", {})
        if len(self.channels) >= ctx.settings.max_channels_per_socket:
            self.reply(msg, "error", {"reason": "ChannelRateLimitReached: Too many channels"})
            return
        key = presence.get("key")
        exp = claims.get("exp")
        expires_at = None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            expires_at = trio.current_time() + (exp - _unix_now())
        channel = Channel(
            client=self,
            topic=msg.topic,
            name=name,
            private=private,
            join_ref=msg.join_ref if msg.join_ref is not None else msg.ref,
            self_broadcast=_flag(broadcast.get("self")),
            ack=_flag(broadcast.get("ack")),
            presence_enabled=_flag(presence.get("enabled")) or bool(key),
            presence_key=str(key) if key else str(uuid.uuid4()),
            claims=claims,
            token=token,
            expires_at=expires_at,
            presence_calls=WindowLimit(ctx.settings.presence_max_calls, ctx.settings.presence_window),
        )
        self.channels[msg.topic] = channel
        self.joins += 1
        await ctx.hub.add_channel(channel)
        self.reply(msg, "ok", {"postgres_changes": pg_changes}, join_ref=channel.join_ref)
        if pg_changes:
            # As Supabase does when it cannot subscribe to the database: the channel stays joined (broadcast
            # and presence work) and the app hears why no change will come, on `system`.
            body = {
                "extension": "postgres_changes",
                "status": "error",
                "message": POSTGRES_CHANGES_UNAVAILABLE,
                "channel": name,
            }
            self.push(channel.join_ref, None, channel.topic, "system", body)
        if channel.presence_enabled:
            await self._push_presence_state(channel)

    async def _push_presence_state(self, channel: Channel) -> None:
        state = await self.ctx.presence.list(channel.key)
        frame = OutFrame(
            encode(Message(channel.join_ref, None, channel.topic, "presence_state", state_payload(state)), self.vsn)
        )
        # Others' state (bounded per channel) never makes a joiner a slow consumer: wait for room first.
        await self.transport.wait_for_room(len(frame.wire))
        self.transport.send(frame)

    async def _drop_channel(self, channel: Channel) -> None:
        """Forget `channel`: untrack its presence (others get the leave diff) and leave the hub index."""
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        if channel.tracked:
            channel.tracked = False
            await self.ctx.presence.untrack(channel.key, channel.member_id)
        await self.ctx.hub.remove_channel(channel)

    async def end_channel(self, channel: Channel, message: str) -> None:
        """Server-initiated end: `system` error, then `phx_close` (the client does not rejoin)."""
        await self._drop_channel(channel)
        body = {"extension": "system", "status": "error", "message": message, "channel": channel.name}
        self.push(channel.join_ref, None, channel.topic, "system", body)
        self.push(channel.join_ref, channel.join_ref, channel.topic, "phx_close", {})

    async def teardown(self) -> None:
        for channel in list(self.channels.values()):
            await self._drop_channel(channel)

    # tokens ----------------------------------------------------------------------------------------

    def next_expiry(self) -> float:
        times = [c.expires_at for c in self.channels.values() if c.expires_at is not None]
        return min(times) if times else float("inf")

    async def end_session(self, session_id: str, message: str) -> None:
        """The session was revoked: end every channel joined with one of its tokens (`system` error, `phx_close`)."""
        for channel in list(self.channels.values()):
            if channel.claims.get("session_id") == session_id:
                await self.end_channel(channel, message)

    async def expire_tokens(self) -> None:
        now = trio.current_time()
        for channel in list(self.channels.values()):
            if channel.expires_at is not None and channel.expires_at <= now:
                await self.end_channel(channel, "Token has expired")

    async def refresh_token(self, channel: Channel, msg: Message) -> None:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        token = payload.get("access_token")
        if not isinstance(token, str) or not token or token.startswith("sb_") or token == channel.token:
            return
        try:
            claims = self.ctx.auth.verify_access_token(token)
        except AuthError as exc:
            await self.end_channel(channel, exc.reason)
            return
        if not self.ctx.auth.may_access(channel.name, channel.private, claims):
            reason = f"You no longer have permission to read from this Channel topic: {channel.topic}"
            await self.end_channel(channel, reason)
            return
        channel.token = token
        channel.claims = claims
        channel.expires_at = trio.current_time() + (float(claims["exp"]) - _unix_now())

    # broadcast -------------------------------------------------------------------------------------

    async def broadcast(self, channel: Channel, msg: Message) -> None:
        payload = msg.payload
        binary = isinstance(payload, BroadcastPayload)
        if isinstance(payload, BroadcastPayload):
            bp = payload
        elif isinstance(payload, dict) and isinstance(payload.get("event"), str):
            data = json.dumps(payload.get("payload", {}), separators=(",", ":"), ensure_ascii=False)
            bp = BroadcastPayload(payload["event"], data.encode(), True, None)
        else:
            if msg.ref is not None:
                self.reply(msg, "error", {"reason": "broadcast payload must be {type, event, payload}"})
            return
        if len(bp.data) > self.ctx.settings.max_payload_bytes:
            if msg.ref is not None:
                self.reply(msg, "error", "payload_size_exceeded")
            return
        env = Envelope(
            topic=channel.topic,
            private=channel.private,
            event=bp.event,
            data=bp.data,
            is_json=bp.is_json,
            binary=binary,
            origin_node=self.ctx.node_id,
            sender=self.id,
            meta=bp.meta,
        )
        await self.ctx.broker.publish(channel.key, env)
        if channel.ack and msg.ref is not None:
            self.reply(msg)

    # presence --------------------------------------------------------------------------------------

    async def presence(self, channel: Channel, msg: Message) -> None:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        event = payload.get("event")
        if not channel.presence_calls.allow(trio.current_time()):
            await self.end_channel(channel, "Client presence rate limit exceeded")
            return
        if event == "track":
            meta = payload.get("payload")
            if not isinstance(meta, dict):
                self.reply(msg, "error", {"reason": "Presence track payload must be a map"})
                return
            refusal = await self._presence_refusal(channel, meta)
            if refusal is not None:
                self.reply(msg, "error", {"reason": refusal})
                return
            if not channel.presence_enabled:
                channel.presence_enabled = True
                await self._push_presence_state(channel)
            # Reply before the diff goes out, as Phoenix does (its diff travels through pubsub).
            self.reply(msg)
            channel.tracked = True
            stored = await self.ctx.presence.track(channel.key, channel.member_id, channel.presence_key, meta)
            if stored is not None:
                channel.phx_ref = stored["phx_ref"]
        elif event == "untrack":
            self.reply(msg)
            if channel.tracked:
                channel.tracked = False
                channel.phx_ref = None
                await self.ctx.presence.untrack(channel.key, channel.member_id)
        else:
            self.reply(msg, "error", {"reason": f"unknown presence event {event!r}"})

    async def _presence_refusal(self, channel: Channel, meta: dict[str, Any]) -> str | None:
        """Why this track must be refused (its size, or the channel's presence bounds), else None.

        The channel's state is what every joiner receives at once: bounded in entries and bytes, the track that
        would grow it past a bound is refused (its sender gets the error), nobody else is affected. The check
        reads the state (tracks are rate-limited per channel, so this costs little); two nodes tracking at the
        same instant may each pass it, overshooting by at most one meta each."""
        settings = self.ctx.settings
        size = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())
        if size > settings.presence_max_meta_bytes:
            return "Track message size exceeded"
        entries, total = 0, 0
        for metas in (await self.ctx.presence.list(channel.key)).values():
            for each in metas:
                if channel.phx_ref is not None and each.get("phx_ref") == channel.phx_ref:
                    continue  # this channel's own entry: the track replaces it
                entries += 1
                total += len(json.dumps(each, separators=(",", ":"), ensure_ascii=False).encode())
        if entries + 1 > settings.presence_max_entries:
            return "Too many presence entries on this channel"
        if total + size > min(settings.presence_max_state_bytes, settings.max_queued_bytes // 2):
            return "Presence state of this channel is too large"
        return None


def _unix_now() -> float:
    return time.time()
