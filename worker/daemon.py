"""`serve_worker`: the start order of one worker node, top to bottom.

data dir and secrets → cluster backends (with Redis: client, deployment store, rate limits, L2, the pub/sub bus,
revocations, broker, presence; else the local store) → runtimes → JWT verifier → front door → live table (restored
from the store) → realtime → admin listener → public listener → heartbeat (cluster) → examples → ready.
Drain (`worker.drain.Drain`: a signal, POST /admin/v1/drain, the control plane) stops accepting, closes
WebSockets with 1012, lets in-flight requests finish within the grace period, then closes everything in reverse
order; every child is reaped by the runtime that owns it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from mbworker import __version__
from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.settings import HttpSettings
from mbworker.lib.jwt import JwksError, open_jwt_verifier
from mbworker.realtime import open_realtime
from mbworker.runtimes import Runtime
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime
from mbworker.runtimes.deno.permissions import NetPolicy, node_addresses, resolve_hosts
from mbworker.runtimes.wasm import WasmSettings, open_wasm_runtime
from mbworker.worker.admin import AdminApp
from mbworker.worker.backends import open_backends
from mbworker.worker.cache import CacheSettings, ResultCache
from mbworker.worker.cluster import (
    Rate,
    RateLimiter,
)
from mbworker.worker.cluster.heartbeat import NodeIdentity, NodeLoad, NodeState, serve_heartbeat
from mbworker.worker.config import WorkerSettings
from mbworker.worker.data_dir import secure_data_dir
from mbworker.worker.deploy_local import deploy_path
from mbworker.worker.deployer import EMPTY_JWKS, Deployer, PlatformEnv, public_jwks
from mbworker.worker.drain import Drain
from mbworker.worker.errors import ConfigError
from mbworker.worker.function_logs import FunctionLogs
from mbworker.worker.functions import FunctionsFrontDoor, FunctionTable, TrustedProxies
from mbworker.worker.jwt_gate import JwtGate
from mbworker.worker.keys import ProjectKeys, load_project_keys
from mbworker.worker.logs import configure_logging
from mbworker.worker.metrics import (
    CACHE_STATS,
    HTTP_STATS,
    REALTIME_STATS,
    RUNTIME_STATS,
    Metrics,
)
from mbworker.worker.public_app import PublicApp
from mbworker.worker.readiness import Readiness, executable_check
from mbworker.worker.upgrade_request import UpgradeRequests

log = logging.getLogger("mbworker.daemon")

DRAIN_REPORT_LINGER_S = 10.0
"""After a drain asked for over the admin API, how long the admin listener waits for the caller to poll again
and read `drained: true` before the process exits."""


@dataclass
class WorkerHandle:
    """What `serve_worker` hands to `task_status.started`: addresses, keys, and the drain trigger."""

    settings: WorkerSettings
    keys: ProjectKeys
    public: HttpServer
    admin: HttpServer
    deployer: Deployer
    drain_control: Drain = field(default_factory=Drain)

    @property
    def public_url(self) -> str:
        return f"http://{_display_host(self.settings.host)}:{self.public.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{_display_host(self.settings.admin_host)}:{self.admin.port}"

    def drain(self) -> None:
        self.drain_control.start()


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


async def serve_worker(
    settings: WorkerSettings,
    deploy_paths: Sequence[Path] = (),
    *,
    handle_signals: bool = True,
    reload_settings: Callable[[], WorkerSettings] | None = None,
    task_status: trio.TaskStatus[WorkerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker node until drained. `started(handle)` once both listeners accept and examples are live."""
    data_dir = settings.data_dir.resolve()
    tightened = await trio.to_thread.run_sync(secure_data_dir, data_dir)
    for what in tightened:
        log.warning("readable by others, tightened: %s", what)
    keys = await trio.to_thread.run_sync(load_project_keys, settings)
    node_id = default_node_id(settings)
    table = FunctionTable()
    drain = Drain()
    metrics = Metrics(node_id=node_id)
    function_logs = FunctionLogs()
    readiness = Readiness()

    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(
            open_backends(settings, data_dir, node_id=node_id, metrics=metrics, readiness=readiness)
        )
        l2 = backends.l2
        net_policy = await trio.to_thread.run_sync(function_net_policy, settings)
        deno_settings = DenoSettings(scratch_dir=data_dir / "scratch" / "deno", net=net_policy)
        if settings.deno is not None:
            deno_settings = deno_settings.model_copy(update={"deno_bin": str(settings.deno)})
        deno = await stack.enter_async_context(open_deno_runtime(deno_settings, on_log=function_logs.on_log))
        readiness.add("runtime deno", executable_check(deno_settings.deno_bin))
        wasm = await stack.enter_async_context(
            open_wasm_runtime(
                WasmSettings(cache_dir=data_dir / "cache" / "wasm", sync_wait_us=settings.wasm_sync_wait_us),
                on_log=function_logs.on_log,
            )
        )
        runtimes: dict[str, Runtime] = {"deno": deno, "wasm": wasm}
        metrics.add_statistics(RUNTIME_STATS, deno.statistics, runtime="deno")
        metrics.add_statistics(RUNTIME_STATS, wasm.statistics, runtime="wasm")
        # Closed before the stores and Redis (the exit stack unwinds in reverse): its L2 writes still reach Redis.
        background = await stack.enter_async_context(trio.open_nursery())
        # One verifier (one algorithm policy, one memo) for the functions' gate and realtime.
        try:
            verifier = await stack.enter_async_context(open_jwt_verifier(keys.jwt_secret, jwks=settings.jwks))
        except JwksError as exc:
            raise ConfigError(f"jwks: {exc}") from None
        verifier.revocations = (
            backends.revocations
        )  # a revoked session's tokens are refused by the gate and by realtime
        functions = FunctionsFrontDoor(
            table,
            runtimes,
            JwtGate(verifier),
            cache=_make_cache(settings),
            metrics=metrics,
            limiter=backends.limiter,
            l2=l2,
            background=background,
            trusted_proxies=TrustedProxies(settings.trusted_proxies),
        )
        metrics.add_statistics(CACHE_STATS, lambda: functions.cache.statistics() if functions.cache else None)

        async def purge_cache(slug: str | None, shared: bool = True) -> int:
            """Drop cached results of `slug` (or all): this node's L1 and, with `shared` in a cluster, the L2."""
            if shared and l2 is not None:
                for each in [slug] if slug else table.slugs():
                    await l2.purge_prefix(each)
            return functions.cache.purge(slug) if functions.cache is not None else 0

        def follow(slug: str) -> None:
            """Metrics and logs follow the slug's live version."""
            active = table.get(slug)
            if active is None:
                metrics.forget_function(slug)
                function_logs.forget(slug)
            else:
                metrics.set_function_version(slug, active.fn.version)

        async def on_change(slug: str, rolled_back: bool) -> None:
            """A slug's live version changed on this node: drop its results from this node's L1 (they are keyed
            by version: this only frees memory, unless an older version came back). The shared L2 is purged only
            by the node that rolled back — every other change brings a version whose keys were never used."""
            await purge_cache(slug, shared=rolled_back)
            follow(slug)

        deployer = Deployer(
            backends.store,
            runtimes,
            table,
            PlatformEnv(
                settings.public_base_url,
                keys.anon_key,
                keys.service_role_key,
                db_url=settings.db_url.get_secret_value() if settings.db_url else None,
                jwks=await _functions_jwks(settings.jwks),
            ),
            scratch_root=data_dir / "scratch" / "functions",
            on_change=on_change,
            default_limits=settings.limits,
        )
        restored = await deployer.restore()
        for slug in table.slugs():  # nothing is in this L1 yet; what other nodes cached for these versions holds
            follow(slug)
        realtime = await stack.enter_async_context(
            open_realtime(
                settings.realtime,
                verifier=verifier,
                node_id=node_id,
                broker=backends.broker,
                presence=backends.presence,
                shared_limiter=_SharedRealtimeLimiter(backends.limiter),
            )
        )
        backends.revocations.add_listener(realtime.end_session)  # channels joined with a revoked session end at once
        metrics.add_statistics(REALTIME_STATS, realtime.statistics)

        async def ready() -> tuple[bool, dict[str, Any]]:
            """Not draining and every dependency up (readiness.py); else 503 with the reasons."""
            problems = await readiness.check()
            detail: dict[str, Any] = {"functions": len(table), "draining": drain.draining}
            if problems:
                detail["problems"] = problems
            quarantined = await backends.store.quarantined()
            if quarantined:  # served without them: ready, but the operator must see what was set aside
                detail["quarantined"] = [
                    {"slug": q.slug, "version": q.version, "reason": q.reason} for q in quarantined
                ]
            return (not drain.draining and not problems, detail)

        def health() -> dict[str, Any]:
            return {
                "status": "draining" if drain.draining else "ok",
                "node": node_id,
                "functions": table.slugs(),
                # what this node serves now: the control plane waits on it before a deploy returns
                "live": {slug: a.fn.version for slug in table.slugs() if (a := table.get(slug)) is not None},
                "runtimes": {name: _stats(rt) for name, rt in runtimes.items()},
            }

        public_app = PublicApp(functions, realtime, ready)
        admin_app = AdminApp(
            deployer,
            keys.admin_token,
            max_bundle_bytes=settings.max_bundle_mb * 1024 * 1024,
            health=health,
            drain=drain.request,
            purge_cache=purge_cache,
            public_url=settings.public_base_url,
            metrics=metrics,
            function_logs=function_logs,
            draining=drain.started,
            upgrade=UpgradeRequests(data_dir, drain.start),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(deployer.serve_store_changes)
            admin: HttpServer = await _listen(nursery, admin_app, settings.admin_host, settings.admin_port, "admin")
            public: HttpServer = await _listen(
                nursery, public_app, settings.host, settings.port, "public", settings=settings.http
            )
            metrics.add_statistics(HTTP_STATS, public.statistics, listener="public")
            metrics.add_statistics(HTTP_STATS, admin.statistics, listener="admin")
            if backends.redis is not None:
                # The control plane's registry: this node's health, load and live versions, once a second.

                def node_state() -> NodeState:
                    live = {slug: a.fn.version for slug in table.slugs() if (a := table.get(slug)) is not None}
                    load = NodeLoad(
                        public.statistics().requests_served,
                        realtime.statistics().connections,
                        deno.statistics().processes,
                    )
                    why = "draining" if drain.draining else None
                    return NodeState(why is None, why, drain.draining, load, live)

                host = await trio.to_thread.run_sync(advertised_host, settings)  # may resolve the host name
                identity = NodeIdentity("worker", node_id, host, public.port, admin.port, __version__)
                nursery.start_soon(partial(serve_heartbeat, backends.redis, identity, node_state, drain.start))
            for path in deploy_paths:
                await deploy_path(deployer, path)
            handle = WorkerHandle(settings, keys, public, admin, deployer, drain)
            if handle_signals:
                nursery.start_soon(_serve_signals, drain, nursery.cancel_scope)
                if reload_settings is not None:

                    async def apply(new: WorkerSettings) -> None:
                        nonlocal settings
                        configure_logging(new.log_level)
                        await deployer.set_default_limits(new.limits)
                        if new.cache_mb != settings.cache_mb:
                            functions.cache = _make_cache(new)  # a new size starts an empty cache
                        settings = new

                    nursery.start_soon(_serve_reload, reload_settings, apply)
            log.info(
                "ready: %s (admin %s), %d functions live (%d restored from the store)",
                handle.public_url,
                handle.admin_url,
                len(table),
                restored,
            )
            task_status.started(handle)
            await drain.wait_started()
            metrics.set_draining(True)
            log.info("draining: grace %.0fs", settings.drain_grace_s)
            with trio.move_on_after(settings.drain_grace_s + 5):
                async with trio.open_nursery() as drains:
                    # 1012 "service restart": realtime-js reconnects, through the proxy, to another worker.
                    drains.start_soon(partial(realtime.close_all, 1012, timeout=settings.drain_grace_s))
                    drains.start_soon(public.drain, settings.drain_grace_s)
            drain.finish()
            # Whoever asked over the admin API (the provisioner's scale-in) polls until it reads drained: true;
            # stay reachable until it has (bounded), then close the admin listener.
            await drain.wait_told(DRAIN_REPORT_LINGER_S)
            with trio.move_on_after(5):
                await admin.drain(5)
            nursery.cancel_scope.cancel()
    log.info("worker stopped")


async def _listen(
    nursery: trio.Nursery,
    app: AdminApp | PublicApp,
    host: str,
    port: int,
    name: str,
    settings: HttpSettings | None = None,
) -> HttpServer:
    """Start a listener; a port that cannot be bound (in use, not allowed) is a `ConfigError`: one clear line."""
    try:
        server: HttpServer = await nursery.start(partial(serve_http, app, host, port, settings=settings))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({name} listener): {exc.strerror or exc}") from exc
    return server


class _SharedRealtimeLimiter:
    """Realtime's `SharedLimiter` over the node's rate limiter (Redis GCRA in a cluster, memory alone)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def allow(self, key: str, per_second: int) -> bool:
        return (await self._limiter.hit(key, Rate(per_second))).allowed


async def _functions_jwks(jwks: str | None) -> str:
    """SUPABASE_JWKS for functions: the public part of the `jwks` setting when it is a file (the verifier has
    already read it, and refused the start if it could not). For a URL functions get none: they can fetch it."""
    if not jwks or jwks.startswith(("http://", "https://")):
        return EMPTY_JWKS
    try:
        return public_jwks(await trio.Path(jwks).read_text())
    except (OSError, UnicodeDecodeError):
        return EMPTY_JWKS


def _make_cache(settings: WorkerSettings) -> ResultCache | None:
    return ResultCache(CacheSettings(capacity_bytes=settings.cache_mb * 1024 * 1024)) if settings.cache_mb else None


async def _serve_reload(load: Callable[[], WorkerSettings], apply: Callable[[WorkerSettings], Awaitable[None]]) -> None:
    """SIGHUP: read the config again and apply what can change live (limits, log level, cache size).

    Listeners, data dir, secrets and Redis need a restart; a bad file is logged and the running config kept.
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                new = await trio.to_thread.run_sync(load)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                continue
            await apply(new)
            log.info("reloaded configuration")


def _stats(runtime: Runtime) -> dict[str, Any]:
    s = runtime.statistics()
    return {"processes": s.processes, "busy": s.busy, "in_flight": s.in_flight, "versions": s.versions}


async def _serve_signals(drain: Drain, scope: trio.CancelScope) -> None:
    """First SIGTERM/SIGINT drains; a second one ends at once (children are still reaped by their owners)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            if drain.draining:
                log.warning("second signal: stopping now")
                scope.cancel()
                return
            drain.start()


def function_net_policy(settings: WorkerSettings) -> NetPolicy:
    """What functions may not reach besides the private ranges: the admin listener's and Redis's hosts (names
    resolved to their addresses), this node's own addresses, and the operator's `net_deny`. Blocking (DNS, /proc):
    run it in a thread."""
    services = [settings.admin_host, *settings.net_deny]
    if settings.redis_url:
        parsed = urlsplit(settings.redis_url)
        if parsed.hostname:
            services.append(f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname)
    services = [h for h in services if h.strip("[]") not in ("", "0.0.0.0", "::")]
    return NetPolicy(
        deny=(*resolve_hosts(services), *node_addresses()), allow_private=tuple(settings.net_allow_private)
    )


def advertised_host(settings: WorkerSettings) -> str:
    """The address proxies and the control plane reach this node's listeners at (its private IP in a cluster)."""
    if settings.advertise_host:
        return settings.advertise_host
    if settings.host not in ("0.0.0.0", "", "::"):
        return settings.host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def default_node_id(settings: WorkerSettings) -> str:
    return settings.node_id or f"{socket.gethostname()}-{settings.port}-{os.getpid()}"
