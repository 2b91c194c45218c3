"""The control plane's routes for mbworker upgrades, the wheels they install, and project secrets.

    POST /control/v1/upgrade                  {"version"}: 202 once planned, a rolling upgrade (control/upgrade.py) runs
    GET  /control/v1/upgrade                  the running or last rollout: state, upgraded, pending, steps, failed
    GET  /control/v1/release[?workers=1]      the cluster's release (control/release.py); with workers=1 also the
                                              workers off it (`cluster status`). Node token too: a worker's helper
                                              converges to it at every start (without the flag: no registry scan)
    GET  /control/v1/wheels                   versions held
    PUT  /control/v1/wheels/<version>         body: a tar of *.whl (the wheelhouse `provision` builds)
    GET  /control/v1/wheels/<version>         [{"filename", "sha256", "size"}]   (node token too: workers' helpers)
    GET  /control/v1/wheels/<version>/<file>  the wheel                           (node token too)
    GET|POST /control/v1/secrets, POST /control/v1/secrets/unset: a worker's admin API, whose store is the cluster's

`ControlApp` takes `routes()` as extra routes; this module owns none of the parts it is handed.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from mbworker.control.app import ExtraRoute, read_json
from mbworker.control.errors import ControlError, NoWorkers
from mbworker.control.registry import NodeRegistry
from mbworker.control.upgrade import Rollout
from mbworker.control.wheel_store import WheelStore
from mbworker.control.workers import WorkerAdmin
from mbworker.lib.http.types import HttpRequest

V1 = "/control/v1"
MAX_PUSH_BYTES = 512 * 1024 * 1024


class UpgradeRoutes:
    def __init__(self, rollout: Rollout, wheels: WheelStore, registry: NodeRegistry, admin: WorkerAdmin) -> None:
        self._rollout = rollout
        self._wheels = wheels
        self._registry = registry
        self._admin = admin

    def routes(self) -> list[ExtraRoute]:
        return [
            ("POST", re.compile(rf"^{V1}/upgrade$"), self._upgrade, True),
            ("GET", re.compile(rf"^{V1}/upgrade$"), self._upgrade_status, False),
            ("GET", re.compile(rf"^{V1}/release$"), self._release, False),
            ("GET", re.compile(rf"^{V1}/wheels$"), self._versions, False),
            ("PUT", re.compile(rf"^{V1}/wheels/([^/]+)$"), self._push, True),
            ("GET", re.compile(rf"^{V1}/wheels/([^/]+)$"), self._manifest, False),
            ("GET", re.compile(rf"^{V1}/wheels/([^/]+)/([^/]+)$"), self._file, False),
            ("GET", re.compile(rf"^{V1}/secrets$"), self._secrets, False),
            ("POST", re.compile(rf"^{V1}/secrets$"), self._secrets, True),
            ("POST", re.compile(rf"^{V1}/secrets/unset$"), self._secrets, True),
        ]

    async def _upgrade(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        version = (await read_json(request)).get("version")
        if not isinstance(version, str):
            raise ControlError('expected {"version": "X.Y.Z"}')
        return 202, await self._rollout.start(version)

    async def _upgrade_status(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, self._rollout.last()

    async def _release(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        release = await self._rollout.current()
        if parse_qs(request.query).get("workers", [""])[-1] != "1":
            return 200, release.to_json()  # what every worker's helper asks at each start: no registry scan
        off = [
            {"name": v.record.name, "version": v.record.version}
            for v in await self._registry.nodes()
            if v.record.role == "worker" and v.up and not release.accepts(v.record.version)
        ]
        return 200, release.to_json() | {"workers_off_release": off}

    async def _versions(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self._wheels.versions()

    async def _push(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        held = await self._wheels.put(args[0], await request.body.read_all(MAX_PUSH_BYTES))
        return 201, {"version": args[0], "wheels": len(held), "bytes": sum(w.size for w in held)}

    async def _manifest(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        held = await self._wheels.manifest(args[0])
        return 200, [{"filename": w.filename, "sha256": w.sha256, "size": w.size} for w in held]

    async def _file(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        return 200, await self._wheels.read(args[0], args[1])

    async def _secrets(self, request: HttpRequest, args: list[str]) -> tuple[int, Any]:
        """Passed to one serving worker: the secrets live in the cluster's store, every worker's functions follow."""
        workers = await self._registry.serving_workers()
        if not workers:
            raise NoWorkers("no ready worker reports to the control plane")
        path = request.path.removeprefix(V1)
        kwargs: dict[str, Any] = {}
        if request.method == "POST":
            kwargs["json"] = await read_json(request)
        return 200, await self._admin.call(workers[0], request.method, f"/admin/v1{path}", **kwargs)
