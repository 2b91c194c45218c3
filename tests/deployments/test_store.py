"""LocalDeploymentStore: numbering (also across instances and processes), activate/rollback/delete, watch."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from mbworker.worker.deployments.archive import BundleRejected, BundleTooLarge, pack_files
from mbworker.worker.deployments.changes import StoreChange
from mbworker.worker.deployments.manifest import Manifest
from mbworker.worker.deployments.store import (
    DeploymentNotFound,
    DeploymentStatus,
    LocalDeploymentStore,
    StoreError,
    UnpackLimits,
    VersionConflict,
    function_version,
)

ACTIVE, STAGED, INACTIVE, REMOVED, FAILED = (
    DeploymentStatus.ACTIVE,
    DeploymentStatus.STAGED,
    DeploymentStatus.INACTIVE,
    DeploymentStatus.REMOVED,
    DeploymentStatus.FAILED,
)


def bundle(slug: str = "hello", body: str = "v", **extra: object) -> bytes:
    manifest = Manifest.model_validate(
        {"slug": slug, "runtime": "deno", "entrypoint": f"{slug}/index.ts", "env": {"API_KEY": "s3cret"}, **extra}
    )
    source = f"Deno.serve(() => new Response({body!r}));\n".encode()
    return pack_files({f"{slug}/index.ts": source}, manifest).data


async def statuses(store: LocalDeploymentStore, slug: str = "hello") -> dict[int, DeploymentStatus]:
    return {d.version: d.status for d in await store.versions(slug)}


async def test_versions_are_monotonic_and_staged(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
    deps = [await store.put("hello", bundle(body=str(i))) for i in range(3)]
    assert [d.version for d in deps] == [1, 2, 3]
    assert all(d.status is STAGED for d in deps)
    assert await store.get_active("hello") is None
    assert (store.bundle_dir("hello", 2) / "hello" / "index.ts").read_text() == (
        "Deno.serve(() => new Response('1'));\n"
    )
    assert store.statistics().puts == 3


async def test_concurrent_puts_get_distinct_versions(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path, keep_versions=100)
    got: list[int] = []

    async def put(i: int) -> None:
        got.append((await store.put("hello", bundle(body=str(i)))).version)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(put, i)
    assert sorted(got) == list(range(1, 21))
    # Each version holds the archive it was given (no two puts wrote into one folder).
    bodies = {
        (store.bundle_dir("hello", d.version) / "hello" / "index.ts").read_text() for d in await store.versions("hello")
    }
    assert len(bodies) == 20


async def test_two_store_instances_on_one_root_never_share_a_version(tmp_path: Path) -> None:
    a = LocalDeploymentStore(tmp_path, keep_versions=100)
    b = LocalDeploymentStore(tmp_path, keep_versions=100)
    got: list[int] = []

    async def put(store: LocalDeploymentStore, i: int) -> None:
        got.append((await store.put("hello", bundle(body=str(i)))).version)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(put, a, i)
            nursery.start_soon(put, b, 100 + i)
    assert sorted(got) == list(range(1, 21))


async def test_another_process_never_takes_a_duplicate_version(tmp_path: Path) -> None:
    script = f"""
import sys, trio
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from tests.deployments.test_store import bundle
from mbworker.worker.deployments.store import LocalDeploymentStore

async def main():
    store = LocalDeploymentStore(__import__("pathlib").Path({str(tmp_path)!r}), keep_versions=100)
    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(store.put, "hello", bundle(body="child" + str(i)))

