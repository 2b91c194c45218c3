"""`/functions/v1/{slug}[/{rest}]`: routing, the JWT gate, and the error contract around a `Runtime`.

The front door never sees a subprocess or a Store: it builds an `Invocation`, enters `Runtime.invoke`, and streams
what comes back. Every failure becomes Supabase's JSON error with its status and `sb-error-code`.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType

import trio

from mbworker.lib.http.types import (
    BadRequestBody,
    BodyTooLarge,
    ClientDisconnected,
    Headers,
    HttpRequest,
    RequestBody,
    Responder,
    WebSocketHandler,
)
from mbworker.runtimes import FunctionRuntimeError, FunctionVersion, Invocation, InvocationResult, Runtime, WorkerError
from mbworker.runtimes.api import RequestBodyStream
from mbworker.runtimes.errors import BootError, VersionRetired
from mbworker.worker.cache import (
    DEFAULT_FUNCTION_CACHE,
    Bypass,
    FlightFailed,
    FlightTimeout,
    FunctionCacheConfig,
    Hit,
    Miss,
    ResultCache,
    respond_through_cache,
)
from mbworker.worker.cluster.l2cache import L2Cache
from mbworker.worker.cluster.ratelimit import Rate, RateLimiter
from mbworker.worker.function_sockets import UPGRADE_HEADERS, StreamResponder, Upgrade
from mbworker.worker.jwt_gate import JwtGate, JwtRejected
from mbworker.worker.metrics import UNMATCHED, Metrics
from mbworker.worker.responses import send_error, send_result

log = logging.getLogger("mbworker.functions")

PREFIX = "/functions/v1/"
_PREFIX_LEN = len(PREFIX)
# Supabase's list: HEAD too gets 405 there, and a function written for it never expects one.
ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ALLOW = [(b"allow", b"GET, POST, PUT, PATCH, DELETE, OPTIONS")]
"""A 405 says what is allowed (RFC 9110 §15.5.6)."""
_BODYLESS = frozenset({"GET"})
# Hop-by-hop headers are the connection's business, not the function's (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer", b"proxy-connection"}
)
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"server"}

_ID_PREFIX = os.urandom(10).hex()
_id_seq = itertools.count(1)


def _new_request_id() -> str:
    """32 hex digits like `uuid4().hex`, unique per daemon run (a random prefix and a counter): uuid4 reads
    os.urandom per request, a syscall on the hot path for an id that only labels log lines."""
    return f"{_ID_PREFIX}{next(_id_seq):012x}"


@dataclass(frozen=True, slots=True)
class ActiveFunction:
    """The version of a slug that serves traffic now, with what the gate and the cache need."""

    fn: FunctionVersion
    verify_jwt: bool = True
    cache: FunctionCacheConfig = DEFAULT_FUNCTION_CACHE
    version_header: tuple[bytes, bytes] = field(init=False)
    """`x-mbworker-version` for every response of this version (built once, not per response)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "version_header", (b"x-mbworker-version", str(self.fn.version).encode()))


class FunctionTable:
    """slug → the active version. Owned by the daemon; admin operations and the store's watch update it."""

    def __init__(self) -> None:
        self._active: dict[str, ActiveFunction] = {}

    def get(self, slug: str) -> ActiveFunction | None:
        return self._active.get(slug)

    def set(self, active: ActiveFunction) -> ActiveFunction | None:
        """Switch `active.fn.slug` to `active`; returns the version it replaced."""
        previous = self._active.get(active.fn.slug)
        self._active[active.fn.slug] = active
        return previous

    def remove(self, slug: str) -> ActiveFunction | None:
        return self._active.pop(slug, None)

    def __len__(self) -> int:
        return len(self._active)

    def slugs(self) -> list[str]:
        return sorted(self._active)


