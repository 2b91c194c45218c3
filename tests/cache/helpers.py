"""Inputs for driving the cache: requests, a clock, a function that counts its runs, a responder that records.

These are not stand-ins for parts of mbworker: the cache's inputs are a request head, a way to run the
function and a place to write the answer, and these are the simplest real ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from mbworker.runtimes.api import InvocationResult
from mbworker.worker.cache import CacheSettings, ResultCache

Headers = list[tuple[bytes, bytes]]


@dataclass
class Req:
    method: str = "GET"
    path: str = "/functions/v1/hello"
    query: str = ""
    headers: Headers = field(default_factory=list)


class Clock:
    """A hand-moved monotonic clock for the entries' own expiry."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(capacity: int = 1 << 20, max_entry: int = 64 * 1024, clock: Clock | None = None) -> ResultCache:
    settings = CacheSettings(capacity_bytes=capacity, max_entry_bytes=max_entry)
    return ResultCache(settings, clock=clock) if clock is not None else ResultCache(settings)


def cacheable(max_age: int = 60, body: bytes = b"hello", *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (b"content-type", b"text/plain"),
        (b"cache-control", b"max-age=%d" % max_age),
        (b"content-length", b"%d" % len(body)),
        *extra,
    ]


class Function:
    """Answers with `status`, `headers` and `chunks`; counts its runs; can be held until `release` or fail."""

    def __init__(
        self,
        headers: Headers | None = None,
        chunks: list[bytes] | None = None,
        status: int = 200,
        *,
        hold: bool = False,
        error: Exception | None = None,
    ) -> None:
        self.chunks = [b"hello"] if chunks is None else chunks
        self.headers = cacheable(60, b"".join(self.chunks)) if headers is None else headers
        self.status = status
        self.error = error
        self.runs = 0
        self.released = trio.Event()
        if not hold:
            self.released.set()

    @asynccontextmanager
    async def invoke(self) -> AsyncIterator[InvocationResult]:
        self.runs += 1
        with trio.fail_after(10):
            await self.released.wait()
        if self.error is not None:
            raise self.error
        yield InvocationResult(self.status, list(self.headers), self._body())

    async def _body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await trio.lowlevel.checkpoint()
            yield chunk


class Recorded:
    """A Responder that keeps what it was told to write."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: Headers = []
        self.body = b""
        self.mode = ""
        self.ended = False

    @property
    def started(self) -> bool:
        return self.status is not None

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None:
        assert not self.started
        self.status, self.headers, self.body, self.mode, self.ended = status, headers, body, "send", True

    async def start(self, status: int, headers: Headers) -> None:
        assert not self.started
        self.status, self.headers, self.mode = status, headers, "stream"

    async def write(self, chunk: bytes) -> None:
        assert self.started
        assert not self.ended
        self.body += chunk

    async def end(self) -> None:
        self.ended = True

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None
