"""The control plane's HTTP API (`/control/v1/...`): `ControlApp`, an `HttpApp` on lib/http.

Every call needs `Authorization: Bearer <control token>` (compared in constant time); a missing or wrong one is
a bare 401 with no detail. The optional node token (proxies, VictoriaMetrics) opens only what nodes read:
`GET /upstreams`, `GET /scrape-targets` and `GET /release` (and wheels: control/upgrade_routes.py). Mutating calls
are recorded in the audit ring with their result.
Errors are JSON `{"code", "message"}`; the cluster's Redis unreachable is 503 REDIS_UNAVAILABLE with the reason.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

from mbworker.control.audit import AuditLog, entry_json
from mbworker.control.errors import ControlError, StateUnavailable
from mbworker.control.functions import ClusterFunctions
from mbworker.control.registry import NodeRegistry
from mbworker.lib.http.types import BodyTooLarge, HttpRequest, Responder, WebSocketHandler
from mbworker.lib.redis import RedisError
from mbworker.lib.revocation import RevocationList

log = logging.getLogger("mbworker.control")

SLUG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SMALL_BODY = 64 * 1024
MAX_EPOCH_S = 253402300800  # 10000-01-01: a revocation's end must be a date the CLI and Redis can print and store
JSON_HEADERS = [(b"content-type", b"application/json")]
NODE_TOKEN_NAME = "node"
NODE_ROUTES = frozenset(
    {("GET", "/control/v1/upstreams"), ("GET", "/control/v1/scrape-targets"), ("GET", "/control/v1/release")}
)
NODE_READABLE = re.compile(r"^/control/v1/wheels/[^/]+(/[^/]+)?$")
"""Also open to the node token (GET): the wheels a worker's upgrade helper installs (control/upgrade_routes.py)."""

#: How long a drain waits for each proxy's next pull (they pull every second; one that does not is down).
PROXY_CATCH_UP_S = 10.0

Route = Callable[[HttpRequest, list[str]], Awaitable[tuple[int, Any]]]
ExtraRoute = tuple[str, re.Pattern[str], Route, bool]
"""(method, path pattern, handler, mutating): routes other modules register (a handler answering bytes sends them
as they are)."""


