"""RealtimeService: the node. Owns the hub, broker, presence (unless passed in) and the auth policy.

`open_realtime(...)` yields a `RealtimeService` whose `websocket_handler` / `handle_http` plug into the HTTP
front door (lib/http/types.py). Each WebSocket connection runs in the front door's task for it and has no
other task while idle (see `_read_loop`); the service's own nursery runs the presence refresher and, only while
a socket pushes back, that connection's writer task (lib/websocket.py). Leaving the context closes every
connection (1001).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import trio
from websockets.http11 import Request, Response

from mbworker.lib.http.types import BodyTooLarge, HttpRequest, Responder, WebSocketHandler
from mbworker.lib.jwt import JwtVerifier, SessionRevoked
from mbworker.lib.websocket import Transport, TransportClosed, accept_stream, json_response
from mbworker.realtime.auth import Authenticator
from mbworker.realtime.broker import Broker, Envelope, broker_key
from mbworker.realtime.broker_memory import MemoryBroker
from mbworker.realtime.client import TOPIC_PREFIX, Client, NodeContext
from mbworker.realtime.errors import AuthError, PresenceError
from mbworker.realtime.hub import Hub
from mbworker.realtime.limits import SharedLimiter
from mbworker.realtime.presence import Presence
from mbworker.realtime.presence_memory import MemoryPresence
from mbworker.realtime.protocol import ProtocolError, Vsn, parse_vsn
from mbworker.realtime.settings import RealtimeSettings

__all__ = ["RealtimeService", "RealtimeStatistics", "open_realtime"]

log = logging.getLogger("mbworker.realtime")

_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-headers", b"apikey, authorization, content-type, x-client-info"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
]


@dataclass(frozen=True, slots=True)
class RealtimeStatistics:
    connections: int
    """Open WebSocket connections on this node."""
    channels: int
    """Joined channel instances on this node."""
    topics: int
    """Topics with at least one local channel (each is subscribed on the broker)."""
    messages_in: int
    """Client frames handled since start (closed connections included)."""
    publications: int
    """Broadcasts received from the broker."""
    deliveries: int
    """Broadcast frames handed to local connections."""
    slow_consumer_disconnects: int
    """Connections closed because their outbound queue overflowed."""
    rejected_handshakes: int
    """WebSocket upgrades refused (bad path, vsn or apikey)."""
    joins: int
    """Channel joins accepted since start (closed connections included)."""
    presence_entries: int
    """Presence entries this node's channels track now (one per channel that tracked)."""


class _Conn:
    """A live connection as the service tracks it. `scope` is the scope of the connection task's current
    wait (a read, bounded by the idle/token deadline) and the frames handling after it: `stop` cancels it."""

    __slots__ = ("client", "close_code", "close_reason", "scope", "stopping")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.scope: trio.CancelScope | None = None
        self.stopping = False
        self.close_code = 1000
        self.close_reason = ""

    def stop(self, code: int, reason: str) -> None:
        """End the connection with `code`: safe from anywhere (a fan-out loop, drain); its task tears down."""
        if not self.stopping:
            self.stopping = True
            self.close_code, self.close_reason = code, reason
        if self.scope is not None:
            self.scope.cancel()

    def on_overflow(self) -> None:
        # Called from inside a fan-out loop: only mark and cancel; teardown runs in this connection's task.
        self.stop(1008, "slow consumer")


