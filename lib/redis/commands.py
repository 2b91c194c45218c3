"""Command builders shared by the client and its pipelines: arguments for the wire plus a reply converter.

Pure: no I/O. Replies stay bytes (no decoding); converters only reshape (OK → True, flat pairs → dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Key = str | bytes
Value = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Command:
    """One command: its arguments and how to turn the raw reply into the typed result."""

    args: tuple[Value, ...]
    convert: Callable[[Any], Any] | None = None


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


def _score(value: float | str) -> Value:
    if isinstance(value, str):
        return value  # "-inf", "+inf", "(1.5"
    return repr(float(value)) if isinstance(value, float) else value


def ping() -> Command:
    return Command(("PING",))


def get(key: Key) -> Command:
    return Command(("GET", key))


def set_(
    key: Key,
    value: Value,
    *,
    ex: int | None = None,
    px: int | None = None,
    nx: bool = False,
    xx: bool = False,
) -> Command:
    args: list[Value] = ["SET", key, value]
    if ex is not None:
        args += ["EX", ex]
    if px is not None:
        args += ["PX", px]
    if nx:
        args.append("NX")
    if xx:
        args.append("XX")
    return Command(tuple(args), _ok)


def delete(*keys: Key) -> Command:
    return Command(("DEL", *keys))


def incr(key: Key) -> Command:
    return Command(("INCR", key))


def incrby(key: Key, amount: int) -> Command:
    return Command(("INCRBY", key, amount))


def expire(key: Key, seconds: int) -> Command:
    return Command(("EXPIRE", key, seconds), _bool)


def pexpire(key: Key, milliseconds: int) -> Command:
    return Command(("PEXPIRE", key, milliseconds), _bool)


def hset(key: Key, mapping: Mapping[Key, Value]) -> Command:
    args: list[Value] = ["HSET", key]
    for field, value in mapping.items():
        args += [field, value]
    return Command(tuple(args))


def hget(key: Key, field: Key) -> Command:
    return Command(("HGET", key, field))


def hgetall(key: Key) -> Command:
    return Command(("HGETALL", key), _pairs)


def hdel(key: Key, *fields: Key) -> Command:
    return Command(("HDEL", key, *fields))


def zadd(key: Key, mapping: Mapping[Key, float], *, nx: bool = False, xx: bool = False) -> Command:
    args: list[Value] = ["ZADD", key]
    if nx:
        args.append("NX")
    if xx:
        args.append("XX")
    for member, score in mapping.items():
        args += [_score(score), member]
    return Command(tuple(args))


def zrangebyscore(
    key: Key,
    minimum: float | str,
    maximum: float | str,
    *,
    withscores: bool = False,
    offset: int | None = None,
    count: int | None = None,
) -> Command:
    args: list[Value] = ["ZRANGEBYSCORE", key, _score(minimum), _score(maximum)]
    if withscores:
        args.append("WITHSCORES")
    if offset is not None or count is not None:
        args += ["LIMIT", offset or 0, -1 if count is None else count]
    return Command(tuple(args), _scored if withscores else None)


def zrem(key: Key, *members: Key) -> Command:
    return Command(("ZREM", key, *members))


def publish(channel: Key, message: Value) -> Command:
    return Command(("PUBLISH", channel, message))


def scan(cursor: int, *, match: Key | None = None, count: int | None = None) -> Command:
    args: list[Value] = ["SCAN", cursor]
    if match is not None:
        args += ["MATCH", match]
    if count is not None:
        args += ["COUNT", count]
    return Command(tuple(args), lambda r: (int(r[0]), list(r[1])))


def evalsha(sha: str, keys: tuple[Key, ...], args: tuple[Value, ...]) -> Command:
    return Command(("EVALSHA", sha, len(keys), *keys, *args))


def eval_(source: str, keys: tuple[Key, ...], args: tuple[Value, ...]) -> Command:
    return Command(("EVAL", source, len(keys), *keys, *args))
