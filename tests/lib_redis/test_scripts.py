"""Lua scripts: header parsing (pure) and EVALSHA with NOSCRIPT fallback against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbworker.lib.redis import RedisResponseError, Script, open_redis
from tests.redis_server import RedisServer

COUNTER = """\
-- Add to a counter and return the new value and its TTL.
-- KEYS[1]: the counter
-- ARGV[1]: amount
-- ARGV[2]: ttl, milliseconds
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {value, redis.call('PTTL', KEYS[1]) > 0 and 1 or 0}
"""


def test_header_declares_keys_and_args(tmp_path: Path) -> None:
    path = tmp_path / "counter.lua"
    path.write_text(COUNTER)
    script = Script.from_file(path)
    assert (script.name, script.keys, script.args) == ("counter.lua", 1, 2)
    assert len(script.sha) == 40
    with pytest.raises(ValueError, match="declares 1 keys"):
        script.check(2)
    bare = Script("return 1")
    assert (bare.keys, bare.args) == (None, None)
    bare.check(5)  # no header: no check


async def test_evalsha_falls_back_to_eval_on_noscript(redis_server: RedisServer) -> None:
    script = Script(COUNTER, name="counter.lua")
    async with open_redis(redis_server.url) as r:
        assert await r.eval_script(script, ["n"], [5, 60_000]) == [5, 1]  # first call: NOSCRIPT → EVAL
        assert await r.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await r.eval_script(script, ["n"], [2, 60_000]) == [7, 1]  # EVALSHA
        await r.execute("SCRIPT", "FLUSH")
        assert await r.eval_script(script, ["n"], [1, 60_000]) == [8, 1]
        stats = r.statistics()
        assert stats.response_errors == 2  # the two NOSCRIPT replies, each followed by an EVAL
        with pytest.raises(ValueError, match="declares 1 keys"):
            await r.eval_script(script, [], [1, 1])


async def test_script_errors_are_response_errors(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        with pytest.raises(RedisResponseError) as info:
            await r.eval_script(Script("return redis.call('NOPE')"))
        assert info.value.code == "ERR"


async def test_pipeline_evalsha_after_load(redis_server: RedisServer) -> None:
    script = Script(COUNTER)
    async with open_redis(redis_server.url) as r:
        await r.load_script(script)
        async with r.pipeline() as p:
            p.evalsha(script, ("a",), (1, 1000))
            p.evalsha(script, ("a",), (1, 1000))
            assert await p.execute() == [[1, 1], [2, 1]]
