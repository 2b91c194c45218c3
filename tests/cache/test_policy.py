"""The pure rules: request and response classification, cache-control parsing, key normalization."""

from __future__ import annotations

import pytest

from mbworker.worker.cache.policy import (
    RequestFacts,
    Storable,
    classify_request,
    classify_response,
    normalize_component,
    normalize_query,
    parse_cache_control,
    primary_key,
    storable_headers,
)
from mbworker.worker.cache.settings import FunctionCacheConfig

DEFAULT = FunctionCacheConfig()


def facts(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, **config: object) -> RequestFacts:
    result = classify_request(method, headers or [], FunctionCacheConfig.model_validate(config))
    assert isinstance(result, RequestFacts), result
    return result


def response(
    status: int = 200, *headers: tuple[bytes, bytes], config: FunctionCacheConfig = DEFAULT, cap: int = 1000
) -> Storable | str:
    return classify_response(status, list(headers), config, max_ttl=3600.0, entry_cap=cap)


# -- Cache-Control ------------------------------------------------------------------------------------------


def test_parse_cache_control_names_values_and_quotes() -> None:
    parsed = parse_cache_control(b'Public, MAX-AGE=60 , private="set-cookie, x-a", s-maxage = 5,,no-cache')
    assert parsed == {"public": None, "max-age": "60", "private": "set-cookie, x-a", "s-maxage": "5", "no-cache": None}


def test_parse_cache_control_first_occurrence_wins() -> None:
    assert parse_cache_control("max-age=10, max-age=99")["max-age"] == "10"
    assert parse_cache_control("") == {}


# -- requests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head_are_cacheable(method: str) -> None:
    assert classify_request(method, [], DEFAULT) == "method"
    assert isinstance(classify_request("GET", [], DEFAULT), RequestFacts)
    assert facts("HEAD").head


def test_disabled_function_bypasses() -> None:
    assert classify_request("GET", [], FunctionCacheConfig(enabled=False)) == "disabled"


def test_client_no_store_bypasses() -> None:
    assert classify_request("GET", [(b"cache-control", b"no-store")], DEFAULT) == "no-store"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"cache-control", b"no-cache")],
        [(b"cache-control", b"max-age=0")],
        [(b"pragma", b"no-cache")],
    ],
)
def test_client_no_cache_revalidates(headers: list[tuple[bytes, bytes]]) -> None:
    assert facts(headers=headers).revalidate


def test_plain_request_does_not_revalidate() -> None:
    got = facts(headers=[(b"cache-control", b"max-age=60"), (b"accept", b"*/*")])
    assert not got.revalidate
    assert not got.conditional


@pytest.mark.parametrize("name", [b"if-none-match", b"if-modified-since", b"range"])
def test_conditional_requests_are_marked(name: bytes) -> None:
    assert facts(headers=[(name, b"x")]).conditional


def test_authorization_is_digested_into_the_key() -> None:
    alice = facts(headers=[(b"authorization", b"Bearer alice")])
    bob = facts(headers=[(b"authorization", b"Bearer bob")])
    assert alice.auth != bob.auth
    assert len(alice.auth) == 16
    assert b"alice" not in alice.auth
    assert facts().auth == b""


def test_authorization_opt_out_shares_the_key() -> None:
    alice = facts(headers=[(b"authorization", b"Bearer alice")], include_authorization=False)
    assert alice.auth == b""


def test_configured_vary_values_are_read() -> None:
    got = facts(
        headers=[(b"accept-language", b" fr "), (b"accept-language", b"en"), (b"x-other", b"1")],
        vary=["Accept-Language", "X-Missing"],
    )
    assert got.vary_values == (b"fr, en", None)


# -- keys ---------------------------------------------------------------------------------------------------


def test_query_pairs_are_sorted_by_name_and_repeats_keep_their_order() -> None:
    assert normalize_query("b=2&a=1") == normalize_query("a=1&b=2") == "a=1&b=2"
    assert normalize_query("a=2&b=1&a=1") == "a=2&a=1&b=1"
    assert normalize_query("a=1&a=2") != normalize_query("a=2&a=1")
    assert normalize_query("&a=1&&") == "a=1"
    assert normalize_query("") == ""


def test_percent_encoding_is_normalized_without_changing_meaning() -> None:
    assert normalize_component("%7euser%2dx") == "~user-x"
    assert normalize_component("a%2fb%3d") == "a%2Fb%3D"
    assert normalize_query("q=%2f&p=%41") == normalize_query("p=A&q=%2F")
    assert normalize_query("q=a%2Bb") != normalize_query("q=a+b")


