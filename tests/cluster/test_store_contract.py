"""The DeploymentStore contract, run against LocalDeploymentStore and RedisDeploymentStore alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mbworker.lib.redis import open_redis
from mbworker.worker.cluster.deployments_redis import open_redis_deployment_store
from mbworker.worker.deployments.archive import BundleRejected, BundleTooLarge, pack_files
from mbworker.worker.deployments.changes import StoreChange
from mbworker.worker.deployments.manifest import Manifest
from mbworker.worker.deployments.store import (
    DeploymentNotFound,
    DeploymentStatus,
    DeploymentStore,
    LocalDeploymentStore,
    StoreError,
    UnpackLimits,
    VersionConflict,
    function_version,
)
from tests.cluster.conftest import fast_settings
from tests.deployments.test_store import bundle
from tests.redis_server import start_redis_server

ACTIVE, STAGED, INACTIVE, REMOVED, FAILED = (
    DeploymentStatus.ACTIVE,
    DeploymentStatus.STAGED,
    DeploymentStatus.INACTIVE,
    DeploymentStatus.REMOVED,
    DeploymentStatus.FAILED,
)

MakeStore = Callable[..., Awaitable[DeploymentStore]]
MANIFEST_BASE = {"slug": "hello", "runtime": "deno", "entrypoint": "hello/index.ts"}


async def hold_redis_store(
    url: str, root: Path, options: dict[str, Any], *, task_status: trio.TaskStatus[DeploymentStore]
) -> None:
    """A Redis store (and its client) living in the caller's nursery until cancelled: another "node"."""
    async with open_redis(fast_settings(url)) as client, open_redis_deployment_store(client, root, **options) as store:
        task_status.started(store)
        await trio.sleep_forever()


