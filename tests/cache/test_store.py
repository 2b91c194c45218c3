"""ResultCache over the real moka-py: hits, misses, bypasses, expiry, Vary, keys, purges, capacity."""

from __future__ import annotations

import gc
import random
import weakref

import trio

from mbworker.worker.cache import (
    CACHE_HEADER,
    Bypass,
    CacheSettings,
    FunctionCacheConfig,
    Hit,
    Miss,
    ResultCache,
)
from tests.cache.helpers import Clock, Req, cacheable, make_cache

SLUG = "hello"


def miss(cache: ResultCache, req: Req, version: int = 1, config: FunctionCacheConfig | None = None) -> Miss:
    got = cache.lookup(req, slug=SLUG, version=version, config=config or FunctionCacheConfig())
    assert isinstance(got, Miss), got
    return got


def hit(cache: ResultCache, req: Req, version: int = 1, config: FunctionCacheConfig | None = None) -> Hit:
    got = cache.lookup(req, slug=SLUG, version=version, config=config or FunctionCacheConfig())
    assert isinstance(got, Hit), got
    return got


def fill(cache: ResultCache, req: Req, body: bytes = b"hello", version: int = 1, **kw: object) -> None:
    config = FunctionCacheConfig.model_validate(kw)
    m = miss(cache, req, version, config)
    assert cache.store(m, 200, cacheable(60, body), body) is not None


def test_miss_then_hit_with_age_and_cache_header() -> None:
    clock = Clock()
    cache = make_cache(clock=clock)
    req = Req(headers=[(b"accept", b"*/*")])
    m = miss(cache, req)
    entry = cache.store(m, 200, cacheable(60, b"hello", (b"x-a", b"1")), b"hello")
    assert entry is not None
    clock.now += 7.9
    h = hit(cache, req)
    assert (h.status, h.body) == (200, b"hello")
    headers = h.headers()
    assert (b"age", b"7") in headers
    assert (CACHE_HEADER, b"HIT") in headers
    assert (b"x-a", b"1") in headers
    assert not any(k == b"content-length" for k, _ in headers)
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.stores, stats.entries) == (1, 1, 1, 1)
    assert stats.bytes >= len(b"hello")


def test_head_shares_the_get_entry_but_never_fills_it() -> None:
    cache = make_cache()
    head = Req(method="HEAD")
    got = cache.lookup(head, slug=SLUG, version=1)
    assert got == Bypass("head")
    fill(cache, Req())
    h = hit(cache, head)
    assert h.body == b""
    assert (b"content-length", b"5") in h.headers()  # the GET's length: the front door keeps it for HEAD
    assert not any(k == b"content-length" for k, _ in hit(cache, Req()).headers())


def test_post_bypasses() -> None:
    cache = make_cache()
    assert cache.lookup(Req(method="POST"), slug=SLUG, version=1) == Bypass("method")
    assert cache.statistics().bypass_reasons == {"method": 1}


def test_conditional_request_hits_but_does_not_fill() -> None:
    cache = make_cache()
    conditional = Req(headers=[(b"if-none-match", b'"v1"')])
    assert cache.lookup(conditional, slug=SLUG, version=1) == Bypass("conditional")
    fill(cache, Req())
    assert hit(cache, conditional).body == b"hello"


def test_uncacheable_responses_are_not_stored() -> None:
    cache = make_cache()
    req = Req()
    for headers, status in [
        ([(b"cache-control", b"no-store, max-age=60")], 200),
        ([(b"cache-control", b"private, max-age=60")], 200),
        ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"a=1")], 200),
        ([(b"cache-control", b"max-age=60")], 500),
        ([], 200),
    ]:
        assert cache.store(miss(cache, req), status, headers, b"x") is None
    miss(cache, req)
    assert cache.statistics().not_stored == {"no-store": 1, "private": 1, "set-cookie": 1, "status": 1, "no-ttl": 1}


def test_function_default_ttl_makes_plain_responses_cacheable() -> None:
    cache = make_cache()
    config = FunctionCacheConfig.model_validate({"ttl": "30s"})
    m = miss(cache, Req(), config=config)
    assert cache.store(m, 200, [(b"content-type", b"text/plain")], b"x") is not None
    assert hit(cache, Req(), config=config).body == b"x"


def test_entry_expires_by_its_own_clock() -> None:
    clock = Clock()
    cache = make_cache(clock=clock)
    fill(cache, Req())
    clock.now += 59.5
    assert hit(cache, Req()).age == 59
    clock.now += 1
    miss(cache, Req())


async def test_moka_drops_expired_entries() -> None:
    cache = make_cache()
    m = miss(cache, Req(), config=FunctionCacheConfig(ttl=0.05))
    assert cache.store(m, 200, [], b"short-lived") is not None
    assert cache.statistics().entries == 1
    # moka's TTL runs on real time: poll its state, bounded
    for _ in range(500):
        if not cache.statistics().entries:
            break
        await trio.sleep(0.01)
    else:
        raise AssertionError("moka kept an expired entry for 5 s")
    assert cache.statistics().expirations == 1
    miss(cache, Req())


