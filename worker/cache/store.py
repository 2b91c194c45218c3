"""`ResultCache`: the L1 cache of function responses — moka (TinyLFU, per-entry TTL, byte weigher) plus a
trio single flight.

Ownership: the daemon owns one `ResultCache` per process (no background task, nothing to close: moka does its
maintenance during cache calls). Entries are immutable `CachedResponse`s; callers must not mutate their header
lists. Use from one trio run only (moka is thread-safe, but the purge index and the flight table are not).

How a request goes through it (worker/cache/respond.py does all of this for the front door):

    decision = cache.lookup(request, slug=..., version=..., config=...)
    Hit    -> send decision.status, decision.headers(), decision.body
    Bypass -> run the function; label the response BYPASS
    Miss   -> async with cache.open_flight(decision, timeout=...) as flight:
                  leader:   run the function; rec = flight.record(status, headers); rec.write(chunk) for each
                            chunk; rec.finish() when the body completed
                  follower: hit = await flight.wait()  # a Hit, or None: run the function yourself (BYPASS)

Calling `lookup` and entering `open_flight` with no `await` in between guarantees that a request either finds
the entry or joins/leads the flight that is filling it.

Streaming and single flight: the leader's response head decides. Not storable (no-store, private, a status
that is not cached, a declared size above the per-entry cap, `text/event-stream`, ...): the followers are
released at once and run their own invocations. Storable with a declared Content-Length (`rec.buffered`): the
followers wait until the body is complete and get the entry (the leader should read the whole body — at most
the per-entry cap — before it answers, so that followers never wait for the leader's client). Storable without
a Content-Length: the followers are released at once (the body may stream for a long time) and the leader tees
the body into the cache while streaming it to its client, up to the per-entry cap; past the cap the tee is
abandoned and nothing is stored. A leader that fails fails its current followers (`FlightFailed`); a leader
that is cancelled releases them.

Who coalesces: followers wait only where waiting is likely to pay. A version coalesces once it has given a
storable response (or when its `[cache] ttl` says its responses are cacheable); before that, concurrent
identical requests each run (and the first storable answer is still stored): most functions never answer
anything cacheable, and waiting for a leader whose answer cannot be shared doubles the followers' latency
(four concurrent 3 s requests took 3, 6, 6 and 6 s). Per key, a response that could not be stored stops
coalescing for `_SOLO_S` (hit-for-miss, as Varnish does).

Purges: `purge(slug)` on every deploy, rollback and delete of that function (the lead's deployment watcher);
the version in every key already keeps other versions' entries from being served, the purge frees their memory
and drops entries a rollback would otherwise resurrect. A purge also invalidates the flights it concerns that
are still running (what they complete is handed to their followers but not stored). `mbworker cache purge
[SLUG]` maps to `purge(slug)`.

moka-py 0.5 gives everything needed: `Moka(capacity, weigher=..., eviction_listener=...)` bounds the total
weight (bytes here); `set(key, value, ttl=...)` sets a per-entry TTL (no cache-wide TTL is set, because a
cache-wide TTL would cap every entry's); `run_pending_tasks()` settles evictions. Entries also carry their own
expiry, checked on every hit with the injectable clock, so a hit is never older than its TTL even before moka
gets to it, and Age is computed from it. moka has no key iteration, so a purge index (slug → version → keys)
is kept in step through the eviction listener.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, cast

from moka_py import Moka

from mbworker.worker.cache.flight import Flight, SingleFlight
from mbworker.worker.cache.policy import (
    Headers,
    PrimaryKey,
    RequestFacts,
    Storable,
    classify_request,
    classify_response,
    header_values,
    normalize_component,
    normalize_query,
    primary_key,
    storable_headers,
    variant_key,
)
from mbworker.worker.cache.settings import DEFAULT_FUNCTION_CACHE, CacheSettings, FunctionCacheConfig

CACHE_HEADER = b"x-mbworker-cache"
HIT, MISS, BYPASS = b"HIT", b"MISS", b"BYPASS"

_ENTRY_OVERHEAD = 256
"""Bytes charged per entry on top of body and headers: the key, the objects, moka's own node."""
_HEADER_OVERHEAD = 16
_SOLO_S = 10.0
"""Hit-for-miss window: after a key's response could not be stored, its requests stop coalescing for this long."""
_SOLO_MAX = 4096
"""Keys remembered for hit-for-miss at most (the table is cleared when full: forgetting only costs coalescing)."""
_SHAREABLE_MAX = 4096
"""(slug, version) pairs remembered as having given a storable response (cleared when full, as `_solo`)."""


