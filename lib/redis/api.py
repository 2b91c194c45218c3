"""`Redis`: the typed command surface other packages depend on (`RedisClient` implements it).

Code outside lib/redis/ should annotate with this Protocol, so tests can pass any implementation. The commands
themselves are `RedisCommands` (commands.py, each written once); this adds what only a client can do: calls of
several round trips (SCAN iteration, EVALSHA falling back to EVAL), raw commands and pipelines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from .commands import Key, RedisCommands, Value
from .pipeline import Pipeline
from .scripts import Script


class Redis(RedisCommands, Protocol):
    def scan_iter(self, *, match: Key | None = None, count: int | None = None) -> AsyncIterator[bytes]: ...

    async def eval_script(self, script: Script, keys: Sequence[Key] = (), args: Sequence[Value] = ()) -> Any: ...

    async def execute(self, *args: Value) -> Any: ...

    async def execute_many(self, commands: Sequence[Sequence[Value]], *, raise_on_error: bool = True) -> list[Any]: ...

    def pipeline(self) -> Pipeline: ...
