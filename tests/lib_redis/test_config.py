"""URL parsing (pure)."""

from __future__ import annotations

import pytest

from mbworker.lib.redis import RedisSettings, RedisUrlError, parse_redis_url


def test_plain_url_defaults() -> None:
    s = parse_redis_url("redis://localhost")
    assert s.addresses == (("localhost", 6379),)
    assert (s.db, s.username, s.password, s.tls, s.sentinel_service) == (0, None, None, False, None)


def test_credentials_db_and_options() -> None:
    s = parse_redis_url("rediss://us%40er:p%3Aw@h.example:6380/3?command_timeout=0.5&pool_size=4&ssl_cert_reqs=none")
    assert s.addresses == (("h.example", 6380),)
    assert (s.username, s.password, s.db, s.tls, s.tls_verify) == ("us@er", "p:w", 3, True, False)
    assert (s.command_timeout, s.pool_size) == (0.5, 4)
    assert "p:w" not in repr(s)


def test_bare_password_and_empty_user() -> None:
    assert parse_redis_url("redis://secret@h").password == "secret"
    s = parse_redis_url("redis://:secret@h")
    assert (s.username, s.password) == (None, "secret")


def test_sentinel_url() -> None:
    s = parse_redis_url("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/2?sentinel_password=sp")
    assert s.addresses == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (s.sentinel_service, s.db, s.password, s.sentinel_password) == ("mymaster", 2, "pw", "sp")


def test_overrides_win() -> None:
    s = parse_redis_url("redis://h?connect_timeout=9", connect_timeout=1.0)
    assert isinstance(s, RedisSettings)
    assert s.connect_timeout == 1.0


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "redis://",
        "redis://h:port",
        "redis://h/x",
        "redis://h/1/2",
        "redis://a,b",
        "redis+sentinel://s1",
        "redis://h?bogus=1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(RedisUrlError):
        parse_redis_url(url)


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        RedisSettings(pool_size=0)
