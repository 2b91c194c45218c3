"""`Pipeline`: queue commands, then send them back to back on one connection with `execute()`.

Not a transaction (no MULTI): other callers' commands may interleave on the server, but this pipeline's
commands run in order and its results come back in order. Owned by the task that made it; not shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import commands as c
from .commands import Command, Key, Value
from .scripts import Script

if TYPE_CHECKING:
    from .client import RedisClient


class Pipeline:
    """`async with client.pipeline() as p: p.set("a", 1).incr("n"); results = await p.execute()`.

    Each queuing method returns the pipeline so calls can chain. Leaving the block without `execute()`
    discards what was queued.
    """

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._commands: list[Command] = []

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._commands.clear()

    def __len__(self) -> int:
        return len(self._commands)

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued and return the results in order; the pipeline is empty afterwards.

        With `raise_on_error` the first error reply raises `RedisResponseError` (the others still ran);
        otherwise error replies are returned in place as `RedisResponseError` instances.
        """
        queued, self._commands = self._commands, []
        return await self._client.run_commands(queued, raise_on_error=raise_on_error)

    def command(self, command: Command) -> Pipeline:
        self._commands.append(command)
        return self

    def execute_command(self, *args: Value) -> Pipeline:
        return self.command(Command(args))

    def ping(self) -> Pipeline:
        return self.command(c.ping())

    def get(self, key: Key) -> Pipeline:
        return self.command(c.get(key))

    def set(
        self,
        key: Key,
        value: Value,
        *,
        ex: int | None = None,
        px: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Pipeline:
        return self.command(c.set_(key, value, ex=ex, px=px, nx=nx, xx=xx))

    def delete(self, *keys: Key) -> Pipeline:
        return self.command(c.delete(*keys))

    def incr(self, key: Key) -> Pipeline:
        return self.command(c.incr(key))

    def incrby(self, key: Key, amount: int) -> Pipeline:
        return self.command(c.incrby(key, amount))

    def expire(self, key: Key, seconds: int) -> Pipeline:
        return self.command(c.expire(key, seconds))

    def pexpire(self, key: Key, milliseconds: int) -> Pipeline:
        return self.command(c.pexpire(key, milliseconds))

    def hset(self, key: Key, mapping: Mapping[Key, Value]) -> Pipeline:
        return self.command(c.hset(key, mapping))

    def hget(self, key: Key, field: Key) -> Pipeline:
        return self.command(c.hget(key, field))

    def hgetall(self, key: Key) -> Pipeline:
        return self.command(c.hgetall(key))

    def hdel(self, key: Key, *fields: Key) -> Pipeline:
        return self.command(c.hdel(key, *fields))

    def zadd(self, key: Key, mapping: Mapping[Key, float], *, nx: bool = False, xx: bool = False) -> Pipeline:
        return self.command(c.zadd(key, mapping, nx=nx, xx=xx))

    def zrangebyscore(
        self,
        key: Key,
        minimum: float | str,
        maximum: float | str,
        *,
        withscores: bool = False,
        offset: int | None = None,
        count: int | None = None,
    ) -> Pipeline:
        return self.command(c.zrangebyscore(key, minimum, maximum, withscores=withscores, offset=offset, count=count))

    def zrem(self, key: Key, *members: Key) -> Pipeline:
        return self.command(c.zrem(key, *members))

    def publish(self, channel: Key, message: Value) -> Pipeline:
        return self.command(c.publish(channel, message))

    def evalsha(self, script: Script, keys: tuple[Key, ...] = (), args: tuple[Value, ...] = ()) -> Pipeline:
        """EVALSHA only: call `client.load_script(script)` first (a pipeline cannot retry on NOSCRIPT)."""
        script.check(len(keys))
        return self.command(c.evalsha(script.sha, keys, args))
