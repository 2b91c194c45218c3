"""The front door's own faults, on real sockets with `serve_http`: slow bodies and status lines."""

from __future__ import annotations

import trio

from mbworker.lib.http.types import HttpRequest, Responder
from tests.lib_http._support import App, RawClient, running


async def test_trickling_bodies_get_408_and_free_their_connections() -> None:
    """150 clients trickle a body a byte at a time: each gets 408 once below the minimum rate (after the grace),
    though every byte came well within `body_timeout_s`; a normal request among them is answered meanwhile."""
    app = App()
    started = trio.Semaphore(0)

    @app.route("/upload")
    async def upload(request: HttpRequest, responder: Responder) -> None:
        started.release()
        body = await request.body.read_all(1 << 20)
        await responder.send(200, [], b"%d" % len(body))

    statuses: list[int] = []
    settings = {"body_grace_s": 0.5, "body_min_rate": 50, "body_timeout_s": 30.0, "max_connections": 151}
    async with running(app, **settings) as server:

        async def trickle() -> None:
            async with RawClient.connect(server.port) as c:
                await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nx")
                with trio.move_on_after(20):
                    while not c.responses:
                        await c.send(b"x")
                        with trio.move_on_after(0.2):  # pacing of the trickle, not synchronisation
                            statuses.append((await c.response()).status)
                            return

        async with trio.open_nursery() as nursery:
            for _ in range(150):
                nursery.start_soon(trickle)
            for _ in range(150):
                await started.acquire()  # every trickler is inside the app, holding a connection
            # Every slot but one is taken: a normal request still gets one and its answer.
            async with RawClient.connect(server.port) as c:
                await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
                answer = await c.response(timeout=20)
            assert (answer.status, answer.body) == (200, b"5")
    assert statuses == [408] * 150
    assert server.statistics().connections_open == 0


async def test_546_status_line_has_a_reason_phrase() -> None:
    app = App()

    @app.route("/limit")
    async def limit(request: HttpRequest, responder: Responder) -> None:
        await responder.send(546, [], b"")

    async with running(app) as server, RawClient.connect(server.port) as c:
        await c.send(b"GET /limit HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = b""
        with trio.fail_after(10):
            while b"\r\n" not in raw:
                raw += await c.stream.receive_some(1024)
    assert raw.startswith(b"HTTP/1.1 546 Worker Limit\r\n")
