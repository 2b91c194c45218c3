"""`Redis`: the typed command surface other packages depend on (`RedisClient` implements it).

Code outside lib/redis/ should annotate with this Protocol, so tests can pass any implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from .commands import Key, Value
from .pipeline import Pipeline
from .scripts import Script


class Redis(Protocol):
    async def ping(self) -> bytes: ...

    async def get(self, key: Key) -> bytes | None: ...

    async def set(
        self,
        key: Key,
        value: Value,
        *,
        ex: int | None = None,
        px: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool: ...

    async def delete(self, *keys: Key) -> int: ...

    async def incr(self, key: Key) -> int: ...

    async def incrby(self, key: Key, amount: int) -> int: ...

    async def expire(self, key: Key, seconds: int) -> bool: ...

    async def pexpire(self, key: Key, milliseconds: int) -> bool: ...

    async def hset(self, key: Key, mapping: Mapping[Key, Value]) -> int: ...

    async def hget(self, key: Key, field: Key) -> bytes | None: ...

    async def hgetall(self, key: Key) -> dict[bytes, bytes]: ...

    async def hdel(self, key: Key, *fields: Key) -> int: ...

    async def zadd(self, key: Key, mapping: Mapping[Key, float], *, nx: bool = False, xx: bool = False) -> int: ...

    async def zrangebyscore(
        self,
        key: Key,
        minimum: float | str,
        maximum: float | str,
        *,
        withscores: bool = False,
        offset: int | None = None,
        count: int | None = None,
    ) -> list[Any]: ...

    async def zrem(self, key: Key, *members: Key) -> int: ...

    async def publish(self, channel: Key, message: Value) -> int: ...

    def scan_iter(self, *, match: Key | None = None, count: int | None = None) -> AsyncIterator[bytes]: ...

    async def eval_script(self, script: Script, keys: Sequence[Key] = (), args: Sequence[Value] = ()) -> Any: ...

    async def execute(self, *args: Value) -> Any: ...

    async def execute_many(self, commands: Sequence[Sequence[Value]], *, raise_on_error: bool = True) -> list[Any]: ...

    def pipeline(self) -> Pipeline: ...