class FunctionsFrontDoor:
    """Serves `/functions/v1/*`. Owns nothing long-lived: table, runtimes, gate and cache belong to the daemon."""

    def __init__(
        self,
        table: FunctionTable,
        runtimes: Mapping[str, Runtime],
        gate: JwtGate,
        cache: ResultCache | None = None,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
        l2: L2Cache | None = None,
        background: trio.Nursery | None = None,
        trusted_proxies: TrustedProxies | None = None,
        body_window: int = 64 * 1024,
    ) -> None:
        """`background`: the daemon's nursery for work a response need not wait for (writes to L2).
        `trusted_proxies`: peers whose X-Forwarded-* reach functions (from anyone else they are replaced).
        `body_window`: request body bytes read before the function runs (a body within it never holds a slot)."""
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self._trusting = bool(self.trusted_proxies)  # no call per request when no proxy is trusted (the default)
        self._good_host: bytes | None = None
        self._origin_host: bytes | None = b"\0"  # the Host `_origin` was made from (no Host is a Host too)
        self._origin = ""
        self.body_window = body_window
        self.limiter = limiter
        self.l2 = l2
        self.background = background
        self.table = table
        self.runtimes = runtimes
        self.gate = gate
        self.cache = cache
        self.metrics = metrics
        self._upgrades: set[Upgrade] = set()
        """WebSocket upgrades being served (`close_sockets` reaches them)."""

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler:
        """WebSocket upgrades to functions (`Deno.upgradeWebSocket`, function_sockets.py)."""
        return self._serve_upgrade

    async def _serve_upgrade(self, stream: trio.abc.Stream, buffered: bytes, request: HttpRequest) -> None:
        """An upgrade request, handed over by the HTTP server: the same front door as any request, answered on the
        raw stream (a plain answer, or the function's WebSocket until it closes). Owns and closes the stream."""
        upgrade = Upgrade(stream, buffered)
        self._upgrades.add(upgrade)
        try:
            await self.handle(request, StreamResponder(stream), upgrade)
        except ClientDisconnected:
            pass
        finally:
            self._upgrades.discard(upgrade)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def close_sockets(self, code: int, reason: str) -> None:
        """Close every function WebSocket with `code` (the node drains): each client is sent the close, the
        function is told once the client answers (or after a short timeout)."""
        for upgrade in list(self._upgrades):
            upgrade.going_away(code, reason)

    async def handle(self, request: HttpRequest, responder: Responder, upgrade: Upgrade | None = None) -> None:
        path = request.path
        slug, sep, tail = path[_PREFIX_LEN:].partition("/")
        if not slug or not path.startswith(PREFIX):
            await send_error(responder, 404, "NOT_FOUND", "Requested function was not found")
            return
        if request.method not in ALLOWED_METHODS:
            await send_error(
                responder, 405, "METHOD_NOT_ALLOWED", f"Method {request.method} is not allowed", headers=_ALLOW
            )
            return
        host = request.header(b"host")
        if host is not None and host != self._good_host:
            if not valid_host(host):  # it would become the function's URL: refuse it before any runtime
                await send_error(responder, 400, "BAD_REQUEST", "The Host header is not a host[:port]")
                return
            self._good_host = host  # most requests repeat the last host: one comparison instead of a match
        active = self.table.get(slug)
        metrics = self.metrics
        if metrics is None:
            await self.invoke(active, request, responder, slug, sep + tail, upgrade, host)
            return
        # Label by deployed slug only: an unknown slug from the path would make label sets unbounded.
        with metrics.observe_request(slug if active else UNMATCHED, responder) as observed:
            await self.invoke(active, request, observed, slug, sep + tail, upgrade, host)

    async def invoke(
        self,
        active: ActiveFunction | None,
        request: HttpRequest,
        responder: Responder,
        slug: str,
        rest: str,
        upgrade: Upgrade | None = None,
        host: bytes | None = None,
    ) -> None:
        """Gate, limit and run one request to `slug` (`rest`: the path after it; `host`: its Host header, as
        `handle` checked it). One method, not a chain of them: each coroutine hop costs on the hottest path of the
        daemon."""
        if active is None:
            await send_error(responder, 404, "NOT_FOUND", "Requested function was not found")
            return
        if active.verify_jwt and request.method != "OPTIONS":
            try:
                self.gate.check(request.header(b"authorization"))
            except JwtRejected as exc:
                await send_error(responder, 401, exc.code, exc.message)
                return
        rps = active.fn.limits.requests_per_second
        if rps is not None and self.limiter is not None:
            verdict = await self.limiter.hit(f"fn:{slug}", Rate(rps))
            if not verdict.allowed:
                if self.metrics is not None:
                    self.metrics.rate_limited("function")
                retry = str(max(1, math.ceil(verdict.retry_after_s))).encode()
                await send_error(
                    responder,
                    429,
                    "RATE_LIMIT_EXCEEDED",
                    f"More than {rps} requests per second to this function",
                    headers=[(b"retry-after", retry)],
                )
                return
        fn = active.fn
        limit = fn.limits.max_request_bytes
        declared = request.header(b"content-length")
        sized = declared is not None and declared.isdigit()
        if declared is not None and sized and int(declared) > limit:
            await send_error(responder, 413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
            return
        runtime = self.runtimes.get(fn.runtime)
        if runtime is None:
            await send_error(responder, 503, "BOOT_ERROR", f"No runtime {fn.runtime!r} on this worker")
            return
        if upgrade is not None:
            refused = await upgrade.read(fn.limits.max_message_bytes)
            if refused is not None:  # not a WebSocket upgrade websockets accepts, or the client left
                status, reason = refused
                if status == 405:  # an upgrade is a GET
                    await send_error(responder, 405, "METHOD_NOT_ALLOWED", reason, headers=[(b"allow", b"GET")])
                elif status:
                    await send_error(responder, status, "BAD_REQUEST", reason)
                return
        cache = self.cache
        decision: Hit | Miss | Bypass | None = None
        trusted = self._trusting and self.trusted_proxies.trusts(request.client)
        # most requests repeat the last host: the same string, its hash kept (the scheme is the listener's, one for all)
        if host != self._origin_host:
            self._origin_host = host
            self._origin = f"{request.scheme}://{host.decode('latin-1') if host else 'localhost'}"
        origin = keyed = self._origin  # the function's `url` starts with it, as the cache key does
        if cache is not None and active.cache.enabled and upgrade is None:  # other methods pass through as BYPASS
            if trusted:
                keyed = cache_origin(request, origin)
            decision = cache.lookup(request, slug=slug, version=fn.version, config=active.cache, origin=keyed)
            if type(decision) is Hit:  # the hot case, answered before anything else is built
                await responder.send(decision.status, decision.headers(), decision.body)
                return
        invocation: Invocation | None = None
        body: RequestBodyStream = request.body
        watch: _BodyWatch | None = None
        if request.method not in _BODYLESS:
            try:
                # Read what fits the window before the runtime gives this request a slot: a client that sends
                # its body slowly then holds only its connection (which the server times out), not a slot.
                if sized and int(declared or 0) <= self.body_window:
                    body = _Once(await request.body.read_all(limit))
                else:
                    head, complete = await _prefetch(request.body, limit, self.body_window)
                    body = _Once(b"".join(head)) if complete else (watch := _BodyWatch(head, request.body, limit))
            except BodyTooLarge:
                await send_error(responder, 413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
                return

        def run() -> AbstractAsyncContextManager[InvocationResult]:
            # Built only when the function runs: a cache hit never pays for headers, ids and URLs.
            nonlocal invocation
            target = f"/{slug}{rest}" + (f"?{request.query}" if request.query else "")
            headers, _, request_id = forwarded_headers(request, trusted)
            if upgrade is not None:
                headers += UPGRADE_HEADERS
            invocation = Invocation(
                method=request.method,
                target=target,
                headers=headers,
                body=body,
                request_id=request_id.decode("latin-1") if request_id else _new_request_id(),
                url=origin + target,
                upgrade=upgrade is not None,
            )
            return _Shaped(self, slug, active, runtime, request, invocation)

        try:
            if decision is not None:
                assert cache is not None
                await respond_through_cache(
                    cache,
                    request,
                    responder,
                    run,
                    slug=slug,
                    version=fn.version,
                    config=active.cache,
                    timeout=fn.limits.request_idle_timeout_s,
                    l2=self.l2,
                    decision=decision,
                    background=self.background,
                    origin=keyed,
                )
            elif upgrade is None:
                await _respond(responder, run)
            else:
                await upgrade.respond(responder, run)
        except BodyTooLarge:
            await send_error(responder, 413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
        except FlightTimeout:
            await send_error(responder, 504, "IDLE_TIMEOUT", "Timed out waiting for the same request in flight")
        except FlightFailed as exc:
            if not isinstance(exc.cause, FunctionRuntimeError):
                raise
            await send_error(responder, exc.cause.status, exc.cause.code, exc.cause.message)
        except FunctionRuntimeError as exc:
            if watch is not None and watch.failure is not None:
                # The runtime failed because the client's body did: answer for the body (413, 400, 408).
                if isinstance(watch.failure, BodyTooLarge):
                    await send_error(responder, 413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
                    return
                raise watch.failure from None
            request_id = invocation.request_id if invocation is not None else "-"
            log.info("%s %s → %d %s: %s", fn.key, request_id, exc.status, exc.code, exc.message)
            await send_error(responder, exc.status, exc.code, exc.message)


async def _respond(responder: Responder, run: Callable[[], AbstractAsyncContextManager[InvocationResult]]) -> None:
    """Stream one invocation to the client; a body the runtime already holds goes out with Content-Length."""
    async with run() as result:
        await send_result(responder, result)
    await responder.end()


class _Refused(FunctionRuntimeError):
    """The front door's own answer from inside an invocation (the function went away, the gate refuses): a
    status and code like a runtime error's, so every path that answers those (the cache's flights too) does."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_RETIRED_RETRIES = 3
"""Versions retired under one waiting request before it gives up (503): each is a deploy or delete meanwhile."""


class _Shaped:
    """The run of one request, on the version live when the runtime takes it, with its result as the client gets
    it: framing headers dropped (the server frames the body), the version header added, and the body capped at
    the function's response limit.

    The live version is looked up again right before the runtime picks an instance (no checkpoint between): the
    request was admitted for `active`, but its body (the prefetch window), a flight or a queue may have lasted
    until a deploy switched away from it or a delete removed it. Then it runs on the version live now, or gets
    404 — a retired version is never booted anew (its pool would outlive it: nothing retires it again). The
    function table stays the one owner of which version is live: a runtime cannot tell a stale request from a
    rollback or a restart of the same version, and only raises `VersionRetired` for a request that was already
    waiting in a pool when it was retired.

    A class, not an @asynccontextmanager: that costs an async generator per request (and trio's first-iteration
    hook), on the hottest path of the daemon."""

    __slots__ = ("_active", "_door", "_invocation", "_request", "_run", "_runtime", "_slug")

    def __init__(
        self,
        door: FunctionsFrontDoor,
        slug: str,
        active: ActiveFunction,
        runtime: Runtime,
        request: HttpRequest,
        invocation: Invocation,
    ) -> None:
        self._door = door
        self._slug = slug
        self._active = active
        self._runtime = runtime
        self._request = request
        self._invocation = invocation

    async def __aenter__(self) -> InvocationResult:
        table = self._door.table
        retries = _RETIRED_RETRIES
        while True:
            live = table.get(self._slug)
            if live is not self._active:
                self._switch(live)
            self._run = self._runtime.invoke(self._active.fn, self._invocation)
            try:
                result = await self._run.__aenter__()
                break
            except VersionRetired:  # nothing of the request was used: run it on the version live now
                if not retries:
                    raise
                retries -= 1
        try:
            headers = [(k, v) for k, v in result.headers if k.lower() not in RESPONSE_DROP]
            headers.append(self._active.version_header)
            cap = self._active.fn.limits.max_response_bytes
            whole = result.complete_body
            if whole is None:
                return InvocationResult(result.status, headers, _capped(result.body, cap), socket=result.socket)
            if len(whole) > cap:
                raise WorkerError(f"Function response is larger than {cap} bytes")
            return InvocationResult(result.status, headers, result.body, whole)  # within the cap: nothing to cut
        except BaseException as exc:
            await self._run.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._run.__aexit__(exc_type, exc, tb)

    def _switch(self, live: ActiveFunction | None) -> None:
        """Run on `live` instead of the version the request was admitted for: through the gate again if only
        `live` checks JWTs; 404 if the function is gone."""
        if live is None:
            raise _Refused(404, "NOT_FOUND", "Requested function was not found")
        request = self._request
        if live.verify_jwt and not self._active.verify_jwt and request.method != "OPTIONS":
            try:
                self._door.gate.check(request.header(b"authorization"))
            except JwtRejected as exc:
                raise _Refused(401, exc.code, exc.message) from None
        runtime = self._door.runtimes.get(live.fn.runtime)
        if runtime is None:
            raise BootError(f"No runtime {live.fn.runtime!r} on this worker")
        if live.fn.key != self._active.fn.key:  # not a new env or limits of the same version
            log.info(
                "%s was retired while a request waited for it: it runs on v%d", self._active.fn.key, live.fn.version
            )
        self._active, self._runtime = live, runtime


async def _capped(body: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in body:
        sent += len(chunk)
        if sent > cap:
            # The head is already out: all that is left is to cut the connection (the server aborts it).
            raise ConnectionAbortedError(f"function response is larger than {cap} bytes")
        yield chunk


_CLIENT_SET = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})
"""Headers that say who the client is: only a trusted proxy may set them; from anyone else they are replaced."""


class TrustedProxies:
    """The peers whose `X-Forwarded-*` a function may believe (the operator's `trusted_proxies` CIDRs).

    Verdicts are remembered per peer address (bounded): parsing an address per request would cost on the hot path,
    and behind a proxy the same few peers send everything."""

    _REMEMBERED = 4096

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._verdicts: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, client: tuple[str, int] | None) -> bool:
        if not self._networks or client is None:
            return False
        peer = client[0]
        verdict = self._verdicts.get(peer)
        if verdict is None:
            try:
                address = ipaddress.ip_address(peer.partition("%")[0])
            except ValueError:
                verdict = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                verdict = any(address in n for n in self._networks)
            if len(self._verdicts) >= self._REMEMBERED:
                self._verdicts.clear()
            self._verdicts[peer] = verdict
        return verdict


def forwarded_headers(request: HttpRequest, trusted: bool = False) -> tuple[Headers, str, bytes | None]:
    """The request headers a function sees — hop-by-hop removed, x-forwarded-* set by us unless `trusted` (the peer
    is a trusted proxy, whose x-forwarded-* are kept and not added twice) — with the request's host (for its URL)
    and x-request-id, found in the same pass over the headers."""
    headers: Headers = []
    host: bytes | None = None
    request_id: bytes | None = None
    forwarded_for = forwarded_proto = forwarded_host = False
    for k, v in request.headers:
        if k in HOP_BY_HOP:
            continue
        if k in _CLIENT_SET:
            if not trusted:
                continue  # a client saying who it is: replaced below by what the connection says
            if k == b"x-forwarded-for":
                forwarded_for = True
            elif k == b"x-forwarded-proto":
                forwarded_proto = True
            elif k == b"x-forwarded-host":
                forwarded_host = True
        headers.append((k, v))
        if k == b"host":
            host = host or v
        elif k == b"x-request-id":
            request_id = request_id or v
    host_text = host.decode("latin-1") if host else "localhost"
    if not forwarded_for and request.client:
        headers.append((b"x-forwarded-for", request.client[0].encode()))
    if not forwarded_proto:
        headers.append((b"x-forwarded-proto", request.scheme.encode()))
    if not forwarded_host:
        headers.append((b"x-forwarded-host", host_text.encode("latin-1")))
    return headers, host_text, request_id


def cache_origin(request: HttpRequest, origin: str) -> str:
    """The cache key's origin for a request from a trusted proxy: the `origin` of the function's URL plus the
    X-Forwarded-Proto/-Host the function is given as the client's (the proxy may pass a client's own on), so a
    response built from them is never served to a request that carried others. From anyone else those headers are
    ours, made from the same scheme and Host, so `origin` alone is the key's."""
    said = [b"\n%s=%s" % (k, v) for k, v in request.headers if k == b"x-forwarded-host" or k == b"x-forwarded-proto"]
    return origin + b"".join(said).decode("latin-1") if said else origin  # LF: in no header value (llhttp)


def valid_host(value: bytes) -> bool:
    """Whether a Host header is `host[:port]` (RFC 9110 §7.2): anything else would become the function's URL."""
    return _HOST_FULL.fullmatch(value) is not None


_HOST_FULL = re.compile(rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")


class _Once:
    """A body the front door holds whole, as the one-chunk stream a runtime reads."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        data = self._data
        if data is None:
            raise StopAsyncIteration
        self._data = None
        return data


async def _prefetch(body: RequestBody, limit: int, window: int) -> tuple[list[bytes], bool]:
    """Read `body` until it ends (True) or `window` bytes are in hand (False: the rest is still to read).
    Raises `BodyTooLarge` past `limit`."""
    chunks: list[bytes] = []
    seen = 0
    iterator = aiter(body)
    while seen < window:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return chunks, True
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return chunks, False


class _BodyWatch:
    """The prefetched head of a body and then the rest as it comes, counted against `limit`. A runtime reports a
    failing body as its own error; `failure` keeps the body's (too large, malformed, too slow, client gone) so
    the front door answers for what really happened."""

    def __init__(self, head: list[bytes], rest: RequestBody, limit: int) -> None:
        self._head = head
        self._rest = rest
        self._limit = limit
        self.failure: Exception | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        for chunk in self._head:
            seen += len(chunk)
            yield chunk
        self._head = []
        try:
            async for chunk in self._rest:
                seen += len(chunk)
                if seen > self._limit:
                    raise BodyTooLarge(f"request body is larger than {self._limit} bytes")
                yield chunk
        except (BodyTooLarge, BadRequestBody, ClientDisconnected) as exc:
            self.failure = exc
            raise
