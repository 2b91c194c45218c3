"""Settings: function.toml's [cache] table and the daemon's cache settings."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import ValidationError

from mbworker.worker.cache.settings import CacheSettings, FunctionCacheConfig, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0), ("1d", 86400.0), ("2.5", 2.5), (7, 7.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "30x", "5m junk", "-1", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_function_toml_cache_table() -> None:
    text = """
[cache]
ttl = "30s"
vary = ["Accept-Language", "accept-language", "X-Tenant"]
include_authorization = false
"""
    table = tomllib.loads(text)["cache"]
    config = FunctionCacheConfig.model_validate(table)
    assert config.ttl == 30.0
    assert config.vary == ("accept-language", "x-tenant")
    assert config.vary_names == (b"accept-language", b"x-tenant")
    assert config.include_authorization is False


def test_function_cache_defaults_are_off() -> None:
    config = FunctionCacheConfig()
    assert (config.enabled, config.ttl, config.vary, config.include_authorization) == (True, None, (), True)
    assert FunctionCacheConfig.model_validate({"ttl": "0s"}).ttl is None


@pytest.mark.parametrize("table", [{"vary": ["*"]}, {"vary": ["Authorization"]}, {"ttl": "later"}, {"tll": 1}])
def test_function_cache_rejects_mistakes(table: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FunctionCacheConfig.model_validate(table)


def test_entry_cap_never_exceeds_capacity() -> None:
    assert CacheSettings().capacity_bytes == 64 * 1024 * 1024
    assert CacheSettings(capacity_bytes=1000, max_entry_bytes=5000).entry_cap == 1000
