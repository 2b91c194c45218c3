"""The HTTP/1.1 front door: listeners, one task per connection, timeouts, drain.

`serve_http` owns the listening sockets, every connection task and the reaper that enforces timeouts. It calls
`task_status.started(HttpServer)` once bound and returns after `HttpServer.drain` (or when cancelled, which
closes everything at once).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from mbworker.lib.http.connection import Connection
from mbworker.lib.http.response_head import DateCache
from mbworker.lib.http.settings import HttpSettings
from mbworker.lib.http.types import HttpApp
from mbworker.lib.nonblocking import PassFlusher, pass_flusher

__all__ = ["HttpServer", "HttpServerStatistics", "serve_http"]

logger = logging.getLogger("mbworker.http")  # under "mbworker": JSON lines like the rest (worker/logs.py)

# accept() errors that mean "out of resources right now": wait and retry rather than die (as trio does).
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    e for e in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS) if e is not None
)


@dataclass(frozen=True, slots=True)
class HttpServerStatistics:
    connections_open: int
    """Connections with a live task, WebSockets included."""
    connections_total: int
    """Connections accepted since start."""
    requests_served: int
    """Responses completed (the app's or the server's 413/500)."""
    websocket_handoffs: int
    """Connections handed to a WebSocket handler."""
    bad_requests: int
    """Connections closed after a parse error (400) or an oversize head (431)."""
    timeouts: int
    """Connections cancelled because the client was too slow (idle, head, body or write)."""
    draining: bool
    """`drain` was called: no new connections are accepted."""
    stalled_writes: int
    """Responses the kernel did not take at once (a client reading slowly), finished by a server task."""


class HttpServer:
    """The handle `serve_http` gives to `task_status.started`. Owned by `serve_http`; callers only read it and
    call `drain`."""

    def __init__(self, app: HttpApp, settings: HttpSettings, listeners: list[trio.SocketListener]) -> None:
        self.app = app
        self.settings = settings
        self.dates = DateCache(settings.server_header)
        self._listeners = listeners
        self.addresses: list[tuple[str, int]] = []
        for listener in listeners:
            name = listener.socket.getsockname()
            self.addresses.append((str(name[0]), int(name[1])))
        self.draining = False
        self.requests_served = 0
        self.websocket_handoffs = 0
        self.bad_requests = 0
        self.timeouts = 0
        self.stalled_writes = 0
        self._connections_total = 0
        self._connections: set[Connection] = set()
        self._slot_free = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._finished = trio.Event()
        self.coalescer: PassFlusher | None = pass_flusher() if settings.coalesce_writes else None
        """Where connections queue complete responses for the end of the scheduler pass (`Connection.send_later`)."""
        self._writers: trio.Nursery | None = None

    @property
    def port(self) -> int:
        """The first listener's port. With host None and port 0, trio binds IPv4 and IPv6 on different free
        ports: see `addresses`, or pass a concrete host."""
        return self.addresses[0][1]

    def statistics(self) -> HttpServerStatistics:
        return HttpServerStatistics(
            connections_open=len(self._connections),
            connections_total=self._connections_total,
            requests_served=self.requests_served,
            websocket_handoffs=self.websocket_handoffs,
            bad_requests=self.bad_requests,
            timeouts=self.timeouts,
            draining=self.draining,
            stalled_writes=self.stalled_writes,
        )

    async def drain(self, grace: float) -> None:
        """Stop accepting (new connections are refused), close idle keep-alive connections, let requests in
        flight finish (each connection closes after its current response) for up to `grace` seconds, then
        cancel whatever remains (WebSocket connections included). Returns once `serve_http` has returned."""
        if not self.draining:
            self.draining = True
            self._accept_scope.cancel()
            for conn in self._connections:
                if conn.idle:
                    conn.scope.cancel()
        with trio.move_on_after(grace):
            await self._finished.wait()
        self._connections_scope.cancel()
        # Cancelled connections only close their sockets; this is quick, but bounded all the same.
        with trio.move_on_after(max(5.0, grace)):
            await self._finished.wait()

    def finish_write(self, conn: Connection, rest: memoryview) -> None:
        """Start the task that finishes a write the kernel did not take at once (`Connection.finish_write`)."""
        self.stalled_writes += 1
        if self._writers is not None:
            try:
                self._writers.start_soon(conn.finish_write, rest)
                return
            except RuntimeError:  # the nursery closed meanwhile
                pass
        # No task can finish it: the server is going away, and so is the connection.
        writing, conn.writing = conn.writing, None
        if writing is not None:
            writing.set()
        conn.closing = True
        conn.scope.cancel()

    async def _serve(self, task_status: trio.TaskStatus[HttpServer]) -> None:
        try:
            async with trio.open_nursery() as reaper_nursery:
                reaper_nursery.start_soon(self._reap)
                with self._connections_scope:
                    async with trio.open_nursery() as connections:
                        self._writers = connections
                        with self._accept_scope:
                            async with trio.open_nursery() as acceptors:
                                for listener in self._listeners:
                                    acceptors.start_soon(self._accept, listener, connections)
                                task_status.started(self)
                        # Draining: closing the listeners makes new connection attempts fail fast.
                        for listener in self._listeners:
                            await trio.aclose_forcefully(listener)
                reaper_nursery.cancel_scope.cancel()
        finally:
            self._writers = None
            for listener in self._listeners:
                await trio.aclose_forcefully(listener)
            self._finished.set()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        limit = self.settings.max_connections
        while True:
            # Backpressure: past the limit, leave new connections in the kernel's backlog.
            while len(self._connections) >= limit:
                if self._slot_free.is_set():
                    self._slot_free = trio.Event()  # shared by every listener's acceptor
                await self._slot_free.wait()
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    logger.error("accept() failed, out of resources; retrying in 100 ms", exc_info=exc)
                    await trio.sleep(0.1)
                    continue
                raise
            conn = Connection(self, self.app, stream)
            self._connections.add(conn)
            self._connections_total += 1
            nursery.start_soon(self._run, conn)

    async def _run(self, conn: Connection) -> None:
        try:
            await conn.serve()
        except Exception:
            logger.exception("HTTP connection failed")
        finally:
            self._connections.discard(conn)
            self._slot_free.set()

    async def _reap(self) -> None:
        """Cancel connections whose current wait on the client has passed its deadline."""
        tick = self.settings.tick()
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for conn in self._connections:
                late = conn.read_deadline < now or conn.write_deadline < now
                if late and not conn.scope.cancel_called:
                    self.timeouts += 1
                    conn.scope.cancel()


async def serve_http(
    app: HttpApp,
    host: str | None,
    port: int,
    *,
    settings: HttpSettings | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 on `host`:`port` (0 picks a free port; see `HttpServer.port`) until drained or cancelled.

    Calls `task_status.started(HttpServer)` once the listeners are bound.
    """
    settings = settings or HttpSettings()
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=settings.backlog)
    await HttpServer(app, settings, listeners)._serve(task_status)
