"""HTTP/1.1 without I/O: request bytes in → parsed requests out; response facts in → head bytes out.

The sans-I/O core of a connection, as websockets has its own: `RequestParser` (httptools underneath) turns the
bytes the shell read into `HttpRequest`s with their `Body`, a parse failure, or the bytes after an upgrade;
`frame_head` decides a response's framing and keep-alive and builds its head; `error_response` makes the
server's own error answers. Nothing here reads, writes, sleeps or looks at a clock: tests feed bytes and read
the results (tests/lib_http/test_protocol.py). `connection.py` is the trio shell that owns the socket.

One seam is async: a `Body` whose bytes are not all parsed yet asks its `BodySource` (the shell) to read more.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Protocol

import httptools

from mbworker.lib.http import response_head as rh
from mbworker.lib.http.types import BodyTooLarge, Headers, HttpRequest

METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}
_INTERESTING: Final = frozenset((b"expect", b"content-length", b"upgrade", b"host", b"transfer-encoding"))
_BODYLESS_STATUS: Final = frozenset((204, 304))

# Server-made error responses: JSON `{"code", "message"}` like every other error of the worker.
ERRORS: Final = {
    400: (b"BAD_REQUEST", b"malformed HTTP request"),
    408: (b"REQUEST_TIMEOUT", b"request body too slow"),
    413: (b"PAYLOAD_TOO_LARGE", b"request body too large"),
    431: (b"REQUEST_HEADER_FIELDS_TOO_LARGE", b"request head too large"),
    500: (b"INTERNAL_SERVER_ERROR", b"internal server error"),
    501: (b"NOT_IMPLEMENTED", b"not implemented"),
}
JSON: Final[Headers] = [(b"content-type", b"application/json")]

# Body framings of a response (`frame_head`).
CHUNKED, IDENTITY, UNTIL_CLOSE, NO_BODY = 0, 1, 2, 3


def error_body(status: int, message: bytes | None = None) -> bytes:
    """`message`: the reason, when it says more than the status's own (plain text: no quote or backslash)."""
    code, default = ERRORS[status]
    return b'{"code":"%s","message":"%s"}' % (code, message or default)


def error_response(status: int, dates: rh.DateCache, message: bytes | None = None) -> bytes:
    """A whole `status` answer that closes the connection: for a request that could not be parsed."""
    body = error_body(status, message)
    return b"".join(
        (
            rh.status_line(status),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            rh.CONNECTION_CLOSE,
            dates.lines(),
            b"\r\n",
            body,
        )
    )


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


