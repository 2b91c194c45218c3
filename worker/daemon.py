"""`Node`: one worker node, the composition root. `serve_worker` runs one until it is drained.

`Node.serve` is the start order, top to bottom (docs/architecture.md, "Start order"): data dir and secrets →
cluster backends (with Redis: client, deployment store, rate limits, L2, the pub/sub bus, revocations, broker,
presence; else the local store) → runtimes → JWT verifier and front door → live table (restored from the store)
→ realtime → the store's change feed, admin listener, public listener, heartbeat (cluster) → `--deploy`
paths → ready. Drain (`worker.drain.Drain`: a signal, POST /admin/v1/drain, the control plane) stops accepting,
closes WebSockets with 1012, lets in-flight requests finish within the grace period, then closes everything in
reverse order; every child is reaped by the runtime that owns it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from mbworker import __version__
from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.settings import HttpSettings
from mbworker.lib.jwt import JwksError, JwtVerifier, open_jwt_verifier
from mbworker.realtime import RealtimeService, open_realtime
from mbworker.runtimes import Runtime
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime
from mbworker.runtimes.deno.permissions import NetPolicy, node_addresses, resolve_hosts
from mbworker.runtimes.wasm import WasmSettings, open_wasm_runtime
from mbworker.worker.admin import AdminApp
from mbworker.worker.backends import Backends, open_backends
from mbworker.worker.cache import CacheSettings, ResultCache
from mbworker.worker.cluster import (
    Rate,
    RateLimiter,
)
from mbworker.worker.cluster.heartbeat import NodeIdentity, NodeLoad, NodeState, serve_heartbeat
from mbworker.worker.config import WorkerSettings
from mbworker.worker.data_dir import remove_legacy_scratch, secure_data_dir
from mbworker.worker.deploy_local import deploy_path
from mbworker.worker.deployer import Deployer, PlatformEnv
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
CORDON_EXIT_STATUS = 75
"""The exit status after a drain the control plane asked for (EX_TEMPFAIL): the service manager starts the node
again (mbworker.service's Restart=on-failure; the local supervisor), and it comes back cordoned — up, not ready,
out of the upstreams — until `mbworker cluster undrain` lifts the drain. Then it exits with this status once more,
so that it starts afresh on the cluster's release (mbworker.service converges before every start: a cordoned node
sits out rolling upgrades) and serves. Any other drain exits 0 and stays down."""
CORDONED = "cordoned by the control plane: `mbworker cluster undrain <node>` brings it back"
"""After a drain asked for over the admin API, how long the admin listener waits for the caller to poll again
and read `drained: true` before the process exits."""


class Node:
    """One worker node. It owns its parts: `serve` opens them in the start order (one method a step) and
    closes them in reverse. The admin app reaches it through `admin.AdminNode` (health, drain, cache purge,
    metrics, logs); the heartbeat reads `state`; the CLI gets it from `serve_worker`'s `started`."""

    # Opened by `serve`, each before anything that uses it.
    keys: ProjectKeys
    backends: Backends
    runtimes: dict[str, Runtime]
    verifier: JwtVerifier
    background: trio.Nursery
    functions: FunctionsFrontDoor
    deployer: Deployer
    realtime: RealtimeService
    admin: HttpServer
    public: HttpServer

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.node_id = default_node_id(settings)
        self.table = FunctionTable()
        self.drain = Drain()
        self.cordoned = False
        """Drained by the control plane before this process started, and not undrained since (the heartbeat)."""
        self.exit_status = 0
        """What `mbworker serve` exits with once the node has drained (CORDON_EXIT_STATUS, or 0)."""
        self.metrics = Metrics(node_id=self.node_id)
        self.function_logs = FunctionLogs()
        self.readiness = Readiness()
        self.upgrade: UpgradeRequests | None = UpgradeRequests(self.data_dir, self.drain.start)

    @property
    def public_url(self) -> str:
        return f"http://{_display_host(self.settings.host)}:{self.public.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{_display_host(self.settings.admin_host)}:{self.admin.port}"

    # -- the start order ----------------------------------------------------------------------------------------

    async def serve(
        self,
        deploy_paths: Sequence[Path] = (),
        *,
        handle_signals: bool = True,
        reload_settings: Callable[[], WorkerSettings] | None = None,
        task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until drained. `started(self)` once both listeners accept and the `--deploy` paths are live."""
        await self._open_data_dir()
        async with AsyncExitStack() as stack:
            await self._open_backends(stack)
            await self._open_runtimes(stack)
            await self._open_front_door(stack)
            restored = await self._restore_table()
            await self._open_realtime(stack)
            async with trio.open_nursery() as nursery:
                await self._listen(nursery)
                for path in deploy_paths:
                    await deploy_path(self.deployer, path)
                if handle_signals:
                    nursery.start_soon(_serve_signals, self.drain, nursery.cancel_scope)
                    if reload_settings is not None:
                        nursery.start_soon(_serve_reload, reload_settings, self.apply_settings)
                log.info(
                    "ready: %s (admin %s), %d functions live (%d restored from the store)",
                    self.public_url,
                    self.admin_url,
                    len(self.table),
                    restored,
                )
                task_status.started(self)
                await self._drain_when_asked()
                nursery.cancel_scope.cancel()
        log.info("worker stopped")

    async def _open_data_dir(self) -> None:
        """Step 2: the data dir made private, and the project's secrets (from settings or kept there)."""
        tightened = await trio.to_thread.run_sync(secure_data_dir, self.data_dir)
        for what in tightened:
            log.warning("readable by others, tightened: %s", what)
        for what in await trio.to_thread.run_sync(remove_legacy_scratch, self.data_dir):
            log.info("removed the temp files of an earlier release: %s", what)
        self.keys = await trio.to_thread.run_sync(load_project_keys, self.settings)

    async def _open_backends(self, stack: AsyncExitStack) -> None:
        """Step 3: what the node shares with its cluster (Redis) or keeps to itself (memory, local store)."""
        self.backends = await stack.enter_async_context(
            open_backends(
                self.settings, self.data_dir, node_id=self.node_id, metrics=self.metrics, readiness=self.readiness
            )
        )

    async def _open_runtimes(self, stack: AsyncExitStack) -> None:
        """Step 4: Deno and Wasm, each owning its processes / Stores."""
        settings = self.settings
        net_policy = await trio.to_thread.run_sync(function_net_policy, settings)
        deno_settings = DenoSettings(scratch_dir=self.data_dir / "scratch" / "deno", net=net_policy)
        if settings.deno is not None:
            deno_settings = deno_settings.model_copy(update={"deno_bin": str(settings.deno)})
        deno = await stack.enter_async_context(open_deno_runtime(deno_settings, on_log=self.function_logs.on_log))
        self.readiness.add("runtime deno", executable_check(deno_settings.deno_bin))
        wasm = await stack.enter_async_context(
            open_wasm_runtime(
                WasmSettings(cache_dir=self.data_dir / "cache" / "wasm", sync_wait_us=settings.wasm_sync_wait_us),
                on_log=self.function_logs.on_log,
            )
        )
        self.runtimes = {"deno": deno, "wasm": wasm}
        for name, runtime in self.runtimes.items():
            self.metrics.add_statistics(RUNTIME_STATS, runtime.statistics, runtime=name)

    async def _open_front_door(self, stack: AsyncExitStack) -> None:
        """Step 5: the JWT verifier (one algorithm policy and memo, for the functions' gate and realtime) and
        the functions front door."""
        # Closed before the stores and Redis (the exit stack unwinds in reverse): its L2 writes still reach Redis.
        self.background = background = await stack.enter_async_context(trio.open_nursery())
        settings = self.settings
        try:
            verifier = await stack.enter_async_context(
                open_jwt_verifier(
                    self.keys.jwt_secret,
                    jwks=settings.jwks,
                    refresh_interval=settings.jwks_refresh_s,
                    min_refetch=min(30.0, settings.jwks_refresh_s),
                )
            )
        except JwksError as exc:
            raise ConfigError(f"jwks: {exc}") from None
        verifier.revocations = self.backends.revocations  # a revoked session's tokens are refused by both
        self.verifier = verifier
        self.functions = FunctionsFrontDoor(
            self.table,
            self.runtimes,
            JwtGate(verifier),
            cache=_make_cache(self.settings),
            metrics=self.metrics,
            limiter=self.backends.limiter,
            l2=self.backends.l2,
            background=background,
            trusted_proxies=TrustedProxies(self.settings.trusted_proxies),
        )
        self.metrics.add_statistics(
            CACHE_STATS, lambda: self.functions.cache.statistics() if self.functions.cache else None
        )

    async def _restore_table(self) -> int:
        """Step 6: the live table, restored from the store's active versions (booted lazily on first
        request). Returns how many were restored."""
        settings = self.settings
        self.deployer = Deployer(
            self.backends.store,
            self.runtimes,
            self.table,
            PlatformEnv(
                settings.public_base_url,
                self.keys.anon_key,
                self.keys.service_role_key,
                db_url=settings.db_url.get_secret_value() if settings.db_url else None,
                jwks=self.verifier.public_jwks,
            ),
            on_change=self._on_change,
            default_limits=settings.limits,
            max_tmp_mb=settings.max_tmp_mb,
        )
        # SUPABASE_JWKS follows the verifier's refreshes of a JWKS URL (or file): see Deployer.set_jwks.
        deployer, verifier = self.deployer, self.verifier
        verifier.on_jwks = lambda: self.background.start_soon(deployer.set_jwks, verifier.public_jwks)
        restored = await self.deployer.restore()
        for slug in self.table.slugs():  # nothing is in this L1 yet; what other nodes cached for these versions holds
            self._follow(slug)
        return restored

    async def _open_realtime(self, stack: AsyncExitStack) -> None:
        """Step 7: realtime, on the cluster's broker and presence when there is one."""
        self.realtime = await stack.enter_async_context(
            open_realtime(
                self.settings.realtime,
                verifier=self.verifier,
                node_id=self.node_id,
                broker=self.backends.broker,
                presence=self.backends.presence,
                shared_limiter=_SharedRealtimeLimiter(self.backends.limiter),
            )
        )
        # Channels joined with a revoked session end at once.
        self.backends.revocations.add_listener(self.realtime.end_session)
        self.metrics.add_statistics(REALTIME_STATS, self.realtime.statistics)

    async def _listen(self, nursery: trio.Nursery) -> None:
        """Step 8: the store's change feed followed, the admin listener, the public listener, and in a cluster
        the heartbeat to the control plane's registry."""
        settings = self.settings
        await nursery.start(self.deployer.serve_store_changes)
        admin_app = AdminApp(
            self,
            self.keys.admin_token,
            max_bundle_bytes=settings.max_bundle_mb * 1024 * 1024,
            public_url=settings.public_base_url,
        )
        self.admin = await _listen(nursery, admin_app, settings.admin_host, settings.admin_port, "admin")
        public_app = PublicApp(self.functions, self.realtime, self.ready)
        self.public = await _listen(nursery, public_app, settings.host, settings.port, "public", settings=settings.http)
        self.metrics.add_statistics(HTTP_STATS, self.public.statistics, listener="public")
        self.metrics.add_statistics(HTTP_STATS, self.admin.statistics, listener="admin")
        if self.backends.redis is not None:
            # The control plane's registry: this node's health, load and live versions, once a second.
            host = await trio.to_thread.run_sync(advertised_host, settings)  # may resolve the host name
            identity = NodeIdentity("worker", self.node_id, host, self.public.port, self.admin.port, __version__)
            beat = partial(serve_heartbeat, drain_started=self.drain.wait_started, on_cordon=self.set_cordon)
            nursery.start_soon(beat, self.backends.redis, identity, self.state, self._drain_for_control_plane)

    def _drain_for_control_plane(self) -> None:
        """`cluster drain`: drain, then exit so that the service manager starts this node again, cordoned."""
        if not self.drain.draining:
            self.exit_status = CORDON_EXIT_STATUS
        self.drain.start()

    def set_cordon(self, on: bool) -> None:
        """The heartbeat's word: a drain from before this start holds (not ready), or was lifted: then start again
        (CORDON_EXIT_STATUS), converged to the cluster's release."""
        if self.cordoned and not on:
            self._drain_for_control_plane()  # idle: out of the upstreams since the drain, nothing to finish
        self.cordoned = on

    async def _drain_when_asked(self) -> None:
        """Wait for the drain, then: stop accepting, finish in-flight work within the grace period, tell whoever
        asked over the admin API, close the admin listener. The caller then closes everything else."""
        await self.drain.wait_started()
        grace = self.settings.drain_grace_s
        self.metrics.set_draining(True)
        log.info("draining: grace %.0fs", grace)
        # Functions' WebSockets (Deno.upgradeWebSocket) are told the node is going away; each connection then
        # finishes like any request.
        self.functions.close_sockets(1001, "the server is shutting down")
        with trio.move_on_after(grace + 5):
            async with trio.open_nursery() as drains:
                # 1012 "service restart": realtime-js reconnects, through the proxy, to another worker.
                drains.start_soon(partial(self.realtime.close_all, 1012, timeout=grace))
                drains.start_soon(self.public.drain, grace)
        self.drain.finish()
        # Whoever asked over the admin API (the provisioner's scale-in) polls until it reads drained: true;
        # stay reachable until it has (bounded), then close the admin listener.
        await self.drain.wait_told(DRAIN_REPORT_LINGER_S)
        with trio.move_on_after(5):
            await self.admin.drain(5)

    # -- what the apps, the deployer and the heartbeat ask -------------------------------------------------------

    @property
    def drain_started(self) -> trio.Event:
        return self.drain.started

    def request_drain(self) -> bool:
        return self.drain.request()

    async def purge_cache(self, slug: str | None, shared: bool = True) -> int:
        """Drop cached results of `slug` (or all): this node's L1 and, with `shared` in a cluster, the L2."""
        l2 = self.backends.l2
        if shared and l2 is not None:
            for each in [slug] if slug else self.table.slugs():
                await l2.purge_prefix(each)
        cache = self.functions.cache
        return cache.purge(slug) if cache is not None else 0

    def _follow(self, slug: str) -> None:
        """Metrics and logs follow the slug's live version."""
        active = self.table.get(slug)
        if active is None:
            self.metrics.forget_function(slug)
            self.function_logs.forget(slug)
        else:
            self.metrics.set_function_version(slug, active.fn.version)

    async def _on_change(self, slug: str, rolled_back: bool) -> None:
        """A slug's live version changed on this node: drop its results from this node's L1 (they are keyed by
        version: this only frees memory, unless an older version came back). The shared L2 is purged only by the
        node that rolled back — every other change brings a version whose keys were never used."""
        await self.purge_cache(slug, shared=rolled_back)
        self._follow(slug)

    def _live(self) -> dict[str, int]:
        return {slug: a.fn.version for slug in self.table.slugs() if (a := self.table.get(slug)) is not None}

    async def ready(self, local: bool = False) -> tuple[bool, dict[str, Any]]:
        """Not draining and every dependency up (readiness.py); else 503 with the reasons. `local`: this node's
        own dependencies only, not the cluster's (`/ready/local`)."""
        draining = self.drain.draining
        problems = await self.readiness.check(local=local)
        if self.cordoned:  # local too: an HAProxy backup must not serve from a cordoned node either
            problems = {**problems, "cordon": CORDONED}
        detail: dict[str, Any] = {"functions": len(self.table), "draining": draining}
        if problems:
            detail["problems"] = problems
        quarantined = await self.backends.store.quarantined()
        if quarantined:  # served without them: ready, but the operator must see what was set aside
            detail["quarantined"] = [{"slug": q.slug, "version": q.version, "reason": q.reason} for q in quarantined]
        return (not draining and not problems, detail)

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.drain.draining else "ok",
            "node": self.node_id,
            "functions": self.table.slugs(),
            # what this node serves now: the control plane waits on it before a deploy returns
            "live": self._live(),
            "runtimes": {name: _stats(rt) for name, rt in self.runtimes.items()},
        }

    def state(self) -> NodeState:
        """What the heartbeat reports: health, load and live versions."""
        load = NodeLoad(
            self.public.statistics().requests_served,
            self.realtime.statistics().connections,
            self.runtimes["deno"].statistics().processes,
        )
        why = "draining" if self.drain.draining else CORDONED if self.cordoned else None
        return NodeState(why is None, why, self.drain.draining, load, self._live(), cordoned=self.cordoned)

    async def apply_settings(self, new: WorkerSettings) -> None:
        """SIGHUP: what can change live (log level, limits, cache size)."""
        configure_logging(new.log_level)
        self.deployer.max_tmp_mb = new.max_tmp_mb
        await self.deployer.set_default_limits(new.limits)
        if new.cache_mb != self.settings.cache_mb:
            self.functions.cache = _make_cache(new)  # a new size starts an empty cache
        self.settings = new


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


async def serve_worker(
    settings: WorkerSettings,
    deploy_paths: Sequence[Path] = (),
    *,
    handle_signals: bool = True,
    reload_settings: Callable[[], WorkerSettings] | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker node until drained. `started(node)` once both listeners accept and examples are live."""
    node = Node(settings)
    await node.serve(
        deploy_paths, handle_signals=handle_signals, reload_settings=reload_settings, task_status=task_status
    )


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
