"""Redis comes back empty (FLUSHALL, a restart without persistence) or behind (a stale replica): the nodes give
back what they serve, deletes stay deleted, numbers never go backwards; a node joining with a single node's
deployments contributes them. Real redis-server; two "nodes" are two stores with their own clients and dirs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from mbworker.lib.redis import open_redis
from mbworker.worker.cluster.deployments_redis import RedisDeploymentStore
from mbworker.worker.deployments.changes import StoreChange
from mbworker.worker.deployments.store import DeploymentStatus, LocalDeploymentStore
from tests.cluster.conftest import fast_settings
from tests.cluster.test_store_cluster import Nodes
from tests.deployments.test_store import bundle
from tests.redis_server import RedisServer

ACTIVE = DeploymentStatus.ACTIVE


@pytest.fixture
async def nodes(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Nodes]:
    async with trio.open_nursery() as nursery:
        yield Nodes(redis_server, tmp_path, nursery)
        nursery.cancel_scope.cancel()


async def flushall(server: RedisServer) -> None:
    async with open_redis(fast_settings(server.url)) as client:
        await client.execute("FLUSHALL")


async def until(changes: AsyncIterator[StoreChange], kind: str, slug: str | None = None) -> None:
    with trio.fail_after(10):
        async for change in changes:
            if change.kind == kind and (slug is None or change.slug == slug):
                return


async def test_flushall_the_nodes_give_back_what_they_serve_and_deletes_stay_deleted(
    nodes: Nodes, redis_server: RedisServer
) -> None:
    a = await nodes.start()
    b = await nodes.start()
    async with b.watch() as seen_by_b:
        for i in (1, 2):
            await a.activate("hello", (await a.put("hello", bundle(body=f"v{i}"))).version)
            await until(seen_by_b, "activate", "hello")
        await a.activate("gone", (await a.put("gone", bundle("gone"))).version)
        await until(seen_by_b, "activate", "gone")
        await a.delete("gone")
        await until(seen_by_b, "delete", "gone")

    await flushall(redis_server)
    assert await a.list() == []  # the store lost everything; the nodes still hold their copies

    # B reconciles first (any node will do): it serves v2, so it gives v2 back; A's later look agrees.
    live = await b.get_active("hello")
    assert live is not None
    assert (live.version, live.status) == (2, ACTIVE)
    again = await a.get_active("hello")
    assert again is not None
    assert again.version == 2
    assert await b.secrets("hello", 2) == {"API_KEY": "s3cret"}
    # Deleted before the loss: nobody claims it, it does not come back.
    assert await a.get_active("gone") is None
    assert await b.get_active("gone") is None
    assert [d.slug for d in await a.list()] == ["hello"]
    # Numbers go on from where they were.
    assert (await b.put("hello", bundle(body="v3"))).version == 3
    assert b.cluster_statistics().restores == 1


async def test_a_stale_replica_is_brought_forward_and_the_highest_version_wins(
    nodes: Nodes, redis_server: RedisServer
) -> None:
    a = await nodes.start()
    for i in (1, 2, 3):
        await a.activate("hello", (await a.put("hello", bundle(body=f"v{i}"))).version)
    # What a replica that missed the last deploy holds: v2 live, nothing of v3, the counter at 2.
    async with open_redis(fast_settings(redis_server.url)) as client:
        await client.execute_many(
            [
                ("SET", "mbw:dep:hello:ptr", b'{"version": 2, "history": [1]}'),
                ("HDEL", "mbw:dep:hello:meta", 3),
                ("DEL", "mbw:dep:hello:archive:3"),
                ("SET", "mbw:dep:hello:seq", 2),
            ]
        )
    live = await a.get_active("hello")
    assert live is not None
    assert live.version == 3
    assert [(d.version, d.status) for d in await a.versions("hello")][-1] == (3, ACTIVE)
    assert (await a.put("hello", bundle(body="v4"))).version == 4
    # A rollback is not a loss: v2 live again, and nobody "restores" v3 over it.
    await a.rollback("hello", 2)
    back = await a.get_active("hello")
    assert back is not None
    assert back.version == 2


async def test_a_restart_without_persistence_is_restored_through_the_change_feed(
    nodes: Nodes, redis_server: RedisServer
) -> None:
    a = await nodes.start()
    await a.activate("hello", (await a.put("hello", bundle(body="kept"))).version)
    async with a.watch() as changes:
        await redis_server.stop()
        await redis_server.start()  # same port, empty
        await until(changes, "resync")
    # Restored before the resync was handed over: reconciling finds the function, never a 404 in between.
    assert [(d.slug, d.version, d.status) for d in await a.list()] == [("hello", 1, ACTIVE)]


async def test_a_node_joining_with_a_single_nodes_deployments_contributes_them(nodes: Nodes, tmp_path: Path) -> None:
    # The data dir of a single node (the local store), about to become node 1 of a cluster.
    single = LocalDeploymentStore(tmp_path / "node1")
    await single.put("hello", bundle(body="one"))
    await single.activate("hello", (await single.put("hello", bundle(body="two"))).version)

    a: RedisDeploymentStore = await nodes.start()  # node1: the same directory
    assert [(d.slug, d.version, d.status) for d in await a.list()] == [("hello", 2, ACTIVE)]
    b = await nodes.start()
    live = await b.get_active("hello")
    assert live is not None
    assert live.version == 2
    await b.ensure_local("hello", 2)
    assert (b.bundle_dir("hello", 2) / "hello" / "index.ts").read_text() == "Deno.serve(() => new Response('two'));\n"
    assert (await b.put("hello", bundle(body="three"))).version == 3


async def test_project_secrets_reach_every_node_and_survive_a_flushall(nodes: Nodes, redis_server: RedisServer) -> None:
    a = await nodes.start()
    b = await nodes.start()
    async with b.watch() as seen_by_b:
        await a.set_secrets({"API_KEY": "k"})
        await until(seen_by_b, "secrets")
    assert await b.project_secrets() == {"API_KEY": "k"}
    await flushall(redis_server)
    assert await b.project_secrets() == {"API_KEY": "k"}  # given back from B's copy
    assert await a.project_secrets() == {"API_KEY": "k"}
    # Emptied on purpose is not "lost": nobody gives them back.
    await a.unset_secrets(["API_KEY"])
    assert await b.project_secrets() == {}
