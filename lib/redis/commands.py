"""The Redis command surface, declared once: `RedisCommands`.

Each method writes one command: its name and arguments for the wire, how its reply is decoded, and its result
type, as a `Command[T]`. It hands the command to `execute_command`, the one seam, and returns what that gives
back. `RedisClient` implements the seam by sending the command and awaiting its reply; `Pipeline` by queuing it
and returning its `Slot`; the `Redis` Protocol (api.py) extends this one, so memory twins and type checks see the
same surface. Both a coroutine and a slot are `Awaitable[T]`, which is what every command returns: Python has
no higher-kinded types, so the one declaration is typed by what both executions share.

Pure: no I/O. Replies stay bytes (no decoding); converters only reshape (OK → True, flat pairs → dict).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .scripts import Script

Key = str | bytes
Value = str | bytes | int | float

T = TypeVar("T")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, on every command
class Command(Generic[T]):
    """One command: its arguments and how to turn the raw reply into the typed result (None: as it came).
    Never changed once built."""

    args: tuple[Value, ...]
    convert: Callable[[Any], T] | None = None


def _ok(reply: Any) -> bool:
    return reply is not None  # SET ... NX answers nil when nothing was set


def _bool(reply: Any) -> bool:
    return bool(reply)


def _pairs(reply: Any) -> dict[bytes, bytes]:
    it = iter(reply)
    return dict(zip(it, it, strict=True))


def _scored(reply: Any) -> list[tuple[bytes, float]]:
    it = iter(reply)
    return [(member, float(score)) for member, score in zip(it, it, strict=True)]


def _cursor(reply: Any) -> tuple[int, list[bytes]]:
    return int(reply[0]), list(reply[1])


def _score(value: float | str) -> Value:
    if isinstance(value, str):
        return value  # "-inf", "+inf", "(1.5"
    return repr(float(value)) if isinstance(value, float) else value


class RedisCommands(Protocol):
    """The typed commands, each written once over `execute_command` (see the module docstring).

    Subclass it (as `RedisClient` and `Pipeline` do) to get every command for one method."""

    def execute_command(self, command: Command[T]) -> Awaitable[T]:
        """The seam: run `command` (client) or queue it (pipeline); awaiting the result gives the reply."""
        ...

    def ping(self) -> Awaitable[bytes]:
        return self.execute_command(Command(("PING",)))

    def get(self, key: Key) -> Awaitable[bytes | None]:
        return self.execute_command(Command(("GET", key)))

    def set(
        self,
        key: Key,
        value: Value,
        *,
        ex: int | None = None,
        px: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Awaitable[bool]:
        """True if the value was set (False when `nx`/`xx` prevented it)."""
        args: list[Value] = ["SET", key, value]
        if ex is not None:
            args += ["EX", ex]
        if px is not None:
            args += ["PX", px]
        if nx:
            args.append("NX")
        if xx:
            args.append("XX")
        return self.execute_command(Command(tuple(args), _ok))

    def delete(self, *keys: Key) -> Awaitable[int]:
        return self.execute_command(Command(("DEL", *keys)))

    def incr(self, key: Key) -> Awaitable[int]:
        return self.execute_command(Command(("INCR", key)))

    def incrby(self, key: Key, amount: int) -> Awaitable[int]:
        return self.execute_command(Command(("INCRBY", key, amount)))

    def expire(self, key: Key, seconds: int) -> Awaitable[bool]:
        return self.execute_command(Command(("EXPIRE", key, seconds), _bool))

    def pexpire(self, key: Key, milliseconds: int) -> Awaitable[bool]:
        return self.execute_command(Command(("PEXPIRE", key, milliseconds), _bool))

    def hset(self, key: Key, mapping: Mapping[Key, Value]) -> Awaitable[int]:
        args: list[Value] = ["HSET", key]
        for field, value in mapping.items():
            args += [field, value]
        return self.execute_command(Command(tuple(args)))

    def hget(self, key: Key, field: Key) -> Awaitable[bytes | None]:
        return self.execute_command(Command(("HGET", key, field)))

    def hgetall(self, key: Key) -> Awaitable[dict[bytes, bytes]]:
        return self.execute_command(Command(("HGETALL", key), _pairs))

    def hdel(self, key: Key, *fields: Key) -> Awaitable[int]:
        return self.execute_command(Command(("HDEL", key, *fields)))

    def zadd(self, key: Key, mapping: Mapping[Key, float], *, nx: bool = False, xx: bool = False) -> Awaitable[int]:
        args: list[Value] = ["ZADD", key]
        if nx:
            args.append("NX")
        if xx:
            args.append("XX")
        for member, score in mapping.items():
            args += [_score(score), member]
        return self.execute_command(Command(tuple(args)))

    def zrangebyscore(
        self,
        key: Key,
        minimum: float | str,
        maximum: float | str,
        *,
        withscores: bool = False,
        offset: int | None = None,
        count: int | None = None,
    ) -> Awaitable[list[Any]]:
        """Members (bytes), or (member, score) pairs with `withscores`."""
        args: list[Value] = ["ZRANGEBYSCORE", key, _score(minimum), _score(maximum)]
        if withscores:
            args.append("WITHSCORES")
        if offset is not None or count is not None:
            args += ["LIMIT", offset or 0, -1 if count is None else count]
        return self.execute_command(Command(tuple(args), _scored if withscores else None))

    def zrem(self, key: Key, *members: Key) -> Awaitable[int]:
        return self.execute_command(Command(("ZREM", key, *members)))

    def publish(self, channel: Key, message: Value) -> Awaitable[int]:
        """Number of subscribers that received the message (on this server)."""
        return self.execute_command(Command(("PUBLISH", channel, message)))

    def scan(
        self, cursor: int, *, match: Key | None = None, count: int | None = None
    ) -> Awaitable[tuple[int, list[bytes]]]:
        """One SCAN step: the next cursor (0 when done) and a batch of keys."""
        args: list[Value] = ["SCAN", cursor]
        if match is not None:
            args += ["MATCH", match]
        if count is not None:
            args += ["COUNT", count]
        return self.execute_command(Command(tuple(args), _cursor))

    def evalsha(self, script: Script, keys: tuple[Key, ...] = (), args: tuple[Value, ...] = ()) -> Awaitable[Any]:
        """Run `script` by SHA: a NOSCRIPT reply if the server does not have it (see `RedisClient.eval_script`,
        which falls back to `eval`, and `load_script`, which a pipeline needs first)."""
        script.check(len(keys))
        return self.execute_command(Command(("EVALSHA", script.sha, len(keys), *keys, *args)))

    def eval(self, script: Script, keys: tuple[Key, ...] = (), args: tuple[Value, ...] = ()) -> Awaitable[Any]:
        """Send the script's source (which also caches it on the server)."""
        script.check(len(keys))
        return self.execute_command(Command(("EVAL", script.source, len(keys), *keys, *args)))
