"""The command surface (arguments and reply conversion, recorded without I/O) and backoff."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest

from mbworker.lib.redis import Command, RedisCommands, Script, Slot
from mbworker.lib.redis.backoff import backoff_delay
from mbworker.lib.redis.commands import T


class Recorder(RedisCommands):
    """The seam alone: each command is recorded, and its slot is what a pipeline would hand back."""

    def __init__(self) -> None:
        self.commands: list[Command[Any]] = []

    def execute_command(self, command: Command[T]) -> Slot[T]:
        self.commands.append(command)
        return Slot(command)


def recorded(call: Any) -> Command[Any]:
    assert isinstance(call, Slot)
    command: Command[Any] = call.command
    return command


def test_set_options_and_conversion() -> None:
    cmd = recorded(Recorder().set("k", b"v", px=1500, nx=True))
    assert cmd.args == ("SET", "k", b"v", "PX", 1500, "NX")
    assert cmd.convert is not None
    assert cmd.convert(b"OK") is True
    assert cmd.convert(None) is False


def test_zadd_and_zrangebyscore_arguments() -> None:
    r = Recorder()
    assert recorded(r.zadd("z", {"a": 1.5, "b": 2}, nx=True)).args == ("ZADD", "z", "NX", "1.5", "a", 2, "b")
    cmd = recorded(r.zrangebyscore("z", "-inf", 10, withscores=True, count=5))
    assert cmd.args == ("ZRANGEBYSCORE", "z", "-inf", 10, "WITHSCORES", "LIMIT", 0, 5)
    assert cmd.convert is not None
    assert cmd.convert([b"a", b"1.5", b"b", b"2"]) == [(b"a", 1.5), (b"b", 2.0)]


def test_replies_parsed_by_hiredis_convert() -> None:
    reader = hiredis.Reader()
    reader.feed(b"*4\r\n$1\r\nf\r\n$1\r\nv\r\n$1\r\ng\r\n$1\r\nw\r\n*2\r\n$1\r\n0\r\n*1\r\n$1\r\nk\r\n")
    r = Recorder()
    hgetall, scan = recorded(r.hgetall("h")), recorded(r.scan(0, match="k*", count=10))
    assert scan.args == ("SCAN", 0, "MATCH", "k*", "COUNT", 10)
    assert hgetall.convert is not None
    assert scan.convert is not None
    assert hgetall.convert(reader.gets()) == {b"f": b"v", b"g": b"w"}
    assert scan.convert(reader.gets()) == (0, [b"k"])


def test_hset_and_eval_arguments() -> None:
    r = Recorder()
    assert recorded(r.hset("h", {"a": 1, b"b": "x"})).args == ("HSET", "h", "a", 1, b"b", "x")
    script = Script("-- KEYS[2]\nreturn 1")
    assert recorded(r.evalsha(script, ("k1", "k2"), (1,))).args == ("EVALSHA", script.sha, 2, "k1", "k2", 1)
    assert recorded(r.eval(script, ("k1", "k2"))).args == ("EVAL", script.source, 2, "k1", "k2")
    with pytest.raises(ValueError, match="declares 2 keys"):
        r.evalsha(script, ("k1",))
    assert len(r.commands) == 3  # the refused call sent nothing


async def test_a_slot_is_awaited_after_its_pipeline_ran() -> None:
    slot = Recorder().get("k")
    with pytest.raises(RuntimeError, match="execute the pipeline first"):
        await slot


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    for failures in range(40):
        delay = backoff_delay(failures, 0.05, 2.0)
        ceiling = min(2.0, 0.05 * 2**failures)
        assert ceiling / 2 <= delay <= ceiling
    assert len({backoff_delay(10, 0.05, 2.0) for _ in range(20)}) > 1  # jittered
