"""Deploy, roll back and delete functions: the store, the runtimes and the live table, kept in step.

Owner: the daemon creates one `Deployer`; the admin API and `serve --deploy` call it. A new version is stored,
booted, and only then switched live; a version that fails to boot is marked failed and the previous one keeps
serving. Old versions are retired (in-flight requests finish) after the switch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from mbworker.lib.jwt import EMPTY_JWKS
from mbworker.runtimes import BootError, FunctionVersion, Limits, Runtime
from mbworker.worker.cache import FunctionCacheConfig
from mbworker.worker.deployments.archive import sha256_hex
from mbworker.worker.deployments.store import Deployment, DeploymentStore, StoreError, function_version
from mbworker.worker.functions import ActiveFunction, FunctionTable

log = logging.getLogger("mbworker.deployer")

_BUILTIN_LIMITS = Limits.model_validate({})

ChangeHook = Callable[[str, bool], Awaitable[None]]
"""on_change(slug, rolled_back): the live version of `slug` changed here; `rolled_back` when this node rolled it
back to an older version (whose earlier cached results must go everywhere)."""
"""Called with a slug after its live version changed (activate, rollback, delete): e.g. a cache purge."""


@dataclass(frozen=True)
class PlatformEnv:
    """Variables every function sees besides its own secrets (Supabase's defaults: reference/edge-functions.md)."""

    supabase_url: str
    anon_key: str
    service_role_key: str
    region: str = "local"
    db_url: str | None = None
    """SUPABASE_DB_URL: the cluster's Postgres, when the node knows it (setting `db_url`)."""
    jwks: str = EMPTY_JWKS
    """SUPABASE_JWKS: the public part of the project's signing keys, as the node's verifier holds them
    (`JwtVerifier.public_jwks`; `Deployer.set_jwks` follows its refreshes)."""

    def for_version(self, slug: str, version: int) -> dict[str, str]:
        env = {
            "SUPABASE_URL": self.supabase_url,
            "SUPABASE_ANON_KEY": self.anon_key,
            "SUPABASE_SERVICE_ROLE_KEY": self.service_role_key,
            # the newer functions read key dictionaries; this project's keys are its anon and service-role JWTs
            "SUPABASE_PUBLISHABLE_KEYS": json.dumps({"default": self.anon_key}),
            "SUPABASE_SECRET_KEYS": json.dumps({"default": self.service_role_key}),
            "SUPABASE_JWKS": self.jwks,
            "SB_REGION": self.region,
            "DENO_DEPLOYMENT_ID": f"mbworker_{slug}_{version}",
        }
        if self.db_url:
            env["SUPABASE_DB_URL"] = self.db_url
        return env


class DeployFailed(Exception):
    """A deploy was stored but its version could not boot; the previous version stays live."""

    def __init__(self, deployment: Deployment, error: BootError) -> None:
        self.deployment = deployment
        self.error = error
        super().__init__(f"{deployment.slug} v{deployment.version} failed to boot: {error.message}")


class Deployer:
    def __init__(
        self,
        store: DeploymentStore,
        runtimes: Mapping[str, Runtime],
        table: FunctionTable,
        platform_env: PlatformEnv,
        on_change: ChangeHook | None = None,
        default_limits: Limits | None = None,
        max_tmp_mb: int | None = None,
    ) -> None:
        self.default_limits = default_limits or Limits.model_validate({})
        self.max_tmp_mb = max_tmp_mb
        """The node's ceiling on `Limits.tmp_mb` (None: none): a function's temp dir never gets more."""
        self.store = store
        self.runtimes = runtimes
        self.table = table
        self.platform_env = platform_env
        self._on_change = on_change
        self._slug_locks: dict[str, trio.Lock] = {}
        self._project_secrets: dict[str, str] | None = None
        """The store's project secrets as last read (None: not yet): every function's env besides its own."""

    def _lock(self, slug: str) -> trio.Lock:
        return self._slug_locks.setdefault(slug, trio.Lock())

    async def function_version(self, dep: Deployment) -> FunctionVersion:
        """What the runtime runs. Env: the project secrets, then the function's own (its deploy's env file wins
        over a project secret of the same name), then the platform's variables (they win over both)."""
        if self._project_secrets is None:
            self._project_secrets = await self.store.project_secrets()
        secrets = await self.store.secrets(dep.slug, dep.version)
        env = {**self._project_secrets, **secrets, **self.platform_env.for_version(dep.slug, dep.version)}
        fn = function_version(dep, self.store.bundle_dir(dep.slug, dep.version), env)
        return dataclasses.replace(fn, limits=self.limits_for(dep))

    def limits_for(self, dep: Deployment) -> Limits:
        """The operator's default limits, overridden by what the function's own function.toml changed, within
        the node's ceilings (`max_tmp_mb`).

        A function field equal to the built-in default counts as unset: the manifest keeps no other trace of it.
        """
        builtin = _BUILTIN_LIMITS.model_dump()
        changed = {k: v for k, v in dep.limits.model_dump().items() if v != builtin[k]}
        limits = self.default_limits.model_copy(update=changed)
        if self.max_tmp_mb is not None and limits.tmp_mb > self.max_tmp_mb:
            limits = limits.model_copy(update={"tmp_mb": self.max_tmp_mb})
        return limits

    async def set_default_limits(self, limits: Limits) -> None:
        """New operator defaults (SIGHUP): live versions pick them up; the front door's limits apply at once, a
        sandbox's own (memory, CPU) with its next process."""
        self.default_limits = limits
        await self._refresh_live()

    async def set_jwks(self, jwks: str) -> None:
        """The node's verifier has a new JWKS (a refresh found other keys): functions' SUPABASE_JWKS follows, as
        project secrets do (`_restart_live`: an env is fixed when a process starts)."""
        if jwks == self.platform_env.jwks:
            return
        self.platform_env = dataclasses.replace(self.platform_env, jwks=jwks)
        await self._restart_live()
        log.info("SUPABASE_JWKS changed: %d functions restart with it", len(self.table))

    async def _refresh_live(self) -> None:
        """Rebuild every live version's `FunctionVersion` (limits) from the current settings: running processes
        keep what they started with."""
        for slug in self.table.slugs():
            async with self._lock(slug):
                dep = await self.store.get_active(slug)
                if dep is not None:
                    self.table.set(await self._active(dep))

    async def _active(self, dep: Deployment) -> ActiveFunction:
        fn = await self.function_version(dep)
        cache = FunctionCacheConfig.model_validate(dep.cache.model_dump())
        return ActiveFunction(fn=fn, verify_jwt=dep.verify_jwt, cache=cache)

    async def restore(self) -> int:
        """Put every stored active version live again (booted lazily, on first request). Returns the count."""
        count = 0
        for dep in await self.store.list():
            if dep.status == "ACTIVE":
                try:
                    self.table.set(await self._active(dep))
                except StoreError as exc:  # one damaged version (quarantined by the store) must not stop the rest
                    log.error("%s v%d not restored: %s", dep.slug, dep.version, exc)
                    continue
                count += 1
        return count

    async def deploy(
        self, slug: str, archive: bytes, sha256: str | None = None, *, skip_unchanged: bool = False
    ) -> Deployment:
        """Store, boot, then switch. Raises `BundleRejected` (4xx) or `DeployFailed` (503 BOOT_ERROR).

        With `skip_unchanged` (`serve --deploy` at every start), an archive identical to the live version's
        stores nothing and returns the live version."""
        if skip_unchanged:
            live = await self.store.get_active(slug)
            if live is not None and live.sha256 == sha256_hex(archive):
                log.info("%s unchanged: v%d stays live", slug, live.version)
                return live
        dep = await self.stage(slug, archive, sha256)
        return await self.activate(slug, dep.version)

    async def stage(self, slug: str, archive: bytes, sha256: str | None = None) -> Deployment:
        """Store and boot a new version without switching to it (the control plane's first phase).

        A version that fails to boot is retired and discarded (its number goes to the next deploy; the failure
        is kept as an attempt): `DeployFailed`."""
        dep = await self.store.put(slug, archive, sha256)
        try:
            await self.warm(dep)
        except DeployFailed as exc:
            error = exc.error
            await self.store.discard(slug, dep.version, error.message + ("\n" + error.output if error.output else ""))
            raise
        return dep

    async def warm(self, dep: Deployment) -> None:
        """Boot `dep` here (fetching its files if another node stored it) without switching to it. On a boot
        error it is retired here and `DeployFailed` raised; the store is not changed."""
        fn = await self.function_version(dep)
        runtime = self.runtimes[fn.runtime]
        try:
            await runtime.warm(fn)
        except BootError as exc:
            await runtime.retire(fn)
            raise DeployFailed(dep, exc) from exc

    async def abandon(self, dep: Deployment, error: str | None) -> None:
        """A version the cluster will not activate: retire it here; with `error` (asked of one node, last), discard
        it from the store as a failed attempt, as a deploy that fails to boot is."""
        runtime = self.runtimes.get(dep.runtime)
        current = self.table.get(dep.slug)
        if runtime is not None and (current is None or current.fn.version != dep.version):
            await runtime.retire(await self.function_version(dep))
        if error is not None:
            await self.store.discard(dep.slug, dep.version, error)

    async def activate(self, slug: str, version: int) -> Deployment:
        """Switch to a stored (and booted) `version`, here and, through the store's change feed, everywhere.

        The store decides, under its own (cluster-wide) lock: a later version live anywhere stays live, and is
        what is returned (this version is then retired here)."""
        async with self._lock(slug):
            live = await self.store.activate(slug, version, only_if_newer=True)
            if live.version != version:
                log.info("%s v%d superseded by v%d", slug, version, live.version)
                dep = await self.store.get(slug, version)
                if dep is not None:
                    await self._retire(await self.function_version(dep))
                await self._follow(live)
                return dep if dep is not None else live
            await self._switch(await self._active(live))
        return live

    async def rollback(self, slug: str, to: int | None = None) -> Deployment:
        async with self._lock(slug):
            dep = await self.store.rollback(slug, to)
            await self._switch(await self._active(dep), rolled_back=True)
        return dep

    async def delete(self, slug: str) -> list[Deployment]:
        """Stop serving `slug` (in-flight requests finish), then remove its versions."""
        async with self._lock(slug):
            previous = self.table.remove(slug)
            if previous is not None:
                await self._retire(previous.fn)
            removed = await self.store.delete(slug)
        await self._changed(slug)
        return removed

    async def serve_store_changes(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the store's change feed, so versions activated elsewhere (another node, in a cluster) go live here.

        Changes this node made arrive too; under the slug lock they find the table already switched and do nothing.
        """
        async with self.store.watch() as changes:
            task_status.started()
            async for change in changes:
                delay = 0.1
                while True:
                    try:
                        if change.kind == "secrets":
                            await self.refresh_secrets()
                        elif change.kind == "resync" or change.slug is None:
                            await self.refresh_secrets()
                            await self.reconcile()
                        elif change.kind in ("activate", "rollback", "delete"):
                            await self.reconcile_slug(change.slug)
                        break
                    except StoreError as exc:
                        if exc.status != 503:
                            raise
                        # The store is unreachable for now (e.g. the feed reconnected before the command
                        # connections did): retry; an outage must not take the daemon down.
                        log.warning("store change (%s) not applied, retry in %.1fs: %s", change.kind, delay, exc)
                        await trio.sleep(delay)
                        delay = min(delay * 2, 5.0)

    async def refresh_secrets(self) -> None:
        """Read the project secrets again; when they changed, every live function gets them from its next
        process on (its processes are retired: in-flight requests finish, the next request starts new ones)."""
        secrets = await self.store.project_secrets()
        if secrets == self._project_secrets:
            return
        self._project_secrets = secrets
        await self._restart_live()
        log.info("project secrets changed: %d functions restart with them", len(self.table))

    async def _restart_live(self) -> None:
        """Rebuild every live version with the current env; their processes are retired (in-flight requests
        finish, the next request starts new ones with the new env)."""
        for slug in self.table.slugs():
            async with self._lock(slug):
                dep = await self.store.get_active(slug)
                if dep is None:
                    continue
                previous = self.table.set(await self._active(dep))
                if previous is not None:
                    await self._retire(previous.fn)  # same version: only its processes go, with the old env

    async def reconcile(self) -> None:
        """Bring every slug's live version in line with the store."""
        slugs = {d.slug for d in await self.store.list()} | set(self.table.slugs())
        for slug in sorted(slugs):
            await self.reconcile_slug(slug)

    async def reconcile_slug(self, slug: str) -> None:
        async with self._lock(slug):
            dep = await self.store.get_active(slug)
            current = self.table.get(slug)
            if dep is None:
                if current is not None:
                    log.info("%s: removed (changed elsewhere)", slug)
                    self.table.remove(slug)
                    await self._retire(current.fn)
                    await self._changed(slug)
                return
            if await self._follow(dep):
                log.info("%s: v%d is live (changed elsewhere)", slug, dep.version)

    async def _follow(self, live: Deployment) -> bool:
        """Switch to `live` unless it already serves here (the slug's lock held). True when it switched."""
        current = self.table.get(live.slug)
        if current is not None and current.fn.version == live.version:
            return False
        await self._switch(await self._active(live))
        return True

    async def _switch(self, active: ActiveFunction, *, rolled_back: bool = False) -> None:
        previous = self.table.set(active)
        if previous is not None and previous.fn.key != active.fn.key:
            await self._retire(previous.fn)
        await self._changed(active.fn.slug, rolled_back=rolled_back)

    async def _retire(self, fn: FunctionVersion) -> None:
        runtime = self.runtimes.get(fn.runtime)
        if runtime is not None:
            await runtime.retire(fn)

    async def _changed(self, slug: str, *, rolled_back: bool = False) -> None:
        if self._on_change is not None:
            await self._on_change(slug, rolled_back)
