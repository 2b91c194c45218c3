"""The sans-I/O core of the HTTP server: bytes in, requests and heads out. No sockets, no trio run."""

from __future__ import annotations

import pytest

from mbworker.lib.http import protocol as p
from mbworker.lib.http.response_head import DateCache
from mbworker.lib.http.types import HttpRequest


class NoSource:
    async def read_body(self, body: p.Body) -> None:
        raise AssertionError("the core never reads")


def parser(max_head: int = 8192) -> p.RequestParser:
    return p.RequestParser(NoSource(), ("192.0.2.1", 4000), max_head)


def bodies(requests: list[HttpRequest]) -> list[p.Body]:
    return [r.body for r in requests]  # type: ignore[misc]


def test_pipelined_requests_and_a_chunked_body_in_one_feed() -> None:
    core = parser()
    core.feed(
        b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    first, second = core.ready
    assert (first.method, first.path, first.query, first.client) == ("GET", "/a", "x=1", ("192.0.2.1", 4000))
    assert first.headers == [(b"host", b"h")]
    one, two = bodies([first, second])
    assert one.complete
    assert not one.chunks
    assert two.complete
    assert list(two.chunks) == [b"abc", b"de"]
    assert two.received == 5
    assert core.failure is None
    assert core.parsing is None


def test_a_head_fed_byte_by_byte_appears_once_complete() -> None:
    core = parser()
    data = b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"
    for i in range(len(data) - 3):
        core.feed(data[i : i + 1])
        assert not core.ready
        assert core.in_head
    core.feed(data[-3:-2])  # the head's last byte
    (request,) = core.ready
    body = bodies([request])[0]
    assert (body.content_length, body.complete, list(body.chunks)) == (2, False, [])
    core.feed(b"o")
    core.feed(b"k")
    assert body.complete
    assert list(body.chunks) == [b"o", b"k"]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    ],
)
def test_parse_failures_are_kept_with_their_status(data: bytes, status: int) -> None:
    core = parser()
    core.feed(data)
    assert core.failure is not None
    assert core.failure.status == status


def test_an_upgrade_keeps_the_bytes_after_it_for_the_handler() -> None:
    core = parser()
    head = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    core.feed(head + b"\x81\x05hello")
    request = core.ready.popleft()  # taken, as the shell takes each request
    body = bodies([request])[0]
    assert body.upgrade
    assert body.websocket
    assert core.upgraded
    core.feed(b"more")  # not HTTP any more
    assert core.upgrade_ready(body)
    assert core.take_upgrade(request) == head + b"\x81\x05hellomore"
    assert core.url == b"/ws"


def request_body(raw: bytes) -> p.Body:
    core = parser()
    core.feed(raw)
    return bodies(list(core.ready))[0]


def test_frame_head_chooses_framing_and_keep_alive() -> None:
    dates = DateCache("t")
    get11 = request_body(b"GET / HTTP/1.1\r\n\r\n")
    head, framing, keep, _ = p.frame_head(200, [(b"x", b"1")], 5, get11, True, dates)
    assert framing == p.IDENTITY
    assert keep
    assert head.startswith(b"HTTP/1.1 200 OK\r\nx: 1\r\ncontent-length: 5\r\n")
    assert head.endswith(b"\r\n\r\n")

    _, framing, keep, _ = p.frame_head(200, [], None, get11, True, dates)
    assert (framing, keep) == (p.CHUNKED, True)
    _, framing, keep, remaining = p.frame_head(200, [(b"Content-Length", b"7")], None, get11, True, dates)
    assert (framing, keep, remaining) == (p.IDENTITY, True, 7)

    get10 = request_body(b"GET / HTTP/1.0\r\n\r\n")
    head, framing, keep, _ = p.frame_head(200, [], None, get10, True, dates)
    assert (framing, keep) == (p.UNTIL_CLOSE, False)
    assert b"connection: close\r\n" in head

    head_request = request_body(b"HEAD / HTTP/1.1\r\n\r\n")
    head, framing, _, _ = p.frame_head(200, [], 42, head_request, True, dates)
    assert framing == p.NO_BODY
    assert b"content-length: 42\r\n" in head

    head, framing, keep, _ = p.frame_head(204, [], 0, get11, False, dates)
    assert (framing, keep) == (p.NO_BODY, False)
    assert b"connection: close\r\n" in head
    with pytest.raises(ValueError, match="CR or LF"):
        p.frame_head(200, [(b"x", b"a\r\nset-cookie: evil")], 0, get11, True, dates)


def test_error_response_and_chunks() -> None:
    answer = p.error_response(408, DateCache(""))
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b'\r\n\r\n{"code":"REQUEST_TIMEOUT","message":"request body too slow"}')
    assert p.chunk(b"hello") == b"5\r\nhello\r\n"


@pytest.mark.parametrize("hosts", [b"Host: a\r\nHost: b\r\n", b"Host: a\r\nhost: a\r\n"])
def test_a_second_host_header_is_refused_before_any_request_is_ready(hosts: bytes) -> None:
    # RFC 9112 §3.2: exactly one Host; with two, which names the URL (and the cache key)?
    core = parser()
    core.feed(b"GET / HTTP/1.1\r\n" + hosts + b"\r\n")
    assert not core.ready
    assert core.failure is not None
    assert (core.failure.status, core.failure.answer) == (400, b"more than one Host header")
    answer = p.error_response(400, DateCache(""), core.failure.answer)
    assert answer.endswith(b'{"code":"BAD_REQUEST","message":"more than one Host header"}')


@pytest.mark.parametrize(
    ("head", "status", "answer"),
    [
        # RFC 9112 §6.1: HTTP/1.0 has no transfer codings; keep-alive or not, the framing is faulty.
        (b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n", 400, b"HTTP/1.0"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n", 400, None),
        # A coding we do not decode: 501 (RFC 9112 §6.1), before a handler could take the coded bytes as the body.
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n", 501, b"only chunked"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n", 501, b"only chunked"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501, None),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n", 400, None),
    ],
)
def test_a_transfer_coding_we_cannot_frame_by_is_refused_before_the_request_is_ready(
    head: bytes, status: int, answer: bytes | None
) -> None:
    core = parser()
    core.feed(head + b"\r\n3\r\nabc\r\n0\r\n\r\n")
    assert not core.ready  # no handler ever sees it
    assert core.failure is not None
    assert core.failure.status == status
    if answer is not None:
        assert core.failure.answer is not None
        assert answer in core.failure.answer


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b" chunked "])
def test_chunked_alone_still_frames_the_body(coding: bytes) -> None:
    core = parser()
    core.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    (request,) = core.ready
    assert core.failure is None
    assert list(bodies([request])[0].chunks) == [b"abc"]
