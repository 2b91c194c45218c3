"""What may be cached, for how long, and under which key. Pure: no I/O, no clock, no trio.

Request side (`classify_request`): only GET and HEAD; `Cache-Control: no-store` from the client bypasses,
`no-cache` / `max-age=0` / `Pragma: no-cache` revalidate (the function runs and the entry is refreshed).
Conditional and Range requests may be answered from the cache with the full response, but on a miss they are
not stored (the function may answer 304/206). HEAD shares GET's entry but never fills it (it has no body).

Response side (`classify_response`): 2xx/3xx except 206 and 304; `no-store`, `private`, `no-cache`,
`Set-Cookie`, `Vary: *` and `text/event-stream` bypass; the lifetime is `s-maxage`, else `max-age` (minus the
response's own `Age`), else the function's default `[cache] ttl`, else nothing is stored. A declared
`Content-Length` above the per-entry cap bypasses at once.

Keys (`primary_key`, `variant_key`): tuples `(slug, version, origin, path, query, vary_values, auth)`; the method
is left out because only GET-family requests are cached and HEAD shares GET's entry. `origin` is what the function
can see of the URL besides path and query (the caller computes it: the front door's `cache_origin`, the scheme and
Host of the function's `url`, from a trusted proxy with its X-Forwarded-Proto/-Host): a response built from it
(a redirect's Location, say) is never served to a request for another host. The path and query are
normalized (percent-encoding of unreserved characters decoded, other escapes upper-cased; query pairs stably
sorted by name, so repeated names keep their order). `vary_values` are the request's values for the function's
configured `vary` headers. `auth` is a 16-byte BLAKE2b digest of the Authorization header (so keys never hold
credentials), or b"" when absent or when the function opted out. Header names a response lists in `Vary` are
not known before the first response; they extend the primary key into a variant key (see store.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mbworker.worker.cache.settings import FunctionCacheConfig

Headers = list[tuple[bytes, bytes]]
"""Header pairs as raw bytes, lower-case names (the front door's and the runtimes' representation)."""

PrimaryKey = tuple[str, int, str, str, str, tuple[bytes | None, ...], bytes]
"""(slug, version, origin, normalized path, normalized query, configured vary values, authorization digest)."""
VariantKey = tuple[str, int, str, str, str, tuple[bytes | None, ...], bytes, tuple[bytes | None, ...]]
"""A primary key plus the request's values for the header names the response listed in `Vary`."""

RequestBypass = Literal["disabled", "method", "no-store"]
ResponseBypass = Literal[
    "status",
    "no-store",
    "private",
    "no-cache",
    "set-cookie",
    "vary-star",
    "event-stream",
    "invalid-max-age",
    "no-ttl",
    "too-large",
]

CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"range"})
_NOT_STORED = frozenset(
    {
        # hop-by-hop and framing: the front door writes its own
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        # recomputed on every hit
        b"age",
        b"x-mbworker-cache",
    }
)
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


# ---------------------------------------------------------------------------------------------------------------
# Cache-Control


def parse_cache_control(value: bytes | str) -> dict[str, str | None]:
    """Directives by lower-case name; quoted arguments unquoted. The first occurrence of a name wins."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    out: dict[str, str | None] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j].strip().lower()
        arg: str | None = None
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':
                j += 1
                chars: list[str] = []
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(text[j])
                    j += 1
                arg = "".join(chars)
                while j < n and text[j] != ",":
                    j += 1
            else:
                start = j
                while j < n and text[j] != ",":
                    j += 1
                arg = text[start:j].strip()
        if name and name not in out:
            out[name] = arg
        i = j
    return out


def _delta_seconds(arg: str | None) -> int | None:
    """RFC 9111 delta-seconds, or None when absent or malformed."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


# ---------------------------------------------------------------------------------------------------------------
# Requests


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs, paid on every lookup
class RequestFacts:
    """What the cache needs from a GET/HEAD request, read in one pass over its headers."""

    head: bool
    revalidate: bool
    """The client asked for a fresh answer: skip the lookup, run the function, refresh the entry."""
    conditional: bool
    """If-None-Match, If-Modified-Since, If-Match, If-Unmodified-Since or Range: may hit, never fills."""
    vary_values: tuple[bytes | None, ...]
    auth: bytes


def classify_request(
    method: str, headers: Sequence[tuple[bytes, bytes]], config: FunctionCacheConfig
) -> RequestFacts | RequestBypass:
    """The request's cache facts, or why it bypasses the cache entirely."""
    if not config.enabled:
        return "disabled"
    if method not in CACHEABLE_METHODS:
        return "method"
    cache_control: bytes | None = None
    pragma_no_cache = False
    conditional = False
    authorization: bytes | None = None
    vary_names = config.vary_names
    for name, value in headers:
        if name == b"cache-control":
            cache_control = value if cache_control is None else cache_control + b"," + value
        elif name == b"authorization":
            authorization = value
        elif name in _CONDITIONAL:
            conditional = True
        elif name == b"pragma" and b"no-cache" in value.lower():
            pragma_no_cache = True
    revalidate = False
    if cache_control is not None:
        directives = parse_cache_control(cache_control)
        if "no-store" in directives:
            return "no-store"
        revalidate = "no-cache" in directives or _delta_seconds(directives.get("max-age", "x")) == 0
    elif pragma_no_cache:
        revalidate = True
    auth = b""
    if authorization is not None and config.include_authorization:
        auth = _digest(authorization)
    return RequestFacts(
        method == "HEAD", revalidate, conditional, header_values(headers, vary_names) if vary_names else (), auth
    )


