"""A runtime that already holds the whole body (`complete_body`): the cache's leader answers in one write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
import trio.testing

from mbworker.runtimes.api import InvocationResult
from mbworker.worker.cache import FunctionCacheConfig, respond_through_cache
from tests.cache.helpers import Function, Recorded, Req, make_cache


class WholeBody(Function):
    """Like `Function`, but says it holds the whole body (as Deno's one-frame and Wasm responses do)."""

    @asynccontextmanager
    async def invoke(self) -> AsyncIterator[InvocationResult]:
        async with super().invoke() as result:
            yield InvocationResult(result.status, result.headers, result.body, b"".join(self.chunks))


async def test_a_storable_complete_body_is_sent_whole_then_hits() -> None:
    cache = make_cache()
    # no content-length, like a Deno response: the leader must still be able to store it
    fn = WholeBody([(b"content-type", b"text/plain"), (b"cache-control", b"max-age=60")], [b"hel", b"lo"])
    first = Recorded()
    assert await respond_through_cache(cache, Req(), first, fn.invoke, slug="hello", version=1, timeout=5) == b"MISS"
    assert (first.mode, first.status, first.body) == ("send", 200, b"hello")
    assert first.header(b"x-mbworker-cache") == b"MISS"
    second = Recorded()
    assert await respond_through_cache(cache, Req(), second, fn.invoke, slug="hello", version=1, timeout=5) == b"HIT"
    assert second.body == b"hello"
    assert fn.runs == 1


async def test_followers_of_a_complete_body_share_it() -> None:
    cache = make_cache()
    fn = WholeBody([(b"cache-control", b"max-age=60")], [b"shared"], hold=True)
    answers = [Recorded() for _ in range(5)]
    async with trio.open_nursery() as nursery:
        for r in answers:
            nursery.start_soon(
                partial(
                    respond_through_cache,
                    cache,
                    Req(),
                    r,
                    fn.invoke,
                    slug="s",
                    version=1,
                    timeout=5,
                    config=FunctionCacheConfig(ttl=60),
                )
            )
        await trio.testing.wait_all_tasks_blocked()
        fn.released.set()
    assert fn.runs == 1
    assert [r.body for r in answers] == [b"shared"] * 5


async def test_an_unstorable_complete_body_is_sent_whole_as_bypass() -> None:
    cache = make_cache()
    fn = WholeBody([(b"content-type", b"text/plain"), (b"content-length", b"2")], [b"hi"])
    got = Recorded()
    assert await respond_through_cache(cache, Req(), got, fn.invoke, slug="hello", version=1, timeout=5) == b"BYPASS"
    assert (got.mode, got.body) == ("send", b"hi")
    assert got.header(b"content-length") is None  # send() frames the body itself
    assert got.header(b"x-mbworker-cache") == b"BYPASS"


async def test_after_an_unstorable_response_requests_for_the_key_stop_coalescing() -> None:
    cache = make_cache()
    fn = WholeBody([(b"content-type", b"text/plain")], [b"private"])  # no Cache-Control: not storable
    first = Recorded()
    assert await respond_through_cache(cache, Req(), first, fn.invoke, slug="s", version=1, timeout=5) == b"BYPASS"
    # hit-for-miss: concurrent requests for that key now all run at once instead of queueing behind a leader
    fn.released = trio.Event()
    answers = [Recorded() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for r in answers:
            nursery.start_soon(
                partial(respond_through_cache, cache, Req(), r, fn.invoke, slug="s", version=1, timeout=5)
            )
        await trio.testing.wait_all_tasks_blocked()
        assert fn.runs == 4  # all three are inside the function together
        fn.released.set()
    assert [r.body for r in answers] == [b"private"] * 3
    # ...and a response that turns storable is still stored, which ends the hit-for-miss
    fn.headers = [(b"cache-control", b"max-age=60")]
    fn.chunks = [b"public"]
    stored = Recorded()
    assert await respond_through_cache(cache, Req(), stored, fn.invoke, slug="s", version=1, timeout=5) == b"MISS"
    hit = Recorded()
    assert await respond_through_cache(cache, Req(), hit, fn.invoke, slug="s", version=1, timeout=5) == b"HIT"
    assert hit.body == b"public"
    assert fn.runs == 5
