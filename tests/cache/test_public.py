"""The cache package's public names."""

from __future__ import annotations

from mbworker.worker import cache


def test_public_names() -> None:
    assert sorted(cache.__all__) == sorted(
        [
            "BYPASS",
            "CACHE_HEADER",
            "DEFAULT_FUNCTION_CACHE",
            "HIT",
            "MISS",
            "Bypass",
            "CacheError",
            "CacheFlight",
            "CacheSettings",
            "CacheStatistics",
            "CachedResponse",
            "FlightFailed",
            "FlightTimeout",
            "FunctionCacheConfig",
            "Hit",
            "Miss",
            "Recorder",
            "RequestHead",
            "ResultCache",
            "parse_duration",
            "respond_through_cache",
        ]
    )
    for name in cache.__all__:
        assert getattr(cache, name) is not None
    assert issubclass(cache.FlightFailed, cache.CacheError)
    assert issubclass(cache.FlightTimeout, cache.CacheError)
