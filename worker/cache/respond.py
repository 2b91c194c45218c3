"""The front door's one call into the cache: answer a function request through the L1 cache.

The functions handler calls `respond_through_cache(...)` instead of streaming `runtime.invoke(...)` itself.
It owns nothing: the caller owns the responder, the runtime and the error rendering. Errors propagate: a
`FunctionRuntimeError` from `invoke` as is (this request ran the function), `FlightFailed` when the invocation
this request waited for failed (render `exc.cause` as if it were this request's), `FlightTimeout` when this
request's `timeout` passed while it waited (answer 504).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from runtimes.api import InvocationResult
from worker.cache.policy import Headers
from worker.cache.settings import DEFAULT_FUNCTION_CACHE, FunctionCacheConfig
from worker.cache.store import BYPASS, CACHE_HEADER, HIT, Bypass, CacheFlight, Hit, RequestHead, ResultCache
from worker.http.types import Responder

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
) -> bytes:
    """Answer `request` from the cache, from another request's invocation, or by running `invoke`.

    `timeout` bounds only the wait for another request's invocation. Returns the x-mbworker-cache label
    sent (HIT, MISS or BYPASS) for logs and metrics.
    """
    decision = cache.lookup(request, slug=slug, version=version, config=config)
    if isinstance(decision, Hit):
        await _send_hit(responder, decision)
        return HIT
    if isinstance(decision, Bypass):
        await _stream(responder, invoke, BYPASS)
        return BYPASS
    async with cache.open_flight(decision, timeout=timeout) as flight:
        if flight.leader:
            return await _lead(responder, invoke, flight)
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


async def _lead(responder: Responder, invoke: Invoke, flight: CacheFlight) -> bytes:
    """Run the function as the flight's leader: buffer a sized storable body (followers wait for it, not for
    this request's client), otherwise stream it to the client while the recorder tees it."""
    async with invoke() as result:
        whole = result.complete_body
        recorder = flight.record(result.status, result.headers, whole)  # a whole body is stored right here
        label = recorder.label
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
