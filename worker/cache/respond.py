"""The front door's one call into the cache: answer a function request through the L1 cache.

The functions handler calls `respond_through_cache(...)` instead of streaming `runtime.invoke(...)` itself.
It owns nothing: the caller owns the responder, the runtime and the error rendering. Errors propagate: a
`FunctionRuntimeError` from `invoke` as is (this request ran the function), `FlightFailed` when the invocation
this request waited for failed (render `exc.cause` as if it were this request's), `FlightTimeout` when this
request's `timeout` passed while it waited (answer 504).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgpack  # type: ignore[import-untyped]
import trio

from mbworker.lib.http.types import Responder
from mbworker.runtimes.api import InvocationResult
from mbworker.worker.cache.policy import Headers
from mbworker.worker.cache.settings import DEFAULT_FUNCTION_CACHE, FunctionCacheConfig
from mbworker.worker.cache.store import (
    BYPASS,
    CACHE_HEADER,
    HIT,
    Bypass,
    CachedResponse,
    Hit,
    Miss,
    Recorder,
    RequestHead,
    ResultCache,
)
from mbworker.worker.cluster.l2cache import L2Cache, key_bytes

Invoke = Callable[[], AbstractAsyncContextManager[InvocationResult]]
"""Starts one invocation of the function for this request (e.g. `lambda: runtime.invoke(fn, invocation)`).
Called at most once per request."""

_FRAMING = frozenset({b"content-length", b"transfer-encoding", CACHE_HEADER})


async def respond_through_cache(
    cache: ResultCache,
    request: RequestHead,
    responder: Responder,
    invoke: Invoke,
    *,
    slug: str,
    version: int,
    config: FunctionCacheConfig = DEFAULT_FUNCTION_CACHE,
    timeout: float,
    l2: L2Cache | None = None,
    decision: Hit | Miss | Bypass | None = None,
    background: trio.Nursery | None = None,
    origin: str = "",
) -> bytes:
    """Answer `request` from the cache, from another request's invocation, or by running `invoke`.

    `timeout` bounds only the wait for another request's invocation. With `l2` and `config.l2`, a miss asks
    the shared second level before running the function, and a stored result is shared there too. Returns the
    x-mbworker-cache label sent (HIT, MISS or BYPASS) for logs and metrics. `decision`: this request's
    `cache.lookup` when the caller already made it (with no `await` since), else it is made here. `background`:
    where a write to L2 runs (the caller owns it; each write is bounded by the L2's own timeout), else it is awaited.
    `origin`: what the function sees of the URL besides path and query (part of the key: `ResultCache.lookup`).
    """
    if decision is None:
        decision = cache.lookup(request, slug=slug, version=version, config=config, origin=origin)
    if isinstance(decision, Hit):
        await _send_hit(responder, decision)
        return HIT
    if isinstance(decision, Bypass):
        await _stream(responder, invoke, BYPASS)
        return BYPASS
    # The common case (a function that does not cache): nobody could join this flight, so none is opened.
    if (l2 is None or not config.l2 or decision.revalidate) and cache.runs_alone(decision):
        miss = decision
        return await _lead(responder, invoke, lambda s, h, b: cache.record_alone(miss, s, h, b))
    async with cache.open_flight(decision, timeout=timeout) as flight:
        if flight.leader:
            if l2 is None or not config.l2 or decision.revalidate:
                return await _lead(responder, invoke, flight.record)
            key = key_bytes(decision.key)
            entry = decode_l2_entry(await l2.get(slug, key))
            if entry is not None:  # another node ran it: store it here too and answer as a hit
                return await _lead(responder, lambda: _replay(entry), flight.record, label=HIT)
            label = await _lead(responder, invoke, flight.record)
            shared_value = _l2_value(cache, request, slug=slug, version=version, config=config, origin=origin)
            if shared_value is not None:  # the client has its answer: the write to L2 need not hold it up
                if background is not None:
                    background.start_soon(l2.set, slug, key, *shared_value)
                else:
                    await l2.set(slug, key, *shared_value)
            return label
        shared = await flight.wait()
    if shared is not None:
        await _send_hit(responder, shared)
        return HIT
    await _stream(responder, invoke, BYPASS)
    return BYPASS


async def _send_hit(responder: Responder, hit: Hit) -> None:
    await responder.send(hit.status, hit.headers(), hit.body)


def _labelled(headers: Headers, label: bytes) -> Headers:
    return [(k, v) for k, v in headers if k != CACHE_HEADER] + [(CACHE_HEADER, label)]


async def _stream(responder: Responder, invoke: Invoke, label: bytes) -> None:
    async with invoke() as result:
        if result.complete_body is not None:  # the runtime holds it all: one write, with Content-Length
            await responder.send(result.status, _labelled(result.headers, label), result.complete_body)
            return
        await responder.start(result.status, _labelled(result.headers, label))
        async for chunk in result.body:
            await responder.write(chunk)
    await responder.end()


Record = Callable[[int, Headers, bytes | None], Recorder]
"""The leader's `CacheFlight.record` (or `ResultCache.record_alone` for a flight nobody can join)."""


async def _lead(responder: Responder, invoke: Invoke, record: Record, *, label: bytes | None = None) -> bytes:
    """Run the function as the flight's leader: buffer a sized storable body (followers wait for it, not for
    this request's client), otherwise stream it to the client while the recorder tees it. `label` overrides
    the x-mbworker-cache value (a result replayed from L2 is a HIT)."""
    async with invoke() as result:
        whole = result.complete_body
        recorder = record(result.status, result.headers, whole)  # a whole body is stored right here
        label = label or recorder.label
        if whole is not None:  # the runtime holds it all: answer in one write with Content-Length
            framed = [(k, v) for k, v in result.headers if k.lower() not in _FRAMING]  # send() frames the body
            await responder.send(result.status, [*framed, (CACHE_HEADER, label)], whole)
            return label
        pending: list[bytes] | None = [] if recorder.buffered else None
        if pending is None:
            await responder.start(result.status, _labelled(result.headers, label))
        async for chunk in result.body:
            recorder.write(chunk)
            if pending is None:
                await responder.write(chunk)
                continue
            pending.append(chunk)
            if not recorder.recording:  # over the cap after all: stop holding this client back
                await responder.start(result.status, _labelled(result.headers, label))
                for held in pending:
                    await responder.write(held)
                pending = None
        recorder.finish()
        status = result.status
        headers = [(k, v) for k, v in result.headers if k.lower() not in _FRAMING]  # send() frames the body
    if pending is not None:
        await responder.send(status, [*headers, (CACHE_HEADER, label)], b"".join(pending))
    else:
        await responder.end()
    return label


# -- L2 -------------------------------------------------------------------------------------------------------


def encode_l2_entry(entry: CachedResponse, now: float) -> tuple[bytes, float] | None:
    """(value, ttl) for the second level, or None: responses that Vary on request headers stay local (the
    L2 key holds only the function's configured vary values)."""
    ttl = entry.expires_at - now
    if entry.vary or ttl <= 0:
        return None
    age = entry.initial_age + int(now - entry.stored_at)
    value = msgpack.packb(
        {"s": entry.status, "h": [list(h) for h in entry.headers], "b": entry.body, "a": age, "w": time.time()},
        use_bin_type=True,
    )
    return value, ttl


def decode_l2_entry(value: bytes | None) -> InvocationResult | None:
    """The stored response as an invocation result (Age advanced by the time it spent in L2), or None."""
    if not value:
        return None
    try:
        raw = msgpack.unpackb(value, raw=False)
        age = int(raw["a"] + max(0.0, time.time() - raw["w"]))
        headers = [(bytes(k), bytes(v)) for k, v in raw["h"] if bytes(k).lower() != b"age"]
        body = bytes(raw["b"])
        status = int(raw["s"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        return None  # an entry of another format: a miss
    return InvocationResult(status, [*headers, (b"age", str(age).encode())], _one(body), complete_body=body)


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


@asynccontextmanager
async def _replay(result: InvocationResult) -> AsyncIterator[InvocationResult]:
    yield result


def _l2_value(
    cache: ResultCache, request: RequestHead, *, slug: str, version: int, config: FunctionCacheConfig, origin: str
) -> tuple[bytes, float] | None:
    """(value, ttl) of what the leader just stored in L1, to put into L2 too; None when nothing was stored or it
    stays local."""
    entry = cache.peek(request, slug=slug, version=version, config=config, origin=origin)
    return None if entry is None else encode_l2_entry(entry, cache.now())
