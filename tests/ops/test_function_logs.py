"""worker.function_logs: the ring is bounded, followers never block the producer, the admin handler and the CLI
reader work through a real HTTP server."""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
from mbworker.runtimes.api import FunctionVersion
from mbworker.worker.function_logs import (
    TRUNCATED,
    Dropped,
    Follower,
    FunctionLogs,
    LogLine,
    TooManyFollowers,
    parse_duration,
    print_logs,
    serve_logs,
)
from mbworker.worker.logs import JsonFormatter

TOKEN = "t0ken"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def fill(buffer: FunctionLogs, slug: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        buffer.record(slug, 1, f"exec-{i}", "stdout", f"line {i}")


def texts(items: list[LogLine] | list[LogLine | Dropped]) -> list[str]:
    return [x.line if isinstance(x, LogLine) else f"dropped {x.count}" for x in items]


def test_ring_keeps_the_last_lines_per_function() -> None:
    buffer = FunctionLogs(lines=5)
    fill(buffer, "a", 12)
    fill(buffer, "b", 2)
    assert texts(buffer.recent("a")) == [f"line {i}" for i in range(7, 12)]
    assert texts(buffer.recent("b")) == ["line 0", "line 1"]
    assert buffer.recent("nobody") == []
    stats = buffer.statistics()
    assert (stats.functions, stats.lines, stats.recorded) == (2, 7, 14)


def test_ring_is_bounded_in_characters() -> None:
    buffer = FunctionLogs(lines=1000, max_chars=100, max_line=60)
    for i in range(10):
        buffer.record("a", 1, "e", "stderr", f"{i}" * 30)
    kept = buffer.recent("a")
    assert sum(len(x.line) for x in kept) <= 100
    assert [x.line[0] for x in kept] == ["7", "8", "9"]
    buffer.record("a", 1, "e", "stderr", "x" * 500)  # one oversized line is cut, and kept alone
    assert buffer.recent("a")[-1].line == "x" * 60 + TRUNCATED


def test_long_lines_are_truncated_at_10000_characters() -> None:
    buffer = FunctionLogs()
    buffer.record("a", 3, "e", "stdout", "y" * 25_000)
    buffer.record("a", 3, "e", "stdout", "z" * 10_000)
    long, exact = buffer.recent("a")
    assert long.line == "y" * 10_000 + TRUNCATED
    assert exact.line == "z" * 10_000
    assert buffer.statistics().truncated == 1


def test_recent_since_and_limit() -> None:
    clock = Clock()
    buffer = FunctionLogs(clock=clock)
    fill(buffer, "a", 3)  # at t0
    clock.now += 600
    fill(buffer, "a", 2, start=3)  # at t0 + 10 min
    assert texts(buffer.recent("a", since_s=60)) == ["line 3", "line 4"]
    assert texts(buffer.recent("a", since_s=601)) == [f"line {i}" for i in range(5)]
    assert texts(buffer.recent("a", limit=2)) == ["line 3", "line 4"]
    assert texts(buffer.recent("a", since_s=601, limit=1)) == ["line 4"]
    assert buffer.recent("a", limit=0) == []


def test_parse_duration() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("30s") == 30
    assert parse_duration("1.5h") == 5400
    assert parse_duration("2d") == 172800
    assert parse_duration("250ms") == 0.25
    assert parse_duration("45") == 45
    for bad in ("", "m", "10 minutes", "-5s"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


def test_on_log_records_and_logs_json(caplog: pytest.LogCaptureFixture) -> None:
    buffer = FunctionLogs()
    fn = FunctionVersion(slug="hello", version=7, runtime="deno", bundle_dir=Path("."), entrypoint="index.ts")
    with caplog.at_level("INFO", logger="mbworker.function"):
        buffer.on_log(fn, "exec-1", "stderr", "something broke")
    (line,) = buffer.recent("hello")
    assert (line.function, line.version, line.execution_id, line.stream) == ("hello", 7, "exec-1", "stderr")
    (record,) = [r for r in caplog.records if r.name == "mbworker.function"]
    assert record.getMessage() == "something broke"
    assert record.__dict__["function"] == "hello"


async def test_follow_gets_backlog_then_new_lines_once() -> None:
    buffer = FunctionLogs()
    fill(buffer, "a", 3)
    async with buffer.follow("a", limit=2) as follower:
        assert texts(follower.backlog) == ["line 1", "line 2"]
        fill(buffer, "a", 2, start=3)
        fill(buffer, "other", 1)
        got = [await follower.receive(), await follower.receive()]
        assert texts(got) == ["line 3", "line 4"]
        with pytest.raises(trio.WouldBlock):
            follower.receive_nowait()
        assert buffer.statistics().followers == 1
    assert buffer.statistics().followers == 0


async def test_slow_follower_drops_lines_without_blocking_the_producer() -> None:
    buffer = FunctionLogs(follower_buffer=3)
    async with buffer.follow("a") as slow, buffer.follow("a") as fast:
        for i in range(10):
            buffer.record("a", 1, "e", "stdout", f"line {i}")  # synchronous: it cannot wait for anyone
            if i < 9:
                assert texts([fast.receive_nowait()]) == [f"line {i}"]
        assert texts([fast.receive_nowait()]) == ["line 9"]
        got = [slow.receive_nowait() for _ in range(3)]  # the slow reader catches up a little...
        buffer.record("a", 1, "e", "stdout", "line 10")  # ...so the marker and the next line fit
        got += [slow.receive_nowait() for _ in range(2)]
        assert texts(got) == ["line 0", "line 1", "line 2", "dropped 7", "line 10"]
        assert isinstance(got[3], Dropped)
        assert slow.dropped_total == 7
        assert fast.dropped_total == 0
    assert buffer.statistics().dropped == 7


async def test_followers_are_bounded() -> None:
    buffer = FunctionLogs(max_followers=1)
    async with buffer.follow("a"):
        with pytest.raises(TooManyFollowers):
            async with buffer.follow("a"):
                pass  # pragma: no cover
        async with buffer.follow("b"):
            pass


def test_forget_drops_lines() -> None:
    buffer = FunctionLogs()
    fill(buffer, "a", 3)
    buffer.forget("a")
    assert buffer.recent("a") == []
    assert buffer.statistics().functions == 0


# -- through a real HTTP server -----------------------------------------------------------------------------


class WatchedLogs(FunctionLogs):
    """Sets `attached` when a follower attaches (so tests wait for it instead of sleeping)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.attached = trio.Event()

    @asynccontextmanager
    async def follow(
        self, slug: str, *, since_s: float | None = None, limit: int | None = None
    ) -> AsyncIterator[Follower]:
        async with super().follow(slug, since_s=since_s, limit=limit) as follower:
            self.attached.set()
            yield follower


class LogsApp:
    """The route the admin app will have: /admin/v1/functions/{slug}/logs behind the bearer token."""

    def __init__(self, buffer: FunctionLogs, **kwargs: object) -> None:
        self.buffer = buffer
        self.kwargs = kwargs
        self.handled = trio.Event()

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        try:
            if request.header(b"authorization") != f"Bearer {TOKEN}".encode():
                await responder.send(401, [(b"content-type", b"application/json")], b'{"code":"UNAUTHORIZED"}')
                return
            slug = request.path.split("/")[4]
            await serve_logs(request, responder, slug, self.buffer, **self.kwargs)  # type: ignore[arg-type]
        finally:
            self.handled.set()

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None


@asynccontextmanager
async def running(app: LogsApp) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        server: HttpServer = await nursery.start(serve_http, app, "127.0.0.1", 0)
        yield f"http://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def cli(
    url: str, slug: str, *, follow: bool = False, since: str | None = None, token: str = TOKEN
) -> tuple[int, str]:
    out = io.StringIO()
    run = functools.partial(print_logs, url, token, slug, follow, since, out=out)
    rc = await trio.to_thread.run_sync(run)
    return rc, out.getvalue()


async def test_recent_logs_through_http_and_cli() -> None:
    buffer = FunctionLogs()
    fill(buffer, "hello", 3)
    async with running(LogsApp(buffer, exists=lambda slug: slug == "hello")) as url:
        rc, out = await cli(url, "hello", since="10m")
        assert rc == 0
        lines = out.splitlines()
        assert len(lines) == 3
        assert lines[0].endswith("line 0")
        assert "stdout" in lines[0]
        assert "v1" in lines[0]

        out_json = io.StringIO()
        run = functools.partial(print_logs, url, TOKEN, "hello", False, None, limit=1, json_output=True, out=out_json)
        assert await trio.to_thread.run_sync(run) == 0
        (obj,) = [json.loads(x) for x in out_json.getvalue().splitlines()]
        assert obj["msg"] == "line 2"
        assert obj["execution_id"] == "exec-2"
        assert set(obj) == {"time", "function", "version", "execution_id", "stream", "msg"}

        assert (await cli(url, "missing"))[0] == 1  # 404 from exists()
        assert (await cli(url, "hello", token="wrong"))[0] == 1  # 401
        assert (await cli(url, "hello", since="ten minutes"))[0] == 2  # refused before any request


async def test_bad_query_is_a_400() -> None:
    buffer = FunctionLogs()
    async with running(LogsApp(buffer)) as url, trio.open_nursery():
        import httpx

        def get() -> httpx.Response:
            with httpx.Client(trust_env=False) as client:
                return client.get(
                    f"{url}/admin/v1/functions/a/logs?since=soon", headers={"authorization": f"Bearer {TOKEN}"}
                )

        response = await trio.to_thread.run_sync(get)
        assert response.status_code == 400
        assert response.json()["code"] == "BAD_REQUEST"


async def test_follow_streams_new_lines_until_told_to_stop() -> None:
    buffer = WatchedLogs()
    fill(buffer, "hello", 2)
    stop = trio.Event()
    async with running(LogsApp(buffer, until=stop)) as url, trio.open_nursery() as nursery:
        result: list[tuple[int, str]] = []

        async def follow() -> None:
            result.append(await cli(url, "hello", follow=True))

        nursery.start_soon(follow)
        with trio.fail_after(10):
            await buffer.attached.wait()
        fill(buffer, "hello", 3, start=2)
        stop.set()  # the daemon's draining event: the stream flushes and ends cleanly
    rc, out = result[0]
    assert rc == 0
    assert [line.rsplit(" ", 2)[-2:] for line in out.splitlines()] == [["line", str(i)] for i in range(5)]
    assert buffer.statistics().followers == 0


async def test_follow_ends_when_the_client_goes_away() -> None:
    buffer = WatchedLogs()
    app = LogsApp(buffer, heartbeat_s=0.02)
    async with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = (
            f"GET /admin/v1/functions/a/logs?follow=1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        with trio.fail_after(10):
            head = await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 200")
            await buffer.attached.wait()
            await stream.aclose()
            await app.handled.wait()  # heartbeats hit the closed socket: the handler returns
    assert buffer.statistics().followers == 0


async def test_too_many_followers_is_a_429() -> None:
    buffer = FunctionLogs(max_followers=0)
    async with running(LogsApp(buffer)) as url:
        rc, _ = await cli(url, "a", follow=True)
        assert rc == 1


def test_json_lines_carry_every_extra_field() -> None:
    """Runtime events log their data as `extra=` (which function, its pid, how long the boot took): all of it must
    reach the JSON line, not only the function labels; values JSON cannot hold are written as strings."""
    record = logging.LogRecord("runtimes.deno.process", logging.INFO, __file__, 1, "deno process booted", None, None)
    record.__dict__.update(slug="hello", version=3, pid=4242, boot_ms=31.5, scratch=Path("/tmp/x"), gone=None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "deno process booted"
    assert entry["component"] == "runtimes.deno.process"
    assert (entry["slug"], entry["version"], entry["pid"], entry["boot_ms"]) == ("hello", 3, 4242, 31.5)
    assert entry["scratch"] == "/tmp/x"
    assert not {"gone", "lineno", "args", "levelname"} & entry.keys()
