"""The L1 result cache: function responses in moka (TinyLFU, per-entry TTL, bytes), with single flight.

Entry points: `ResultCache` (one per daemon), `respond_through_cache` (the functions handler's call),
`FunctionCacheConfig` (function.toml `[cache]`), `CacheSettings` (the daemon's settings).
"""

from mbworker.worker.cache.errors import CacheError, FlightFailed, FlightTimeout
from mbworker.worker.cache.respond import respond_through_cache
from mbworker.worker.cache.settings import DEFAULT_FUNCTION_CACHE, CacheSettings, FunctionCacheConfig, parse_duration
from mbworker.worker.cache.store import (
    BYPASS,
    CACHE_HEADER,
    HIT,
    MISS,
    Bypass,
    CachedResponse,
    CacheFlight,
    CacheStatistics,
    Hit,
    Miss,
    Recorder,
    RequestHead,
    ResultCache,
)

__all__ = [
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
