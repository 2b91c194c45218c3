"""Single flight, through the front door's call (`respond_through_cache`) and the generic table."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mbworker.runtimes.errors import WorkerError
from mbworker.worker.cache import (
    FlightFailed,
    FlightTimeout,
    FunctionCacheConfig,
    Miss,
    ResultCache,
    respond_through_cache,
)
from mbworker.worker.cache.flight import SingleFlight
from tests.cache.helpers import Function, Recorded, Req, cacheable, make_cache

SLUG = "hello"
DECLARED = FunctionCacheConfig(ttl=60)
"""A function whose `[cache] ttl` declares its answers cacheable: its requests coalesce from the first one (without
it, a version coalesces only once it has answered something storable: see test_a_version_coalesces_...)."""


async def respond(
    cache: ResultCache,
    fn: Function,
    req: Req | None = None,
    *,
    timeout: float = 10.0,
    config: FunctionCacheConfig | None = None,
) -> tuple[bytes, Recorded]:
    out = Recorded()
    label = await respond_through_cache(
        cache,
        req or Req(),
        out,
        fn.invoke,
        slug=SLUG,
        version=1,
        config=config or DECLARED,
        timeout=timeout,
    )
    assert out.ended
    return label, out


async def test_hundred_concurrent_identical_misses_run_the_function_once() -> None:
    cache = make_cache()
    fn = Function(hold=True)
    results: list[tuple[bytes, Recorded]] = []

    async def one() -> None:
        results.append(await respond(cache, fn))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.statistics().flights == 1
        fn.released.set()
    assert fn.runs == 1
    assert len(results) == 100
    assert all(out.status == 200 and out.body == b"hello" for _, out in results)
    labels = sorted(label for label, _ in results)
    assert labels == [b"HIT"] * 99 + [b"MISS"]
    stats = cache.statistics()
    assert (stats.misses, stats.coalesced, stats.stores, stats.flights) == (100, 99, 1, 0)
    # and the next request is a plain hit
    label, out = await respond(cache, fn)
    assert (label, out.header(b"x-mbworker-cache"), fn.runs) == (b"HIT", b"HIT", 1)


async def test_a_failing_flight_fails_its_waiters_and_the_next_request_retries() -> None:
    cache = make_cache()
    fn = Function(hold=True, error=WorkerError("boom"))
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await respond(cache, fn)
        except (WorkerError, FlightFailed) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        fn.released.set()
    assert fn.runs == 1
    assert sum(isinstance(e, WorkerError) for e in errors) == 1
    followers = [e for e in errors if isinstance(e, FlightFailed)]
    assert len(followers) == 9
    assert all(isinstance(e.cause, WorkerError) and e.cause.status == 500 for e in followers)
    assert cache.statistics().flights == 0

    fn.error = None
    label, out = await respond(cache, fn)
    assert (label, out.body, fn.runs) == (b"MISS", b"hello", 2)


async def test_a_follower_gives_up_at_its_own_timeout() -> None:
    cache = make_cache()
    fn = Function(hold=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(respond, cache, fn)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(FlightTimeout):
            await respond(cache, fn, timeout=0.01)
        fn.released.set()
    assert fn.runs == 1


async def run_concurrently(
    cache: ResultCache, fn: Function, reqs: list[Req], config: FunctionCacheConfig = DECLARED
) -> list[tuple[bytes, Recorded]]:
    """The first request leads (it starts alone); the others join its flight (when the version coalesces)."""
    results: list[tuple[bytes, Recorded]] = []

    async def one(req: Req) -> None:
        results.append(await respond(cache, fn, req, config=config))

    async with trio.open_nursery() as nursery:
        for req in reqs:
            nursery.start_soon(one, req)
            await trio.testing.wait_all_tasks_blocked()
        fn.released.set()
    return results


async def test_uncacheable_leader_response_sends_followers_to_run_their_own() -> None:
    cache = make_cache()
    fn = Function([(b"cache-control", b"no-store")], hold=True)
    results = await run_concurrently(cache, fn, [Req() for _ in range(5)])
    assert fn.runs == 5
    assert all(out.body == b"hello" for _, out in results)
    assert [label for label, _ in results] == [b"BYPASS"] * 5
    assert cache.statistics().coalesced == 0


async def test_oversize_declared_length_releases_followers() -> None:
    cache = make_cache(max_entry=4)
    fn = Function(hold=True)  # 5-byte body, Content-Length 5
    results = await run_concurrently(cache, fn, [Req() for _ in range(3)])
    assert fn.runs == 3
    assert all(out.body == b"hello" for _, out in results)
    assert cache.statistics().stores == 0


async def test_followers_with_another_value_of_a_response_vary_header_run_their_own() -> None:
    cache = make_cache()
    fn = Function(cacheable(60, b"hello", (b"vary", b"accept-language")), hold=True)
    fr = Req(headers=[(b"accept-language", b"fr")])
    en = Req(headers=[(b"accept-language", b"en")])
    results = await run_concurrently(cache, fn, [fr, fr, en])
    assert fn.runs == 2  # the leader (fr) and the en follower
    assert sorted(label for label, _ in results) == [b"BYPASS", b"HIT", b"MISS"]


async def test_a_cancelled_leader_releases_its_followers() -> None:
    cache = make_cache()
    fn = Function(hold=True)
    follower_out: list[tuple[bytes, Recorded]] = []

    async def follower() -> None:
        follower_out.append(await respond(cache, fn))

    async with trio.open_nursery() as nursery:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await respond(cache, fn)

        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert fn.runs == 2  # the follower runs its own
        fn.released.set()
    assert follower_out[0][0] == b"BYPASS"


async def test_unsized_body_is_teed_into_the_cache_while_streaming() -> None:
    cache = make_cache()
    fn = Function([(b"cache-control", b"max-age=60")], [b"he", b"ll", b"o"])
    label, out = await respond(cache, fn)
    assert (label, out.mode, out.body) == (b"MISS", "stream", b"hello")
    label, out = await respond(cache, fn)
    assert (label, out.mode, out.body, fn.runs) == (b"HIT", "send", b"hello", 1)


async def test_unsized_body_past_the_cap_streams_whole_and_is_not_cached() -> None:
    cache = make_cache(max_entry=8)
    fn = Function([(b"cache-control", b"max-age=60")], [b"12345", b"67890", b"abc"])
    _, out = await respond(cache, fn)
    assert (out.mode, out.body) == ("stream", b"1234567890abc")
    await respond(cache, fn)
    assert fn.runs == 2
    assert cache.statistics().not_stored == {"too-large": 2}


async def test_sized_body_is_buffered_and_sent_in_one_piece() -> None:
    cache = make_cache()
    fn = Function(chunks=[b"hel", b"lo"])
    label, out = await respond(cache, fn)
    assert (label, out.mode, out.body) == (b"MISS", "send", b"hello")
    assert out.header(b"content-length") is None  # send() frames the body itself
    assert out.header(b"cache-control") == b"max-age=60"


async def test_a_sized_body_that_lies_about_its_length_streams_past_the_cap() -> None:
    cache = make_cache(max_entry=8)
    fn = Function(cacheable(60, b"12345"), [b"12345", b"67890"])
    _, out = await respond(cache, fn)
    assert (out.mode, out.body) == ("stream", b"1234567890")
    assert cache.statistics().stores == 0


async def test_bypassed_request_streams_the_functions_answer() -> None:
    cache = make_cache()
    fn = Function()
    label, out = await respond(cache, fn, Req(method="POST"))
    assert (label, out.header(b"x-mbworker-cache"), out.mode) == (b"BYPASS", b"BYPASS", "stream")
    assert out.header(b"content-length") == b"5"


async def test_revalidation_runs_the_function_and_refreshes_the_entry() -> None:
    cache = make_cache()
    fn = Function(chunks=[b"old"])
    await respond(cache, fn)
    fn.chunks, fn.headers = [b"new"], cacheable(60, b"new")
    label, out = await respond(cache, fn, Req(headers=[(b"cache-control", b"no-cache")]))
    assert (label, out.body) == (b"MISS", b"new")
    label, out = await respond(cache, fn)
    assert (label, out.body, fn.runs) == (b"HIT", b"new", 2)


async def test_flight_purged_mid_run_still_answers_its_followers_but_stores_nothing() -> None:
    cache = make_cache()
    fn = Function(hold=True)
    results: list[tuple[bytes, Recorded]] = []

    async def one() -> None:
        results.append(await respond(cache, fn))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        cache.purge(SLUG)
        nursery.start_soon(one)  # after the purge: a new flight
        await trio.testing.wait_all_tasks_blocked()
        fn.released.set()
    assert fn.runs == 2
    assert sorted(label for label, _ in results) == [b"HIT", b"MISS", b"MISS"]
    assert cache.statistics().stores == 1


# -- the generic table ------------------------------------------------------------------------------------


async def test_single_flight_table_forgets_resolved_and_detached_flights() -> None:
    table: SingleFlight[str, int] = SingleFlight()
    first, leads = table.join("a")
    assert leads
    again, leads = table.join("a")
    assert again is first
    assert not leads
    assert first.followers == 1
    first.publish(7)
    assert len(table) == 0
    assert await first.wait(1) == 7
    second, leads = table.join("a")
    assert leads
    assert second is not first
    assert table.detach(lambda key: key == "a") == 1
    third, leads = table.join("a")
    assert leads
    second.fail(ValueError("x"))  # a detached flight resolving leaves the new one listed
    assert len(table) == 1
    with pytest.raises(FlightFailed) as caught:
        await second.wait(1)
    assert isinstance(caught.value.cause, ValueError)
    third.settle(None)
    assert await third.wait(1) is None


async def test_low_level_api_leader_and_follower() -> None:
    cache = make_cache()
    lookup = cache.lookup(Req(), slug=SLUG, version=1, config=DECLARED)
    assert isinstance(lookup, Miss)
    async with cache.open_flight(lookup, timeout=1) as leader:
        assert leader.leader
        follower_lookup = cache.lookup(Req(), slug=SLUG, version=1, config=DECLARED)
        assert isinstance(follower_lookup, Miss)
        async with cache.open_flight(follower_lookup, timeout=1) as follower:
            assert not follower.leader
            recorder = leader.record(200, cacheable(60, b"hello"))
            assert (recorder.storable, recorder.buffered, recorder.label) == (True, True, b"MISS")
            recorder.write(b"hello")
            assert recorder.finish() is not None
            shared = await follower.wait()
            assert shared is not None
            assert shared.body == b"hello"
            with pytest.raises(RuntimeError):
                follower.record(200, [])
    assert cache.statistics().flights == 0


async def test_a_version_coalesces_once_it_has_answered_something_storable() -> None:
    """Without a declared ttl, concurrent identical requests to a version that never gave a storable answer all
    run at once (an uncacheable answer must not serialize them); after its first storable answer they coalesce."""
    cache = make_cache()
    fn = Function([(b"content-type", b"text/plain")], hold=True)  # no Cache-Control: not storable
    results = await run_concurrently(cache, fn, [Req() for _ in range(4)], config=FunctionCacheConfig())
    assert fn.runs == 4  # every request ran: none waited for another
    assert cache.statistics().coalesced == 0

    # A storable answer (max-age=60) is stored, and from then on the version's requests coalesce.
    label, _ = await respond(cache, Function(), Req(path="/warm"), config=FunctionCacheConfig())
    assert label == b"MISS"
    fn = Function(hold=True)
    results = []

    async def one() -> None:
        results.append(await respond(cache, fn, Req(path="/new"), config=FunctionCacheConfig()))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        fn.released.set()
    assert fn.runs == 1
    assert sorted(label for label, _ in results) == [b"HIT"] * 3 + [b"MISS"]


async def test_a_miss_nobody_could_join_is_recorded_without_a_flight() -> None:
    """`runs_alone` + `record_alone`: the bookkeeping of a flight nobody can follow, with none opened (the path
    every request of a function that does not cache takes)."""
    cache = make_cache()
    plain = FunctionCacheConfig()
    miss = cache.lookup(Req(), slug=SLUG, version=1, config=plain)
    assert isinstance(miss, Miss)
    assert cache.runs_alone(miss)
    declared = cache.lookup(Req(), slug=SLUG, version=1, config=DECLARED)
    assert isinstance(declared, Miss)
    assert not cache.runs_alone(declared)  # a declared ttl: its requests coalesce from the first
    not_storable = cache.record_alone(miss, 200, [(b"content-type", b"text/plain")], b"hi")
    assert (not_storable.label, cache.statistics().stores, cache.statistics().flights) == (b"BYPASS", 0, 0)
    assert cache.runs_alone(miss)  # its key is in the hit-for-miss window now, and the version is still unseen
    stored = cache.record_alone(miss, 200, cacheable(60, b"hello"), b"hello")
    assert (stored.label, cache.statistics().stores) == (b"MISS", 1)
    other = cache.lookup(Req(path="/other"), slug=SLUG, version=1, config=plain)
    assert isinstance(other, Miss)
    assert not cache.runs_alone(other)
    label, out = await respond(cache, Function(), config=plain)
    assert (label, out.body) == (b"HIT", b"hello")