def test_no_cache_request_revalidates_and_refreshes_the_entry() -> None:
    cache = make_cache()
    fill(cache, Req(), b"old")
    revalidating = Req(headers=[(b"cache-control", b"no-cache")])
    m = miss(cache, revalidating)
    assert m.revalidate
    assert cache.store(m, 200, cacheable(60, b"new"), b"new") is not None
    assert hit(cache, Req()).body == b"new"


def test_client_no_store_bypasses_even_a_present_entry() -> None:
    cache = make_cache()
    fill(cache, Req())
    assert cache.lookup(Req(headers=[(b"cache-control", b"no-store")]), slug=SLUG, version=1) == Bypass("no-store")


def test_query_order_and_escapes_share_an_entry() -> None:
    cache = make_cache()
    fill(cache, Req(query="b=2&a=%7e"))
    assert hit(cache, Req(query="a=~&b=2")).body == b"hello"
    miss(cache, Req(query="a=~&b=3"))
    miss(cache, Req(path="/functions/v1/hello/other", query="a=~&b=2"))


def test_configured_vary_separates_entries() -> None:
    cache = make_cache()
    config = FunctionCacheConfig(vary=("accept-language",))
    fr = Req(headers=[(b"accept-language", b"fr")])
    en = Req(headers=[(b"accept-language", b"en")])
    m = miss(cache, fr, config=config)
    assert cache.store(m, 200, cacheable(60, b"bonjour"), b"bonjour") is not None
    miss(cache, en, config=config)
    miss(cache, Req(), config=config)
    assert hit(cache, fr, config=config).body == b"bonjour"


def test_response_vary_separates_variants() -> None:
    cache = make_cache()
    gzip = Req(headers=[(b"accept-encoding", b"gzip")])
    plain = Req(headers=[(b"accept-encoding", b"identity")])
    vary = (b"vary", b"Accept-Encoding")
    assert cache.store(miss(cache, gzip), 200, cacheable(60, b"GZ", vary), b"GZ") is not None
    miss(cache, plain)
    assert cache.store(miss(cache, plain), 200, cacheable(60, b"ID", vary), b"ID") is not None
    assert hit(cache, gzip).body == b"GZ"
    assert hit(cache, plain).body == b"ID"
    miss(cache, Req())
    assert cache.statistics().entries == 3  # one Vary node + two variants


def test_authorization_is_part_of_the_key_unless_opted_out() -> None:
    cache = make_cache()
    alice = Req(headers=[(b"authorization", b"Bearer alice")])
    bob = Req(headers=[(b"authorization", b"Bearer bob")])
    fill(cache, alice, b"for alice")
    assert hit(cache, alice).body == b"for alice"
    miss(cache, bob)
    miss(cache, Req())

    shared = FunctionCacheConfig(include_authorization=False)
    fill(cache, alice, b"for everyone", version=2, include_authorization=False)
    assert hit(cache, bob, version=2, config=shared).body == b"for everyone"
    assert hit(cache, Req(), version=2, config=shared).body == b"for everyone"


def test_a_new_version_never_sees_an_older_versions_entry() -> None:
    cache = make_cache()
    fill(cache, Req(), b"v1", version=1)
    miss(cache, Req(), version=2)
    assert hit(cache, Req(), version=1).body == b"v1"


def test_purge_slug_drops_every_version_of_that_function_only() -> None:
    cache = make_cache()
    fill(cache, Req(), b"v1", version=1)
    fill(cache, Req(query="a=1"), b"v1", version=1)
    fill(cache, Req(), b"v2", version=2)
    other = cache.lookup(Req(), slug="other", version=1)
    assert isinstance(other, Miss)
    assert cache.store(other, 200, cacheable(60, b"o"), b"o") is not None
    assert cache.purge(SLUG) == 3
    miss(cache, Req(), version=1)
    miss(cache, Req(), version=2)
    assert isinstance(cache.lookup(Req(), slug="other", version=1), Hit)
    assert cache.statistics().entries == 1


def test_purge_version_on_rollback_keeps_the_other_version() -> None:
    cache = make_cache()
    fill(cache, Req(), b"v1", version=1)
    fill(cache, Req(), b"v2", version=2)
    assert cache.purge_version(SLUG, 2) == 1
    miss(cache, Req(), version=2)
    assert hit(cache, Req(), version=1).body == b"v1"
    assert cache.purge_version(SLUG, 2) == 0


def test_purge_everything() -> None:
    cache = make_cache()
    fill(cache, Req(), b"v1", version=1)
    fill(cache, Req(), b"v2", version=2)
    assert cache.purge() == 2
    assert cache.statistics().entries == 0
    miss(cache, Req())


