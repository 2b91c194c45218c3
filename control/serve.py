"""`serve_control`: the control plane's start order — token, Redis, revocations, worker client, the layout and
its probes (a background task of this nursery), listener.

Redis is opened without requiring a connection: a control plane started before (or cut off from) the state
pillar answers 503 with the reason and recovers when Redis comes back, like the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from mbworker import __version__
from mbworker.control.app import ControlApp
from mbworker.control.audit import MemoryAuditLog
from mbworker.control.errors import ControlError, StateUnavailable
from mbworker.control.functions import ClusterFunctions
from mbworker.control.probes import NodeProber
from mbworker.control.registry import NodeRegistry
from mbworker.control.release import RedisReleaseStore
from mbworker.control.settings import ControlSettings
from mbworker.control.token import TOKEN_NAME, load_or_create_token
from mbworker.control.upgrade import Rollout
from mbworker.control.upgrade_routes import UpgradeRoutes
from mbworker.control.wheel_store import WheelStore
from mbworker.control.workers import open_worker_admin
from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.redis import open_redis
from mbworker.lib.revocation import open_redis_revocations

log = logging.getLogger("mbworker.control")


@dataclass(frozen=True)
class ControlHandle:
    settings: ControlSettings
    server: HttpServer
    app: ControlApp

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{self.server.port}"


async def serve_control(
    settings: ControlSettings, *, task_status: trio.TaskStatus[ControlHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until cancelled; `started(handle)` once the listener accepts."""
    token = await trio.to_thread.run_sync(load_or_create_token, settings.token_file)
    node_token = None
    if settings.node_token_file is not None:
        node_token = await trio.to_thread.run_sync(load_or_create_token, settings.node_token_file)
    async with (
        open_redis(settings.redis_url, require_connection=False) as redis,
        open_redis_revocations(redis) as revocations,
        open_worker_admin(settings.admin_token.get_secret_value()) as admin,
    ):
        prober = None
        if settings.layout_file is not None:
            prober = NodeProber(
                settings.layout_file, interval_s=settings.probe_interval_s, patroni_port=settings.patroni_port
            )
        registry = NodeRegistry(redis, down_after_s=settings.down_after_s, layout=prober)
        audit = MemoryAuditLog(settings.audit_size)
        wheels = WheelStore(settings.wheels_dir)
        release = RedisReleaseStore(redis, __version__)  # before any upgrade: the version shipped with the cluster
        rollout = Rollout(registry, admin, wheels, audit, token_name=TOKEN_NAME, release=release)
        upgrades = UpgradeRoutes(rollout, wheels, registry, admin)
        app = ControlApp(
            token,
            token_name=TOKEN_NAME,
            node_token=node_token,
            registry=registry,
            functions=ClusterFunctions(registry, admin, timeout=settings.deploy_timeout_s),
            revocations=revocations,
            audit=audit,
            session_lifetime_s=settings.session_lifetime_s,
            max_bundle_bytes=settings.max_bundle_mb * 1024 * 1024,
            extra_routes=upgrades.routes(),
        )
        async with trio.open_nursery() as nursery:
            if prober is not None:
                await nursery.start(prober.serve)  # the layout is read before the first request
            await nursery.start(rollout.serve)
            server: HttpServer = await nursery.start(serve_http, app, settings.host, settings.port)
            handle = ControlHandle(settings, server, app)
            log.info("control plane on %s", handle.url)
            if settings.node_name:
                nursery.start_soon(_beat_self, registry, settings.node_name, settings.host)
            task_status.started(handle)


SELF_BEAT_S = 1.0


async def _beat_self(registry: NodeRegistry, name: str, host: str) -> None:
    """The control plane's own node in the registry (role system), written like a proxy's pull."""
    refused = ""
    while True:
        try:
            await registry.record_pull("system", name, host, __version__)
        except StateUnavailable:
            pass  # the nodes API answers 503 meanwhile; the next beat retries
        except ControlError as exc:  # e.g. --node-name is not the layout's system node: said once, not fatal
            if exc.message != refused:
                log.warning("the control plane's own node is not recorded: %s", exc.message)
            refused = exc.message
        await trio.sleep(SELF_BEAT_S)
