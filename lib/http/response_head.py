"""Response heads as bytes: status lines, the per-second Date cache, header serialisation. No I/O.

The hot path: one `b"".join` per response, cached status lines and a Date line rebuilt once a second.
"""

from __future__ import annotations

import http
import time
from email.utils import formatdate

from mbworker.lib.http.types import Headers

_PLATFORM_PHRASES = {546: "Worker Limit"}
"""Statuses of the Supabase platform that `http.HTTPStatus` does not know (546: a function hit a resource limit)."""

STATUS_LINES: dict[int, bytes] = {
    **{s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii")) for s in http.HTTPStatus},
    **{code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("ascii")) for code, phrase in _PLATFORM_PHRASES.items()},
}
"""Status lines of the statuses Python's `http.HTTPStatus` knows and the platform's own (`status_line` makes the
others)."""

# Headers the server writes itself: the app's values for these are dropped (framing is ours).
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection", b"keep-alive"))
# Headers the server writes unless the app wrote them.
_DEFAULTED = frozenset((b"date", b"server"))

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

CONNECTION_CLOSE = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


class DateCache:
    """`date: <IMF-fixdate>\\r\\n` (+ the Server line), rebuilt at most once per second."""

    __slots__ = ("_date", "_line", "_second", "_server", "line_count")

    def __init__(self, server_header: str) -> None:
        self._server = b"server: %s\r\n" % server_header.encode("latin-1") if server_header else b""
        self.line_count = 2 if self._server else 1
        """How many header lines `lines()` holds."""
        self._second = -1
        self._date = b""
        self._line = b""

    def lines(self) -> bytes:
        """The Date and Server lines together."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = b"date: %s\r\n" % formatdate(now, usegmt=True).encode("ascii")
            self._line = self._date + self._server
        return self._line

    def date_line(self) -> bytes:
        self.lines()
        return self._date

    def server_line(self) -> bytes:
        return self._server


def encode_headers(headers: Headers, parts: list[bytes]) -> tuple[bytes | None, int, int]:
    """Append the app's headers to `parts` as `name: value\\r\\n` pieces; skip framing headers.

    Returns (the app's content-length value or None, lines written, flags) where flags bit 1 = the app set
    Date, bit 2 = the app set Server. Names are written as given.
    """
    content_length: bytes | None = None
    flags = 0
    lines = 0
    for name, value in headers:
        lname = name.lower()
        if lname in _FRAMING:
            if lname == b"content-length":
                content_length = value
            continue
        if lname in _DEFAULTED:
            flags |= 1 if lname == b"date" else 2
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    return content_length, lines, flags


def check_head(head: bytes, lines: int) -> None:
    """Raise ValueError when a header name or value smuggled CR or LF into the head (response splitting)."""
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("response header names and values must not contain CR or LF")
