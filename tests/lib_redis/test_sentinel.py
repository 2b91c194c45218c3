"""Sentinel discovery against a real master + replica + sentinel (redis-server --sentinel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from mbworker.lib.redis import PubSubMessage, RedisConnectionError, RedisResponseError, open_pubsub, open_redis
from tests.conftest import free_port
from tests.redis_server import start_redis_sentinel, start_redis_server


async def test_resolves_master_and_follows_a_failover(tmp_path: Path) -> None:
    # No diskless-sync delay: the replica is in sync at once instead of after the default 5 s.
    master = await start_redis_server(tmp_path, name="master", args=["--repl-diskless-sync-delay", "0"])
    replica = await start_redis_server(tmp_path, name="replica", args=["--replicaof", "127.0.0.1", str(master.port)])
    sentinel = await start_redis_sentinel(tmp_path, master.port)
    try:
        url = (
            f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/mymaster?connect_timeout=2&pool_size=1"
        )
        async with open_redis(url) as r, open_pubsub(url) as ps:
            assert r.statistics().address == ("127.0.0.1", master.port)  # the dead first sentinel was skipped
            await r.set("k", "v")
            await ps.subscribe("events")
            async with open_redis(replica.url) as direct:
                with trio.fail_after(20):  # the replica must be in sync before a failover is allowed
                    while True:
                        if await direct.get("k") == b"v":
                            break
                        await trio.sleep(0.05)
                async with open_redis(f"redis://127.0.0.1:{sentinel.port}") as s:
                    with trio.fail_after(20):  # the sentinel must see the replica as healthy and linked
                        while True:
                            replicas = await s.execute("SENTINEL", "REPLICAS", "mymaster")
                            fields = [dict(zip(r[::2], r[1::2], strict=True)) for r in replicas]
                            if any(f[b"flags"] == b"slave" and f[b"master-link-status"] == b"ok" for f in fields):
                                break
                            await trio.sleep(0.05)
                    # The master dies; a forced failover promotes the replica without waiting for down-after.
                    await master.kill()
                    assert await s.execute("SENTINEL", "FAILOVER", "mymaster") == b"OK"
            # Both connections were lost; the client asks the sentinels again and finds the new master.
            with trio.fail_after(30):
                while True:
                    try:
                        await r.set("after", "failover")
                        if r.statistics().address == ("127.0.0.1", replica.port):
                            break
                    except RedisConnectionError:
                        pass
                    await trio.sleep(0.05)
            assert await r.get("k") == b"v"
            await ps.wait_connected(30)
            with trio.fail_after(30):
                while True:
                    if await r.publish("events", "on-new-master") == 1:
                        break
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while True:
                    event = await ps.messages.receive()
                    if isinstance(event, PubSubMessage):
                        assert event == PubSubMessage(b"events", b"on-new-master")
                        break
    finally:
        await sentinel.stop()
        await replica.stop()
        await master.stop()


async def test_unknown_service_is_a_connection_error(tmp_path: Path) -> None:
    master = await start_redis_server(tmp_path, name="master")
    sentinel = await start_redis_sentinel(tmp_path, master.port)
    try:
        with pytest.raises(RedisConnectionError, match="does not know master 'other'"):
            async with open_redis(f"redis+sentinel://127.0.0.1:{sentinel.port}/other"):
                pass
    finally:
        await sentinel.stop()
        await master.stop()


async def test_demoted_master_is_refused_and_readonly_drops_the_connection(tmp_path: Path) -> None:
    """The sentinel still names a server that has become a replica: ROLE refuses it on connect, and a
    connection already open to it is dropped on the first -READONLY reply so it will be rediscovered."""
    master = await start_redis_server(tmp_path, name="master")
    other = await start_redis_server(tmp_path, name="other")
    sentinel = await start_redis_sentinel(tmp_path, master.port)
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster?pool_size=1"
        async with open_redis(url) as r, open_redis(master.url) as direct:
            assert await r.set("k", 1) is True
            await direct.execute("REPLICAOF", "127.0.0.1", str(other.port))
            with pytest.raises(RedisResponseError) as info:
                await r.set("k", 2)
            assert info.value.code == "READONLY"
            with pytest.raises(RedisConnectionError):  # the connection was dropped at once
                await r.get("k")
            with pytest.raises(RedisConnectionError, match="not a master"):
                async with open_redis(url):
                    pass
    finally:
        await sentinel.stop()
        await other.stop()
        await master.stop()