class ParseFailure(Exception):
    def __init__(self, status: int, reason: str, answer: bytes | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.answer = answer
        """The reason as the client is told it, when it is ours (the parser's own words stay in the log)."""


class _HeadTooLarge(Exception):
    pass


class _Refused(Exception):
    """A head that parses but must not be served (RFC 9112): raised in a callback, it stops the parser."""

    def __init__(self, status: int, reason: bytes) -> None:
        super().__init__(reason.decode())
        self.status = status
        self.reason = reason


class BodySource(Protocol):
    """Who reads more of a body from the client (the connection's trio shell)."""

    async def read_body(self, body: Body) -> None:
        """Read until `body` has a chunk or is complete."""
        ...


class Body:
    """One request's body and framing facts; implements `RequestBody`. Owned by its connection.

    `chunks` fills as the parser meets body bytes; a read that finds none asks the `BodySource` for more. After
    the handler returns, unread bytes are drained (up to `max_drain_bytes`) or the connection closes.
    """

    __slots__ = (
        "_source",
        "chunks",
        "complete",
        "content_length",
        "continue_sent",
        "expect_continue",
        "http_version",
        "is_head",
        "keep_alive",
        "received",
        "started_at",
        "upgrade",
        "websocket",
    )

    def __init__(self, source: BodySource) -> None:
        self._source = source
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.content_length: int | None = None
        self.continue_sent = False
        self.expect_continue = False
        self.is_head = False
        self.keep_alive = True
        self.upgrade = False
        """llhttp stopped after this request (Upgrade + Connection: upgrade): bytes after it are not HTTP."""
        self.websocket = False
        """The request has `Upgrade: websocket`."""
        self.http_version = "1.1"
        self.received = 0
        """Body bytes parsed so far (for the minimum body rate)."""
        self.started_at = -1.0
        """When the app first waited for body bytes (the shell's clock); -1 until then."""
        # No reference back to the HttpRequest (which holds this body): a cycle per request would leave every
        # request's objects to the cyclic GC, whose collections then cost more than the rest of the path.

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        chunks = self.chunks
        while not chunks:
            if self.complete:
                raise StopAsyncIteration
            await self._source.read_body(self)
        return chunks.popleft()

    async def read_all(self, limit: int) -> bytes:
        if self.content_length is not None and self.content_length > limit:
            # Known too large: refuse before the client sends it (and before any 100 Continue).
            raise BodyTooLarge(f"request body of {self.content_length} bytes exceeds {limit}")
        if self.complete and len(self.chunks) <= 1:
            data = self.chunks.popleft() if self.chunks else b""
            if len(data) > limit:
                raise BodyTooLarge(f"request body exceeds {limit} bytes")
            return data
        parts: list[bytes] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(f"request body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class RequestParser:
    """Bytes in (`feed`), requests out (`ready`). Parse errors are kept in `failure`, to be answered once the
    requests before them are; after an upgrade request, the bytes that follow it collect in `upgrade_buffer`.

    Pipelined requests queue in `ready` up to what one `feed` held (the shell feeds one read at a time).
    """

    __slots__ = (
        "_client",
        "_codings",
        "_completed",
        "_fresh_feed",
        "_head_chunks",
        "_head_exact",
        "_head_size",
        "_headers",
        "_host_seen",
        "_max_head",
        "_parser",
        "_source",
        "failure",
        "in_head",
        "parsing",
        "ready",
        "upgrade_buffer",
        "upgraded",
        "url",
    )

    def __init__(self, source: BodySource, client: tuple[str, int] | None, max_head: int) -> None:
        self._source = source
        self._client = client
        self._max_head = max_head
        self._parser = httptools.HttpRequestParser(self)
        self.ready: deque[HttpRequest] = deque()
        """Parsed requests not taken yet (each one's `body` is its `Body`)."""
        self.failure: ParseFailure | None = None
        self.parsing: Body | None = None
        """The body of the message being parsed (None between messages)."""
        self._completed: Body | None = None
        self.in_head = False
        """Inside a request head: the shell reads on (within the head timeout) until it is complete."""
        self.url = b""
        """The last request's target, raw."""
        self._headers: Headers = []
        self._head_size = 0
        self._host_seen = False
        self._codings: bytes | None = None
        """The request's Transfer-Encoding (its lines joined), checked once the head is complete."""
        # Raw bytes of the head being parsed, kept for a WebSocket handoff.
        self._head_chunks: list[bytes] = []
        self._head_exact = False
        self._fresh_feed = False
        self.upgrade_buffer = b""
        self.upgraded = False

    def close(self) -> None:
        """Drop the parser: it holds our bound callbacks (a cycle the GC would have to find). Never fed again."""
        self._parser = None  # type: ignore[assignment]

    # -- input ----------------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse `data` (one read). Results land in `ready`, `failure`, `upgrade_buffer`."""
        if self.upgraded:
            self.upgrade_buffer += data  # not HTTP any more: it belongs to the WebSocket handler
            return
        self._completed = None
        if self.parsing is None:
            self._head_chunks = [data]
        elif self.in_head:
            self._head_chunks.append(data)
        self._fresh_feed = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stopped at the end of an upgrade request: what follows is not HTTP. No more parsing.
            self.upgrade_buffer = data[int(exc.args[0]) :]
            self.upgraded = True
            if self._head_exact:  # the head as received: every chunk since it began, less what followed it
                head = b"".join(self._head_chunks)
                self._head_chunks = [head[: len(head) - len(self.upgrade_buffer)]]
            if self._completed is not None:
                self._completed.upgrade = True
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _HeadTooLarge):
                self.failure = ParseFailure(431, "request head too large")
            elif isinstance(refused, _Refused):
                self.failure = ParseFailure(refused.status, str(refused), refused.reason)
            else:
                self.failure = ParseFailure(400, f"malformed request: {exc}")
            return
        if self.in_head and sum(map(len, self._head_chunks)) > self._max_head:
            self.failure = ParseFailure(431, "request head too large")

    def upgrade_ready(self, body: Body) -> bool:
        """Whether `body`'s request may be handed over as an upgrade: llhttp stopped at its end."""
        return not self.ready and self.parsing is None and body.complete

    def take_upgrade(self, request: HttpRequest) -> bytes:
        """Every byte received from the upgrade request on (its head as received, then what followed), and
        release what this parser will not use again (~4 KB that would otherwise live as long as the
        WebSocket). `url` stays: it is the upgrade request's target (for the log)."""
        buffered = self._raw_head(request) + self.upgrade_buffer
        self._parser = None  # type: ignore[assignment]  # never fed again after a hand-off
        self.ready.clear()
        self._head_chunks = []
        self._headers = []
        self.upgrade_buffer = b""
        self.parsing = self._completed = None
        return buffered

    def _raw_head(self, request: HttpRequest) -> bytes:
        """The upgrade request's head as received; re-serialised when it shared a read with an earlier request."""
        if self._head_exact:
            return self._head_chunks[0]
        parts = [
            b"%s %s HTTP/%s\r\n"
            % (request.method.encode(), request.target.encode("latin-1"), request.http_version.encode())
        ]
        parts += [b"%s: %s\r\n" % (k, v) for k, v in request.headers]
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Body(self._source)
        self.in_head = True
        self.url = b""
        self._headers = []
        self._head_size = 0
        self._host_seen = False
        self._codings = None
        self._head_exact = self._fresh_feed

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_size += len(url)
        if self._head_size > self._max_head:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        self._headers.append((lname, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            raise _HeadTooLarge
        if lname in _INTERESTING:
            body = self.parsing
            assert body is not None
            if lname == b"content-length":
                try:
                    body.content_length = int(value)
                except ValueError:
                    pass  # llhttp rejects it
            elif lname == b"expect":
                body.expect_continue = value.lower() == b"100-continue"
            elif lname == b"host":
                if self._host_seen:  # which one names the target? RFC 9112 §3.2: exactly one, else 400
                    raise _Refused(400, b"more than one Host header")
                self._host_seen = True
            elif lname == b"transfer-encoding":
                self._codings = value if self._codings is None else self._codings + b"," + value
            else:
                body.websocket = value.lower() == b"websocket"

    def on_headers_complete(self) -> None:
        body = self.parsing
        assert body is not None
        parser = self._parser
        self.in_head = False
        raw_method = parser.get_method()
        method = METHODS.get(raw_method) or raw_method.decode("latin-1")
        target = self.url.decode("latin-1")
        path, _, query = target.partition("?")
        version = body.http_version = parser.get_http_version()
        if self._codings is not None:
            _check_codings(self._codings, version)
        body.keep_alive = parser.should_keep_alive()
        body.is_head = method == "HEAD"
        if not body.websocket:
            self._head_chunks = []  # only an upgrade needs the raw head; do not hold the read buffer
        self.ready.append(HttpRequest(method, target, path, query, self._headers, body, self._client, version))

    def on_body(self, data: bytes) -> None:
        body = self.parsing
        assert body is not None
        body.chunks.append(data)
        body.received += len(data)

    def on_message_complete(self) -> None:
        body = self.parsing
        assert body is not None
        body.complete = True
        self._completed = body
        self.parsing = None
        self._fresh_feed = False


def _check_codings(codings: bytes, version: str) -> None:
    """Refuse a Transfer-Encoding we cannot frame by, before the request reaches a handler (RFC 9112 §6.1).

    HTTP/1.0 has no transfer codings: the framing is faulty and the connection must close after the answer (a
    proxy in front may have framed the same bytes by Content-Length: request smuggling). A coding other than
    chunked is one we do not decode: 501, rather than hand the handler bytes it would take for the body."""
    if version == "1.0":
        raise _Refused(400, b"Transfer-Encoding in an HTTP/1.0 request")
    listed = [c.strip().lower() for c in codings.split(b",")]
    listed = [c for c in listed if c]  # empty list elements are allowed (RFC 9110 §5.6.1)
    if any(c != b"chunked" for c in listed):
        raise _Refused(501, b"transfer coding not implemented: only chunked is")
    if len(listed) != 1:
        raise _Refused(400, b"Transfer-Encoding must be chunked, once")


def frame_head(
    status: int, headers: Headers, length: int | None, body: Body, keep: bool, dates: rh.DateCache
) -> tuple[bytes, int, bool, int]:
    """A response head for the request of `body`: (head, framing, keep-alive, content-length to count down).

    `length`: the body's size when it is given whole, None for a streamed body. `keep`: whether the connection
    may stay open as far as the shell knows (not closing, not draining, the body read or drainable); the
    request and the framing may still rule it out. Raises ValueError for an invalid app Content-Length or a
    header that smuggles CR/LF (response splitting)."""
    parts = [rh.STATUS_LINES.get(status) or rh.status_line(status)]
    app_length, lines, flags = rh.encode_headers(headers, parts)
    lines += 2
    keep = keep and body.keep_alive and not body.upgrade
    remaining = 0
    if status < 200 or status in _BODYLESS_STATUS:
        framing = NO_BODY
    elif body.is_head:
        framing = NO_BODY
        if app_length is not None:
            parts += (b"content-length: ", app_length, b"\r\n")
            lines += 1
        elif length is not None:
            parts.append(b"content-length: %d\r\n" % length)
            lines += 1
    elif length is not None:
        framing = IDENTITY
        parts.append(b"content-length: %d\r\n" % length)
        lines += 1
    elif app_length is not None:
        framing = IDENTITY
        try:
            remaining = int(app_length)
        except ValueError:
            raise ValueError(f"invalid content-length {app_length!r}") from None
        parts += (b"content-length: ", app_length, b"\r\n")
        lines += 1
    elif body.http_version == "1.1":
        framing = CHUNKED
        parts.append(rh.CHUNKED)
        lines += 1
    else:
        framing = UNTIL_CLOSE
        keep = False
    if body.http_version == "1.1":
        if not keep:
            parts.append(rh.CONNECTION_CLOSE)
            lines += 1
    else:
        parts.append(rh.CONNECTION_KEEP_ALIVE if keep else rh.CONNECTION_CLOSE)
        lines += 1
    if flags == 0:
        parts.append(dates.lines())
        lines += dates.line_count
    else:
        if not flags & 1:
            parts.append(dates.date_line())
            lines += 1
        if not flags & 2 and dates.server_line():
            parts.append(dates.server_line())
            lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        rh.check_head(head, lines)  # raises: a name or value smuggled CR or LF (response splitting)
    return head, framing, keep, remaining
