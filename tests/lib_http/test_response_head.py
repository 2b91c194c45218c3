"""Response heads without I/O, and the package's public names."""

from __future__ import annotations

import pytest

from mbworker.lib.http import response_head as rh
from mbworker.lib.http import server


def test_status_lines() -> None:
    assert rh.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert rh.status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    with pytest.raises(ValueError, match="invalid HTTP status"):
        rh.status_line(1000)


def test_date_and_server_lines() -> None:
    dates = rh.DateCache("mbworker")
    lines = dates.lines()
    assert lines.startswith(b"date: ")
    assert lines.endswith(b" GMT\r\nserver: mbworker\r\n")
    assert rh.DateCache("").lines().count(b"\r\n") == 1


def test_encode_headers_drops_framing_and_reports_defaults() -> None:
    parts: list[bytes] = []
    length, lines, flags = rh.encode_headers(
        [(b"Content-Length", b"3"), (b"X-A", b"1"), (b"Transfer-Encoding", b"chunked"), (b"Server", b"me")],
        parts,
    )
    assert (length, lines, flags) == (b"3", 2, 2)
    assert b"".join(parts) == b"X-A: 1\r\nServer: me\r\n"


def test_check_head_refuses_smuggled_lines() -> None:
    rh.check_head(b"HTTP/1.1 200 OK\r\nx: 1\r\n\r\n", 3)
    with pytest.raises(ValueError, match="CR or LF"):
        rh.check_head(b"HTTP/1.1 200 OK\r\nx: 1\r\nevil: 1\r\n\r\n", 3)
    with pytest.raises(ValueError, match="CR or LF"):
        rh.check_head(b"HTTP/1.1 200 OK\r\nx: 1\revil\r\n\r\n", 3)


def test_public_names() -> None:
    assert server.__all__ == ["HttpServer", "HttpServerStatistics", "serve_http"]
