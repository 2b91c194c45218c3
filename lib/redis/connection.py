"""One Redis connection: open + handshake (TLS, AUTH, SELECT, sentinel discovery) and a multiplexed reply FIFO.

`Connection` is owned by whoever runs `Connection.run()` (the client's slot supervisor); callers only `submit`
packed commands and wait on the returned `Batch`. Replies come back in the order commands were written (RESP
guarantees it), so a FIFO of batches matches them: concurrent callers share one socket and their commands are
written together (automatic pipelining) by one writer task.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import trio

from .config import RedisSettings
from .errors import (
    RedisAuthError,
    RedisConnectionError,
    RedisError,
    RedisProtocolError,
    RedisTimeout,
    map_errors,
)

NOT_ENOUGH: Any = object()
"""hiredis' "no complete reply yet" marker (RESP3 could return False for a real reply)."""

_READ_SIZE = 256 * 1024

# hiredis' stub types the argument as a 1-tuple; any tuple of str/bytes/int/float/memoryview is accepted.
pack_command = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


def new_reader() -> hiredis.Reader:
    return hiredis.Reader(notEnoughData=NOT_ENOUGH)


def _ssl_context(settings: RedisSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def open_stream(host: str, port: int, settings: RedisSettings, *, tls: bool) -> trio.abc.Stream:
    """A TCP (or TLS) stream to host:port within `connect_timeout`; the caller owns and closes it."""
    with map_errors(f"connect to {host}:{port}"), trio.fail_after(settings.connect_timeout):
        if tls:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=_ssl_context(settings))
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
        return await trio.open_tcp_stream(host, port)