def _unlisted(flight: Flight[CachedResponse]) -> None:
    """The `forget` of a flight that is in no table (a hit-for-miss leader's): nothing to remove."""


Key = tuple[object, ...]


class RequestHead(Protocol):
    """What `lookup` reads from a request. `worker.http.types.HttpRequest` is one."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def headers(self) -> Headers: ...


@dataclass(frozen=True, slots=True, eq=False)
class CachedResponse:
    """A stored response. `headers` exclude framing, hop-by-hop, Age and x-mbworker-cache."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float
    expires_at: float
    initial_age: int
    """The function's own Age header, if any."""
    vary: tuple[bytes, ...]
    """Header names the response listed in Vary (beyond the function's configured ones)."""
    vary_values: tuple[bytes | None, ...]
    """The leader's request values for `vary`: followers with other values do not share this response."""
    weight: int


@dataclass(frozen=True, slots=True, eq=False)
class _VaryNode:
    """Stands at a primary key whose responses carry Vary: the variants live at `variant_key(...)`."""

    names: tuple[bytes, ...]
    expires_at: float
    weight: int


@dataclass(slots=True)
class Hit:
    """Answer from the cache: send `status`, `headers()` and `body`."""

    response: CachedResponse
    age: int
    head: bool

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def body(self) -> bytes:
        """The stored body; empty for HEAD (its headers still describe the GET)."""
        return b"" if self.head else self.response.body

    def headers(self) -> Headers:
        """The stored headers plus `Age` and `x-mbworker-cache: HIT` (and, for HEAD, the GET's Content-Length,
        which `Responder.send` keeps for a HEAD response). A new list each call."""
        headers = [*self.response.headers, (b"age", b"%d" % self.age), (CACHE_HEADER, HIT)]
        if self.head:
            headers.append((b"content-length", b"%d" % len(self.response.body)))
        return headers


@dataclass(frozen=True, slots=True)
class Miss:
    """Not in the cache: run the function through `ResultCache.open_flight(miss, ...)`."""

    key: PrimaryKey
    config: FunctionCacheConfig
    request_headers: Headers
    revalidate: bool
    epoch: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Bypass:
    """The cache takes no part: run the function and label the response BYPASS."""

    reason: str
    """disabled, method, no-store (from the client), head (a HEAD miss), conditional (a conditional or Range
    miss: the function may answer 304/206)."""


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot for metrics. Counters are totals since start."""

    hits: int
    """Lookups answered from the cache."""
    misses: int
    """Lookups that ran (or joined) a flight."""
    bypasses: int
    """Lookups the cache took no part in (by reason in `bypass_reasons`)."""
    coalesced: int
    """Misses answered by another request's invocation (single flight followers that got its response)."""
    stores: int
    """Responses inserted (moka may still refuse some for space: see `evictions`)."""
    not_stored: Mapping[str, int]
    """Responses that ran through a flight but were not stored, by reason (no-store, too-large, status, ...)."""
    bypass_reasons: Mapping[str, int]
    evictions: int
    """Entries removed, or refused admission, for space."""
    expirations: int
    """Entries removed by moka because their TTL passed."""
    entries: int
    """Entries held, including one small Vary node per path whose responses carry Vary."""
    bytes: int
    """Total weight held: bodies + headers + a fixed overhead per entry. At most `capacity_bytes` once settled."""
    capacity_bytes: int
    flights: int
    """Flights running now."""


@dataclass(slots=True)
class _Counters:
    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    coalesced: int = 0
    stores: int = 0
    evictions: int = 0
    expirations: int = 0
    not_stored: dict[str, int] = field(default_factory=dict)
    bypass_reasons: dict[str, int] = field(default_factory=dict)


