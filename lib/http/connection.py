"""One HTTP/1.1 connection, the trio shell around `protocol` (the sans-I/O core): read, feed the parser, call the
app once per request, answer in order, write.

Ownership: the connection's task (started by `HttpServer`) owns the stream and closes it, unless it hands the
stream to a WebSocket handler, which then owns it. Everything here runs in that one task: the app's
`handle_http` is awaited inline (no task per request), and reading the request body pulls from the socket in
the app's own call. Nothing reads ahead of the app beyond one socket read (`HttpSettings.read_size`), so
pipelined requests queue up to at most one read's worth.

Timeouts cost no timer objects: each wait on the client records a deadline in `read_deadline` /
`write_deadline`; the server's reaper cancels `scope` when one has passed (see `HttpServer`). A stalled client
therefore surfaces in the app as `trio.Cancelled` (a slow request body as `BadRequestBody` with status 408, see
`_receive_body`); a vanished one as `ClientDisconnected` from a write.

Writes never wait when the kernel takes the bytes at once (`lib.nonblocking.write_some`), and complete keep-alive
responses leave at the end of the scheduler pass (`lib.nonblocking.pass_flusher`, see `send_later`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Final, cast

import trio

from mbworker.lib.http import response_head as rh
from mbworker.lib.http.protocol import (
    CHUNKED,
    ERRORS,
    IDENTITY,
    JSON,
    NO_BODY,
    UNTIL_CLOSE,
    Body,
    RequestParser,
    error_body,
    error_response,
    frame_head,
)
from mbworker.lib.http.protocol import (
    chunk as frame_chunk,
)
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
_LATER_MAX: Final = 128 * 1024
"""Most response bytes one connection holds for the end-of-pass flush; past it they are written at once."""

# Responder states.
_FRESH, _STREAMING, _DONE = 0, 1, 2


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
        self._framing = CHUNKED
        self._remaining = 0
        self.keep_alive = False

    @property
    def started(self) -> bool:
        return self._state != _FRESH

    @property
    def ended(self) -> bool:
        return self._state == _DONE

    def _head(self, status: int, headers: Headers, length: int | None) -> bytes:
        """Build the head (`protocol.frame_head`); `length` None means a streamed body."""
        conn = self._conn
        body = self._body
        keep = not conn.closing and not conn.server.draining and (body.complete or conn.may_drain(body))
        head, self._framing, self.keep_alive, self._remaining = frame_head(
            status, headers, length, body, keep, conn.dates
        )
        return head

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None:
        if self._state != _FRESH:
            raise RuntimeError("the response has already started")
        head = self._head(status, headers, len(body))
        self._state = _DONE
        conn = self._conn
        if self._framing == NO_BODY or not body:
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
        if framing == CHUNKED:
            await self._conn.send_all(frame_chunk(chunk))
        elif framing == IDENTITY:
            self._remaining -= len(chunk)
            if self._remaining < 0:
                self.keep_alive = False
                raise ValueError("response body longer than its content-length")
            await self._conn.send_all(chunk)
        elif framing == UNTIL_CLOSE:
            await self._conn.send_all(chunk)

    async def end(self) -> None:
        if self._state == _DONE:
            return
        if self._state == _FRESH:
            raise RuntimeError("end() needs start() first")
        self._state = _DONE
        if self._framing == CHUNKED:
            await self._conn.send(rh.LAST_CHUNK)
        elif self._framing == IDENTITY and self._remaining != 0:
            # Shorter than announced: only closing tells the client the body is incomplete.
            self.keep_alive = False


class Connection:
    """The I/O and timeouts of one connection (see the module docstring); parsing is its `RequestParser`'s."""

    # Slots: a connection outlives its HTTP use as a WebSocket, and past 30 attributes CPython would give each
    # instance a dict of its own (~1.6 KB).
    __slots__ = (
        "__weakref__",
        "_app",
        "_coalescer",
        "_current",
        "_http",
        "_later",
        "_max_drain",
        "_read_size",
        "_sock",
        "_stream",
        "_upgrade",
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
        self._max_drain = settings.max_drain_bytes
        self._sock = stream.socket
        self.scope = trio.CancelScope()
        self.read_deadline = _INF
        self.write_deadline = _INF
        self.idle = False
        """True while waiting for the first byte of a request: a drain may close the connection now."""
        self.closing = False
        """Close after the current response (drain, or a framing problem)."""
        self._current: Body | None = None
        self._upgrade: HttpRequest | None = None
        self._later = b""
        """Response bytes waiting for the end of the scheduler pass (see `send_later`)."""
        self._coalescer = server.coalescer
        self.writing: trio.Event | None = None
        """Set while a server task finishes a write the kernel did not take at once; every other write waits."""
        try:
            peer = stream.socket.getpeername()
            client: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
        except (OSError, IndexError, TypeError):
            client = None
        self._http = RequestParser(self, client, settings.max_header_bytes)
        """The sans-I/O core: this shell feeds it what it reads and answers what it parsed."""

    # -- reading --------------------------------------------------------------------------------------------------

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
        if self._http.failure is not None:
            raise BadRequestBody(str(self._http.failure))
        if body.expect_continue and not body.continue_sent:
            body.continue_sent = True
            await self.send(rh.CONTINUE)
        data = await self._receive_body(body)
        if not data:
            self.closing = True
            raise ClientDisconnected("the connection closed before the request body ended")
        self._http.feed(data)
        if not body.complete and not body.chunks and self._http.failure is not None:
            self.closing = True
            raise BadRequestBody(str(self._http.failure))

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
            if self._http.failure is not None:
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
            self._http.feed(data)
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
                    self._http.close()

    async def _serve_requests(self) -> WebSocketHandler | None:
        """The request loop. Returns the WebSocket handler to hand the stream to (the upgrade request is in
        `_upgrade`), or None when the connection is done."""
        http = self._http
        ready = http.ready
        server = self.server
        settings = server.settings
        timeout = settings.header_timeout_s  # the first request of a connection gets the head budget
        fresh = False  # whether a read (which yields) came since the last request
        while True:
            if not ready:
                if http.failure is not None:
                    await self._reject(http.failure.status, http.failure.answer)
                    return None
                if self.closing or server.draining:
                    return None
                self.idle = True
                data = await self._receive(timeout)
                self.idle = False
                if not data:
                    return None
                http.feed(data)
                fresh = True
                if http.in_head and http.failure is None and not await self._finish_head(settings.header_timeout_s):
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
            if body.upgrade and body.websocket and http.upgrade_ready(body):
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
        http = self._http
        while http.in_head and http.failure is None:
            self.read_deadline = deadline
            try:
                data = await self._stream.receive_some(self._read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self.read_deadline = _INF
            if not data:
                return False
            http.feed(data)
        return True

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
            await self._answer_error(responder, exc.status if exc.status in ERRORS else 400)
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
            await responder.send(status, JSON, error_body(status))
        except ClientDisconnected:
            responder.keep_alive = False

    async def _reject(self, status: int, message: bytes | None = None) -> None:
        """Answer a request that could not be parsed, then close (after lingering so the client reads it)."""
        self.server.bad_requests += 1
        try:
            await self.send(error_response(status, self.dates, message))
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
            logger.exception("WebSocket handler failed on %s", self._http.url.decode("latin-1").partition("?")[0])
        finally:
            # The handler owns the stream; closing it again is a no-op, and it stops a buggy handler leaking it.
            await trio.aclose_forcefully(self._stream)

    def _take_upgrade(self) -> tuple[bytes, HttpRequest]:
        """The upgrade request and every byte read from it on; the parser releases what it will not use again."""
        request = self._upgrade
        assert request is not None
        buffered = self._http.take_upgrade(request)
        self._current = self._upgrade = None
        return buffered, request
