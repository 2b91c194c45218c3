"""Cluster-wide function commands: deploy, list, versions, rollback, delete, logs.

The deployment store is the cluster's Redis (worker/cluster/deployments_redis.py); the control plane changes it
through the workers, which own the runtimes (it imports none).

A deploy is two-phase, so no worker ever serves a version another worker could not boot:
1. stage on one serving worker (validate, store as a new version, boot) — not live anywhere yet;
2. warm that version on every other serving worker (each fetches it from Redis and boots it);
3. only if every one booted: activate it (one switch in the store; every worker follows the change feed), then
   wait until every serving worker reports it live, and say how many do.
A failure in 1 or 2 retires the version where it was warmed and discards it as a failed attempt (its number goes
to the next deploy), and leaves the previous version serving everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from mbworker.control.errors import ControlError, NoWorkers, WorkerCallFailed
from mbworker.control.registry import NodeRegistry, NodeView
from mbworker.control.workers import WorkerAdmin

log = logging.getLogger("mbworker.control.functions")

CONVERGE_POLL_S = 0.05


class ClusterFunctions:
    """Owns a lock per slug (deploys of one function through this control plane take turns)."""

    def __init__(self, registry: NodeRegistry, admin: WorkerAdmin, *, timeout: float = 120.0) -> None:
        self._registry = registry
        self._admin = admin
        self._timeout = timeout
        self._locks: dict[str, trio.Lock] = {}

    async def _workers(self) -> Sequence[NodeView]:
        workers = await self._registry.serving_workers()
        if not workers:
            raise NoWorkers("no ready worker reports to the control plane")
        return workers

    async def list_functions(self) -> Any:
        return await self._admin.call((await self._workers())[0], "GET", "/admin/v1/functions")

    async def versions(self, slug: str) -> Any:
        return await self._admin.call((await self._workers())[0], "GET", f"/admin/v1/functions/{slug}")

    async def deploy(self, slug: str, archive: bytes, sha256: str | None) -> dict[str, Any]:
        async with self._locks.setdefault(slug, trio.Lock()):
            workers = await self._workers()
            first, rest = workers[0], workers[1:]
            headers = {"content-type": "application/octet-stream"}
            if sha256:
                headers["x-mbworker-sha256"] = sha256
            base = f"/admin/v1/functions/{slug}"
            # 1. stage + boot on one worker: a bad bundle or a boot error ends here (the worker marks it failed).
            staged = await self._admin.call(
                first, "POST", f"{base}/deploy?activate=0", content=archive, headers=headers, timeout=self._timeout
            )
            version = int(staged["version"])
            # 2. boot it on every other worker, side by side.
            failures: list[WorkerCallFailed] = []

            async def warm(node: NodeView) -> None:
                try:
                    await self._admin.call(node, "POST", f"{base}/versions/{version}/warm", timeout=self._timeout)
                except WorkerCallFailed as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                for node in rest:
                    nursery.start_soon(warm, node)
            if failures:
                reason = f"{failures[0].node}: {failures[0].message}"
                await self._abandon(workers, base, version, reason)
                failed = failures[0]
                raise WorkerCallFailed(
                    failed.node, failed.status, failed.code, f"v{version} not activated: {failed.message}",
                    output=failed.output,
                )  # fmt: skip
            # 3. one switch in the store; every worker follows.
            live = await self._admin.call(first, "POST", f"{base}/versions/{version}/activate")
            serving = await self._converge(workers, slug, int(live["version"]))
            return {**live, "workers": len(workers), "serving": serving}

    async def _abandon(self, workers: Sequence[NodeView], base: str, version: int, reason: str) -> None:
        """Retire the version wherever it was warmed, then discard it from the store as a failed attempt (asked of
        the worker that staged it, last: the others still find it to retire). Best effort, bounded."""
        for node in [*workers[1:], workers[0]]:
            body = {"error": f"not booted on every worker: {reason}"} if node is workers[0] else {}
            try:
                await self._admin.call(node, "POST", f"{base}/versions/{version}/abandon", json=body, timeout=10.0)
            except WorkerCallFailed as exc:
                log.warning("could not abandon v%d on %s: %s", version, node.record.name, exc.message)

    async def rollback(self, slug: str, to: int | None) -> dict[str, Any]:
        async with self._locks.setdefault(slug, trio.Lock()):
            workers = await self._workers()
            body = {} if to is None else {"version": to}
            dep = await self._admin.call(workers[0], "POST", f"/admin/v1/functions/{slug}/rollback", json=body)
            serving = await self._converge(workers, slug, int(dep["version"]))
            return {**dep, "workers": len(workers), "serving": serving}

    async def delete(self, slug: str) -> dict[str, Any]:
        async with self._locks.setdefault(slug, trio.Lock()):
            workers = await self._workers()
            result = await self._admin.call(workers[0], "DELETE", f"/admin/v1/functions/{slug}")
            gone = await self._converge(workers, slug, None)
            return {**result, "workers": len(workers), "removed_on": gone}

    async def logs(self, slug: str, since: str | None, limit: int | None) -> list[dict[str, Any]]:
        """Recent lines from every serving worker, merged by time, each with its `node`."""
        params: dict[str, str] = {}
        if since:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        lines: list[dict[str, Any]] = []
        missing = 0
        for node in await self._workers():
            try:
                got = await self._admin.call(node, "GET", f"/admin/v1/functions/{slug}/logs", params=params)
            except WorkerCallFailed as exc:
                if exc.status != 404:
                    raise
                missing += 1
                continue
            lines.extend({**line, "node": node.record.name} for line in got if isinstance(line, dict))
        if not lines and missing:
            raise ControlError(f"No function {slug!r}", status=404, code="NOT_FOUND")
        lines.sort(key=lambda line: str(line.get("time", "")))  # ISO times sort as text
        return lines[-limit:] if limit else lines

    async def _converge(self, workers: Sequence[NodeView], slug: str, version: int | None) -> int:
        """Wait (bounded) until every worker serves `version` of `slug` (None: none); how many do."""
        pending = {node.record.name: node for node in workers}
        with trio.move_on_after(self._timeout):
            while pending:
                for name, node in list(pending.items()):
                    try:
                        live = await self._admin.live(node)
                    except WorkerCallFailed:
                        continue  # asked again at the next poll (a worker that went away stays pending)
                    if live.get(slug) == version:
                        del pending[name]
                if pending:
                    await trio.sleep(CONVERGE_POLL_S)
        if pending:
            log.warning("%s: %s did not switch within %.0fs", slug, ", ".join(sorted(pending)), self._timeout)
        return len(workers) - len(pending)