class ResultCache:
    """The per-process L1 cache of function responses. See the module docstring for the request flow."""

    def __init__(self, settings: CacheSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._cap = settings.entry_cap
        self._max_ttl = settings.max_ttl_s
        self._flights: SingleFlight[PrimaryKey, CachedResponse] = SingleFlight()
        self._solo: dict[PrimaryKey, float] = {}
        """Hit-for-miss: key → until when its requests run without a flight (its last response was not
        storable, so followers would only wait for the leader's head and then run the function anyway)."""
        self._shareable: set[tuple[str, int]] = set()
        """Versions that have given a storable response: only their requests coalesce (module docstring)."""
        self._index: _Index = {}
        self._epoch = 0
        """Bumped by `purge()`; with `_slug_epochs` (bumped by purges of one slug) it tells a response that
        started before a purge, which must not be stored."""
        self._slug_epochs: dict[str, int] = {}
        self._n = _Counters()
        self._moka: Moka[Key, CachedResponse | _VaryNode] | None = None
        if settings.capacity_bytes > 0:
            self._moka = Moka(
                settings.capacity_bytes,
                policy=settings.policy,
                weigher=_weigh,
                # not a bound method: moka (a Rust object the GC cannot traverse) would keep this cache alive
                eviction_listener=_Removals(self._index, self._n),
            )

    # -- lookups --------------------------------------------------------------------------------------------

    def lookup(
        self,
        request: RequestHead,
        *,
        slug: str,
        version: int,
        config: FunctionCacheConfig = DEFAULT_FUNCTION_CACHE,
        origin: str = "",
    ) -> Hit | Miss | Bypass:
        """Find the response for `request` to version `version` of function `slug`. Never blocks. `origin`: what
        the function can see of the URL besides path and query (policy.py's keys), part of the key."""
        moka = self._moka
        facts = classify_request(request.method, request.headers, config) if moka is not None else "disabled"
        if not isinstance(facts, RequestFacts):
            return self._bypass(facts)
        # primary_key(), inlined with its fast paths: this runs on every cache hit
        path, query = request.path, request.query
        key = (
            slug,
            version,
            origin,
            path if "%" not in path else normalize_component(path),
            normalize_query(query) if query else "",
            facts.vary_values,
            facts.auth,
        )
        if not facts.revalidate:
            assert moka is not None
            found = moka.get(key)
            if type(found) is _VaryNode:
                found = moka.get(variant_key(key, header_values(request.headers, found.names)))
            if found is not None:
                assert type(found) is CachedResponse
                now = self._clock()
                if found.expires_at > now:
                    self._n.hits += 1
                    return Hit(found, int(now - found.stored_at) + found.initial_age, facts.head)
        if facts.head:
            return self._bypass("head")
        if facts.conditional:
            return self._bypass("conditional")
        self._n.misses += 1
        return Miss(key, config, request.headers, facts.revalidate, self._epoch_of(slug))

    def peek(
        self,
        request: RequestHead,
        *,
        slug: str,
        version: int,
        config: FunctionCacheConfig = DEFAULT_FUNCTION_CACHE,
        origin: str = "",
    ) -> CachedResponse | None:
        """The fresh entry `request` would hit, without counting a hit (to share it with the L2)."""
        moka = self._moka
        facts = classify_request("GET", request.headers, config) if moka is not None else "disabled"
        if not isinstance(facts, RequestFacts) or moka is None:
            return None
        key = primary_key(slug, version, request.path, request.query, facts, origin)
        found = moka.get(key)
        if type(found) is _VaryNode:
            found = moka.get(variant_key(key, header_values(request.headers, found.names)))
        if type(found) is CachedResponse and found.expires_at > self._clock():
            return found
        return None

    def now(self) -> float:
        """The cache's clock (entries' stored_at / expires_at are on it)."""
        return self._clock()

    def _epoch_of(self, slug: str) -> tuple[int, int]:
        return self._epoch, self._slug_epochs.get(slug, 0)

    def _bypass(self, reason: str) -> Bypass:
        self._n.bypasses += 1
        self._n.bypass_reasons[reason] = self._n.bypass_reasons.get(reason, 0) + 1
        return Bypass(reason)

    # -- filling --------------------------------------------------------------------------------------------

    def open_flight(self, miss: Miss, *, timeout: float) -> CacheFlight:
        """Lead or follow the flight for `miss.key`. An async context manager; `timeout` bounds a follower's
        wait. Enter it right after `lookup`, with no `await` in between."""
        key = miss.key
        if self.runs_alone(miss):  # a leader of its own, unlisted: nobody follows it (its response may be stored)
            return CacheFlight(self, miss, Flight(key, _unlisted), True, timeout)
        self._solo.pop(key, None)  # its hit-for-miss window, if any, has passed
        flight, leader = self._flights.join(key)
        return CacheFlight(self, miss, flight, leader, timeout)

    def runs_alone(self, miss: Miss) -> bool:
        """Whether `open_flight(miss)` would make this request the leader of a flight nobody can join (nothing of
        its version was storable yet, or its key is in its hit-for-miss window). Then `record_alone` does the same
        bookkeeping with no flight to open, enter or settle: the common case of a function that does not cache."""
        key = miss.key
        if miss.config.ttl is None and (key[0], key[1]) not in self._shareable:
            return True
        until = self._solo.get(key)
        return until is not None and until > self._clock()

    def record_alone(self, miss: Miss, status: int, headers: Headers, body: bytes | None = None) -> Recorder:
        """`CacheFlight.record` for a miss that `runs_alone`. If the body then fails, `abandon()` the recorder."""
        return _record(self, miss, Flight(miss.key, _unlisted), status, headers, body)

    def store(self, miss: Miss, status: int, headers: Headers, body: bytes) -> CachedResponse | None:
        """Store a complete response for `miss` if the rules allow it (no flight involved). Returns the entry."""
        verdict = self._classify(miss, status, headers)
        if not isinstance(verdict, Storable):
            return None
        if verdict.content_length is not None and verdict.content_length != len(body):
            self._not_stored("length-mismatch")
            return None
        return self._insert(miss, verdict, status, headers, body)

    def _classify(self, miss: Miss, status: int, headers: Headers) -> Storable | str:
        verdict = classify_response(status, headers, miss.config, max_ttl=self._max_ttl, entry_cap=self._cap)
        if not isinstance(verdict, Storable):
            self._not_stored(verdict)
        return verdict

    def _not_stored(self, reason: str) -> None:
        self._n.not_stored[reason] = self._n.not_stored.get(reason, 0) + 1

    def _insert(
        self, miss: Miss, verdict: Storable, status: int, headers: Headers, body: bytes
    ) -> CachedResponse | None:
        """Make the entry; insert it unless a purge happened since the lookup. None only when too large."""
        if len(body) > self._cap:
            self._not_stored("too-large")
            return None
        now = self._clock()
        kept = storable_headers(headers)
        vary_values = header_values(miss.request_headers, verdict.vary) if verdict.vary else ()
        weight = (
            _ENTRY_OVERHEAD
            + len(body)
            + len(miss.key[2])
            + len(miss.key[3])
            + len(miss.key[4])
            + sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in kept)
        )
        entry = CachedResponse(
            status=status,
            headers=kept,
            body=body,
            stored_at=now,
            expires_at=now + verdict.ttl,
            initial_age=verdict.age,
            vary=verdict.vary,
            vary_values=vary_values,
            weight=weight,
        )
        moka = self._moka
        if moka is None or miss.epoch != self._epoch_of(miss.key[0]):
            self._not_stored("purged")
            return entry
        if verdict.vary:
            node = moka.get(miss.key)
            node_ttl = verdict.ttl
            if type(node) is _VaryNode and node.names == verdict.vary:
                node_ttl = max(node_ttl, node.expires_at - now)
            self._set(miss.key, _VaryNode(verdict.vary, now + node_ttl, _ENTRY_OVERHEAD), node_ttl)
            self._set(variant_key(miss.key, vary_values), entry, verdict.ttl)
        else:
            self._set(miss.key, entry, verdict.ttl)
        self._n.stores += 1
        return entry

    def _set(self, key: Key, value: CachedResponse | _VaryNode, ttl: float) -> None:
        assert self._moka is not None
        slug, version = cast(str, key[0]), cast(int, key[1])
        self._index.setdefault(slug, {}).setdefault(version, {})[key] = value
        self._moka.set(key, value, ttl=ttl)

    # -- purges and statistics ------------------------------------------------------------------------------

    def purge(self, slug: str | None = None) -> int:
        """Drop every entry of `slug` (all versions), or everything. Returns how many entries were dropped."""
        if slug is None:
            self._epoch += 1
            dropped = sum(len(keys) for versions in self._index.values() for keys in versions.values())
            self._index.clear()
            self._flights.detach(lambda _key: True)
            if self._moka is not None:
                self._moka.clear()
                self._moka.run_pending_tasks()
            return dropped
        self._slug_epochs[slug] = self._slug_epochs.get(slug, 0) + 1
        self._flights.detach(lambda key: key[0] == slug)
        return self._drop(self._index.pop(slug, {}).values())

    def purge_version(self, slug: str, version: int) -> int:
        """Drop the entries of one version of `slug` (e.g. a retired version). Returns how many."""
        self._slug_epochs[slug] = self._slug_epochs.get(slug, 0) + 1
        self._flights.detach(lambda key: key[0] == slug and key[1] == version)
        versions = self._index.get(slug)
        if versions is None:
            return 0
        keys = versions.pop(version, None)
        if not versions:
            self._index.pop(slug, None)
        return self._drop([keys] if keys else [])

    def _drop(self, groups: Iterable[dict[Key, object]]) -> int:
        dropped = 0
        moka = self._moka
        for keys in groups:
            for key in keys:
                dropped += 1
                if moka is not None:
                    moka.remove(key)
        return dropped

    def statistics(self) -> CacheStatistics:
        """Settles moka's pending evictions first, so `entries` and `bytes` are exact."""
        entries = size = 0
        if self._moka is not None:
            self._moka.run_pending_tasks()
            entries, size = self._moka.count(), self._moka.weighted_size()
        n = self._n
        return CacheStatistics(
            hits=n.hits,
            misses=n.misses,
            bypasses=n.bypasses,
            coalesced=n.coalesced,
            stores=n.stores,
            not_stored=dict(n.not_stored),
            bypass_reasons=dict(n.bypass_reasons),
            evictions=n.evictions,
            expirations=n.expirations,
            entries=entries,
            bytes=size,
            capacity_bytes=self.settings.capacity_bytes,
            flights=len(self._flights),
        )


