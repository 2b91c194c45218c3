"""Command builders and backoff (pure, no I/O)."""

from __future__ import annotations

import hiredis

from mbworker.lib.redis import commands as c
from mbworker.lib.redis.backoff import backoff_delay


def test_set_options_and_conversion() -> None:
    cmd = c.set_("k", b"v", px=1500, nx=True)
    assert cmd.args == ("SET", "k", b"v", "PX", 1500, "NX")
    assert cmd.convert is not None
    assert cmd.convert(b"OK") is True
    assert cmd.convert(None) is False


def test_zadd_and_zrangebyscore_arguments() -> None:
    assert c.zadd("z", {"a": 1.5, "b": 2}, nx=True).args == ("ZADD", "z", "NX", "1.5", "a", 2, "b")
    cmd = c.zrangebyscore("z", "-inf", 10, withscores=True, count=5)
    assert cmd.args == ("ZRANGEBYSCORE", "z", "-inf", 10, "WITHSCORES", "LIMIT", 0, 5)
    assert cmd.convert is not None
    assert cmd.convert([b"a", b"1.5", b"b", b"2"]) == [(b"a", 1.5), (b"b", 2.0)]


def test_replies_parsed_by_hiredis_convert() -> None:
    reader = hiredis.Reader()
    reader.feed(b"*4\r\n$1\r\nf\r\n$1\r\nv\r\n$1\r\ng\r\n$1\r\nw\r\n*2\r\n$1\r\n0\r\n*1\r\n$1\r\nk\r\n")
    hgetall, scan = c.hgetall("h"), c.scan(0, match="k*", count=10)
    assert scan.args == ("SCAN", 0, "MATCH", "k*", "COUNT", 10)
    assert hgetall.convert is not None
    assert scan.convert is not None
    assert hgetall.convert(reader.gets()) == {b"f": b"v", b"g": b"w"}
    assert scan.convert(reader.gets()) == (0, [b"k"])


def test_hset_and_eval_arguments() -> None:
    assert c.hset("h", {"a": 1, b"b": "x"}).args == ("HSET", "h", "a", 1, b"b", "x")
    assert c.evalsha("abc", ("k1", "k2"), (1,)).args == ("EVALSHA", "abc", 2, "k1", "k2", 1)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    for failures in range(40):
        delay = backoff_delay(failures, 0.05, 2.0)
        ceiling = min(2.0, 0.05 * 2**failures)
        assert ceiling / 2 <= delay <= ceiling
    assert len({backoff_delay(10, 0.05, 2.0) for _ in range(20)}) > 1  # jittered
