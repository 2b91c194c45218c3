"""What an operator and a function author can configure about the result cache.

`CacheSettings` belongs to the daemon (the lead's config fills it from `MBWORKER_CACHE_MB` etc.).
`FunctionCacheConfig` is the `[cache]` table of a function's `function.toml`:

    [cache]
    ttl = "30s"                      # default TTL when the response has no max-age/s-maxage; off if absent
    vary = ["accept-language"]       # request headers that are always part of the key
    include_authorization = true     # false: one entry serves every caller (the response must not be per-user)
    enabled = true                   # false: never cache this function, whatever its responses say
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from `30`, `2.5`, `"30s"`, `"500ms"`, `"5m"`, `"1h30m"`, `"1d"`. Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a duration cannot be a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h30m)") from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class CacheSettings(BaseModel):
    """The daemon's cache: one per worker process, in memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    capacity_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """Total weight of all entries (body + headers + a fixed overhead each). 0 turns the cache off."""
    max_entry_bytes: int = Field(default=1024 * 1024, ge=0)
    """Bodies larger than this are never cached (a response streams past it without being kept)."""
    max_ttl_s: float = Field(default=86400.0, gt=0)
    """Upper bound on any entry's lifetime, whatever the response asks for."""
    policy: Literal["tiny_lfu", "lru"] = "tiny_lfu"
    """moka's admission/eviction policy. TinyLFU resists scans (see docs/benchmarks.md, "Result cache")."""

    @property
    def entry_cap(self) -> int:
        """The effective per-entry cap: never more than the whole capacity."""
        return min(self.max_entry_bytes, self.capacity_bytes)


class FunctionCacheConfig(BaseModel):
    """The `[cache]` table of function.toml. The defaults cache only what the response itself allows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    ttl: float | None = None
    """Seconds; used when a cacheable response carries neither s-maxage nor max-age. None or 0: no default."""
    vary: tuple[str, ...] = ()
    """Request header names (any case) whose values are always part of the key."""
    include_authorization: bool = True
    """Key on the request's Authorization header. Turn off only for responses that are the same for everyone."""
    l2: bool = False
    """Share results through the cluster's Redis (second level) too. Needs MBWORKER_REDIS_URL."""

    @field_validator("ttl", mode="before")
    @classmethod
    def _parse_ttl(cls, value: object) -> float | None:
        if value is None:
            return None
        return parse_duration(value) or None

    @field_validator("vary", mode="before")
    @classmethod
    def _normalize_vary(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError("vary is a list of header names")
        names = {str(v).strip().lower() for v in value}
        names.discard("")
        if "*" in names:
            raise ValueError('vary = ["*"] would make every request unique; set enabled = false instead')
        if "authorization" in names:
            raise ValueError("authorization is keyed by include_authorization, not vary")
        return tuple(sorted(names))

    @cached_property
    def vary_names(self) -> tuple[bytes, ...]:
        """`vary` as the lower-case byte strings request headers use (computed once: read on every lookup)."""
        return tuple(n.encode("latin-1") for n in self.vary)


DEFAULT_FUNCTION_CACHE = FunctionCacheConfig()
"""For functions whose function.toml has no `[cache]` table."""