def _weigh(_key: Key, value: CachedResponse | _VaryNode) -> int:
    return value.weight


_Index = dict[str, dict[int, dict[Key, object]]]
"""slug → version → key → value: what a purge must remove (moka cannot list its keys)."""


class _Removals:
    """moka's eviction listener: counts evictions and expirations and keeps the purge index in step.

    Called by moka on the calling thread during cache calls; must not raise.
    """

    __slots__ = ("_counters", "_index")

    def __init__(self, index: _Index, counters: _Counters) -> None:
        self._index = index
        self._counters = counters

    def __call__(self, key: Key, value: object, cause: str) -> None:
        if cause == "replaced":
            return  # the key holds a new value, already indexed
        if cause == "size":
            self._counters.evictions += 1
        elif cause == "expired":
            self._counters.expirations += 1
        slug, version = cast(str, key[0]), cast(int, key[1])
        versions = self._index.get(slug)
        if versions is None:
            return
        keys = versions.get(version)
        if keys is not None and keys.get(key) is value:  # not a newer value stored under the same key
            del keys[key]
            if not keys:
                del versions[version]
                if not versions:
                    del self._index[slug]


class CacheFlight:
    """One request's part in the flight for its key (see `ResultCache.open_flight`).

    Leader (`leader` is True): run the function, then `record(status, headers)` and feed the recorder. Leaving
    the context resolves the flight if the recorder did not: an error fails the followers, a cancellation or a
    clean exit releases them. Follower: `await wait()`.
    """

    __slots__ = ("_cache", "_flight", "_miss", "_recorder", "_timeout", "leader")

    def __init__(
        self, cache: ResultCache, miss: Miss, flight: Flight[CachedResponse], leader: bool, timeout: float
    ) -> None:
        self._cache = cache
        self._miss = miss
        self._flight = flight
        self._timeout = timeout
        self._recorder: Recorder | None = None
        self.leader = leader

    async def __aenter__(self) -> CacheFlight:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.leader:
            self._flight.settle(exc)  # first: an error must reach the followers as an error
            if self._recorder is not None:
                self._recorder.abandon()

    async def wait(self) -> Hit | None:
        """Follower: the leader's response as a Hit, or None — then run the function yourself and label the
        response BYPASS. Raises `FlightFailed` (the leader's error is its `cause`) or `FlightTimeout`."""
        if self.leader:
            raise RuntimeError("the leader runs the function; only followers wait")
        entry = await self._flight.wait(self._timeout)
        if entry is None:
            return None
        if entry.vary and header_values(self._miss.request_headers, entry.vary) != entry.vary_values:
            return None  # the response varies on a header this request has a different value for
        cache = self._cache
        cache._n.coalesced += 1
        age = int(cache._clock() - entry.stored_at) + entry.initial_age
        return Hit(entry, max(age, 0), head=False)

    def record(self, status: int, headers: Headers, body: bytes | None = None) -> Recorder:
        """Leader: the function answered this head. Returns the recorder to feed the body into; releases the
        followers right away if they cannot share the response.

        `body`: the whole body when the runtime already holds it (`InvocationResult.complete_body`). Then it is
        recorded and finished here: followers get the entry at once, even without a declared length."""
        if not self.leader:
            raise RuntimeError("only the leader records")
        recorder = _record(self._cache, self._miss, self._flight, status, headers, body)
        self._recorder = recorder
        return recorder


