"""Through the real front door (serve_http): framing of hits, HEAD, and the cache headers on the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
from mbworker.worker.cache import FunctionCacheConfig, ResultCache, respond_through_cache
from mbworker.worker.deployments.manifest import CacheSettings as ManifestCacheSettings
from tests.cache.helpers import Function, cacheable, make_cache


class CachedApp:
    def __init__(self, cache: ResultCache, fn: Function) -> None:
        self.cache = cache
        self.fn = fn

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        await respond_through_cache(self.cache, request, responder, self.fn.invoke, slug="hello", version=1, timeout=5)

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None


@asynccontextmanager
async def running(app: CachedApp) -> AsyncIterator[HttpServer]:
    async with trio.open_nursery() as nursery:
        server: HttpServer = await nursery.start(serve_http, app, "127.0.0.1", 0)
        yield server
        nursery.cancel_scope.cancel()


async def fetch(
    port: int, method: str = "GET", target: str = "/functions/v1/hello"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on its own connection (Connection: close): status, headers (last value wins), body."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def test_miss_then_hit_then_head_on_the_wire() -> None:
    fn = Function(cacheable(60, b"hello", (b"etag", b'"v1"')))
    async with running(CachedApp(make_cache(), fn)) as server:
        status, headers, body = await fetch(server.port)
        assert (status, body, headers[b"x-mbworker-cache"]) == (200, b"hello", b"MISS")
        assert headers[b"content-length"] == b"5"
        status, headers, body = await fetch(server.port)
        assert (status, body, headers[b"x-mbworker-cache"]) == (200, b"hello", b"HIT")
        assert headers[b"age"] == b"0"
        assert headers[b"etag"] == b'"v1"'
        assert headers[b"content-length"] == b"5"
        status, headers, body = await fetch(server.port, "HEAD")
        assert (status, body, headers[b"x-mbworker-cache"]) == (200, b"", b"HIT")
        assert headers[b"content-length"] == b"5"
    assert fn.runs == 1


async def test_post_is_bypassed_on_the_wire() -> None:
    fn = Function()
    async with running(CachedApp(make_cache(), fn)) as server:
        for _ in range(2):
            status, headers, body = await fetch(server.port, "POST")
            assert (status, body, headers[b"x-mbworker-cache"]) == (200, b"hello", b"BYPASS")
    assert fn.runs == 2


def test_function_toml_cache_table_converts() -> None:
    """The deployment manifest's `[cache]` model feeds FunctionCacheConfig (convert once per deployment)."""
    manifest = ManifestCacheSettings.model_validate({"ttl": "30s", "vary": ["Accept-Language"]})
    config = FunctionCacheConfig.model_validate(manifest.model_dump())
    assert (config.ttl, config.vary_names, config.include_authorization) == (30.0, (b"accept-language",), True)
