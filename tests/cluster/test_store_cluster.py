"""RedisDeploymentStore as a cluster: two "nodes" (separate clients and local dirs) on one redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from mbworker.lib.redis import RedisClient, open_redis
from mbworker.worker.cluster.deployments_redis import RedisDeploymentStore, open_redis_deployment_store
from mbworker.worker.cluster.errors import ClusterStoreUnavailable
from mbworker.worker.deployer import Deployer, PlatformEnv
from mbworker.worker.deployments.changes import StoreChange
from mbworker.worker.deployments.store import DeploymentStatus
from mbworker.worker.functions import FunctionTable
from tests.cluster.conftest import fast_settings
from tests.cluster.test_store_contract import hold_redis_store
from tests.deployments.test_store import bundle
from tests.redis_server import RedisServer


class Nodes:
    def __init__(self, server: RedisServer, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.count = 0

    async def start(self, **options: object) -> RedisDeploymentStore:
        self.count += 1
        options.setdefault("node_id", f"node{self.count}")
        store: RedisDeploymentStore = await self.nursery.start(
            hold_redis_store, self.server.url, self.tmp_path / f"node{self.count}", options
        )
        return store


@pytest.fixture
async def nodes(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Nodes]:
    async with trio.open_nursery() as nursery:
        yield Nodes(redis_server, tmp_path, nursery)
        nursery.cancel_scope.cancel()


def body_of(store: RedisDeploymentStore, version: int) -> str:
    return (store.bundle_dir("hello", version) / "hello" / "index.ts").read_text()


async def next_change(changes: AsyncIterator[StoreChange], kind: str) -> StoreChange:
    with trio.fail_after(10):
        async for change in changes:
            if change.kind == kind:
                return change
    raise AssertionError("watch ended")


async def test_a_deploy_on_node_a_is_seen_and_served_by_node_b(nodes: Nodes) -> None:
    a = await nodes.start()
    b = await nodes.start()
    async with b.watch() as changes:
        dep = await a.put("hello", bundle(body="from-a"))
        assert await next_change(changes, "put") == StoreChange("put", "hello", dep.version)
        await a.activate("hello", dep.version)
        assert await next_change(changes, "activate") == StoreChange("activate", "hello", 1)
    # The activate change was handed over only once B had the files (eager fetch, sha256 verified).
    assert body_of(b, 1) == "Deno.serve(() => new Response('from-a'));\n"
    active = await b.get_active("hello")
    assert active is not None
    assert active.status is DeploymentStatus.ACTIVE
    assert await b.secrets("hello", 1) == {"API_KEY": "s3cret"}
    assert b.cluster_statistics().fetches == 1
    assert b.cluster_statistics().remote_changes >= 2
    # B's own rollback/delete reach A too.
    await a.put("hello", bundle(body="two"))
    await a.activate("hello", 2)
    async with a.watch() as changes:
        await b.rollback("hello")
        assert await next_change(changes, "rollback") == StoreChange("rollback", "hello", 1)
        await b.delete("hello")
        assert await next_change(changes, "delete") == StoreChange("delete", "hello", None)
    assert await a.get_active("hello") is None


async def test_concurrent_puts_from_two_nodes_get_distinct_versions(nodes: Nodes) -> None:
    a = await nodes.start(keep_versions=100)
    b = await nodes.start(keep_versions=100)
    got: list[tuple[str, int]] = []

    async def put(store: RedisDeploymentStore, name: str, i: int) -> None:
        got.append((name, (await store.put("hello", bundle(body=f"{name}{i}"))).version))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(put, a, "a", i)
            nursery.start_soon(put, b, "b", i)
    assert sorted(v for _, v in got) == list(range(1, 13))
    # Each node holds the files of its own puts under the number it got.
    for name, version in got:
        store = a if name == "a" else b
        assert body_of(store, version).startswith(f"Deno.serve(() => new Response('{name}")


async def test_a_new_node_syncs_active_versions_on_start(nodes: Nodes) -> None:
    a = await nodes.start()
    await a.put("hello", bundle(body="live"))
    await a.activate("hello", 1)
    await a.put("hello", bundle(body="staged"))
    await a.put("other", bundle("other"))
    c = await nodes.start()
    # Active versions are local before the store is handed over; staged ones are fetched lazily.
    assert body_of(c, 1) == "Deno.serve(() => new Response('live'));\n"
    assert not c.bundle_dir("hello", 2).exists()
    assert not c.bundle_dir("other", 1).exists()
    await c.ensure_local("hello", 2)
    assert body_of(c, 2) == "Deno.serve(() => new Response('staged'));\n"
    assert c.cluster_statistics().fetches == 2


async def test_a_stale_local_copy_is_replaced(nodes: Nodes, redis_server: RedisServer, tmp_path: Path) -> None:
    """If Redis lost its data, numbers restart: a local copy made from another archive is not served."""
    a = await nodes.start()
    await a.put("hello", bundle(body="old"))
    stale = tmp_path / "stale"
    (stale / "hello" / "v1" / "bundle" / "hello").mkdir(parents=True)
    (stale / "hello" / "v1" / "bundle" / "mbworker.json").write_text("{}")
    (stale / "hello" / "v1" / "bundle" / "hello" / "index.ts").write_text("stale")
    (stale / "hello" / "v1" / "sha256").write_text("0" * 64)
    async with open_redis(fast_settings(redis_server.url)) as client, open_redis_deployment_store(client, stale) as s:
        assert await s.secrets("hello", 1) == {"API_KEY": "s3cret"}
        assert body_of(s, 1) == "Deno.serve(() => new Response('old'));\n"


async def test_watchers_resync_after_a_redis_restart(nodes: Nodes, redis_server: RedisServer) -> None:
    a = await nodes.start()
    async with a.watch() as changes:
        await redis_server.restart()  # same port; pub/sub reconnects and resubscribes by itself
        assert await next_change(changes, "resync") == StoreChange("resync", None, None)
    assert a.cluster_statistics().resyncs == 1


async def test_redis_outage_gives_store_errors_then_recovers(redis_server: RedisServer, tmp_path: Path) -> None:
    async with open_redis(fast_settings(redis_server.url)) as client:
        store: RedisDeploymentStore
        async with open_redis_deployment_store(client, tmp_path / "n1") as store:
            await store.put("hello", bundle(body="before"))
            await store.activate("hello", 1)
            await redis_server.stop()
            with pytest.raises(ClusterStoreUnavailable) as info:
                await store.put("hello", bundle())
            assert info.value.status == 503
            with pytest.raises(ClusterStoreUnavailable):
                await store.list()
            # The local copy keeps the node able to (re)start what it runs.
            assert await store.secrets("hello", 1) == {"API_KEY": "s3cret"}
            await redis_server.start()
            await client.wait_connected(10)
            # Data did not persist (test server): the store works again from scratch.
            assert (await store.put("again", bundle("again"))).version == 1


async def test_open_fails_cleanly_without_redis(redis: RedisClient, redis_server: RedisServer, tmp_path: Path) -> None:
    await redis_server.stop()
    with pytest.raises(ClusterStoreUnavailable):
        async with open_redis_deployment_store(redis, tmp_path / "n"):
            pass


async def test_other_nodes_drop_copies_of_deleted_versions(nodes: Nodes) -> None:
    a = await nodes.start()
    b = await nodes.start(local_grace_s=3600)  # the automatic removal waits for in-flight requests
    await a.put("hello", bundle())
    await a.activate("hello", 1)
    await b.ensure_local("hello", 1)
    async with b.watch() as changes:
        await a.delete("hello")
        await next_change(changes, "delete")
    assert b.bundle_dir("hello", 1).is_dir()  # still there during the grace period
    assert await b.prune_local("hello") == 1
    assert not b.bundle_dir("hello", 1).exists()
    assert not a.bundle_dir("hello", 1).exists()  # the deleting node removed its copy at once


async def test_a_missed_announcement_is_noticed(nodes: Nodes, redis_server: RedisServer) -> None:
    """Node A stored a change but its publish never went out: B notices the gap in the change numbers."""
    a = await nodes.start()
    b = await nodes.start()
    async with open_redis(fast_settings(redis_server.url)) as raw:
        async with b.watch() as changes:
            await raw.incr("mbw:dep:epoch")  # a change whose announcement was lost
            await a.put("hello", bundle())  # the next announcement carries a skipped number
            assert await next_change(changes, "resync") == StoreChange("resync", None, None)
            assert await next_change(changes, "put") == StoreChange("put", "hello", 1)
        async with b.watch() as changes, trio.open_nursery() as nursery:
            await raw.incr("mbw:dep:epoch")  # lost, and nothing follows it: the periodic check finds it
            nursery.start_soon(b.serve_reconcile, 0.01)
            assert await next_change(changes, "resync") == StoreChange("resync", None, None)
            nursery.cancel_scope.cancel()


async def test_the_deployer_of_a_new_node_restores_from_the_cluster(nodes: Nodes, tmp_path: Path) -> None:
    """What the daemon does at start with the Redis store: restore every active function (booted lazily)."""
    a = await nodes.start()
    await a.put("hello", bundle(body="cluster"))
    await a.activate("hello", 1)
    b = await nodes.start()
    table = FunctionTable()
    deployer = Deployer(b, {}, table, PlatformEnv("http://x", "anon", "service"))
    assert await deployer.restore() == 1
    live = table.get("hello")
    assert live is not None
    assert live.fn.env["API_KEY"] == "s3cret"
    assert (live.fn.bundle_dir / live.fn.entrypoint).read_text() == "Deno.serve(() => new Response('cluster'));\n"
