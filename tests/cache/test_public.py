"""The cache package's public names."""

from __future__ import annotations

from mbworker import worker


def test_public_names() -> None:
    assert sorted(worker.cache.__all__) == sorted(
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
    for name in worker.cache.__all__:
        assert getattr(worker.cache, name) is not None
    assert issubclass(worker.cache.FlightFailed, worker.cache.CacheError)
    assert issubclass(worker.cache.FlightTimeout, worker.cache.CacheError)
