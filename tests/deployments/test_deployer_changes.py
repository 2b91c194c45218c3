"""What the Deployer tells the daemon when a slug's live version changes (the cache purges hang off it)."""

from __future__ import annotations

from pathlib import Path

from mbworker.worker.deployer import Deployer, PlatformEnv
from mbworker.worker.deployments.store import LocalDeploymentStore
from mbworker.worker.functions import FunctionTable
from tests.deployments.test_store import bundle


async def test_only_a_rollback_here_is_reported_as_rolled_back(tmp_path: Path) -> None:
    """A rollback brings back a version whose earlier results may be cached anywhere (the shared L2 is purged for
    it); a switch seen from the store, like a newer version activated elsewhere, brings a version never cached."""
    store = LocalDeploymentStore(tmp_path / "store", keep_versions=10)
    for body in ("v1", "v2"):
        dep = await store.put("hello", bundle(body=body))
        await store.activate("hello", dep.version)
    changes: list[tuple[str, bool]] = []

    async def on_change(slug: str, rolled_back: bool) -> None:
        changes.append((slug, rolled_back))

    table = FunctionTable()
    env = PlatformEnv("http://x", "anon", "service")
    deployer = Deployer(store, {}, table, env, on_change=on_change)
    assert await deployer.restore() == 1
    assert changes == []  # restoring is not a change

    await deployer.rollback("hello")
    assert changes == [("hello", True)]
    live = table.get("hello")
    assert live is not None
    assert live.fn.version == 1

    dep = await store.put("hello", bundle(body="v3"))
    await store.activate("hello", dep.version)  # as another node would
    await deployer.reconcile_slug("hello")
    assert changes[1:] == [("hello", False)]