trio.run(main)
"""
    store = LocalDeploymentStore(tmp_path, keep_versions=100)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.run_process, [sys.executable, "-c", script], capture_stderr=True))
            for i in range(10):
                nursery.start_soon(store.put, "hello", bundle(body=f"parent{i}"))
    versions = await store.versions("hello")
    assert [d.version for d in versions] == list(range(1, 21))
    bodies = {(store.bundle_dir("hello", d.version) / "hello" / "index.ts").read_text() for d in versions}
    assert len(bodies) == 20  # ten from each process, none overwritten


async def test_activate_rollback_semantics(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
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

    assert (await store.rollback("hello")).version == 2  # the previously active one
    assert (await store.rollback("hello")).version == 1  # and further back on a second call
    with pytest.raises(VersionConflict, match="no previous version"):
        await store.rollback("hello")
    assert (await store.rollback("hello", to=3)).version == 3
    assert await statuses(store) == {1: INACTIVE, 2: INACTIVE, 3: ACTIVE}

    with pytest.raises(DeploymentNotFound):
        await store.activate("hello", 99)
    with pytest.raises(StoreError, match="invalid function name"):
        await store.activate("../etc", 1)


async def test_a_put_never_activated_leaves_the_active_version(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
    await store.put("hello", bundle(body="live"))
    await store.activate("hello", 1)
    staged = await store.put("hello", bundle(body="new"))
    assert staged.status is STAGED
    active = await store.get_active("hello")
    assert active is not None
    assert active.version == 1
    assert [d.version for d in await store.list()] == [1]


async def test_failed_versions_are_not_activated(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
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


async def test_delete(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
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
    # Deploying again continues the numbering.
    again = await store.put("hello", bundle())
    assert again.version == 3
    assert (await store.activate("hello", 3)).status is ACTIVE


async def test_listing_hides_secret_values(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
    dep = await store.put("hello", bundle(verify_jwt=False, cache={"ttl": 30, "vary": ["accept"]}))
    await store.activate("hello", 1)
    (listed,) = await store.list()
    assert listed.env_names == ["API_KEY"]
    assert "s3cret" not in listed.model_dump_json()
    assert listed.verify_jwt is False
    assert listed.cache.ttl == 30
    assert len(dep.sha256) == 64
    assert await store.secrets("hello", 1) == {"API_KEY": "s3cret"}
    fv = function_version(listed, store.bundle_dir("hello", 1), {"API_KEY": "s3cret", "SUPABASE_URL": "u"})
    assert fv.key == "hello@1"
    assert (fv.bundle_dir / fv.entrypoint).is_file()
    assert await store.archive("hello", 1) == bundle(verify_jwt=False, cache={"ttl": 30, "vary": ["accept"]})


async def test_bad_uploads_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path, limits=UnpackLimits(max_archive_bytes=100_000))
    with pytest.raises(BundleRejected, match="bundle is for 'other', not 'hello'"):
        await store.put("hello", bundle("other"))
    with pytest.raises(BundleRejected, match="sha256 mismatch"):
        await store.put("hello", bundle(), sha256="ab" * 32)
    with pytest.raises(BundleTooLarge) as info:
        await store.put("hello", b"\0" * 100_001)
    assert info.value.status == 413
    assert await store.versions("hello") == []
    assert store.statistics().rejected == 3
    assert (await store.put("hello", bundle())).version >= 1


async def test_old_versions_are_pruned(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path, keep_versions=2)
    await store.put("hello", bundle())
    await store.activate("hello", 1)
    for _ in range(5):
        await store.put("hello", bundle())
    # active 1 stays, the newest (6) stays, plus two other old ones.
    assert [d.version for d in await store.versions("hello")] == [1, 4, 5, 6]
    assert not store.bundle_dir("hello", 2).exists()


async def test_watch_reports_changes(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
    await store.put("hello", bundle())
    seen: list[StoreChange] = []
    with trio.fail_after(10):
        async with store.watch() as changes:
            assert store.statistics().watchers == 1
            await store.activate("hello", 1)
            await store.delete("hello")
            async for change in changes:
                seen.append(change)
                if change.kind == "delete":
                    break
    assert seen == [StoreChange("activate", "hello", 1), StoreChange("delete", "hello", None)]
    assert store.statistics().watchers == 0


async def test_watch_fires_for_a_waiting_reader(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path)
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


async def test_a_slow_watcher_gets_resync(tmp_path: Path) -> None:
    store = LocalDeploymentStore(tmp_path, watch_buffer=2, keep_versions=100)
    async with store.watch() as changes:
        for _ in range(5):
            await store.put("hello", bundle())
        with trio.fail_after(5):
            first = await changes.__anext__()
    assert first == StoreChange("resync", None, None)
