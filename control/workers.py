"""Calls from the control plane to workers' admin listeners (private network), with the workers' admin token.

`WorkerAdmin` owns one `httpx.AsyncClient` (trio through anyio); `open_worker_admin` is its owner context. Every
call has a timeout; a refused call becomes `WorkerCallFailed` carrying the worker's own status, code and message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from mbworker.control.errors import WorkerCallFailed
from mbworker.control.registry import NodeView

CALL_TIMEOUT_S = 30.0


class WorkerAdmin:
    def __init__(self, http: httpx.AsyncClient, timeout: float = CALL_TIMEOUT_S) -> None:
        self._http = http
        self._timeout = timeout

    async def call(self, node: NodeView, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        name = node.record.name
        try:
            response = await self._http.request(
                method, f"{node.admin_url}{path}", timeout=timeout or self._timeout, **kwargs
            )
        except httpx.HTTPError as exc:
            raise WorkerCallFailed(name, 502, "WORKER_UNREACHABLE", f"admin API unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            raise WorkerCallFailed(
                name,
                response.status_code,
                str(body.get("code", "WORKER_FAILED")),
                str(body.get("message", response.text[:300])),
                output=str(body.get("output", "")),
            )
        if response.headers.get("content-type", "").startswith("application/x-ndjson"):
            return [json.loads(line) for line in response.text.splitlines() if line.strip()]
        return response.json()

    async def live(self, node: NodeView) -> dict[str, int]:
        """The versions `node` serves now (slug → version), from its health."""
        health = await self.call(node, "GET", "/admin/v1/health", timeout=5.0)
        live = health.get("live", {}) if isinstance(health, dict) else {}
        return {str(k): int(v) for k, v in live.items()} if isinstance(live, dict) else {}


@asynccontextmanager
async def open_worker_admin(admin_token: str, timeout: float = CALL_TIMEOUT_S) -> AsyncIterator[WorkerAdmin]:
    headers = {"authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as http:
        yield WorkerAdmin(http, timeout)
