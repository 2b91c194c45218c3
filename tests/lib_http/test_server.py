"""The front door over real sockets: framing, keep-alive, pipelining, limits, timeouts, drain."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from mbworker.lib.http.types import BadRequestBody, BodyTooLarge, ClientDisconnected, HttpRequest, Responder
from tests.lib_http._support import App, RawClient, running

TEXT = [(b"content-type", b"text/plain")]


def make_app() -> App:
    app = App()

    @app.route("/hello")
    async def hello(request: HttpRequest, responder: Responder) -> None:
        await responder.send(200, TEXT, b"hello")

    @app.route("/echo")
    async def echo(request: HttpRequest, responder: Responder) -> None:
        try:
            body = await request.body.read_all(1024)
        except BodyTooLarge:
            await responder.send(413, TEXT, b"too large")
            return
        await responder.send(200, [*TEXT, (b"x-method", request.method.encode())], body)

    @app.route("/ignore-body")
    async def ignore_body(request: HttpRequest, responder: Responder) -> None:
        await responder.send(200, TEXT, b"ignored")

    @app.route("/boom")
    async def boom(request: HttpRequest, responder: Responder) -> None:
        raise RuntimeError("the app failed")

    return app


def url(server: object, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"  # type: ignore[attr-defined]


async def test_get_keep_alive_reuses_one_connection() -> None:
    async with running(make_app()) as server, httpx.AsyncClient() as client:
        first = await client.get(url(server, "/hello"))
        second = await client.get(url(server, "/hello?x=1"))
        assert (first.status_code, first.text) == (200, "hello")
        assert second.text == "hello"
        assert first.headers["content-length"] == "5"
        assert first.headers["server"] == "mbworker"
        assert first.headers["date"].endswith(" GMT")
        stats = server.statistics()
        assert stats.connections_total == 1
        assert stats.requests_served == 2


async def test_request_fields_reach_the_app() -> None:
    app = make_app()
    async with running(app) as server, httpx.AsyncClient() as client:
        await client.get(url(server, "/hello?a=1&b=%20"), headers={"X-Thing": "One"})
    request = app.seen[0]
    assert (request.method, request.path, request.query) == ("GET", "/hello", "a=1&b=%20")
    assert request.target == "/hello?a=1&b=%20"
    assert request.header(b"x-thing") == b"One"
    assert request.http_version == "1.1"
    assert request.client is not None
    assert request.client[0] == "127.0.0.1"


async def test_post_with_content_length_and_chunked_bodies() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cd", b"e"):
            yield part

    async with running(make_app()) as server, httpx.AsyncClient() as client:
        fixed = await client.post(url(server, "/echo"), content=b"x" * 100)
        chunked = await client.post(url(server, "/echo"), content=chunks())
    assert (fixed.status_code, fixed.content) == (200, b"x" * 100)
    assert (chunked.status_code, chunked.content) == (200, b"abcde")


async def test_body_limit_is_the_apps_413_and_the_connection_survives() -> None:
    async with running(make_app()) as server, httpx.AsyncClient() as client:
        big = await client.post(url(server, "/echo"), content=b"x" * 5000)
        after = await client.get(url(server, "/hello"))
    assert big.status_code == 413
    assert after.text == "hello"


async def test_streamed_response_chunks_arrive_before_the_end() -> None:
    app = make_app()
    release = trio.Event()

    @app.route("/stream")
    async def stream(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, TEXT)
        await responder.write(b"first")
        await release.wait()
        await responder.write(b"second")
        await responder.end()

    async with (
        running(app) as server,
        httpx.AsyncClient() as client,
        client.stream("GET", url(server, "/stream")) as response,
    ):
        assert response.headers["transfer-encoding"] == "chunked"
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"first"  # while the app still waits on `release`
        release.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"second"


async def test_head_writes_no_body() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(10):
            raw = b""
            while raw.count(b"HTTP/1.1 200") < 2 or not raw.endswith(b"hello"):
                raw += await c.stream.receive_some(65536)
    head_response, _, get_response = raw.partition(b"\r\n\r\n")
    assert b"content-length: 5" in head_response
    assert get_response.startswith(b"HTTP/1.1 200 OK\r\n")  # nothing between the HEAD head and the next response


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        batch = b"".join(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in (b"one", b"two", b"three")
        )
        await c.send(batch + b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        bodies = [(await c.response()).body for _ in range(4)]
    assert bodies == [b"one", b"two", b"three", b"hello"]


async def test_expect_100_continue() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        with trio.fail_after(10):
            interim = await c.stream.receive_some(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await c.send(b"hello")
        response = await c.response()
    assert (response.status, response.body) == (200, b"hello")


async def test_expect_100_continue_refused_without_reading_the_body() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999\r\nExpect: 100-continue\r\n\r\n")
        response = await c.response()
        assert response.status == 413  # no 100 Continue first: the known length is over the app's limit
        assert response.header(b"connection") == b"close"
        await c.wait_closed()


async def test_unread_body_is_drained_and_the_connection_kept() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789")
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await c.response()).body == b"ignored"
        assert (await c.response()).body == b"hello"
    assert server.statistics().connections_total == 1


async def test_oversize_head_gets_431_and_closes() -> None:
    async with running(make_app(), max_header_bytes=4096) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        response = await c.response()
        assert response.status == 431
        await c.wait_closed()
    assert server.statistics().bad_requests == 1


async def test_oversize_head_in_many_pieces_gets_431() -> None:
    async with running(make_app(), max_header_bytes=4096) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /hello HTTP/1.1\r\nX-Big: ")
        for _ in range(6):  # one header line that never ends
            await c.send(b"a" * 1000)
        response = await c.response()
        assert response.status == 431
        await c.wait_closed()


async def test_malformed_request_gets_400_and_others_are_unaffected() -> None:
    async with running(make_app()) as server, httpx.AsyncClient() as client:
        await client.get(url(server, "/hello"))  # a kept-alive connection that must survive
        async with RawClient.connect(server.port) as c:
            await c.send(b"NOT HTTP AT ALL\r\n\r\n")
            response = await c.response()
            assert response.status == 400
            assert response.header(b"connection") == b"close"
            await c.wait_closed()
        again = await client.get(url(server, "/hello"))
        assert again.text == "hello"
        assert server.statistics().connections_total == 2


async def test_malformed_chunked_body_is_a_400() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n")
        response = await c.response()
        assert response.status == 400
        await c.wait_closed()


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
    ],
)
async def test_a_transfer_coding_we_cannot_frame_by_is_refused_and_closes_before_the_app(
    request_head: bytes, status: int
) -> None:
    app = make_app()
    async with running(app) as server, RawClient.connect(server.port) as c:
        # What follows the head is not a body we can delimit: it must never be read as the next request.
        await c.send(request_head + b"3\r\nabc\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        response = await c.response()
        assert (response.status, response.header(b"connection")) == (status, b"close")
        await c.wait_closed()
    assert app.seen == []


async def test_app_exception_is_a_500_and_the_connection_continues() -> None:
    async with running(make_app()) as server, httpx.AsyncClient() as client:
        failed = await client.get(url(server, "/boom"))
        ok = await client.get(url(server, "/hello"))
    assert failed.status_code == 500
    assert failed.json()["code"] == "INTERNAL_SERVER_ERROR"
    assert ok.text == "hello"


async def test_header_injection_is_refused() -> None:
    app = make_app()

    @app.route("/inject")
    async def inject(request: HttpRequest, responder: Responder) -> None:
        await responder.send(200, [(b"x-a", b"1\r\nset-cookie: evil=1")], b"")

    async with running(app) as server, httpx.AsyncClient() as client:
        response = await client.get(url(server, "/inject"))
    assert response.status_code == 500
    assert "set-cookie" not in response.headers


async def test_http10_closes_and_streams_until_close() -> None:
    app = make_app()

    @app.route("/stream")
    async def stream(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, TEXT)
        await responder.write(b"a")
        await responder.write(b"b")
        await responder.end()

    async with running(app) as server:
        async with RawClient.connect(server.port) as c:
            await c.send(b"GET /hello HTTP/1.0\r\n\r\n")
            raw = await c.read_raw()
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in raw
        assert raw.endswith(b"\r\n\r\nhello")
        async with RawClient.connect(server.port) as c:
            await c.send(b"GET /stream HTTP/1.0\r\n\r\n")
            raw = await c.read_raw()
        assert b"transfer-encoding" not in raw
        assert raw.endswith(b"\r\n\r\nab")
        async with RawClient.connect(server.port) as c:
            await c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /hello HTTP/1.0\r\n\r\n")
            first = await c.response()
            assert first.header(b"connection") == b"keep-alive"
            assert (await c.response()).body == b"hello"


async def test_client_disconnect_mid_stream_fails_the_apps_write() -> None:
    app = make_app()
    started = trio.Event()
    failed: list[BaseException] = []
    done = trio.Event()

    @app.route("/forever")
    async def forever(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, TEXT)
        started.set()
        try:
            while True:
                await responder.write(b"x" * 65536)
        except ClientDisconnected as exc:
            failed.append(exc)
            raise
        finally:
            done.set()

    async with running(app) as server:
        async with RawClient.connect(server.port) as c:
            await c.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(10):
                await started.wait()
                await c.stream.receive_some(10)
        with trio.fail_after(10):
            await done.wait()
    assert len(failed) == 1


async def test_header_timeout_closes_a_slow_head_and_an_idle_connection() -> None:
    settings = {"header_timeout_s": 0.2, "keep_alive_timeout_s": 0.2}
    async with running(make_app(), **settings) as server:
        async with RawClient.connect(server.port) as slow:
            await slow.send(b"GET /hello HTTP/1.1\r\nHo")
            await slow.wait_closed()
        async with RawClient.connect(server.port) as idle:
            await idle.wait_closed()
        async with RawClient.connect(server.port) as kept:
            await kept.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await kept.response()).body == b"hello"
            await kept.wait_closed()  # keep-alive idle timeout
        assert server.statistics().timeouts == 3


async def test_max_connections_stops_accepting() -> None:
    async with running(make_app(), max_connections=1) as server:
        async with RawClient.connect(server.port) as first:
            await first.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            await first.response()
            async with RawClient.connect(server.port) as second:
                await second.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().connections_total == 1  # the second waits in the backlog
                await first.stream.aclose()
                assert (await second.response()).body == b"hello"
        assert server.statistics().connections_total == 2


async def test_drain_finishes_in_flight_closes_idle_and_refuses_new() -> None:
    app = make_app()
    entered = trio.Event()
    release = trio.Event()

    @app.route("/slow")
    async def slow(request: HttpRequest, responder: Responder) -> None:
        entered.set()
        await release.wait()
        await responder.send(200, TEXT, b"finished")

    async with running(app) as server:
        async with RawClient.connect(server.port) as idle, RawClient.connect(server.port) as busy:
            await idle.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            await idle.response()
            await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(10):
                await entered.wait()
            drained = trio.Event()

            async def drain() -> None:
                await server.drain(grace=30)
                drained.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await idle.wait_closed()
                with pytest.raises(OSError, match="all attempts to connect"):
                    await trio.open_tcp_stream("127.0.0.1", server.port)
                release.set()
                response = await busy.response()
                assert (response.body, response.header(b"connection")) == (b"finished", b"close")
                await busy.wait_closed()
                with trio.fail_after(10):
                    await drained.wait()
        assert server.statistics().connections_open == 0


async def test_valid_requests_before_a_malformed_one_are_answered_first() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nBROKEN\x00\r\n\r\n")
        assert (await c.response()).body == b"hello"
        assert (await c.response()).status == 400
        await c.wait_closed()


async def test_stalled_body_is_408_and_a_vanished_one_raises() -> None:
    app = make_app()
    outcomes: list[type[BaseException]] = []
    reading = trio.Event()
    finished = trio.Event()

    @app.route("/upload")
    async def upload(request: HttpRequest, responder: Responder) -> None:
        reading.set()
        try:
            await request.body.read_all(1 << 20)
        except BaseException as exc:
            outcomes.append(type(exc))
            raise
        finally:
            finished.set()

    async with running(app, body_timeout_s=0.2) as server:
        async with RawClient.connect(server.port) as c:
            await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\npartial")
            assert (await c.response()).status == 408  # the server gave up on the stalled body, and says so
            await c.wait_until_closed()
        with trio.fail_after(10):
            await finished.wait()
        reading, finished = trio.Event(), trio.Event()
        async with RawClient.connect(server.port) as c:
            await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\npartial")
            with trio.fail_after(10):
                await reading.wait()
        with trio.fail_after(10):
            await finished.wait()
    assert outcomes == [BadRequestBody, ClientDisconnected]


async def test_drain_cancels_what_outlives_the_grace() -> None:
    app = make_app()
    entered = trio.Event()
    outcome: list[type[BaseException]] = []

    @app.route("/stuck")
    async def stuck(request: HttpRequest, responder: Responder) -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(type(exc))
            raise

    async with running(app) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /stuck HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(10):
            await entered.wait()
            await server.drain(grace=0.05)
        await c.wait_closed()
    assert outcome == [trio.Cancelled]


async def test_short_streamed_body_with_its_own_length_closes_the_connection() -> None:
    app = make_app()

    @app.route("/short")
    async def short(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, [(b"content-length", b"10")])
        await responder.write(b"12345")
        await responder.end()

    async with running(app) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /short HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = await c.read_raw()
    assert b"content-length: 10\r\n" in raw
    assert b"transfer-encoding" not in raw
    assert raw.endswith(b"\r\n\r\n12345")


def make_big_app() -> App:
    app = make_app()

    @app.route("/big")
    async def big(request: HttpRequest, responder: Responder) -> None:
        # ~60 KB, marked with the request's query: a complete response that still fits one coalesced write
        await responder.send(200, TEXT, request.query.encode().ljust(60_000, b"."))

    return app


@pytest.mark.parametrize("coalesce", [True, False])
async def test_pipelined_responses_past_the_socket_buffer_arrive_whole_and_in_order(coalesce: bool) -> None:
    # 300 pipelined requests and nothing read until every task is blocked: ~18 MB of responses do not fit the
    # kernel's buffers (loopback's autotune to several MB), so a write stops part-way, a server task finishes
    # it, and the connection waits for that before it answers more (backpressure, not an unbounded queue).
    requests = b"".join(b"GET /big?%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(300))
    async with running(make_big_app(), coalesce_writes=coalesce) as server, RawClient.connect(server.port) as c:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send, requests)  # blocks too once the server stops reading
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert server.statistics().stalled_writes >= 1
            assert len(server.app.seen) < 300  # type: ignore[attr-defined]
            bodies = [(await c.response()).body for _ in range(300)]
        assert [b.rstrip(b".") for b in bodies] == [b"%d" % i for i in range(300)]
        assert {len(b) for b in bodies} == {60_000}
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await c.response()).body == b"hello"  # the connection is still good


async def test_a_client_that_half_closes_still_gets_its_responses() -> None:
    async with running(make_app()) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /hello?2 HTTP/1.1\r\nHost: t\r\n\r\n")
        await c.stream.send_eof()
        raw = await c.read_raw()
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.endswith(b"hello")


async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout() -> None:
    app = make_big_app()
    cut_off = trio.Event()

    @app.route("/watched")
    async def watched(request: HttpRequest, responder: Responder) -> None:
        try:
            await responder.send(200, TEXT, b"w" * 60_000)
        except trio.Cancelled:  # waiting behind the stalled write when the server gives up on the client
            cut_off.set()
            raise

    requests = b"".join(b"GET /watched HTTP/1.1\r\nHost: t\r\n\r\n" for _ in range(300))
    async with running(app, write_timeout_s=0.3) as server, RawClient.connect(server.port) as c:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_ignoring_reset, c, requests)
            with trio.fail_after(10):
                await cut_off.wait()
        assert server.statistics().timeouts >= 1
        assert server.statistics().stalled_writes >= 1
        await c.wait_until_closed()


async def send_ignoring_reset(c: RawClient, data: bytes) -> None:
    try:
        await c.send(data)
    except trio.BrokenResourceError:
        pass  # the server closed the connection while we were still sending: what the test is about
