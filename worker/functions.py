"""`/functions/v1/{slug}[/{rest}]`: routing, the JWT gate, and the error contract around a `Runtime`.

The front door never sees a subprocess or a Store: it builds an `Invocation`, enters `Runtime.invoke`, and streams
what comes back. Every failure becomes Supabase's JSON error with its status and `sb-error-code`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType

import trio

from mbworker.lib.http.types import BodyTooLarge, Headers, HttpRequest, RequestBody, Responder
from mbworker.runtimes import FunctionRuntimeError, FunctionVersion, Invocation, InvocationResult, Runtime, WorkerError
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
from mbworker.worker.jwt_gate import JwtGate, JwtRejected
from mbworker.worker.metrics import UNMATCHED, Metrics
from mbworker.worker.responses import send_error

log = logging.getLogger("mbworker.functions")

PREFIX = "/functions/v1/"
_PREFIX_LEN = len(PREFIX)
ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})
_BODYLESS = frozenset({"GET", "HEAD"})
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
    ) -> None:
        """`background`: the daemon's nursery for work a response need not wait for (writes to L2)."""
        self.limiter = limiter
        self.l2 = l2
        self.background = background
        self.table = table
        self.runtimes = runtimes
        self.gate = gate
        self.cache = cache
        self.metrics = metrics

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        path = request.path
        slug, sep, tail = path[_PREFIX_LEN:].partition("/")
        if not slug or not path.startswith(PREFIX):
            await send_error(responder, 404, "NOT_FOUND", "Requested function was not found")
            return
        if request.method not in ALLOWED_METHODS:
            await send_error(responder, 405, "METHOD_NOT_ALLOWED", f"Method {request.method} is not allowed")
            return
        active = self.table.get(slug)
        metrics = self.metrics
        if metrics is None:
            await self.invoke(active, request, responder, slug, sep + tail)
            return
        # Label by deployed slug only: an unknown slug from the path would make label sets unbounded.
        with metrics.observe_request(slug if active else UNMATCHED, responder) as observed:
            await self.invoke(active, request, observed, slug, sep + tail)

    async def invoke(
        self, active: ActiveFunction | None, request: HttpRequest, responder: Responder, slug: str, rest: str
    ) -> None:
        """Gate, limit and run one request to `slug` (`rest`: the path after it). One method, not a chain of
        them: each coroutine hop costs on the hottest path of the daemon."""
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
        cache = self.cache
        decision: Hit | Miss | Bypass | None = None
        if cache is not None and active.cache.enabled:  # other methods pass through as BYPASS
            decision = cache.lookup(request, slug=slug, version=fn.version, config=active.cache)
            if type(decision) is Hit:  # the hot case, answered before anything else is built
                await responder.send(decision.status, decision.headers(), decision.body)
                return
        invocation: Invocation | None = None

        def run() -> AbstractAsyncContextManager[InvocationResult]:
            # Built only when the function runs: a cache hit never pays for headers, ids and URLs.
            nonlocal invocation
            target = f"/{slug}{rest}" + (f"?{request.query}" if request.query else "")
            headers, host, request_id = forwarded_headers(request)
            invocation = Invocation(
                method=request.method,
                target=target,
                headers=headers,
                # A declared length is enforced by the HTTP parser (and checked above); only a chunked body needs
                # counting. A GET has neither: no generator to make.
                body=request.body if sized or request.method in _BODYLESS else _limited(request.body, limit),
                request_id=request_id.decode("latin-1") if request_id else _new_request_id(),
                url=f"{request.scheme}://{host}{target}",
            )
            return _Shaped(runtime.invoke(fn, invocation), active)

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
                )
            else:
                await _respond(responder, run)
        except BodyTooLarge:
            await send_error(responder, 413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
        except FlightTimeout:
            await send_error(responder, 504, "IDLE_TIMEOUT", "Timed out waiting for the same request in flight")
        except FlightFailed as exc:
            if not isinstance(exc.cause, FunctionRuntimeError):
                raise
            await send_error(responder, exc.cause.status, exc.cause.code, exc.cause.message)
        except FunctionRuntimeError as exc:
            request_id = invocation.request_id if invocation is not None else "-"
            log.info("%s %s → %d %s: %s", fn.key, request_id, exc.status, exc.code, exc.message)
            await send_error(responder, exc.status, exc.code, exc.message)


async def _respond(responder: Responder, run: Callable[[], AbstractAsyncContextManager[InvocationResult]]) -> None:
    """Stream one invocation to the client; a body the runtime already holds goes out with Content-Length."""
    async with run() as result:
        if result.complete_body is not None:
            await responder.send(result.status, result.headers, result.complete_body)
            return
        await responder.start(result.status, result.headers)
        async for chunk in result.body:
            await responder.write(chunk)
    await responder.end()


class _Shaped:
    """The runtime's result as the client gets it: framing headers dropped (the server frames the body), the
    version header added, and the body capped at the function's response limit.

    A class, not an @asynccontextmanager: that costs an async generator per request (and trio's first-iteration
    hook), on the hottest path of the daemon."""

    __slots__ = ("_active", "_invocation")

    def __init__(self, invocation: AbstractAsyncContextManager[InvocationResult], active: ActiveFunction) -> None:
        self._invocation = invocation
        self._active = active

    async def __aenter__(self) -> InvocationResult:
        result = await self._invocation.__aenter__()
        try:
            headers = [(k, v) for k, v in result.headers if k.lower() not in RESPONSE_DROP]
            headers.append(self._active.version_header)
            cap = self._active.fn.limits.max_response_bytes
            whole = result.complete_body
            if whole is None:
                return InvocationResult(result.status, headers, _capped(result.body, cap))
            if len(whole) > cap:
                raise WorkerError(f"Function response is larger than {cap} bytes")
            return InvocationResult(result.status, headers, result.body, whole)  # within the cap: nothing to cut
        except BaseException as exc:
            await self._invocation.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._invocation.__aexit__(exc_type, exc, tb)


async def _capped(body: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in body:
        sent += len(chunk)
        if sent > cap:
            # The head is already out: all that is left is to cut the connection (the server aborts it).
            raise ConnectionAbortedError(f"function response is larger than {cap} bytes")
        yield chunk


def forwarded_headers(request: HttpRequest) -> tuple[Headers, str, bytes | None]:
    """The request headers a function sees — hop-by-hop removed, x-forwarded-* added when a proxy didn't — with
    the request's host (for its URL) and x-request-id, found in the same pass over the headers."""
    headers: Headers = []
    host: bytes | None = None
    request_id: bytes | None = None
    forwarded_for = forwarded_proto = forwarded_host = False
    for k, v in request.headers:
        if k in HOP_BY_HOP:
            continue
        headers.append((k, v))
        if k == b"host":
            host = host or v
        elif k == b"x-request-id":
            request_id = request_id or v
        elif k == b"x-forwarded-for":
            forwarded_for = True
        elif k == b"x-forwarded-proto":
            forwarded_proto = True
        elif k == b"x-forwarded-host":
            forwarded_host = True
    host_text = host.decode("latin-1") if host else "localhost"
    if not forwarded_for and request.client:
        headers.append((b"x-forwarded-for", request.client[0].encode()))
    if not forwarded_proto:
        headers.append((b"x-forwarded-proto", request.scheme.encode()))
    if not forwarded_host:
        headers.append((b"x-forwarded-host", host_text.encode("latin-1")))
    return headers, host_text, request_id


async def _limited(body: RequestBody, limit: int) -> AsyncIterator[bytes]:
    """Pass the body through, raising `BodyTooLarge` once it exceeds `limit` (chunked bodies have no length)."""
    seen = 0
    async for chunk in body:
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        yield chunk
