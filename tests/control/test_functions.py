"""The cluster deploy's two phases with stand-in workers: a version one worker cannot boot is never activated
(and is retired where it was warmed); otherwise one activation, then it waits for every worker to serve it."""

from __future__ import annotations

from typing import Any

import pytest

from mbworker.control.errors import WorkerCallFailed
from mbworker.control.functions import ClusterFunctions
from mbworker.control.registry import NodeRecord, NodeView


def _node(name: str) -> NodeView:
    record = NodeRecord(
        role="worker", name=name, private_ip="127.0.0.1", port=1, admin_port=2, version="1", ready=True, sent_at=0
    )
    return NodeView(record=record, up=True, last_seen_s=0, drain_asked=False)


class Registry:
    def __init__(self, *names: str) -> None:
        self.workers = [_node(n) for n in names]

    async def serving_workers(self) -> list[NodeView]:
        return self.workers


class Workers:
    """Stand-in admin APIs: record every call; `fail_warm` boots fail on that worker; activation is seen by
    every worker at once."""

    def __init__(self, fail_warm: str | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.fail_warm = fail_warm
        self.serving: dict[str, int] = {"hello": 1}

    async def call(self, node: NodeView, method: str, path: str, **kwargs: Any) -> Any:
        name = node.record.name
        self.calls.append((name, method, path.split("?")[0] + (" error" if kwargs.get("json") else "")))
        if path.endswith("/deploy?activate=0"):
            return {"slug": "hello", "version": 2, "status": "STAGED"}
        if path.endswith("/warm") and name == self.fail_warm:
            raise WorkerCallFailed(name, 503, "BOOT_ERROR", "boom", output="stack")
        if path.endswith("/activate"):
            self.serving["hello"] = 2
            return {"slug": "hello", "version": 2, "status": "ACTIVE"}
        return {}

    async def live(self, node: NodeView) -> dict[str, int]:
        return self.serving


def _functions(registry: Registry, workers: Workers) -> ClusterFunctions:
    return ClusterFunctions(registry, workers, timeout=5)  # type: ignore[arg-type]


async def test_a_version_one_worker_cannot_boot_is_never_activated() -> None:
    workers = Workers(fail_warm="w3")
    workers.serving = {"hello": 1}
    with pytest.raises(WorkerCallFailed) as failed:
        await _functions(Registry("w1", "w2", "w3"), workers).deploy("hello", b"bundle", "sha")
    assert (failed.value.status, failed.value.code, failed.value.node) == (503, "BOOT_ERROR", "w3")
    assert failed.value.output == "stack"
    assert not [c for c in workers.calls if c[2].endswith("/activate")]
    abandoned = [(n, p) for n, _, p in workers.calls if "/abandon" in p]
    # retired everywhere, then discarded once (with the reason) by the worker that staged it
    assert abandoned == [
        ("w2", "/admin/v1/functions/hello/versions/2/abandon"),
        ("w3", "/admin/v1/functions/hello/versions/2/abandon"),
        ("w1", "/admin/v1/functions/hello/versions/2/abandon error"),
    ]
    assert workers.serving == {"hello": 1}


async def test_a_deploy_activates_once_and_returns_when_every_worker_serves_it() -> None:
    workers = Workers()
    result = await _functions(Registry("w1", "w2"), workers).deploy("hello", b"bundle", None)
    assert (result["version"], result["workers"], result["serving"]) == (2, 2, 2)
    assert [c for c in workers.calls if not c[2].endswith("/health")] == [
        ("w1", "POST", "/admin/v1/functions/hello/deploy"),
        ("w2", "POST", "/admin/v1/functions/hello/versions/2/warm"),
        ("w1", "POST", "/admin/v1/functions/hello/versions/2/activate"),
    ]