class RealtimeService:
    def __init__(self, settings: RealtimeSettings, *, verifier: JwtVerifier, node_id: str, broker: Broker,
                 presence: Presence, shared_limiter: SharedLimiter | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.node_id = node_id
        self._auth = Authenticator(
            verifier, settings.private_channel_rules, service_role_bypass=settings.service_role_bypass
        )
        self._broker = broker
        self._presence = presence
        self._hub = Hub(node_id, broker, presence)
        broker.bind(self._hub)
        presence.bind(self._hub)
        self._ctx = NodeContext(node_id, settings, self._auth, self._hub, broker, presence, shared_limiter)
        self._conns: dict[str, _Conn] = {}
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._messages_in_closed = 0
        self._joins_closed = 0
        self._slow = 0
        self._rejected = 0
        self._closing = False
        self._nursery: trio.Nursery | None = None
        """The node's nursery (set by `open_realtime`): presence upkeep and connections' writer tasks."""
        self._apikeys: dict[str, tuple[str, dict[str, Any]]] = {}
        """apikey → (the key, its claims), shared by the connections presenting it (see `_shared_apikey`)."""

    async def end_session(self, session_id: str) -> None:
        """A session was revoked (the cluster's deny-list calls this on every node): its channels here end now.
        New joins with its tokens are refused by the verifier."""
        message = str(SessionRevoked("Session has been revoked"))
        for client in list(self._hub.clients.values()):
            await client.end_session(session_id, message)

    # statistics ------------------------------------------------------------------------------------

    def statistics(self) -> RealtimeStatistics:
        conns = list(self._conns.values())
        return RealtimeStatistics(
            connections=len(conns),
            channels=sum(len(c.client.channels) for c in conns),
            topics=self._hub.topic_count,
            messages_in=self._messages_in_closed + sum(c.client.messages_in for c in conns),
            publications=self._hub.publications,
            deliveries=self._hub.deliveries,
            slow_consumer_disconnects=self._slow,
            rejected_handshakes=self._rejected,
            joins=self._joins_closed + sum(c.client.joins for c in conns),
            presence_entries=sum(ch.tracked for c in conns for ch in c.client.channels.values()),
        )

    # WebSocket -------------------------------------------------------------------------------------

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        """A handler for `…/websocket` upgrades (any prefix, `//` collapsed), else None."""
        if not request.path.endswith("/websocket"):
            return None
        return self._serve_websocket

    async def _serve_websocket(self, stream: trio.abc.Stream, buffered: bytes, request: HttpRequest) -> None:
        """The front door's WebSocket handler: handshake, then this task is the connection's only task."""
        accepted = await self._accept(stream, buffered, request)
        del buffered, request  # an idle connection keeps neither the upgrade request nor its bytes
        if accepted is None:
            return
        transport, vsn, apikey, claims = accepted
        try:
            await self._run_connection(transport, vsn, apikey, claims)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _accept(
        self, stream: trio.abc.Stream, buffered: bytes, request: HttpRequest
    ) -> tuple[Transport, Vsn, str, dict[str, Any]] | None:
        """The opening handshake with our checks (vsn, apikey); None when refused or failed."""
        params = {k: v[-1] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
        verdict: dict[str, Any] = {}

        def check(_req: Request) -> Response | None:
            if self._closing:
                return json_response(503, b'{"error":"realtime is shutting down"}')
            try:
                verdict["vsn"] = parse_vsn(params.get("vsn"))
            except ProtocolError as exc:
                self._rejected += 1
                return json_response(400, json.dumps({"error": str(exc)}).encode())
            key = params.get("apikey") or (request.header(b"x-api-key") or b"").decode("latin-1")
            try:
                verdict["claims"] = self._auth.verify_apikey(key)
            except AuthError as exc:
                self._rejected += 1
                return json_response(401, json.dumps({"error": exc.reason}).encode())
            verdict["apikey"], verdict["claims"] = self._shared_apikey(key, verdict["claims"])
            return None

        settings = self.settings
        assert self._nursery is not None, "RealtimeService runs inside open_realtime"
        transport = await accept_stream(
            stream,
            buffered,
            check,
            nursery=self._nursery,
            max_size=settings.max_frame_bytes,
            max_queued_bytes=settings.max_queued_bytes,
            handshake_timeout=settings.handshake_timeout,
            write_timeout=settings.write_timeout,
        )
        if transport is None:
            return None
        return transport, verdict["vsn"], verdict["apikey"], verdict["claims"]

    def _shared_apikey(self, key: str, claims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """One copy of an apikey and its claims for every connection presenting it (typically all browsers of a
        project share the anon key): ~0.6 KB less per idle connection. Claims are read-only once verified."""
        hit = self._apikeys.get(key)
        if hit is not None and hit[1] == claims:
            return hit
        if len(self._apikeys) >= 256:  # bounded: many distinct keys only lose the sharing
            self._apikeys.clear()
        self._apikeys[key] = (key, claims)
        return key, claims

    async def _run_connection(self, transport: Transport, vsn: Vsn, apikey: str, claims: dict[str, Any]) -> None:
        client = Client(self._ctx, transport, vsn, apikey, claims)
        conn = _Conn(client)
        transport.on_overflow = conn.on_overflow
        self._conns[client.id] = conn
        self._all_closed = trio.Event()
        self._hub.add_client(client)
        try:
            await self._read_loop(conn, transport)
        finally:
            conn.scope = None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await client.teardown()
                self._hub.remove_client(client)
                self._messages_in_closed += client.messages_in
                self._joins_closed += client.joins
                if transport.overflowed:
                    self._slow += 1
                del self._conns[client.id]
                if not self._conns:
                    self._all_closed.set()
                # Closing handshake, bounded; skipped for a slow consumer or a close already under way.
                await transport.aclose(conn.close_code, conn.close_reason, timeout=1.0)

    async def _read_loop(self, conn: _Conn, transport: Transport) -> None:
        """Read and handle frames until the socket ends, the client idles out or `conn.stop` is called.

        One scope per wait carries both the deadline (idle timeout, next token expiry) and `stop`: an idle
        connection holds no timer task and no other scope of ours."""
        client = conn.client
        idle = self.settings.idle_timeout
        last_rx = trio.current_time()
        while True:
            with trio.CancelScope(deadline=min(last_rx + idle, client.next_expiry())) as scope:
                conn.scope = scope
                if conn.stopping:
                    return
                try:
                    messages = await transport.receive()
                except TransportClosed:
                    return
                scope.deadline = math.inf  # the deadline bounds the wait, not the handling
                if messages:  # control frames (ping) alone do not count as activity, as before
                    last_rx = trio.current_time()
                for data in messages:
                    try:
                        await client.handle_frame(data)
                    except ProtocolError as exc:
                        conn.close_code, conn.close_reason = exc.close_code, str(exc)[:120]
                        return
                    except RecursionError:  # JSON that parsed but nests too deeply to handle (e.g. a join's)
                        conn.close_code, conn.close_reason = 1007, "JSON nested too deeply"
                        return
            if conn.stopping:
                return
            if scope.cancelled_caught:
                if trio.current_time() >= last_rx + idle:
                    conn.close_code, conn.close_reason = 1000, "idle timeout"
                    return
                await client.expire_tokens()

    async def close_all(self, code: int = 1012, *, timeout: float = 10.0) -> None:
        """Close every connection with `code` (1012 = drain) and wait (bounded) until they are gone."""
        for conn in list(self._conns.values()):
            conn.stop(code, "server restart" if code == 1012 else "going away")
        with trio.move_on_after(timeout):
            await self._all_closed.wait()

    # REST ------------------------------------------------------------------------------------------

    def _rest_route(self, path: str) -> tuple[str, str] | tuple[None, None] | None:
        """(sub_topic, event) for the single form, (None, None) for batch, None if not ours."""
        path = "/" + "/".join(p for p in path.split("/") if p)
        prefix = "/" + "/".join(p for p in self.settings.path_prefix.split("/") if p)
        for base in (prefix + "/api/broadcast", "/api/broadcast"):
            if path == base:
                return None, None
            if path.startswith(base + "/"):
                parts = path[len(base) + 1 :].split("/")
                if len(parts) == 3 and parts[1] == "events":
                    return unquote(parts[0]), unquote(parts[2])
                return None
        return None

    async def handle_http(self, request: HttpRequest, responder: Responder) -> bool:
        """Serve REST broadcast; returns False (nothing sent) when the path is not realtime's."""
        route = self._rest_route(request.path)
        if route is None:
            return False
        if request.method == "OPTIONS":
            await responder.send(204, _CORS)
            return True
        if request.method != "POST":
            await _json(responder, 405, {"error": "method not allowed"})
            return True
        params = {k: v[-1] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
        key = (request.header(b"apikey") or b"").decode("latin-1") or params.get("apikey", "")
        try:
            claims = self._auth.verify_apikey(key)
            bearer = (request.header(b"authorization") or b"").decode("latin-1")
            if bearer.lower().startswith("bearer "):
                token = bearer[7:].strip()
                if token and token != key and not token.startswith("sb_"):
                    claims = self._auth.verify_access_token(token)
        except AuthError as exc:
            await _json(responder, 401, {"error": exc.reason})
            return True
        try:
            body = await request.body.read_all(self.settings.max_rest_body_bytes)
        except BodyTooLarge:
            await _json(responder, 413, {"error": "payload_size_exceeded"})
            return True
        ctype = (request.header(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        sub_topic, event = route
        binary = ctype == "application/octet-stream" and sub_topic is not None
        if ctype not in ("", "application/json") and not binary:  # no type: taken as JSON
            await _json(responder, 415, {"error": f"unsupported content type {ctype!r}: send application/json"})
            return True
        try:
            doc = None if binary else json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
            await _json(responder, 400, {"error": "bad request: the body is not valid JSON"})
            return True
        try:
            envelopes = self._rest_envelopes(sub_topic, event, params, doc, body, claims)
        except _Forbidden:
            await _json(responder, 403, {"error": "not allowed to broadcast to this channel"})
            return True
        except RecursionError:
            await _json(responder, 400, {"error": "bad request: JSON nested too deeply"})
            return True
        except ValueError as exc:
            await _json(responder, 422, {"error": f"unprocessable: {exc}"})
            return True
        for _, env in envelopes:
            if len(env.data) > self.settings.max_payload_bytes:
                await _json(responder, 422, {"error": "Payload size exceeded"})
                return True
        for bkey, env in envelopes:
            await self._broker.publish(bkey, env)
        await responder.send(202, [(b"content-length", b"0"), *_CORS])
        return True

    def _rest_envelopes(self, sub_topic: str | None, event: str | None, params: dict[str, str], doc: Any,
                        body: bytes, claims: dict[str, Any]) -> list[tuple[str, Envelope]]:  # fmt: skip
        """What a REST broadcast publishes. Raises `_Forbidden` (single form, channel not allowed) or
        `ValueError` (a body of the wrong shape)."""
        if sub_topic is not None and event is not None:
            private = params.get("private", "").lower() == "true"
            if not self._auth.may_access(sub_topic, private, claims):
                raise _Forbidden
            return [self._rest_envelope(sub_topic, event, body, doc is not None, private)]
        messages = doc.get("messages") if isinstance(doc, dict) else None
        if not isinstance(messages, list):
            raise ValueError('expected {"messages": [...]}')
        envelopes: list[tuple[str, Envelope]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("topic"), str):
                raise ValueError("each message needs a topic")
            if not isinstance(m.get("event"), str):
                raise ValueError("each message needs an event")
            private = m.get("private") in (True, "true")
            name = m["topic"].removeprefix(TOPIC_PREFIX)
            if not self._auth.may_access(name, private, claims):
                continue  # Supabase drops unauthorized batch items and still answers 202
            data = json.dumps(m.get("payload", {}), separators=(",", ":"), ensure_ascii=False)
            item = self._rest_envelope(name, m["event"], data.encode(), True, private)
            if m.get("id") is not None:
                item[1].meta = {"id": str(m["id"])}
            envelopes.append(item)
        return envelopes

    def _rest_envelope(self, name: str, event: str, data: bytes, is_json: bool, private: bool
                       ) -> tuple[str, Envelope]:  # fmt: skip
        topic = TOPIC_PREFIX + name
        env = Envelope(
            topic=topic,
            private=private,
            event=event,
            data=data,
            is_json=is_json,
            binary=not is_json,
            origin_node=self.node_id,
            sender=None,
            meta={"id": str(uuid.uuid4())},
        )
        return broker_key(topic, private), env

    # presence upkeep -------------------------------------------------------------------------------

    async def _serve_presence_upkeep(self) -> None:
        while True:
            await trio.sleep(self.settings.presence_refresh_interval)
            tracked: dict[str, list[str]] = {}
            for conn in list(self._conns.values()):
                for ch in conn.client.channels.values():
                    if ch.tracked:
                        tracked.setdefault(ch.key, []).append(ch.member_id)
            try:
                for key, members in tracked.items():
                    await self._presence.refresh(key, members)
                await self._presence.sweep()
            except PresenceError as exc:  # the store is away (a Redis outage): expected, and it recovers
                log.warning("presence upkeep failed (%s); retrying next period", exc)
            except Exception:
                log.exception("presence upkeep failed; retrying next period")


class _Forbidden(Exception):
    """A REST broadcast to a channel the caller may not use (answered 403)."""


async def _json(responder: Responder, status: int, doc: Any) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *_CORS]
    await responder.send(status, headers, body)


@asynccontextmanager
async def open_realtime(
    settings: RealtimeSettings,
    *,
    jwt_secret: str | None = None,
    verifier: JwtVerifier | None = None,
    node_id: str,
    broker: Broker | None = None,
    presence: Presence | None = None,
    shared_limiter: SharedLimiter | None = None,
) -> AsyncIterator[RealtimeService]:
    """Run realtime for this node. Tokens are checked by `verifier` (the node's), or by one made here for the
    HS256 `jwt_secret`. Passed-in verifier/broker/presence/limiter stay owned by the caller; defaults are memory
    (and no per-key limit shared between nodes)."""
    if verifier is None:
        if jwt_secret is None:
            raise TypeError("open_realtime needs a verifier or a jwt_secret")
        verifier = JwtVerifier(jwt_secret)
    service = RealtimeService(
        settings,
        verifier=verifier,
        node_id=node_id,
        broker=broker if broker is not None else MemoryBroker(),
        presence=presence if presence is not None else MemoryPresence(ttl=settings.presence_ttl),
        shared_limiter=shared_limiter,
    )
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        nursery.start_soon(service._serve_presence_upkeep)
        try:
            yield service
        finally:
            service._closing = True  # refuse new upgrades: the front door may outlive this context
            with trio.CancelScope(shield=True):
                await service.close_all(1001, timeout=5)
            nursery.cancel_scope.cancel()