def test_primary_key_holds_every_dimension() -> None:
    f = facts(headers=[(b"authorization", b"Bearer t")])
    key = primary_key("hello", 3, "/functions/v1/hello/%7ex", "b=1&a=2", f, "http://h")
    assert key == ("hello", 3, "http://h", "/functions/v1/hello/~x", "a=2&b=1", (), f.auth)
    assert key != primary_key("hello", 4, "/functions/v1/hello/%7ex", "b=1&a=2", f, "http://h")
    assert key != primary_key("hello", 3, "/functions/v1/hello/%7ex", "b=1&a=2", f, "http://evil.example")


# -- responses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [100, 206, 304, 400, 404, 500, 503])
def test_statuses_outside_2xx_3xx_and_partial_answers_bypass(status: int) -> None:
    assert response(status, (b"cache-control", b"max-age=60")) == "status"


@pytest.mark.parametrize("status", [200, 201, 204, 301, 302, 308])
def test_2xx_and_3xx_are_storable(status: int) -> None:
    assert isinstance(response(status, (b"cache-control", b"max-age=60")), Storable)


def test_s_maxage_wins_over_max_age() -> None:
    got = response(200, (b"cache-control", b"max-age=10, s-maxage=20"))
    assert isinstance(got, Storable)
    assert got.ttl == 20.0


def test_max_age_minus_the_responses_own_age() -> None:
    got = response(200, (b"Cache-Control", b"max-age=100"), (b"Age", b"30"))
    assert isinstance(got, Storable)
    assert (got.ttl, got.age) == (70.0, 30)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"cache-control", b"no-store, max-age=60")], "no-store"),
        ([(b"cache-control", b"private, max-age=60")], "private"),
        ([(b"cache-control", b'private="x", max-age=60')], "private"),
        ([(b"cache-control", b"no-cache, max-age=60")], "no-cache"),
        ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"s=1")], "set-cookie"),
        ([(b"cache-control", b"max-age=60"), (b"vary", b"accept, *")], "vary-star"),
        ([(b"cache-control", b"max-age=60"), (b"content-type", b"text/event-stream")], "event-stream"),
        ([(b"cache-control", b"max-age=soon")], "invalid-max-age"),
        ([(b"cache-control", b"max-age=0")], "no-ttl"),
        ([(b"cache-control", b"public")], "no-ttl"),
        ([], "no-ttl"),
        ([(b"cache-control", b"max-age=60"), (b"content-length", b"1001")], "too-large"),
    ],
)
def test_response_bypass_rules(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    assert response(200, *headers) == reason


def test_function_default_ttl_applies_without_max_age() -> None:
    config = FunctionCacheConfig.model_validate({"ttl": "30s"})
    got = response(200, config=config)
    assert isinstance(got, Storable)
    assert got.ttl == 30.0
    with_max_age = response(200, (b"cache-control", b"max-age=5"), config=config)
    assert isinstance(with_max_age, Storable)
    assert with_max_age.ttl == 5.0
    assert response(200, (b"cache-control", b"no-store"), config=config) == "no-store"


def test_ttl_is_capped_by_max_ttl() -> None:
    got = response(200, (b"cache-control", b"max-age=999999"))
    assert isinstance(got, Storable)
    assert got.ttl == 3600.0


def test_content_length_is_read_when_single_and_valid() -> None:
    sized = response(200, (b"cache-control", b"max-age=1"), (b"content-length", b"12"))
    assert isinstance(sized, Storable)
    assert sized.content_length == 12
    twice = response(200, (b"cache-control", b"max-age=1"), (b"content-length", b"1"), (b"content-length", b"1"))
    assert isinstance(twice, Storable)
    assert twice.content_length is None


def test_response_vary_excludes_configured_names_and_keyed_authorization() -> None:
    config = FunctionCacheConfig(vary=("accept-language",))
    got = response(
        200,
        (b"cache-control", b"max-age=1"),
        (b"vary", b"Accept-Language, Accept-Encoding"),
        (b"vary", b"authorization"),
        config=config,
    )
    assert isinstance(got, Storable)
    assert got.vary == (b"accept-encoding",)
    opted_out = response(
        200,
        (b"cache-control", b"max-age=1"),
        (b"vary", b"authorization"),
        config=FunctionCacheConfig(include_authorization=False),
    )
    assert isinstance(opted_out, Storable)
    assert opted_out.vary == (b"authorization",)


def test_stored_headers_drop_framing_and_our_own() -> None:
    kept = storable_headers(
        [
            (b"content-type", b"text/plain"),
            (b"content-length", b"5"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"age", b"3"),
            (b"x-mbworker-cache", b"MISS"),
            (b"etag", b'"x"'),
        ]
    )
    assert kept == [(b"content-type", b"text/plain"), (b"etag", b'"x"')]