def _digest(secret: bytes) -> bytes:
    return hashlib.blake2b(secret, digest_size=16).digest()


def header_values(headers: Sequence[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> tuple[bytes | None, ...]:
    """For each of `names` (lower-case), the request's values joined by ", ", or None when absent.

    Authorization (listed by a response's Vary when the function opted out of keying it) becomes a digest.
    """
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in names:
            value = value.strip()
            found.setdefault(name, []).append(_digest(value) if name == b"authorization" else value)
    return tuple(b", ".join(found[n]) if n in found else None for n in names)


def normalize_component(text: str) -> str:
    """Decode escapes of unreserved characters and upper-case the others (RFC 3986 §6.2.2)."""
    if "%" not in text:
        return text

    def fix(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()

    return _PCT.sub(fix, text)


def normalize_query(query: str) -> str:
    """Pairs sorted by name (stable: a repeated name keeps its values' order), escapes normalized."""
    if not query:
        return ""
    normal = _query_memo.get(query)
    if normal is None:
        pairs = [normalize_component(p) for p in query.split("&") if p]
        if len(pairs) > 1:
            pairs.sort(key=_pair_name)
        normal = "&".join(pairs)
        if len(_query_memo) >= _QUERY_MEMO_SIZE:
            _query_memo.clear()  # crude bound; hot queries come straight back
        _query_memo[query] = normal
    return normal


def _pair_name(pair: str) -> str:
    return pair.partition("=")[0]


_QUERY_MEMO_SIZE = 4096
_query_memo: dict[str, str] = {}
"""Query strings repeat a lot on a cache's hot path; normalizing one costs more than a dict lookup."""


def primary_key(slug: str, version: int, path: str, query: str, facts: RequestFacts, origin: str = "") -> PrimaryKey:
    """The key of a request's responses. `ResultCache.lookup` builds the same tuple inline (keep them equal:
    tests/cache/test_store.py checks it)."""
    return (slug, version, origin, normalize_component(path), normalize_query(query), facts.vary_values, facts.auth)


def variant_key(primary: PrimaryKey, response_vary_values: tuple[bytes | None, ...]) -> VariantKey:
    return (*primary, response_vary_values)


# ---------------------------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True, slots=True)
class Storable:
    """A response head that may be stored, provided its body completes within the per-entry cap."""

    ttl: float
    vary: tuple[bytes, ...]
    """Header names from the response's Vary, minus those the function configures (already in the key)."""
    content_length: int | None
    """Declared body size; None means the body streams with no declared size."""
    age: int
    """The response's own Age header (an upstream cache's), added to the Age of every hit."""


def classify_response(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    config: FunctionCacheConfig,
    *,
    max_ttl: float,
    entry_cap: int,
) -> Storable | ResponseBypass:
    """Whether a function's response head may be stored, and for how long."""
    if not 200 <= status < 400 or status in (206, 304):
        return "status"
    cache_control: bytes | None = None
    vary: set[bytes] = set()
    content_length: int | None = None
    lengths = 0
    age = 0
    for name, value in headers:
        name = name.lower()
        if name == b"cache-control":
            cache_control = value if cache_control is None else cache_control + b"," + value
        elif name == b"set-cookie":
            return "set-cookie"
        elif name == b"vary":
            for item in value.split(b","):
                item = item.strip().lower()
                if item == b"*":
                    return "vary-star"
                if item:
                    vary.add(item)
        elif name == b"content-length":
            lengths += 1
            content_length = int(value) if value.strip().isdigit() else None
        elif name == b"content-type" and value.lower().startswith(b"text/event-stream"):
            return "event-stream"
        elif name == b"age" and value.strip().isdigit():
            age = int(value)
    if lengths != 1:
        content_length = None
    ttl: float | None = None
    if cache_control is not None:
        directives = parse_cache_control(cache_control)
        if "no-store" in directives:
            return "no-store"
        if "private" in directives:
            return "private"
        if "no-cache" in directives:
            return "no-cache"
        for directive in ("s-maxage", "max-age"):
            if directive in directives:
                seconds = _delta_seconds(directives[directive])
                if seconds is None:
                    return "invalid-max-age"
                ttl = float(seconds - age)
                break
    if ttl is None:
        ttl = config.ttl
    if ttl is None or ttl <= 0:
        return "no-ttl"
    if content_length is not None and content_length > entry_cap:
        return "too-large"
    vary.difference_update(config.vary_names)
    if config.include_authorization:
        vary.discard(b"authorization")  # already in the primary key
    return Storable(ttl=min(ttl, max_ttl), vary=tuple(sorted(vary)), content_length=content_length, age=age)


def storable_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The response headers kept in an entry: without framing, hop-by-hop, Age and our own cache header."""
    return [(k, v) for k, v in headers if k.lower() not in _NOT_STORED]