async def exchange(
    stream: trio.abc.Stream, reader: hiredis.Reader, commands: Sequence[Sequence[Any]], what: str
) -> list[Any]:
    """Send `commands` at once and read their replies (error replies are returned, not raised).

    Used before a connection is multiplexed (handshake, sentinel queries); the caller applies the timeout.
    """
    with map_errors(what):
        await stream.send_all(b"".join(pack_command(tuple(c)) for c in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is NOT_ENOUGH:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    raise RedisConnectionError(f"{what}: server closed the connection")
                reader.feed(data)  # type: ignore[arg-type]  # bytes at runtime; stubs lack bytearray
                continue
            replies.append(reply)
        return replies


def _auth_command(username: str | None, password: str | None) -> tuple[str, ...] | None:
    if password is None:
        return None
    return ("AUTH", username, password) if username else ("AUTH", password)


async def discover_master(settings: RedisSettings) -> tuple[str, int]:
    """Ask each sentinel in turn for `settings.sentinel_service`'s master address; the first answer wins."""
    assert settings.sentinel_service is not None
    problems: list[str] = []
    for host, port in settings.addresses:
        try:
            stream = await open_stream(host, port, settings, tls=False)
            try:
                commands: list[tuple[str, ...]] = []
                auth = _auth_command(settings.sentinel_username, settings.sentinel_password)
                if auth:
                    commands.append(auth)
                commands.append(("SENTINEL", "get-master-addr-by-name", settings.sentinel_service))
                with map_errors(f"sentinel {host}:{port}"), trio.fail_after(settings.connect_timeout):
                    replies = await exchange(stream, new_reader(), commands, f"sentinel {host}:{port}")
            finally:
                await trio.aclose_forcefully(stream)
        except RedisError as exc:
            problems.append(f"{host}:{port}: {exc}")
            continue
        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if errors:
            problems.append(f"{host}:{port}: {errors[0]}")
            continue
        address = replies[-1]
        if not address:
            problems.append(f"{host}:{port}: does not know master {settings.sentinel_service!r}")
            continue
        return address[0].decode(), int(address[1])
    raise RedisConnectionError(f"no sentinel gave a master for {settings.sentinel_service!r}: " + "; ".join(problems))


async def connect(settings: RedisSettings) -> tuple[trio.abc.Stream, hiredis.Reader, tuple[str, int]]:
    """Open, authenticate and select the database; with sentinels, find the master and check its ROLE.

    Returns the stream (owned by the caller from now on), its reader (which may hold buffered bytes) and the
    address connected to.
    """
    if settings.sentinel_service is not None:
        host, port = await discover_master(settings)
    else:
        host, port = settings.addresses[0]
    stream = await open_stream(host, port, settings, tls=settings.tls)
    reader = new_reader()
    try:
        commands: list[tuple[str, ...]] = []
        auth = _auth_command(settings.username, settings.password)
        if auth:
            commands.append(auth)
        if settings.db:
            commands.append(("SELECT", str(settings.db)))
        if settings.sentinel_service is not None:
            commands.append(("ROLE",))
        if commands:
            what = f"handshake with {host}:{port}"
            with map_errors(what), trio.fail_after(settings.connect_timeout):
                replies = await exchange(stream, reader, commands, what)
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, hiredis.ReplyError):
                    if command[0] == "AUTH":
                        raise RedisAuthError(f"AUTH to {host}:{port} refused: {reply}") from reply
                    raise RedisConnectionError(f"{command[0]} on {host}:{port} failed: {reply}")
                if command[0] == "ROLE" and reply[0] != b"master":
                    raise RedisConnectionError(
                        f"{host}:{port} given by the sentinels is a {reply[0].decode()}, not a master"
                    )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, reader, (host, port)


class Batch:
    """Replies awaited by one caller: `n` replies in order; `event` is set when all arrived or on `error`."""

    __slots__ = ("deadline", "error", "event", "n", "replies")

    def __init__(self, n: int, deadline: float) -> None:
        self.n = n
        self.deadline = deadline
        self.replies: list[Any] = []
        self.event = trio.Event()
        self.error: RedisError | None = None


class Connection:
    """A multiplexed connection. `run()` (its owner) reads and writes until it fails or is cancelled.

    Timeouts are enforced here, not per caller: the reader waits for bytes only until the oldest pending
    batch's deadline; past it the connection is aborted with `RedisTimeout` and every pending batch fails
    (replies are positional, so nothing after a lost reply can be trusted). Callers just wait on their batch.
    """

    def __init__(
        self, stream: trio.abc.Stream, reader: hiredis.Reader, address: tuple[str, int], timeout: float
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._read_scope: trio.CancelScope | None = None
        self._stream = stream
        self._reader = reader
        self._pending: deque[Batch] = deque()
        self._outbox: list[bytes] = []
        self._wake = trio.Event()
        self._error: RedisError | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def usable(self) -> bool:
        return self._error is None

    @property
    def error(self) -> RedisError | None:
        """Why the connection ended (None while usable)."""
        return self._error

    @property
    def inflight(self) -> int:
        return sum(b.n - len(b.replies) for b in self._pending)

    def submit(self, packed: bytes, n: int) -> Batch:
        """Queue already-packed commands expecting `n` replies; written in order with other callers' commands."""
        if self._error is not None:
            raise RedisConnectionError(f"connection to {self._where()} is closed: {self._error}")
        batch = Batch(n, trio.current_time() + self._timeout)
        if not self._pending and self._read_scope is not None:
            self._read_scope.deadline = batch.deadline  # the reader was waiting with no deadline
        self._pending.append(batch)
        self._outbox.append(packed)
        self._wake.set()
        return batch

    def abort(self, error: RedisError) -> None:
        """End the connection: every pending batch fails with `error`'s message; run() returns soon."""
        if self._error is None:
            self._error = error
        pending, self._pending = self._pending, deque()
        for batch in pending:
            batch.error = error
            batch.event.set()
        self._outbox.clear()
        if self._scope is not None:
            self._scope.cancel()

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    async def run(self) -> None:
        """Pump bytes both ways until the connection fails, is aborted or this task is cancelled; then close."""
        try:
            with trio.CancelScope() as self._scope:
                if self._error is not None:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._read_loop)
        finally:
            self.abort(RedisConnectionError(f"connection to {self._where()} closed"))
            await trio.aclose_forcefully(self._stream)

    async def _write_loop(self) -> None:
        try:
            with map_errors(f"write to {self._where()}"):
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    if not self._outbox:
                        continue
                    data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
                    self._outbox.clear()
                    await self._stream.send_all(data)
        except RedisError as exc:
            self.abort(exc)

    async def _read_loop(self) -> None:
        reader = self._reader
        pending = self._pending
        try:
            with map_errors(f"read from {self._where()}"):
                while True:
                    reply = reader.gets()
                    if reply is NOT_ENOUGH:
                        deadline = pending[0].deadline if pending else math.inf
                        data: bytes | bytearray = b""
                        with trio.CancelScope(deadline=deadline) as scope:
                            self._read_scope = scope
                            data = await self._stream.receive_some(_READ_SIZE)
                        self._read_scope = None
                        if scope.cancelled_caught:
                            raise RedisTimeout(
                                f"no reply from {self._where()} within {self._timeout}s"
                            ) from trio.TooSlowError()
                        if not data:
                            raise RedisConnectionError(f"{self._where()} closed the connection")
                        reader.feed(data)  # type: ignore[arg-type]  # bytes at runtime; stubs lack bytearray
                        # abort() swaps the deque; keep reading into the current one.
                        pending = self._pending
                        continue
                    if not pending:
                        raise RedisProtocolError(f"unexpected reply from {self._where()}: {reply!r:.80}")
                    batch = pending[0]
                    batch.replies.append(reply)
                    if len(batch.replies) == batch.n:
                        pending.popleft()
                        batch.event.set()
        except RedisError as exc:
            self.abort(exc)
