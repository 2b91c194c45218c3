"""One HTTP/1.1 connection: parse with httptools, call the app once per request, answer in order.

Ownership: the connection's task (started by `HttpServer`) owns the stream and closes it, unless it hands the
stream to a WebSocket handler, which then owns it. Everything here runs in that one task: the app's
`handle_http` is awaited inline (no task per request), and reading the request body pulls from the socket in
the app's own call. Nothing reads ahead of the app beyond one socket read (`HttpSettings.read_size`), so
pipelined requests queue up to at most one read's worth.

Timeouts cost no timer objects: each wait on the client records a deadline in `read_deadline` /
`write_deadline`; the server's reaper cancels `scope` when one has passed (see `HttpServer`). A stalled client
therefore surfaces in the app as `trio.Cancelled`; a vanished one as `ClientDisconnected` from a write.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools
import trio

from mbworker.lib.http import response_head as rh
from mbworker.lib.http.types import (
    BadRequestBody,
    BodyTooLarge,
    ClientDisconnected,
    Headers,
    HttpApp,
    HttpRequest,
    WebSocketHandler,
)
from mbworker.lib.nonblocking import write_some

if TYPE_CHECKING:
    from mbworker.lib.http.server import HttpServer

logger = logging.getLogger("mbworker.http")  # under "mbworker": JSON lines like the rest (worker/logs.py)

_INF: Final = math.inf
_METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}
_INTERESTING: Final = frozenset((b"expect", b"content-length", b"upgrade"))
_BODYLESS_STATUS: Final = frozenset((204, 304))

# Server-made error responses: JSON `{"code", "message"}` like every other error of the worker.
_ERRORS: Final = {
    400: (b"BAD_REQUEST", b"malformed HTTP request"),
    408: (b"REQUEST_TIMEOUT", b"request body too slow"),
    413: (b"PAYLOAD_TOO_LARGE", b"request body too large"),
    431: (b"REQUEST_HEADER_FIELDS_TOO_LARGE", b"request head too large"),
    500: (b"INTERNAL_SERVER_ERROR", b"internal server error"),
}


def _error_body(status: int) -> bytes:
    code, message = _ERRORS[status]
    return b'{"code":"%s","message":"%s"}' % (code, message)


_JSON: Final[Headers] = [(b"content-type", b"application/json")]
_LATER_MAX: Final = 128 * 1024
"""Most response bytes one connection holds for the end-of-pass flush; past it they are written at once."""

# Responder states and body framings.
_FRESH, _STREAMING, _DONE = 0, 1, 2
_CHUNKED, _IDENTITY, _UNTIL_CLOSE, _NO_BODY = 0, 1, 2, 3


class _ParseFailure(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _HeadTooLarge(Exception):
    pass


class Body:
    """One request's body and framing facts; implements `RequestBody`. Owned by its connection.

    `chunks` fills as the parser meets body bytes; the app's reads pull more from the socket while the request's
    handler runs. After the handler returns, unread bytes are drained (up to `max_drain_bytes`) or the connection
    closes.
    """

    __slots__ = (
        "_conn",
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

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
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
        """When the app first waited for body bytes (trio clock); -1 until then."""
        # No reference back to the HttpRequest (which holds this body): a cycle per request would leave every
        # request's objects to the cyclic GC, whose collections then cost more than the rest of the path.

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        chunks = self.chunks
        while not chunks:
            if self.complete:
                raise StopAsyncIteration
            await self._conn.read_body(self)
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


class Responder:
    """Writes one response (implements `types.Responder`). `send` once, or `start` / `write`* / `end`.

    Streamed bodies use chunked encoding for HTTP/1.1, the app's own Content-Length when it gives one, and
    close-delimited bodies for HTTP/1.0. Write failures raise `ClientDisconnected`.
    """

    __slots__ = ("_body", "_conn", "_framing", "_remaining", "_state", "keep_alive")

    def __init__(self, conn: Connection, body: Body) -> None:
        self._conn = conn
        self._body = body
        self._state = _FRESH
        self._framing = _CHUNKED
        self._remaining = 0
        self.keep_alive = False

    @property
    def started(self) -> bool:
        return self._state != _FRESH

    @property
    def ended(self) -> bool:
        return self._state == _DONE

    def _head(self, status: int, headers: Headers, length: int | None) -> bytes:
        """Build the head; `length` None means a streamed body. Decides framing and keep-alive."""
        conn = self._conn
        body = self._body
        parts = [rh.STATUS_LINES.get(status) or rh.status_line(status)]
        app_length, lines, flags = rh.encode_headers(headers, parts)
        lines += 2
        keep = (
            body.keep_alive
            and not conn.closing
            and not conn.server.draining
            and not body.upgrade
            and (body.complete or conn.may_drain(body))
        )
        if status < 200 or status in _BODYLESS_STATUS:
            self._framing = _NO_BODY
        elif body.is_head:
            self._framing = _NO_BODY
            if app_length is not None:
                parts += (b"content-length: ", app_length, b"\r\n")
                lines += 1
            elif length is not None:
                parts.append(b"content-length: %d\r\n" % length)
                lines += 1
        elif length is not None:
            self._framing = _IDENTITY
            parts.append(b"content-length: %d\r\n" % length)
            lines += 1
        elif app_length is not None:
            self._framing = _IDENTITY
            try:
                self._remaining = int(app_length)
            except ValueError:
                raise ValueError(f"invalid content-length {app_length!r}") from None
            parts += (b"content-length: ", app_length, b"\r\n")
            lines += 1
        elif body.http_version == "1.1":
            self._framing = _CHUNKED
            parts.append(rh.CHUNKED)
            lines += 1
        else:
            self._framing = _UNTIL_CLOSE
            keep = False
        if body.http_version == "1.1":
            if not keep:
                parts.append(rh.CONNECTION_CLOSE)
                lines += 1
        else:
            parts.append(rh.CONNECTION_KEEP_ALIVE if keep else rh.CONNECTION_CLOSE)
            lines += 1
        dates = conn.dates
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
        self.keep_alive = keep
        return head

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None:
        if self._state != _FRESH:
            raise RuntimeError("the response has already started")
        head = self._head(status, headers, len(body))
        self._state = _DONE
        conn = self._conn
        if self._framing == _NO_BODY or not body:
            data = head
        elif len(body) <= 65536:
            data = head + body
        else:
            await conn.send(head)
            await conn.send(body)
            return
        if self.keep_alive and conn.writing is None:
            conn.send_later(data)  # the connection reads on after this: the write can wait for the pass's end
        else:
            await conn.send(data)  # behind a write the client is slow to take: wait (backpressure)

    async def start(self, status: int, headers: Headers) -> None:
        if self._state != _FRESH:
            raise RuntimeError("the response has already started")
        head = self._head(status, headers, None)
        self._state = _STREAMING
        await self._conn.send(head)

    async def write(self, chunk: bytes) -> None:
        if self._state != _STREAMING:
            raise RuntimeError("write() needs start() first and no end()")
        if not chunk:
            return
        framing = self._framing
        # Streamed writes always yield (send_all): an app writing in a tight loop must not starve the others.
        if framing == _CHUNKED:
            await self._conn.send_all(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
        elif framing == _IDENTITY:
            self._remaining -= len(chunk)
            if self._remaining < 0:
                self.keep_alive = False
                raise ValueError("response body longer than its content-length")
            await self._conn.send_all(chunk)
        elif framing == _UNTIL_CLOSE:
            await self._conn.send_all(chunk)

    async def end(self) -> None:
        if self._state == _DONE:
            return
        if self._state == _FRESH:
            raise RuntimeError("end() needs start() first")
        self._state = _DONE
        if self._framing == _CHUNKED:
            await self._conn.send(rh.LAST_CHUNK)
        elif self._framing == _IDENTITY and self._remaining != 0:
            # Shorter than announced: only closing tells the client the body is incomplete.
            self.keep_alive = False


class Connection:
    """The state of one connection and its httptools callbacks (see the module docstring)."""

    # Slots: a connection outlives its HTTP use as a WebSocket, and past 30 attributes CPython would give each
    # instance a dict of its own (~1.6 KB).
    __slots__ = (
        "__weakref__",
        "_app",
        "_client",
        "_coalescer",
        "_completed",
        "_current",
        "_failure",
        "_fresh_feed",
        "_head_chunks",
        "_head_exact",
        "_head_size",
        "_headers",
        "_in_head",
        "_later",
        "_max_drain",
        "_max_head",
        "_parser",
        "_parsing",
        "_read_size",
        "_ready",
        "_sock",
        "_stream",
        "_upgrade",
        "_upgrade_buffer",
        "_upgraded",
        "_url",
        "closing",
        "dates",
        "idle",
        "read_deadline",
        "scope",
        "server",
        "write_deadline",
        "writing",
    )

    def __init__(self, server: HttpServer, app: HttpApp, stream: trio.SocketStream) -> None:
        settings = server.settings
        self.server = server
        self._app = app
        self._stream = stream
        self.dates = server.dates
        self._read_size = settings.read_size
        self._max_head = settings.max_header_bytes
        self._max_drain = settings.max_drain_bytes
        self._sock = stream.socket
        self._parser = httptools.HttpRequestParser(self)
        self.scope = trio.CancelScope()
        self.read_deadline = _INF
        self.write_deadline = _INF
        self.idle = False
        """True while waiting for the first byte of a request: a drain may close the connection now."""
        self.closing = False
        """Close after the current response (drain, or a framing problem)."""
        self._ready: deque[HttpRequest] = deque()
        """Parsed requests not answered yet (each one's `body` is its `Body`)."""
        self._current: Body | None = None
        self._upgrade: HttpRequest | None = None
        self._failure: _ParseFailure | None = None
        # Parser state for the message being parsed.
        self._parsing: Body | None = None
        self._completed: Body | None = None
        self._in_head = False
        self._url = b""
        self._headers: Headers = []
        self._head_size = 0
        # Raw bytes of the head being parsed, kept for a WebSocket handoff.
        self._head_chunks: list[bytes] = []
        self._head_exact = False
        self._fresh_feed = False
        self._upgrade_buffer = b""
        self._upgraded = False
        self._later = b""
        """Response bytes waiting for the end of the scheduler pass (see `send_later`)."""
        self._coalescer = server.coalescer
        self.writing: trio.Event | None = None
        """Set while a server task finishes a write the kernel did not take at once; every other write waits."""
        try:
            peer = stream.socket.getpeername()
            self._client: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
        except (OSError, IndexError, TypeError):
            self._client = None

    # -- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Body(self)
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_exact = self._fresh_feed

    def on_url(self, url: bytes) -> None:
        self._url += url
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
            body = self._parsing
            assert body is not None
            if lname == b"content-length":
                try:
                    body.content_length = int(value)
                except ValueError:
                    pass  # llhttp rejects it
            elif lname == b"expect":
                body.expect_continue = value.lower() == b"100-continue"
            else:
                body.websocket = value.lower() == b"websocket"

    def on_headers_complete(self) -> None:
        body = self._parsing
        assert body is not None
        parser = self._parser
        self._in_head = False
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        body.keep_alive = parser.should_keep_alive()
        body.is_head = method == "HEAD"
        if not body.websocket:
            self._head_chunks = []  # only an upgrade needs the raw head; do not hold the read buffer
        version = body.http_version = parser.get_http_version()
        self._ready.append(HttpRequest(method, target, path, query, self._headers, body, self._client, version))

    def on_body(self, data: bytes) -> None:
        body = self._parsing
        assert body is not None
        body.chunks.append(data)
        body.received += len(data)

    def on_message_complete(self) -> None:
        body = self._parsing
        assert body is not None
        body.complete = True
        self._completed = body
        self._parsing = None
        self._fresh_feed = False

    # -- reading --------------------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse `data`; parse errors are kept in `_failure` and answered once the requests before them are."""
        if self._upgraded:
            self._upgrade_buffer += data  # not HTTP any more: it belongs to the WebSocket handler
            return
        self._completed = None
        if self._parsing is None:
            self._head_chunks = [data]
        elif self._in_head:
            self._head_chunks.append(data)
        self._fresh_feed = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stopped at the end of an upgrade request: what follows is not HTTP. No more parsing.
            self._upgrade_buffer = data[int(exc.args[0]) :]
            self._upgraded = True
            if self._completed is not None:
                self._completed.upgrade = True
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._failure = _ParseFailure(431, "request head too large")
            else:
                self._failure = _ParseFailure(400, f"malformed request: {exc}")
            return
        if self._in_head and sum(map(len, self._head_chunks)) > self._max_head:
            self._failure = _ParseFailure(431, "request head too large")

    async def _receive(self, timeout: float) -> bytes:
        """One read (b"" at end of stream or on a socket error), within `timeout` (see the reaper).

        What trio's `socket.recv` does (try at once, wait for readability only when the kernel has nothing,
        yield either way) without its wrapping, an async context manager per call: ~14 % of a /health request's
        instructions under callgrind. One difference: trio checks for cancellation before reading, this does
        not (both yield shielded after a read that found data); a cancelled connection stops at its next wait for
        data, and the request loop checks `closing` and `draining` before every read."""
        sock = self._sock
        if not self._later:  # with a response still queued, the client has nothing to send yet: just wait
            try:
                data = os.read(sock.fileno(), self._read_size)  # the fd is -1 once closed: EBADF, not another socket
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                # A read that did not wait still yields, so one busy client cannot hold the loop (as trio's does).
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        self.read_deadline = trio.current_time() + timeout
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return os.read(sock.fileno(), self._read_size)
                except BlockingIOError:
                    continue
        except (OSError, trio.ClosedResourceError):
            return b""
        finally:
            self.read_deadline = _INF

    async def read_body(self, body: Body) -> None:
        """Read from the socket until `body` has a chunk or is complete. Called by `Body` reads."""
        if body is not self._current:
            raise RuntimeError("a request body can only be read while its handler runs")
        if self._failure is not None:
            raise BadRequestBody(str(self._failure))
        if body.expect_continue and not body.continue_sent:
            body.continue_sent = True
            await self.send(rh.CONTINUE)
        data = await self._receive_body(body)
        if not data:
            self.closing = True
            raise ClientDisconnected("the connection closed before the request body ended")
        self._feed(data)
        if not body.complete and not body.chunks and self._failure is not None:
            self.closing = True
            raise BadRequestBody(str(self._failure))

    async def _receive_body(self, body: Body) -> bytes:
        """One read for `body` (b"" at end of stream), or `BadRequestBody` with status 408 when the client is too
        slow: no byte within `body_timeout_s`, a rate below `body_min_rate` once `body_grace_s` has passed (as
        Apache's mod_reqtimeout: each byte received extends the deadline by 1/rate s), or the whole body past
        `body_deadline_s`. A trickling client thus frees its connection (and whatever the app holds for it).

        A cancel scope of its own (not the reaper's deadline, which cancels the connection without an answer):
        only a body that is not there yet gets here, never the common request whose body came with its head."""
        settings = self.server.settings
        now = trio.current_time()
        if body.started_at < 0:
            body.started_at = now
        deadline = min(now + settings.body_timeout_s, body.started_at + settings.body_deadline_s)
        if settings.body_min_rate > 0:
            deadline = min(deadline, body.started_at + settings.body_grace_s + body.received / settings.body_min_rate)
        with trio.move_on_at(deadline):
            return await self._receive(_INF)
        self.closing = True
        self.server.timeouts += 1
        raise BadRequestBody(f"request body too slow ({body.received} bytes received)", status=408)

    def may_drain(self, body: Body) -> bool:
        """Whether an unread body may be discarded to keep the connection (else it closes after the response)."""
        if body.expect_continue and not body.continue_sent:
            return False  # the client waits for our answer before sending; it will not come
        return body.content_length is None or body.content_length <= self._max_drain

    async def _drain(self, body: Body) -> bool:
        """Discard the rest of `body`; False when it is too large or broken (close the connection)."""
        budget = self._max_drain
        body.chunks.clear()
        while not body.complete:
            if self._failure is not None:
                return False
            try:
                data = await self._receive_body(body)
            except BadRequestBody:
                return False
            if not data:
                return False
            budget -= len(data)
            if budget < 0:
                return False
            self._feed(data)
            body.chunks.clear()
        return True

    # -- writing --------------------------------------------------------------------------------------------------

    def send_later(self, data: bytes) -> None:
        """Queue a complete response for the end-of-pass flush (`lib.nonblocking.pass_flusher`), or write it now.
        Not while `writing` (that is `send`'s case: it waits, so a client that does not read stops being served).

        Only for responses after which the connection goes back to reading: the bytes leave when trio has run
        every ready task and is about to wait for I/O, together with the other connections' responses, instead
        of one by one between them. On loopback a write also runs the reader's side of TCP and wakes the reader;
        a client woken once per pass, not once per response, costs both processes less (docs/benchmarks.md).
        """
        if self.writing is not None:
            raise RuntimeError("send_later() behind an unfinished write: use send(), which waits")
        if self._later:
            self._later += data  # pipelined: behind the response still waiting, and flushed with it
            if len(self._later) > _LATER_MAX:
                self.flush()
            return
        coalescer = self._coalescer
        if coalescer is None or len(data) > _LATER_MAX:
            self._write_now(data)
            return
        self._later = data
        coalescer.add(self)

    def flush(self) -> None:
        """Write what `send_later` queued (the pass flusher calls this; so does every other write, first). Never
        raises: a broken connection shows up at its next read or write."""
        if self._later and self.writing is None:
            data, self._later = self._later, b""
            self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        """Write `data` without waiting; what the kernel does not take now is finished by a server task."""
        try:
            sent = write_some(self._sock.fileno(), data)  # the fd is -1 once closed: EBADF, not another socket
        except OSError:
            self.closing = True
            return
        if sent < len(data):
            self.writing = trio.Event()  # set now, not when the task starts: no write may slip in before it
            self.server.finish_write(self, memoryview(data)[sent:])

    async def finish_write(self, rest: memoryview) -> None:
        """Run by the server for bytes the kernel did not take at once (a client that reads slowly), within the
        write timeout. Nothing queues behind them: every other write waits on `writing` (`send_later` refuses).
        If the client does not take them, the connection is cancelled (its response is lost)."""
        done = self.writing
        assert done is not None
        try:
            with trio.move_on_after(self.server.settings.write_timeout_s) as timer:
                await self._stream.send_all(rest)
            if timer.cancelled_caught:
                self.server.timeouts += 1
                self._abandon()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._abandon()
        finally:
            self.writing = None
            done.set()

    def _abandon(self) -> None:
        self.closing = True
        self.scope.cancel()

    async def _settle_writes(self) -> None:
        """Put every earlier byte on the wire (or in the finishing task's hands, then wait for it): before a
        write of another kind, a WebSocket hand-off or a close, so bytes keep their order."""
        self.flush()
        while self.writing is not None:
            await self.writing.wait()

    async def send(self, data: bytes) -> None:
        """Write `data` whole. Hot path: when the kernel takes it all at once this does not yield (the request
        loop yields at every read), saving a trip through the scheduler per response."""
        if self._later or self.writing is not None:
            await self._settle_writes()
        try:
            sent = write_some(self._sock.fileno(), data)
        except OSError as exc:
            self.closing = True
            raise ClientDisconnected("the client closed the connection") from exc
        if sent < len(data):
            await self.send_all(memoryview(data)[sent:])

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write `data` whole, waiting for the client as needed (bounded by the write timeout); yields."""
        if self._later or self.writing is not None:
            await self._settle_writes()
        self.write_deadline = trio.current_time() + self.server.settings.write_timeout_s
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closing = True
            raise ClientDisconnected("the client closed the connection") from exc
        finally:
            self.write_deadline = _INF

    # -- the connection's life ------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the connection ends; closes the stream unless a WebSocket handler took it."""
        handler: WebSocketHandler | None = None
        try:
            with self.scope:
                handler = await self._serve_requests()
                if handler is not None:
                    # Out here, not inside the request loop: its frame (and what it references) is gone
                    # for the WebSocket's whole life.
                    await self._hand_off(handler)
        finally:
            if handler is None:
                try:
                    await self._settle_writes()  # e.g. a client that half-closed after its last request
                finally:
                    await trio.aclose_forcefully(self._stream)
                    # The parser holds our bound callbacks: without this, each closed connection would be a
                    # cycle for the GC to find.
                    self._parser = None  # type: ignore[assignment]

    async def _serve_requests(self) -> WebSocketHandler | None:
        """The request loop. Returns the WebSocket handler to hand the stream to (the upgrade request is in
        `_upgrade`), or None when the connection is done."""
        ready = self._ready
        server = self.server
        settings = server.settings
        timeout = settings.header_timeout_s  # the first request of a connection gets the head budget
        fresh = False  # whether a read (which yields) came since the last request
        while True:
            if not ready:
                if self._failure is not None:
                    await self._reject(self._failure.status)
                    return None
                if self.closing or server.draining:
                    return None
                self.idle = True
                data = await self._receive(timeout)
                self.idle = False
                if not data:
                    return None
                self._feed(data)
                fresh = True
                if self._in_head and self._failure is None and not await self._finish_head(settings.header_timeout_s):
                    return None
                continue
            timeout = settings.keep_alive_timeout_s
            if not fresh:
                # Pipelined requests are answered without reads, and an answer the kernel takes at once does
                # not yield either: yield here so one pipelining client cannot hold the loop.
                await trio.lowlevel.checkpoint()
            fresh = False
            request = ready.popleft()
            body = cast(Body, request.body)
            if body.upgrade and body.websocket and self._upgrade_ready(body):
                handler = self._app.websocket_handler(request)
                if handler is not None:
                    self._upgrade = request  # for `_take_upgrade`
                    return handler
            if not await self._respond(request, body):
                if not body.complete:
                    await self._linger()
                return None

    async def _finish_head(self, timeout: float) -> bool:
        """Read until the head in progress is complete, within `timeout` of its first byte (slowloris).

        False when the client closed the connection first."""
        deadline = trio.current_time() + timeout
        while self._in_head and self._failure is None:
            self.read_deadline = deadline
            try:
                data = await self._stream.receive_some(self._read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self.read_deadline = _INF
            if not data:
                return False
            self._feed(data)
        return True

    def _upgrade_ready(self, body: Body) -> bool:
        # The upgrade request must be the last parsed one: llhttp stopped at its end.
        return not self._ready and self._parsing is None and body.complete

    async def _respond(self, request: HttpRequest, body: Body) -> bool:
        """Call the app for one request; returns whether the connection stays open."""
        server = self.server
        responder = Responder(self, body)
        self._current = body
        try:
            await self._app.handle_http(request, responder)
        except ClientDisconnected:
            return False
        except BodyTooLarge:
            if responder.started:
                return False
            await self._answer_error(responder, 413)
        except BadRequestBody as exc:
            if responder.started:
                return False
            self.closing = True
            await self._answer_error(responder, exc.status if exc.status in _ERRORS else 400)
        except Exception:
            logger.exception("HTTP handler failed on %s %s", request.method, request.path)
            if responder.started:
                return False
            await self._answer_error(responder, 500)
        finally:
            self._current = None
        state = responder._state  # not the properties: this runs once per request
        if state == _FRESH:
            logger.error("HTTP handler returned without a response on %s %s", request.method, request.path)
            await self._answer_error(responder, 500)
        elif state != _DONE:
            try:
                await responder.end()
            except ClientDisconnected:
                return False
        server.requests_served += 1
        if not responder.keep_alive or self.closing:
            return False
        if not body.complete:
            return await self._drain(body)
        return True

    async def _answer_error(self, responder: Responder, status: int) -> None:
        try:
            await responder.send(status, _JSON, _error_body(status))
        except ClientDisconnected:
            responder.keep_alive = False

    async def _reject(self, status: int) -> None:
        """Answer a request that could not be parsed, then close (after lingering so the client reads it)."""
        self.server.bad_requests += 1
        head = b"".join(
            (
                rh.status_line(status),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(_error_body(status)),
                rh.CONNECTION_CLOSE,
                self.dates.lines(),
                b"\r\n",
            )
        )
        try:
            await self.send(head + _error_body(status))
        except ClientDisconnected:
            return
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then read and discard for a moment: closing with unread input makes the kernel send RST,
        which can destroy the response before the client reads it."""
        timeout = self.server.settings.linger_timeout_s
        if timeout <= 0:
            return
        await self._settle_writes()
        try:
            await self._stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        budget = self._max_drain + self._read_size
        with trio.move_on_after(timeout):
            while budget > 0:
                try:
                    data = await self._stream.receive_some(self._read_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                budget -= len(data)

    async def _hand_off(self, handler: WebSocketHandler) -> None:
        """Give the stream and every byte read so far to a WebSocket handler, which owns the stream from now."""
        self.server.websocket_handoffs += 1
        await self._settle_writes()  # responses to requests pipelined before the upgrade go first
        try:
            # No local holds the request or the bytes: the handler may drop them after its handshake.
            await handler(self._stream, *self._take_upgrade())
        except Exception:
            logger.exception("WebSocket handler failed on %s", self._url.decode("latin-1").partition("?")[0])
        finally:
            # The handler owns the stream; closing it again is a no-op, and it stops a buggy handler leaking it.
            await trio.aclose_forcefully(self._stream)

    def _take_upgrade(self) -> tuple[bytes, HttpRequest]:
        """The upgrade request and every byte read so far; releases the HTTP state this connection will not
        use again (parser, queues, head buffers: ~4 KB that would otherwise live as long as the WebSocket).
        `_url` stays: it is the upgrade request's target (for the log)."""
        request = self._upgrade
        assert request is not None
        buffered = self._raw_head(request) + self._upgrade_buffer
        self._parser = None  # type: ignore[assignment]  # never fed again after a hand-off
        self._ready = None  # type: ignore[assignment]
        self._head_chunks = []
        self._headers = []
        self._upgrade_buffer = b""
        self._parsing = self._completed = self._current = self._upgrade = None
        return buffered, request

    def _raw_head(self, request: HttpRequest) -> bytes:
        """The upgrade request's head as received; re-serialised when it shared a read with an earlier request."""
        if self._head_exact:
            head = b"".join(self._head_chunks)
            return head[: len(head) - len(self._upgrade_buffer)]
        parts = [
            b"%s %s HTTP/%s\r\n"
            % (request.method.encode(), request.target.encode("latin-1"), request.http_version.encode())
        ]
        parts += [b"%s: %s\r\n" % (k, v) for k, v in request.headers]
        parts.append(b"\r\n")
        return b"".join(parts)