class ControlApp:
    """Owns nothing: registry, functions, revocations and audit belong to `serve_control`."""

    def __init__(
        self,
        token: str,
        *,
        token_name: str,
        node_token: str | None = None,
        registry: NodeRegistry,
        functions: ClusterFunctions,
        revocations: RevocationList,
        audit: AuditLog,
        session_lifetime_s: float,
        max_bundle_bytes: int,
        extra_routes: Sequence[ExtraRoute] = (),
    ) -> None:
        self._tokens: list[tuple[bytes, str]] = [(token.encode(), token_name)]
        if node_token:
            self._tokens.append((node_token.encode(), NODE_TOKEN_NAME))
        self.registry = registry
        self.functions = functions
        self.revocations = revocations
        self.audit = audit
        self.session_lifetime_s = session_lifetime_s
        self.max_bundle_bytes = max_bundle_bytes
        v1 = "/control/v1"
        # (method, path, handler, mutating); the node token opens only the routes in NODE_ROUTES
        self._routes: list[tuple[str, re.Pattern[str], Route, bool]] = [
            ("GET", re.compile(rf"^{v1}/nodes$"), self._nodes, False),
            ("POST", re.compile(rf"^{v1}/nodes/([^/]+)/drain$"), self._drain, True),
            ("DELETE", re.compile(rf"^{v1}/nodes/([^/]+)/drain$"), self._undrain, True),
            ("GET", re.compile(rf"^{v1}/upstreams$"), self._upstreams, False),
            ("GET", re.compile(rf"^{v1}/scrape-targets$"), self._scrape_targets, False),
            ("GET", re.compile(rf"^{v1}/audit$"), self._audit, False),
            ("POST", re.compile(rf"^{v1}/sessions/revoke$"), self._revoke, True),
            ("GET", re.compile(rf"^{v1}/sessions/revoked$"), self._revoked, False),
            ("GET", re.compile(rf"^{v1}/functions$"), self._list, False),
            ("GET", re.compile(rf"^{v1}/functions/([^/]+)/logs$"), self._logs, False),
            ("GET", re.compile(rf"^{v1}/functions/([^/]+)$"), self._versions, False),
            ("POST", re.compile(rf"^{v1}/functions/([^/]+)/deploy$"), self._deploy, True),
            ("POST", re.compile(rf"^{v1}/functions/([^/]+)/rollback$"), self._rollback, True),
            ("DELETE", re.compile(rf"^{v1}/functions/([^/]+)$"), self._delete, True),
            *extra_routes,
        ]

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None

    def _caller(self, request: HttpRequest) -> str | None:
        """The name of the token the request carries, or None."""
        scheme, _, token = (request.header(b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        found = None
        for expected, name in self._tokens:  # every one compared: the time says nothing about which matched
            if hmac.compare_digest(token, expected):
                found = name
        return found

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        caller = self._caller(request)
        if caller is None or (caller == NODE_TOKEN_NAME and not _node_may(request)):
            await responder.send(401, [(b"www-authenticate", b"Bearer")])
            return
        matched = False
        for method, pattern, route, mutating in self._routes:
            m = pattern.match(request.path)
            if m is None:
                continue
            matched = True
            if method != request.method:
                continue
            status, value = await self._run(route, request, list(m.groups()))
            if mutating:
                self.audit.record(caller, f"{request.method} {request.path}", status, _summary(value))
            if isinstance(value, bytes):
                await responder.send(status, [(b"content-type", b"application/octet-stream")], value)
            else:
                await responder.send(status, JSON_HEADERS, json.dumps(value).encode())
            return
        if matched:
            await _error(responder, 405, "METHOD_NOT_ALLOWED", f"{request.method} not allowed here")
        else:
            await _error(responder, 404, "NOT_FOUND", f"No control route {request.path}")

    async def _run(self, route: Route, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        try:
            return await route(request, args)
        except ControlError as exc:
            body: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.output:
                body["output"] = exc.output[-8000:]
            return exc.status, body
        except RedisError as exc:
            return 503, {"code": StateUnavailable.code, "message": f"the cluster's Redis is unreachable: {exc}"}
        except BodyTooLarge:
            return 413, {"code": "PAYLOAD_TOO_LARGE", "message": "Request body too large"}

    async def _json_body(self, request: HttpRequest) -> dict[str, Any]:
        return await read_json(request)

    # nodes -------------------------------------------------------------------------------------------------

    async def _nodes(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, [view.to_json() for view in await self.registry.nodes()]

    async def _drain(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        # Out of the upstreams first (a hold: the node is not told) and every proxy has applied that, then the
        # drain ask, which the node acts on at its next beat: no proxy sends it a request once it stops accepting.
        name = (await self.registry.drainable(args[0])).record.name
        await self.registry.hold(name)
        await self.registry.wait_proxies_caught_up(PROXY_CATCH_UP_S)
        view = await self.registry.ask_drain(name)
        return 202, {"name": view.record.name, "draining": True, "left_upstreams": True}

    async def _undrain(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        view = await self.registry.cancel_drain(args[0])
        return 200, {"name": view.record.name, "draining": view.record.draining, "drain_asked": False}

    async def _upstreams(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        # A proxy names itself (x-mbworker-node, x-mbworker-version): its pull is its heartbeat.
        name = (request.header(b"x-mbworker-node") or b"").decode("ascii", "replace")
        if name:
            if not NODE_NAME.match(name):
                raise ControlError(f"x-mbworker-node must match {NODE_NAME.pattern}")
            version = (request.header(b"x-mbworker-version") or b"").decode("ascii", "replace")[:40] or "unknown"
            ip = request.client[0] if request.client else "unknown"
            await self.registry.record_pull("proxy", name, ip, version)
        return 200, await self.registry.upstreams()

    async def _scrape_targets(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self.registry.scrape_targets()

    async def _audit(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        limit = _int_param(request, "limit")
        return 200, [entry_json(e) for e in self.audit.entries(limit)]

    # sessions ----------------------------------------------------------------------------------------------

    async def _revoke(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        body = await self._json_body(request)
        session_id = body.get("session_id")
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise ControlError("session_id must be a string of letters, digits and _.:- (at most 128)")
        now = time.time()
        until = body.get("until", now + self.session_lifetime_s)
        if not isinstance(until, int | float) or isinstance(until, bool) or not now < until < MAX_EPOCH_S:
            raise ControlError("until must be a time in the future (epoch seconds)")
        await self.revocations.revoke(session_id, float(until))
        return 200, {"session_id": session_id, "revoked_until": until}

    async def _revoked(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        listed = await self.revocations.listed()
        return 200, [{"session_id": s, "until": u} for s, u in sorted(listed.items())]

    # functions ---------------------------------------------------------------------------------------------

    async def _list(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self.functions.list_functions()

    async def _versions(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self.functions.versions(_slug(args[0]))

    async def _deploy(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        slug = _slug(args[0])
        sha = (request.header(b"x-mbworker-sha256") or b"").decode("ascii", "replace") or None
        archive = await request.body.read_all(self.max_bundle_bytes)
        return 201, await self.functions.deploy(slug, archive, sha)

    async def _rollback(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        to = (await self._json_body(request)).get("version")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool)):
            raise ControlError("version must be an integer")
        return 200, await self.functions.rollback(_slug(args[0]), to)

    async def _delete(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self.functions.delete(_slug(args[0]))

    async def _logs(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        since = parse_qs(request.query).get("since", [None])[-1]
        return 200, await self.functions.logs(_slug(args[0]), since, _int_param(request, "limit"))


async def read_json(request: HttpRequest) -> dict[str, Any]:
    """A small JSON object body ({} when empty); `ControlError` (400) otherwise."""
    raw = await request.body.read_all(SMALL_BODY)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:
        raise ControlError(f"Invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError("Invalid JSON body: expected an object")
    return value


def _no_constant(name: str) -> Any:
    """NaN and ±Infinity are not JSON (Python's parser takes them): refused, as any other parser would."""
    raise ValueError(f"{name} is not a JSON value")


def _node_may(request: HttpRequest) -> bool:
    return (request.method, request.path) in NODE_ROUTES or (
        request.method == "GET" and NODE_READABLE.match(request.path) is not None
    )


def _slug(slug: str) -> str:
    if not SLUG.match(slug):
        raise ControlError(f"Slug {slug!r} must match {SLUG.pattern}", code="INVALID_SLUG")
    return slug


def _int_param(request: HttpRequest, name: str) -> int | None:
    raw = parse_qs(request.query).get(name, [""])[-1]
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ControlError(f"{name} must be an integer") from None
    if value < 0:
        raise ControlError(f"{name} must be >= 0")
    return value


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        if "message" in value:
            return str(value["message"])
        return ", ".join(f"{k}={value[k]}" for k in ("slug", "version", "serving", "name", "session_id") if k in value)
    return ""


async def _error(responder: Responder, status: int, code: str, message: str) -> None:
    await responder.send(status, JSON_HEADERS, json.dumps({"code": code, "message": message}).encode())