@pytest.fixture(params=["local", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """`await make_store(**options)`: a fresh store of the parametrized kind (options: keep_versions, limits,
    watch_buffer). Redis stores share one server; each gets its own local directory."""
    server = await start_redis_server(tmp_path) if request.param == "redis" else None
    count = 0
    try:
        async with trio.open_nursery() as nursery:

            async def make(**options: Any) -> DeploymentStore:
                nonlocal count
                count += 1
                root = tmp_path / f"node{count}"
                if server is None:
                    return LocalDeploymentStore(root, **options)
                store: DeploymentStore = await nursery.start(hold_redis_store, server.url, root, options)
                return store

            yield make
            nursery.cancel_scope.cancel()
    finally:
        if server is not None:
            await server.stop()


async def statuses(store: DeploymentStore, slug: str = "hello") -> dict[int, DeploymentStatus]:
    return {d.version: d.status for d in await store.versions(slug)}


async def test_versions_are_monotonic_and_staged(make_store: MakeStore) -> None:
    store = await make_store()
    deps = [await store.put("hello", bundle(body=str(i))) for i in range(3)]
    assert [d.version for d in deps] == [1, 2, 3]
    assert all(d.status is STAGED for d in deps)
    assert await store.get_active("hello") is None
    text = (store.bundle_dir("hello", 2) / "hello" / "index.ts").read_text()
    assert text == "Deno.serve(() => new Response('1'));\n"
    assert store.statistics().puts == 3
    got = await store.get("hello", 3)
    assert got is not None
    assert got.sha256 == deps[2].sha256
    assert await store.get("hello", 99) is None


async def test_concurrent_puts_get_distinct_versions(make_store: MakeStore) -> None:
    store = await make_store(keep_versions=100)
    got: list[int] = []

    async def put(i: int) -> None:
        got.append((await store.put("hello", bundle(body=str(i)))).version)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(put, i)
    assert sorted(got) == list(range(1, 11))
    bodies = {
        (store.bundle_dir("hello", d.version) / "hello" / "index.ts").read_text() for d in await store.versions("hello")
    }
    assert len(bodies) == 10


async def test_activate_rollback_semantics(make_store: MakeStore) -> None:
    store = await make_store()
    for i in range(3):
        await store.put("hello", bundle(body=str(i)))
    assert (await store.activate("hello", 1)).status is ACTIVE
    await store.activate("hello", 2)
    assert await statuses(store) == {1: INACTIVE, 2: ACTIVE, 3: STAGED}
    await store.activate("hello", 3)
    active = await store.get_active("hello")
    assert active is not None
    assert active.version == 3
    assert active.activated_at is not None

    assert (await store.rollback("hello")).version == 2
    assert (await store.rollback("hello")).version == 1
    with pytest.raises(VersionConflict, match="no previous version"):
        await store.rollback("hello")
    assert (await store.rollback("hello", to=3)).version == 3
    assert await statuses(store) == {1: INACTIVE, 2: INACTIVE, 3: ACTIVE}

    with pytest.raises(DeploymentNotFound):
        await store.activate("hello", 99)
    with pytest.raises(StoreError, match="invalid function name"):
        await store.activate("../etc", 1)


async def test_failed_versions_are_not_activated(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("hello", bundle())
    await store.activate("hello", 1)
    await store.put("hello", bundle())
    failed = await store.mark_failed("hello", 2, "SyntaxError: Unexpected token")
    assert failed.status is FAILED
    assert failed.boot_error == "SyntaxError: Unexpected token"
    with pytest.raises(VersionConflict, match="failed to boot: SyntaxError"):
        await store.activate("hello", 2)
    await store.put("hello", bundle())
    await store.activate("hello", 3)
    assert (await store.rollback("hello")).version == 1


async def test_delete(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("hello", bundle())
    await store.put("hello", bundle())
    await store.activate("hello", 2)
    await store.put("other", bundle("other"))
    removed = await store.delete("hello")
    assert [d.version for d in removed] == [1, 2]
    assert await store.get_active("hello") is None
    assert await statuses(store) == {1: REMOVED, 2: REMOVED}
    assert not store.bundle_dir("hello", 2).exists()
    assert [d.slug for d in await store.list()] == ["other"]
    assert [d.slug for d in await store.list(include_removed=True)] == ["hello", "other"]
    with pytest.raises(VersionConflict, match="was removed"):
        await store.activate("hello", 2)
    with pytest.raises(DeploymentNotFound):
        await store.delete("never-deployed")
    with pytest.raises(DeploymentNotFound):
        await store.archive("hello", 1)
    again = await store.put("hello", bundle())
    assert again.version == 3  # numbering continues after a delete
    assert (await store.activate("hello", 3)).status is ACTIVE


async def test_listing_hides_secret_values(make_store: MakeStore) -> None:
    store = await make_store()
    archive = bundle(verify_jwt=False, cache={"ttl": 30, "vary": ["accept"]})
    dep = await store.put("hello", archive)
    await store.activate("hello", 1)
    (listed,) = await store.list()
    assert listed.env_names == ["API_KEY"]
    assert "s3cret" not in listed.model_dump_json()
    assert listed.verify_jwt is False
    assert listed.cache.ttl == 30
    assert len(dep.sha256) == 64
    assert await store.secrets("hello", 1) == {"API_KEY": "s3cret"}
    fv = function_version(listed, store.bundle_dir("hello", 1), {"API_KEY": "s3cret"})
    assert fv.key == "hello@1"
    assert (fv.bundle_dir / fv.entrypoint).is_file()
    assert await store.archive("hello", 1) == archive


async def test_bad_uploads_are_refused_and_leave_nothing(make_store: MakeStore) -> None:
    store = await make_store(limits=UnpackLimits(max_archive_bytes=100_000))
    with pytest.raises(BundleRejected, match="bundle is for 'other', not 'hello'"):
        await store.put("hello", bundle("other"))
    with pytest.raises(BundleRejected, match="sha256 mismatch"):
        await store.put("hello", bundle(), sha256="ab" * 32)
    with pytest.raises(BundleTooLarge) as info:
        await store.put("hello", b"\0" * 100_001)
    assert info.value.status == 413
    with pytest.raises(BundleRejected):
        await store.put("hello", b"not a tar.gz at all")
    assert await store.versions("hello") == []
    assert store.statistics().rejected == 4
    assert (await store.put("hello", bundle())).version >= 1


async def test_old_versions_are_pruned(make_store: MakeStore) -> None:
    store = await make_store(keep_versions=2)
    await store.put("hello", bundle())
    await store.activate("hello", 1)
    for _ in range(5):
        await store.put("hello", bundle())
    # active 1 stays, the newest (6) stays, plus two other old ones.
    assert [d.version for d in await store.versions("hello")] == [1, 4, 5, 6]
    with pytest.raises(DeploymentNotFound):
        await store.archive("hello", 2)


async def test_watch_reports_changes(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("hello", bundle())
    seen: list[StoreChange] = []
    with trio.fail_after(10):
        async with store.watch() as changes:
            assert store.statistics().watchers == 1
            await store.activate("hello", 1)
            await store.put("hello", bundle())
            await store.rollback("hello", to=1)
            await store.mark_failed("hello", 2, "boom")
            await store.delete("hello")
            async for change in changes:
                seen.append(change)
                if change.kind == "delete":
                    break
    assert seen == [
        StoreChange("activate", "hello", 1),
        StoreChange("put", "hello", 2),
        StoreChange("rollback", "hello", 1),
        StoreChange("failed", "hello", 2),
        StoreChange("delete", "hello", None),
    ]
    assert store.statistics().watchers == 0


async def test_watch_fires_for_a_waiting_reader(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put("hello", bundle())
    got = trio.Event()
    async with store.watch() as changes:

        async def reader() -> None:
            async for change in changes:
                if change.kind == "activate":
                    got.set()
                    return

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await store.activate("hello", 1)
                await got.wait()


async def test_a_slow_watcher_gets_resync(make_store: MakeStore) -> None:
    store = await make_store(watch_buffer=2, keep_versions=100)
    async with store.watch() as changes:
        for _ in range(5):
            await store.put("hello", bundle())
        with trio.fail_after(5):
            first = await changes.__anext__()
    assert first == StoreChange("resync", None, None)


async def test_activate_only_if_newer_never_moves_the_live_version_back(make_store: MakeStore) -> None:
    store = await make_store()
    v1 = (await store.put("hello", bundle(body="1"))).version
    v2 = (await store.put("hello", bundle(body="2"))).version
    assert (await store.activate("hello", v2, only_if_newer=True)).version == v2
    # v1 finished booting later: it must not take the live pointer back from v2.
    live = await store.activate("hello", v1, only_if_newer=True)
    assert live.version == v2
    active = await store.get_active("hello")
    assert active is not None
    assert active.version == v2
    # Without the flag (a rollback, an operator's choice) older versions can still be activated.
    assert (await store.activate("hello", v1)).version == v1


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "DENO_DIR", "NODE_OPTIONS", "PATH", "HOME", "TMPDIR", "http_proxy", "OTEL_DENO", "SSLKEYLOGFILE"],
)
async def test_env_that_changes_how_a_process_starts_is_refused(make_store: MakeStore, name: str) -> None:
    """A manifest built around the CLI's own check (as an attacker would) is refused by the store: 400, named."""
    store = await make_store()
    manifest = Manifest.model_construct(
        **{**Manifest.model_validate(MANIFEST_BASE).__dict__, "env": {name: "/tmp/evil.so", "OK": "1"}}
    )
    archive = pack_files({"hello/index.ts": b"Deno.serve(() => new Response('x'));\n"}, manifest).data
    with pytest.raises(BundleRejected) as caught:
        await store.put("hello", archive)
    assert caught.value.status == 400
    assert name in caught.value.reason
    assert await store.versions("hello") == []


async def test_a_failed_boot_gives_its_number_back_and_is_kept_as_an_attempt(make_store: MakeStore) -> None:
    store = await make_store()
    await store.activate("hello", (await store.put("hello", bundle(body="1"))).version)
    broken = await store.put("hello", bundle(body="2"))
    attempt = await store.discard("hello", broken.version, "SyntaxError: Unexpected token")
    assert (attempt.number, attempt.sha256) == (2, broken.sha256)
    assert [d.version for d in await store.versions("hello")] == [1]
    assert [(a.number, a.error) for a in await store.attempts("hello")] == [(2, "SyntaxError: Unexpected token")]
    assert (await store.put("hello", bundle(body="3"))).version == 2  # the number was given back
    with pytest.raises(VersionConflict):
        await store.discard("hello", 1, "the live version stays")


async def test_a_number_taken_after_the_failed_one_is_not_reused(make_store: MakeStore) -> None:
    store = await make_store()
    failing = await store.put("hello", bundle(body="1"))
    later = await store.put("hello", bundle(body="2"))  # a racing deploy took the next number meanwhile
    await store.discard("hello", failing.version, "boom")
    assert (await store.put("hello", bundle(body="3"))).version == later.version + 1


async def test_project_secrets_set_unset_and_announce(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.project_secrets() == {}
    async with store.watch() as changes:
        await store.set_secrets({"API_KEY": "a", "OTHER": "b"})
        with trio.fail_after(5):
            assert (await changes.__anext__()).kind == "secrets"
    await store.set_secrets({"API_KEY": "c"})
    assert await store.project_secrets() == {"API_KEY": "c", "OTHER": "b"}
    assert await store.unset_secrets(["OTHER", "NOPE"]) == ["OTHER"]
    assert await store.project_secrets() == {"API_KEY": "c"}
    with pytest.raises(StoreError) as refused:
        await store.set_secrets({"LD_PRELOAD": "x", "SUPABASE_URL": "y"})
    assert "LD_PRELOAD" in str(refused.value)
    assert "SUPABASE_" in str(refused.value)
    assert refused.value.status == 400
    assert await store.project_secrets() == {"API_KEY": "c"}
