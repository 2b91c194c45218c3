"""`Pipeline`: queue commands, then send them back to back on one connection with `execute()`.

Not a transaction (no MULTI): other callers' commands may interleave on the server, but this pipeline's
commands run in order and its results come back in order. Owned by the task that made it; not shared.
"""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic

from .commands import Command, RedisCommands, T
from .errors import RedisResponseError

if TYPE_CHECKING:
    from .client import RedisClient


_PENDING: Any = object()


class Slot(Generic[T]):
    """The result of one queued command: `await slot` once the pipeline has executed (it never suspends)."""

    __slots__ = ("command", "value")

    def __init__(self, command: Command[T]) -> None:
        self.command = command
        self.value: Any = _PENDING
        """The decoded reply or its `RedisResponseError`, set by the pipeline's `execute()`."""

    def result(self) -> T:
        """The decoded reply; `RedisResponseError` if the server answered this command with an error."""
        if self.value is _PENDING:
            raise RuntimeError(f"{self.command.args[0]!r} is queued: execute the pipeline first")
        if isinstance(self.value, RedisResponseError):
            raise self.value
        value: T = self.value
        return value

    def __await__(self) -> Generator[Any, None, T]:
        yield from ()
        return self.result()


class Pipeline(RedisCommands):
    """`async with client.pipeline() as p: n = p.incr("n"); p.set("a", 1); await p.execute(); await n`.

    Every command of `RedisCommands` queues here and returns its `Slot`; `execute()` also returns all results in
    order. Leaving the block without `execute()` discards what was queued.
    """

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._slots: list[Slot[Any]] = []

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)

    def execute_command(self, command: Command[T]) -> Slot[T]:
        """Queue `command`; its slot holds the result once `execute()` has run."""
        slot = Slot(command)
        self._slots.append(slot)
        return slot

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued and return the results in order; the pipeline is empty afterwards.

        With `raise_on_error` the first error reply raises `RedisResponseError` (the others still ran);
        otherwise error replies are returned in place as `RedisResponseError` instances. Either way every slot
        is filled (an error reply's slot raises it when awaited).
        """
        slots, self._slots = self._slots, []
        results = await self._client.run_commands([slot.command for slot in slots], raise_on_error=False)
        error: RedisResponseError | None = None
        for slot, result in zip(slots, results, strict=True):
            slot.value = result
            if error is None and isinstance(result, RedisResponseError):
                error = result
        if raise_on_error and error is not None:
            raise error
        return results