def _record(
    cache: ResultCache, miss: Miss, flight: Flight[CachedResponse], status: int, headers: Headers, body: bytes | None
) -> Recorder:
    """The leader's bookkeeping for a response head (see `CacheFlight.record`), on `flight` listed or not."""
    verdict = cache._classify(miss, status, headers)
    if isinstance(verdict, Storable):
        cache._solo.pop(miss.key, None)
        key = miss.key
        if (key[0], key[1]) not in cache._shareable:
            if len(cache._shareable) >= _SHAREABLE_MAX:
                cache._shareable.clear()
            cache._shareable.add((key[0], key[1]))
    else:
        if len(cache._solo) >= _SOLO_MAX:
            cache._solo.clear()
        cache._solo[miss.key] = cache._clock() + _SOLO_S
    recorder = Recorder(cache, miss, flight, verdict, status, headers)
    if body is not None and recorder.storable:
        recorder.write(body)
        recorder.finish()  # publishes the entry (or None when it is not stored)
    elif not recorder.buffered:
        flight.publish(None)  # nothing to share, or a body of unknown length: don't keep them
    return recorder


class Recorder:
    """Collects the leader's response body for the cache, up to the per-entry cap.

    `storable`: the head allows storing (label the response MISS; else BYPASS). `buffered`: storable with a
    declared length — followers wait for `finish()`, so read the whole body before answering your client.
    `recording`: still collecting (False once abandoned or finished).
    """

    __slots__ = ("_cache", "_chunks", "_flight", "_headers", "_miss", "_size", "_status", "_verdict")

    def __init__(
        self,
        cache: ResultCache,
        miss: Miss,
        flight: Flight[CachedResponse],
        verdict: Storable | str,
        status: int,
        headers: Headers,
    ) -> None:
        self._cache = cache
        self._miss = miss
        self._flight = flight
        self._verdict = verdict
        self._status = status
        self._headers = headers
        self._size = 0
        self._chunks: list[bytes] | None = [] if isinstance(verdict, Storable) else None

    @property
    def storable(self) -> bool:
        return isinstance(self._verdict, Storable)

    @property
    def buffered(self) -> bool:
        return isinstance(self._verdict, Storable) and self._verdict.content_length is not None

    @property
    def label(self) -> bytes:
        """The x-mbworker-cache value for the leader's own response."""
        return MISS if isinstance(self._verdict, Storable) else BYPASS

    @property
    def recording(self) -> bool:
        return self._chunks is not None

    def write(self, chunk: bytes) -> None:
        """Add a body chunk; past the per-entry cap the recording is abandoned (followers released)."""
        chunks = self._chunks
        if chunks is None:
            return
        self._size += len(chunk)
        if self._size > self._cache._cap:
            self._cache._not_stored("too-large")
            self.abandon()
            return
        chunks.append(chunk)

    def finish(self) -> CachedResponse | None:
        """The body is complete: store it and hand it to the followers. Returns the entry, or None."""
        chunks, verdict = self._chunks, self._verdict
        if chunks is None or not isinstance(verdict, Storable):
            return None
        self._chunks = None
        body = b"".join(chunks)
        entry: CachedResponse | None = None
        if verdict.content_length is not None and verdict.content_length != len(body):
            self._cache._not_stored("length-mismatch")
        else:
            entry = self._cache._insert(self._miss, verdict, self._status, self._headers, body)
        self._flight.publish(entry)
        return entry

    def abandon(self) -> None:
        """Stop recording; followers (if still waiting) run their own invocations."""
        if self._chunks is not None:
            self._chunks = None
            self._flight.publish(None)
