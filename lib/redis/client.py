"""`RedisClient`: a pool of multiplexed connections with automatic pipelining, timeouts and reconnects.

Owner: `open_redis()` (an async context manager) owns the client, its nursery and every connection; leaving
the block closes them. Each pool slot has a supervisor task that connects, runs the connection until it
fails, and reconnects with exponential backoff + jitter. Commands never wait for a reconnect: while no
connection is up they fail fast with `RedisConnectionError` (the daemon degrades to local work) and
`state` is `DEGRADED`; `wait_connected()` waits for recovery.

Concurrent commands from many tasks share a connection: each call appends its packed bytes to the
connection's outbox and waits for its reply in FIFO order, so one `send` carries many commands.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import hiredis
import trio

from mbworker.lib.nursery import open_owned_nursery

from .backoff import backoff_delay
from .commands import Command, Key, RedisCommands, T, Value
from .config import RedisSettings, parse_redis_url
from .connection import Connection, connect, pack_command
from .errors import RedisConnectionError, RedisError, RedisResponseError, RedisTimeout
from .pubsub import PubSub, open_pubsub
from .scripts import Script


class RedisState(enum.Enum):
    CONNECTING = "connecting"
    """Not connected yet (first attempt still running)."""
    CONNECTED = "connected"
    """At least one connection is up and the last connect attempt succeeded."""
    DEGRADED = "degraded"
    """No connection is up; reconnecting in the background."""


@dataclass(frozen=True)
class RedisStatistics:
    state: RedisState
    connections: int
    """Connections up now."""
    connects: int
    """Successful connects (including the first ones)."""
    reconnects: int
    """Successful connects that replaced a lost connection or followed a failed attempt."""
    connect_failures: int
    commands: int
    """Commands sent (a pipeline of n counts n)."""
    response_errors: int
    """Error replies from the server (`-ERR ...`)."""
    connection_errors: int
    """Calls that failed because no connection was up or it broke while they waited."""
    timeouts: int
    inflight: int
    """Commands written or queued whose replies have not arrived."""
    address: tuple[str, int] | None
    """The server the last connection went to (the master, with sentinels)."""


def _check(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        raise RedisResponseError(str(reply)) from reply
    return reply


class RedisClient(RedisCommands):
    """Typed Redis commands (`RedisCommands`) over a pool; get one from `open_redis()`. Safe to share between
    tasks."""

    def __init__(self, settings: RedisSettings, nursery: trio.Nursery) -> None:
        self.settings = settings
        self._nursery = nursery
        self._live: list[Connection] = []
        self._rr = 0
        self._state = RedisState.CONNECTING
        self._state_changed = trio.Event()
        self._last_error: RedisError | None = None
        self._address: tuple[str, int] | None = None
        self._inflight = 0
        self._inflight_lot = trio.lowlevel.ParkingLot()
        self._inflight_waiting = 0
        self._connects = 0
        self._reconnects = 0
        self._connect_failures = 0
        self._commands = 0
        self._response_errors = 0
        self._connection_errors = 0
        self._timeouts = 0

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> RedisState:
        return self._state

    def _set_state(self, state: RedisState) -> None:
        if state is not self._state:
            self._state = state
            self._state_changed.set()
            self._state_changed = trio.Event()

    async def wait_connected(self, timeout: float) -> None:
        """Return once a connection is up; `RedisTimeout` after `timeout` seconds."""
        with trio.move_on_after(timeout):
            while self._state is not RedisState.CONNECTED:
                await self._state_changed.wait()
            return
        raise RedisTimeout(f"Redis not connected after {timeout}s (last error: {self._last_error})")

    def statistics(self) -> RedisStatistics:
        return RedisStatistics(
            state=self._state,
            connections=len(self._live),
            connects=self._connects,
            reconnects=self._reconnects,
            connect_failures=self._connect_failures,
            commands=self._commands,
            response_errors=self._response_errors,
            connection_errors=self._connection_errors,
            timeouts=self._timeouts,
            inflight=self._inflight,
            address=self._address,
        )

    # -- pool supervision -----------------------------------------------------------------------------------

    async def serve_slot(
        self,
        *,
        initial: Connection | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one pooled connection up until cancelled: run it, and on loss reconnect with backoff.

        `started()` once `initial` (if given) is in the pool, or right away."""
        failures = 0
        lost_before = False
        conn = initial
        if conn is not None:
            self._adopt(conn, reconnect=False)
        task_status.started()
        while True:
            if conn is None:
                try:
                    stream, reader, address = await connect(self.settings)
                except RedisError as exc:
                    self._last_error = exc
                    self._connect_failures += 1
                    if not self._live:
                        self._set_state(RedisState.DEGRADED)
                    failures += 1
                    delay = backoff_delay(failures, self.settings.backoff_initial, self.settings.backoff_max)
                    await trio.sleep(delay)
                    continue
                conn = Connection(stream, reader, address, self.settings.command_timeout)
                self._adopt(conn, reconnect=bool(failures or lost_before))
                failures = 0
            try:
                await conn.run()
            finally:
                self._live.remove(conn)
            self._last_error = conn.error
            conn = None
            lost_before = True
            if not self._live:
                self._set_state(RedisState.DEGRADED)
            # A lost connection gets one quick retry (a blip), then the backoff grows.
            await trio.sleep(backoff_delay(0, self.settings.backoff_initial, self.settings.backoff_max))

    def _adopt(self, conn: Connection, *, reconnect: bool) -> None:
        self._connects += 1
        if reconnect:
            self._reconnects += 1
        self._address = conn.address
        self._live.append(conn)
        self._set_state(RedisState.CONNECTED)

    def _pick(self) -> Connection:
        live = self._live
        for _ in range(len(live)):
            self._rr += 1
            conn = live[self._rr % len(live)]
            if conn.usable:  # a dying connection stays listed until its run() has returned
                return conn
        self._connection_errors += 1
        raise RedisConnectionError(f"not connected to Redis (reconnecting): {self._last_error}")

    # -- execution --------------------------------------------------------------------------------------------

    async def _roundtrip(self, packed: bytes, n: int) -> list[Any]:
        """Send packed commands expecting n replies on one connection; replies in order (errors unraised)."""
        while self._inflight >= self.settings.max_inflight:
            with trio.move_on_after(self.settings.command_timeout) as scope:
                self._inflight_waiting += 1
                try:
                    await self._inflight_lot.park()
                finally:
                    self._inflight_waiting -= 1
            if scope.cancelled_caught:
                self._timeouts += 1
                raise RedisTimeout(f"{self.settings.max_inflight} commands already in flight")
        conn = self._pick()
        batch = conn.submit(packed, n)  # the connection enforces command_timeout (see Connection)
        self._commands += n
        self._inflight += n
        try:
            await batch.event.wait()
        finally:
            self._inflight -= n
            if self._inflight_waiting:
                self._inflight_lot.unpark()
        if batch.error is not None:
            if isinstance(batch.error, RedisTimeout):
                self._timeouts += 1
            else:
                self._connection_errors += 1
            raise type(batch.error)(str(batch.error)) from batch.error
        for reply in batch.replies:
            if isinstance(reply, hiredis.ReplyError):
                self._response_errors += 1
                if str(reply).startswith("READONLY"):
                    # A failover demoted our server: drop the connection so the next one rediscovers the master.
                    conn.abort(RedisConnectionError(f"server became a replica: {reply}"))
        return batch.replies

    async def execute_command(self, command: Command[T]) -> T:
        """Send one command and return its decoded reply (the seam every `RedisCommands` method goes through)."""
        reply = (await self._roundtrip(pack_command(command.args), 1))[0]
        _check(reply)
        if command.convert is not None:
            return command.convert(reply)
        result: T = reply  # hiredis's reply is already the declared type (bytes, int, list, None)
        return result

    async def run_commands(self, commands: Sequence[Command[Any]], *, raise_on_error: bool = True) -> list[Any]:
        """Send `commands` back to back on one connection and return their results in order.

        With `raise_on_error`, the first error reply raises `RedisResponseError` (all commands were still
        executed); otherwise error replies are returned in place as `RedisResponseError` instances.
        """
        if not commands:
            return []
        packed = b"".join([pack_command(cmd.args) for cmd in commands])
        replies = await self._roundtrip(packed, len(commands))
        results: list[Any] = []
        for cmd, reply in zip(commands, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                if raise_on_error:
                    _check(reply)
                results.append(RedisResponseError(str(reply)))
            else:
                results.append(cmd.convert(reply) if cmd.convert is not None else reply)
        return results

    async def execute(self, *args: Value) -> Any:
        """Any command, reply unconverted: `await client.execute("XADD", "s", "*", "f", "v")`."""
        command: Command[Any] = Command(args)
        return await self.execute_command(command)

    async def execute_many(self, commands: Sequence[Sequence[Value]], *, raise_on_error: bool = True) -> list[Any]:
        """Several raw commands pipelined on one connection: `[("PUBLISH", "c", b"m"), ...]`."""
        queued: list[Command[Any]] = [Command(tuple(args)) for args in commands]
        return await self.run_commands(queued, raise_on_error=raise_on_error)

    def pipeline(self) -> Pipeline:
        """`async with client.pipeline() as p: n = p.incr(...); p.publish(...); await p.execute(); await n`."""
        return Pipeline(self)

    def pubsub(self, *, buffer: int = 4096, keepalive: float = 15.0) -> AbstractAsyncContextManager[PubSub]:
        """`async with client.pubsub() as ps:` a dedicated pub/sub connection with this client's settings
        (see `open_pubsub`); the block owns it."""
        return open_pubsub(self.settings, buffer=buffer, keepalive=keepalive)

    async def scan_iter(self, *, match: Key | None = None, count: int | None = None) -> AsyncIterator[bytes]:
        """Every key (matching `match`), via SCAN; a key may be yielded twice if the keyspace is rehashed."""
        cursor = 0
        while True:
            cursor, keys = await self.scan(cursor, match=match, count=count)
            for key in keys:
                yield key
            if cursor == 0:
                return

    async def eval_script(self, script: Script, keys: Sequence[Key] = (), args: Sequence[Value] = ()) -> Any:
        """Run `script` by SHA; if the server does not have it (NOSCRIPT: restart, SCRIPT FLUSH), EVAL it,
        which also caches it."""
        try:
            return await self.evalsha(script, tuple(keys), tuple(args))
        except RedisResponseError as exc:
            if exc.code != "NOSCRIPT":
                raise
        return await self.eval(script, tuple(keys), tuple(args))

    async def load_script(self, script: Script) -> None:
        """SCRIPT LOAD ahead of use (for pipelines, which cannot fall back on NOSCRIPT)."""
        await self.execute("SCRIPT", "LOAD", script.source)


@asynccontextmanager
async def open_redis(settings: RedisSettings | str, *, require_connection: bool = True) -> AsyncIterator[RedisClient]:
    """A client for a URL or settings; the block owns it and its connections.

    With `require_connection`, an unreachable server raises `RedisConnectionError` here; otherwise the client
    starts `DEGRADED` and keeps reconnecting in the background."""
    if isinstance(settings, str):
        settings = parse_redis_url(settings)
    first: Connection | None = None
    if require_connection:
        first = Connection(*await connect(settings), settings.command_timeout)
    async with open_owned_nursery() as nursery:
        client = RedisClient(settings, nursery)
        await nursery.start(partial(client.serve_slot, initial=first))
        for _ in range(settings.pool_size - 1):
            nursery.start_soon(client.serve_slot)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()


async def serve_redis(
    settings: RedisSettings | str,
    *,
    require_connection: bool = True,
    task_status: trio.TaskStatus[RedisClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`client = await nursery.start(serve_redis, url)`: the client lives until the nursery is cancelled."""
    async with open_redis(settings, require_connection=require_connection) as client:
        task_status.started(client)
        await trio.sleep_forever()


from .pipeline import Pipeline  # noqa: E402  (the pipeline queues into the client: imported after it)