def test_a_response_that_started_before_a_purge_is_not_stored() -> None:
    cache = make_cache()
    m = miss(cache, Req())
    cache.purge(SLUG)
    entry = cache.store(m, 200, cacheable(60, b"stale"), b"stale")
    assert entry is not None  # still handed to the requests that waited for it
    miss(cache, Req())
    assert cache.statistics().not_stored == {"purged": 1}


def test_a_purge_of_another_function_does_not_stop_a_store() -> None:
    cache = make_cache()
    m = miss(cache, Req())
    cache.purge("other")
    cache.purge_version("other", 1)
    assert cache.store(m, 200, cacheable(60, b"kept"), b"kept") is not None
    assert hit(cache, Req()).body == b"kept"
    m = miss(cache, Req(query="x=1"))
    cache.purge_version(SLUG, 1)
    cache.store(m, 200, cacheable(60, b"x"), b"x")
    m = miss(cache, Req(query="x=1"))
    cache.purge()
    cache.store(m, 200, cacheable(60, b"x"), b"x")
    miss(cache, Req(query="x=1"))
    assert cache.statistics().not_stored == {"purged": 2}


def test_oversize_body_is_not_cached() -> None:
    cache = make_cache(max_entry=100)
    body = b"x" * 101
    assert cache.store(miss(cache, Req()), 200, cacheable(60, body), body) is None
    assert cache.store(miss(cache, Req()), 200, [(b"cache-control", b"max-age=60")], body) is None
    miss(cache, Req())
    assert cache.statistics().not_stored == {"too-large": 2}


def test_length_mismatch_is_not_cached() -> None:
    cache = make_cache()
    assert cache.store(miss(cache, Req()), 200, cacheable(60, b"hello"), b"hell") is None


def test_capacity_is_respected_under_churn() -> None:
    capacity = 64 * 1024
    cache = make_cache(capacity=capacity, max_entry=8 * 1024)
    rng = random.Random(7)
    for round_ in range(20):
        for _ in range(200):
            n = rng.randrange(2000)
            req = Req(query=f"k={n}")
            got = cache.lookup(req, slug=SLUG, version=1)
            if isinstance(got, Miss):
                body = b"x" * rng.randrange(100, 4000)
                cache.store(got, 200, cacheable(600, body), body)
        stats = cache.statistics()
        assert stats.bytes <= capacity, (round_, stats)
    assert stats.evictions > 0
    assert stats.hits > 0
    # the purge index follows moka's evictions: it names exactly the entries moka holds
    indexed = sum(len(keys) for versions in cache._index.values() for keys in versions.values())
    assert indexed == stats.entries


def test_zero_capacity_turns_the_cache_off() -> None:
    cache = ResultCache(CacheSettings(capacity_bytes=0))
    assert cache.lookup(Req(), slug=SLUG, version=1) == Bypass("disabled")
    assert cache.statistics().capacity_bytes == 0


def test_disabled_function_bypasses() -> None:
    cache = make_cache()
    assert cache.lookup(Req(), slug=SLUG, version=1, config=FunctionCacheConfig(enabled=False)) == Bypass("disabled")


def test_a_dropped_cache_is_freed() -> None:
    """moka holds the eviction listener and the GC cannot look inside moka: the listener must not hold the cache."""
    cache = make_cache()
    fill(cache, Req())
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None


def test_lookup_keys_requests_exactly_as_primary_key_does() -> None:
    # lookup() builds the key inline (hot path); it must stay the tuple policy.primary_key() makes
    from mbworker.worker.cache.policy import classify_request, primary_key

    cache = make_cache()
    config = FunctionCacheConfig()
    for path, query in [("/functions/v1/hello", ""), ("/functions/v1/hello/%7ex", "b=1&a=%41"), ("/f/a", "x")]:
        req = Req(path=path, query=query, headers=[(b"authorization", b"Bearer t")])
        decision = cache.lookup(req, slug="hello", version=2, config=config, origin="http://h")
        assert isinstance(decision, Miss)
        facts = classify_request("GET", req.headers, config)
        assert not isinstance(facts, str)
        assert decision.key == primary_key("hello", 2, path, query, facts, "http://h")


def test_responses_are_keyed_by_the_origin_the_function_saw() -> None:
    # The same path and Authorization from another Host: the function built its answer from its URL's host.
    cache = make_cache()
    req = Req(headers=[(b"authorization", b"Bearer anon")])
    evil = cache.lookup(req, slug=SLUG, version=1, origin="http://evil.example")
    assert isinstance(evil, Miss)
    assert cache.store(evil, 200, cacheable(60, b"", (b"location", b"http://evil.example/next")), b"") is not None
    assert isinstance(cache.lookup(req, slug=SLUG, version=1, origin="http://api.example"), Miss)
    assert isinstance(cache.lookup(req, slug=SLUG, version=1, origin="http://evil.example"), Hit)
    assert cache.peek(req, slug=SLUG, version=1, origin="http://api.example") is None
    assert cache.peek(req, slug=SLUG, version=1, origin="http://evil.example") is not None
