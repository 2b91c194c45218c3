"""`RedisDeploymentStore`: the cluster's `DeploymentStore`. A deploy to any node is served by every node.

Owner: `open_redis_deployment_store(client, local_root)` (an async context manager) owns the store, its pub/sub
connection and its tasks; the caller owns `client` (a `RedisClient`). On enter it subscribes to changes and
syncs (see below) before yielding, so the daemon can restore its functions right after.

What lives where:

    Redis (the state pillar; shared)                         this node (`local_root`; its own)
    <p>dep:slugs            set of every slug ever deployed   <slug>/v<N>/bundle/   unpacked files (read-only)
    <p>dep:<slug>:seq       version counter (INCR)            <slug>/v<N>/sha256    digest of their archive
    <p>dep:<slug>:meta      hash: N -> Deployment JSON        <slug>/.incoming-*    unpacks in progress
    <p>dep:<slug>:ptr       {"version", "history"} JSON
    <p>dep:<slug>:archive:N the archive as uploaded
    <p>dep:<slug>:attempts  list: failed deploys (JSON), newest first
    <p>dep:epoch            change counter (one per announcement)
    <p>dep:secrets          hash: project secrets, plus their revision     .secrets.json  their copy (0600)
    <p>dep:changes          pub/sub: msgpack {k, s, v, o, e} (kind, slug, version, origin node, change number)

- Version numbers come from `INCR <slug>:seq`, taken under the distributed lock `deploy:<slug>` that every
  metadata change (put, activate, rollback, delete, mark_failed, prune) holds, so read-modify-write of the
  pointer and statuses never interleaves between nodes. Multi-key writes go in one MULTI/EXEC.
- Redis should persist (AOF) on the state pillar: it is the source of truth for deployments. If it loses its
  data anyway (a restart without persistence, FLUSHALL, failover to a stale replica), the nodes give it back:
  each keeps, besides the unpacked files, the version's metadata, its archive and the version it serves
  (`local_copies`), and a node that finds Redis knowing no version of a slug as high as the one it serves
  writes its versions back (`restore`: on start, after a change-feed gap, when the change counter goes
  backwards, and in `get_active`, which reconciling calls). Deletes leave every version as REMOVED (a
  tombstone) and clear each node's claim, so "deleted" is never mistaken for "lost". Of two nodes restoring,
  the higher version wins; version numbers never go backwards. Each local copy also carries the sha256 of its
  archive and is re-fetched when Redis says a version has another digest.
- Local copies: `put` unpacks on the deploying node first (validation + limits, nothing is stored on reject).
  Other nodes fetch (GET archive, verify sha256, unpack) lazily via `ensure_local` (called by `secrets()`, which
  the deployer calls before `bundle_dir()`), and eagerly: on start for every active version (`sync`), and when
  a watcher receives `activate`/`rollback` (before the change is handed over). Copies of deleted or pruned
  versions are removed after `local_grace_s` (in-flight requests finish first).
- Changes: this node's own changes reach its watchers directly (in order, like the local store); other nodes
  get them over pub/sub. After a pub/sub gap (Redis restart, network), or when change numbers show a missed
  announcement (next message, or the periodic check of `<p>dep:epoch`), every watcher gets `resync`.
- Secrets travel inside the bundle (the manifest's `env`), so they are stored in Redis like the rest. Redis
  sits in the private zone (state pillar, reached over the private network via HAProxy, password/ACL auth);
  treat its data and backups as secret. Not encrypted at rest here.
- Redis unreachable: reads and writes raise `ClusterStoreUnavailable` (503), except that `secrets()` and
  `ensure_local` fall back to an existing local copy, so a node keeps serving and can restart its functions.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped]
import trio
from pydantic import ValidationError

from mbworker.lib.nursery import open_owned_nursery
from mbworker.lib.redis import (
    PubSub,
    PubSubDisconnected,
    PubSubMessage,
    PubSubResubscribed,
    RedisClient,
    RedisError,
)
from mbworker.worker.cluster.errors import ClusterStoreUnavailable, LockError
from mbworker.worker.cluster.local_copies import LocalCopies, check_slug, check_version, rmtree
from mbworker.worker.cluster.lock import Locks, RedisLocks
from mbworker.worker.deployments import lifecycle, project_secrets
from mbworker.worker.deployments.archive import BundleRejected, BundleTooLarge
from mbworker.worker.deployments.changes import ChangeFeed, ChangeReader, StoreChange
from mbworker.worker.deployments.manifest import SLUG_RE
from mbworker.worker.deployments.model import ATTEMPTS_KEPT, Attempt, StorageFull, is_disk_full
from mbworker.worker.deployments.project_secrets import REVISION_FIELD
from mbworker.worker.deployments.store import (
    AttemptList,
    Deployment,
    DeploymentList,
    DeploymentNotFound,
    DeploymentStatus,
    DeploymentStore,
    QuarantineList,
    StoreError,
    StoreStatistics,
    UnpackLimits,
    VersionConflict,
    pointer_from_json,
    pointer_json,
    read_secrets,
    staged_deployment,
)

log = logging.getLogger("mbworker.cluster.deployments")

_KINDS = frozenset({"put", "activate", "rollback", "delete", "failed", "secrets"})
"""Change kinds nodes announce to each other (`resync` is local: each node detects its own gaps)."""
_RESTORE_RETRY_S = 15.0
"""How long a node keeps trying to give back its functions after Redis lost data, before the resync goes on."""
_PREFETCH_TIMEOUT_S = 60.0
"""Bound on the eager fetch a watcher does before handing over an activate/rollback change."""


@dataclass(frozen=True)
class RedisStoreStatistics:
    """Cluster-side counters (besides the Protocol's `StoreStatistics`)."""

    fetches: int
    """Versions fetched from Redis and unpacked locally."""
    fetch_failures: int
    remote_changes: int
    """Changes received from other nodes."""
    resyncs: int
    """Pub/sub gaps (each sent `resync` to every watcher)."""
    publish_failures: int
    """Changes this node could not announce (other nodes learn them at their next resync)."""
    local_removals: int
    """Local version copies removed (deleted/pruned versions)."""
    restores: int = 0
    """Functions this node gave back to Redis after it lost data (or a node joined with deployments)."""


class _Changes:
    """The reader side of one `watch()`: fetches activated versions before handing the change over."""

    def __init__(self, store: RedisDeploymentStore, reader: ChangeReader) -> None:
        self._store = store
        self._reader = reader

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> StoreChange:
        change = await self._reader.__anext__()
        if change.kind in ("activate", "rollback") and change.slug is not None and change.version is not None:
            await self._store.prefetch(change.slug, change.version)
        return change


def _now_ms() -> int:
    return int(time.time() * 1000)


def _load_meta(raw: bytes) -> Deployment:
    try:
        return Deployment.model_validate_json(raw)
    except ValidationError as exc:
        raise StoreError(f"corrupt deployment metadata in Redis: {exc}") from exc


def _decode_hash(flat: list[bytes]) -> dict[str, str]:
    it = iter(flat)
    return {k.decode(): v.decode() for k, v in zip(it, it, strict=True)}


def _secret_values(stored: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in stored.items() if k != REVISION_FIELD}


def _load_metas(flat: list[bytes]) -> dict[int, Deployment]:
    """HGETALL's flat [field, value, ...] reply of a slug's meta hash."""
    it = iter(flat)
    return {int(n): _load_meta(raw) for n, raw in zip(it, it, strict=True)}


def _load_pointer(raw: bytes | None) -> lifecycle.Pointer:
    if raw is None:
        return lifecycle.Pointer()
    try:
        return pointer_from_json(json.loads(raw))
    except ValueError as exc:
        raise StoreError(f"corrupt deployment pointer in Redis: {exc}") from exc


class RedisDeploymentStore:
    """`DeploymentStore` shared through Redis; get one from `open_redis_deployment_store`.

    `local_root` belongs to this store alone (one node, one process): don't share it with another store.
    """

    def __init__(
        self,
        redis: RedisClient,
        local_root: Path,
        nursery: trio.Nursery,
        *,
        locks: Locks | None = None,
        prefix: str = "mbw:",
        node_id: str | None = None,
        keep_versions: int = 10,
        limits: UnpackLimits | None = None,
        watch_buffer: int = 64,
        lock_ttl_s: float = 30.0,
        lock_timeout_s: float = 30.0,
        local_grace_s: float = 60.0,
    ) -> None:
        self._redis = redis
        self.local_root = Path(local_root)
        self._nursery = nursery
        self._locks = locks if locks is not None else RedisLocks(redis, prefix=prefix)
        self._p = f"{prefix}dep:"
        self.channel = f"{prefix}dep:changes"
        self.node_id = node_id or secrets.token_hex(8)
        self.keep_versions = keep_versions
        self.limits = limits or UnpackLimits()
        self._copies = LocalCopies(self.local_root, self.limits)
        self._changes = ChangeFeed(watch_buffer)
        self._lock_ttl_s = lock_ttl_s
        self._lock_timeout_s = lock_timeout_s
        self.local_grace_s = local_grace_s
        self._fetch_locks: dict[tuple[str, int], trio.Lock] = {}
        self._slug_locks: dict[str, trio.Lock] = {}
        self._local_prunes: set[str] = set()
        self._puts = 0
        self._rejected = 0
        self._fetches = 0
        self._fetch_failures = 0
        self._remote_changes = 0
        self._resyncs = 0
        self._publish_failures = 0
        self._epoch_key = f"{prefix}dep:epoch"
        self._secrets_key = f"{prefix}dep:secrets"
        self._restores = 0
        self._epoch: int | None = None
        """The highest change number seen (None until the first one)."""

    # ------------------------------------------------------------------------------------------- keys

    def _key(self, slug: str, part: str) -> str:
        return f"{self._p}{slug}:{part}"

    def _archive_key(self, slug: str, version: int) -> str:
        return f"{self._p}{slug}:archive:{version}"

    def bundle_dir(self, slug: str, version: int) -> Path:
        return self._copies.bundle_dir(slug, version)

    # ------------------------------------------------------------------------------------- plumbing

    @contextmanager
    def _redis_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise ClusterStoreUnavailable(f"{what}: Redis unreachable ({exc})") from exc
        except LockError as exc:
            raise ClusterStoreUnavailable(f"{what}: {exc}") from exc

    @asynccontextmanager
    async def _mutating(self, slug: str, what: str) -> AsyncIterator[None]:
        """Hold the slug's cluster lock; Redis and lock failures become `ClusterStoreUnavailable`. This node's
        own tasks queue on a trio lock first, so only one of them at a time polls the cluster lock."""
        local = self._slug_locks.setdefault(slug, trio.Lock())
        try:
            async with local:
                with self._redis_errors(what):
                    lock = self._locks.lock(f"deploy:{slug}", ttl=self._lock_ttl_s, timeout=self._lock_timeout_s)
                    async with lock:
                        yield
        finally:
            if not local.locked() and not local.statistics().tasks_waiting:
                self._slug_locks.pop(slug, None)

    async def _read_slug(self, slug: str) -> tuple[dict[int, Deployment], lifecycle.Pointer]:
        metas_raw, ptr_raw = await self._redis.execute_many(
            [("HGETALL", self._key(slug, "meta")), ("GET", self._key(slug, "ptr"))]
        )
        return _load_metas(metas_raw), _load_pointer(ptr_raw)

    async def _read_state(self, slug: str) -> lifecycle.SlugState:
        """The slug's metadata, pointer and which versions still have their archive (one round trip more)."""
        metas, ptr = await self._read_slug(slug)
        numbers = sorted(metas)
        present = await self._redis.execute_many([("EXISTS", self._archive_key(slug, n)) for n in numbers])
        return lifecycle.SlugState(metas, ptr, frozenset(n for n, e in zip(numbers, present, strict=True) if e))

    async def _apply(self, slug: str, step: lifecycle.Transition, extra: Sequence[tuple[Any, ...]] = ()) -> None:
        await self._write(slug, list(step.changed), step.pointer, extra)

    async def _write(
        self,
        slug: str,
        deps: list[Deployment],
        ptr: lifecycle.Pointer | None = None,
        extra: Sequence[tuple[Any, ...]] = (),
    ) -> None:
        """Metadata (and pointer, and `extra` commands) in one MULTI/EXEC: all or nothing."""
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if deps:
            fields: list[Any] = []
            for dep in deps:
                fields += [dep.version, lifecycle.stored(dep).model_dump_json().encode()]
            commands.append(("HSET", self._key(slug, "meta"), *fields))
        if ptr is not None:
            commands.append(("SET", self._key(slug, "ptr"), pointer_json(ptr)))
        commands += extra
        commands.append(("EXEC",))
        await self._redis.execute_many(commands)

    async def _announce(self, kind: str, slug: str | None, version: int | None) -> None:
        """Tell this node's watchers now, then the other nodes. Each announcement takes the next number of the
        cluster's change counter (`<p>dep:epoch`), so a node that misses one (a failed publish here) notices a
        gap at the next message or at its periodic check and resyncs. A failed publish is logged, not raised:
        the change itself is stored."""
        self._notify(StoreChange(kind, slug, version))  # type: ignore[arg-type]
        try:
            epoch = await self._redis.incr(self._epoch_key)
            self._seen_epoch(epoch, own=True)
            message = msgpack.packb({"k": kind, "s": slug, "v": version, "o": self.node_id, "e": epoch})
            await self._redis.publish(self.channel, message)
        except RedisError as exc:
            self._publish_failures += 1
            log.warning("could not announce %s of %s v%s to other nodes: %s", kind, slug, version, exc)

    # ------------------------------------------------------------------------------------------- writes

    async def put(self, slug: str, archive: bytes, sha256: str | None = None) -> Deployment:
        check_slug(slug)
        if len(archive) > self.limits.max_archive_bytes:
            self._rejected += 1
            raise BundleTooLarge(
                f"bundle is {len(archive)} bytes, at most {self.limits.max_archive_bytes} bytes are accepted"
            )
        try:
            incoming, manifest, digest = await trio.to_thread.run_sync(
                self._copies.unpack_incoming, slug, archive, sha256
            )
        except BundleRejected:
            self._rejected += 1
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(f"no space left to store {slug} ({exc.strerror}): nothing was stored") from exc
            raise
        try:
            async with self._mutating(slug, f"put {slug}"):
                version = await self._redis.incr(self._key(slug, "seq"))
                dep = staged_deployment(slug, version, manifest, digest, len(archive))
                extra = [("SET", self._archive_key(slug, version), archive), ("SADD", f"{self._p}slugs", slug)]
                await self._write(slug, [dep], extra=extra)
                try:
                    pruned = await self._prune_locked(slug)
                except RedisError as exc:  # the version is stored: pruning can wait for the next put
                    log.warning("could not prune old versions of %s: %s", slug, exc)
                    pruned = []
            await trio.to_thread.run_sync(self._copies.install, dep, incoming, archive)
        finally:
            await trio.to_thread.run_sync(rmtree, incoming)
        self._puts += 1
        if pruned:
            self._schedule_local_prune(slug)
        await self._announce("put", slug, version)
        return dep

    async def activate(self, slug: str, version: int, *, only_if_newer: bool = False) -> Deployment:
        check_slug(slug)
        check_version(version)
        dep = await self._transition(
            slug,
            f"activate {slug} v{version}",
            lambda state: lifecycle.activate(state, slug, version, _now_ms(), only_if_newer=only_if_newer),
        )
        assert dep is not None
        if dep.version == version:
            await self._announce("activate", slug, version)
        return dep

    async def rollback(self, slug: str, to: int | None = None) -> Deployment:
        check_slug(slug)
        if to is not None:
            check_version(to)
        dep = await self._transition(
            slug, f"roll back {slug}", lambda state: lifecycle.rollback(state, slug, _now_ms(), to)
        )
        assert dep is not None
        await self._announce("rollback", slug, dep.version)
        return dep

    async def delete(self, slug: str) -> DeploymentList:
        check_slug(slug)
        async with self._mutating(slug, f"delete {slug}"):
            state = await self._read_state(slug)
            step = lifecycle.delete(state, slug, _now_ms())
            archives = tuple(self._archive_key(slug, n) for n in state.metas)
            await self._apply(slug, step, extra=[("DEL", *archives)])
        # This node's deployer retired the function before calling delete: its copies can go now.
        await trio.to_thread.run_sync(self._copies.set_live, slug, None)
        await trio.to_thread.run_sync(self._copies.remove, slug, set())
        await self._announce("delete", slug, None)
        return list(step.removed)

    async def mark_failed(self, slug: str, version: int, error: str) -> Deployment:
        check_slug(slug)
        check_version(version)
        dep = await self._transition(
            slug,
            f"mark {slug} v{version} failed",
            lambda state: lifecycle.mark_failed(state, slug, version, error, _now_ms()),
        )
        assert dep is not None
        await self._announce("failed", slug, version)
        return dep

    async def discard(self, slug: str, version: int, error: str) -> Attempt:
        check_slug(slug)
        check_version(version)
        async with self._mutating(slug, f"discard {slug} v{version}"):
            attempt = lifecycle.discard(await self._read_state(slug), slug, version, error, _now_ms())
            seq = int(await self._redis.get(self._key(slug, "seq")) or 0)
            extra: list[tuple[Any, ...]] = [
                ("HDEL", self._key(slug, "meta"), version),
                ("DEL", self._archive_key(slug, version)),
                ("LPUSH", self._key(slug, "attempts"), attempt.model_dump_json()),
                ("LTRIM", self._key(slug, "attempts"), 0, ATTEMPTS_KEPT - 1),
            ]
            if seq == version:  # nobody took a later number: the next put gets this one again
                extra.append(("SET", self._key(slug, "seq"), version - 1))
            await self._write(slug, [], extra=extra)
        await trio.to_thread.run_sync(self._copies.remove_version, slug, version)
        await self._announce("failed", slug, version)
        return attempt

    async def attempts(self, slug: str) -> AttemptList:
        check_slug(slug)
        with self._redis_errors(f"read the attempts of {slug}"):
            raw = await self._redis.execute("LRANGE", self._key(slug, "attempts"), 0, ATTEMPTS_KEPT - 1)
        out: AttemptList = []
        for item in raw:
            try:
                out.append(Attempt.model_validate_json(item))
            except ValidationError:
                continue  # only a record
        return out

    # ---------------------------------------------------------------------------------- project secrets

    async def project_secrets(self) -> dict[str, str]:
        """From Redis (mirrored to this node's 0600 copy). Redis unreachable: the copy. Redis without any
        revision (it lost its data) while the copy has one: the copy is given back first."""
        try:
            raw = await self._redis.execute("HGETALL", self._secrets_key)
        except RedisError as exc:
            mirror = await trio.to_thread.run_sync(self._copies.read_secrets)
            if mirror is None:
                raise ClusterStoreUnavailable(f"read the project secrets: Redis unreachable ({exc})") from exc
            return _secret_values(mirror)
        stored = _decode_hash(raw)
        if REVISION_FIELD not in stored:
            mirror = await trio.to_thread.run_sync(self._copies.read_secrets)
            if mirror and REVISION_FIELD in mirror:
                with self._redis_errors("restore the project secrets"):
                    flat = [item for pair in mirror.items() for item in pair]
                    await self._redis.execute("HSET", self._secrets_key, *flat)  # HSET only adds: a race is safe
                log.warning("the store had no project secrets; restored %d from this node", len(mirror) - 1)
                return _secret_values(mirror)
        await trio.to_thread.run_sync(self._copies.write_secrets, stored)
        return _secret_values(stored)

    async def set_secrets(self, values: Mapping[str, str]) -> None:
        current = await self.project_secrets()
        project_secrets.validated(current, values)  # the whole set's rules, before anything is written
        flat = [item for pair in values.items() for item in pair]
        with self._redis_errors("set project secrets"):
            await self._redis.execute_many(
                [
                    ("MULTI",),
                    *([("HSET", self._secrets_key, *flat)] if flat else []),
                    ("HINCRBY", self._secrets_key, REVISION_FIELD, 1),
                    ("EXEC",),
                ]
            )
        await self.project_secrets()  # refresh this node's copy
        await self._announce("secrets", None, None)

    async def unset_secrets(self, names: Sequence[str]) -> list[str]:
        current = await self.project_secrets()
        _, removed = project_secrets.without(current, names)
        with self._redis_errors("unset project secrets"):
            await self._redis.execute_many(
                [
                    ("MULTI",),
                    *([("HDEL", self._secrets_key, *removed)] if removed else []),
                    ("HINCRBY", self._secrets_key, REVISION_FIELD, 1),
                    ("EXEC",),
                ]
            )
        await self.project_secrets()
        await self._announce("secrets", None, None)
        return removed

    async def _transition(
        self, slug: str, what: str, decide: Callable[[lifecycle.SlugState], lifecycle.Transition]
    ) -> Deployment | None:
        """Read the slug's state, let the lifecycle `decide`, write what it changed: under the cluster lock."""
        async with self._mutating(slug, what):
            step = decide(await self._read_state(slug))
            await self._apply(slug, step)
        if step.pointer is not None:
            await trio.to_thread.run_sync(self._copies.set_live, slug, step.pointer)
        return step.result

    async def _prune_locked(self, slug: str) -> list[int]:
        """Drop what the lifecycle prunes (the slug's lock held). Returns the pruned versions."""
        pruned = lifecycle.prune(await self._read_state(slug), self.keep_versions)
        if pruned:
            await self._redis.execute_many(
                [
                    ("MULTI",),
                    ("HDEL", self._key(slug, "meta"), *pruned),
                    ("DEL", *(self._archive_key(slug, n) for n in pruned)),
                    ("EXEC",),
                ]
            )
        return pruned

    # -------------------------------------------------------------------------------------------- reads

    async def get(self, slug: str, version: int) -> Deployment | None:
        check_slug(slug)
        check_version(version)
        with self._redis_errors(f"read {slug} v{version}"):
            raw, ptr_raw = await self._redis.execute_many(
                [("HGET", self._key(slug, "meta"), version), ("GET", self._key(slug, "ptr"))]
            )
        if raw is None:
            return None
        return lifecycle.derive(_load_meta(raw), _load_pointer(ptr_raw).version)

    async def get_active(self, slug: str) -> Deployment | None:
        """The live version in Redis. When Redis knows less of `slug` than this node holds (it came back empty,
        or a stale replica took over), this node's live version is given back first (`restore`)."""
        check_slug(slug)
        with self._redis_errors(f"read {slug}"):
            ptr_raw, numbers = await self._redis.execute_many(
                [("GET", self._key(slug, "ptr")), ("HKEYS", self._key(slug, "meta"))]
            )
            version = _load_pointer(ptr_raw).version
            raw = None if version is None else await self._redis.hget(self._key(slug, "meta"), str(version))
        known = max((int(n) for n in numbers), default=0)
        local = await trio.to_thread.run_sync(self._copies.read_pointer, slug)
        if local.version is not None and local.version > known:
            restored = await self.restore(slug)
            if restored is not None:
                return restored
        if raw is None or version is None:
            if numbers and local.version is not None:  # deleted (a tombstone): this node no longer claims it
                await trio.to_thread.run_sync(self._copies.set_live, slug, None)
            return None
        if local.version != version:
            await trio.to_thread.run_sync(self._copies.note_live, slug, version)
        return lifecycle.derive(_load_meta(raw), version)

    async def restore(self, slug: str) -> Deployment | None:
        """Give Redis back this node's live version of `slug` (with every newer version it holds) when Redis
        knows of no version that high: it lost its data, or a stale replica took over. A delete leaves its
        versions behind as REMOVED (a tombstone), so a deleted function never comes back this way; of two nodes
        restoring, the higher version wins (each writes only above what Redis has, under the slug's lock).
        Returns the restored live version, or None when Redis needed nothing from this node."""
        check_slug(slug)
        local = await trio.to_thread.run_sync(self._copies.read_local, slug)
        live = local.pointer.version
        if live is None or live not in local.files:
            return None
        async with self._mutating(slug, f"restore {slug}"):
            state = await self._read_state(slug)
            known = max(state.metas, default=0)
            if live <= known:
                return None
            given = sorted(n for n in local.files if n > known)
            archives = await trio.to_thread.run_sync(lambda: {n: self._copies.archive(slug, n) for n in given})
            seq = int(await self._redis.get(self._key(slug, "seq")) or 0)
            history = tuple(v for v in local.pointer.history if v in state.metas or v in given)
            extra: list[tuple[Any, ...]] = [("SET", self._archive_key(slug, n), archives[n]) for n in given]
            extra.append(("SADD", f"{self._p}slugs", slug))
            if seq < given[-1]:
                extra.append(("SET", self._key(slug, "seq"), given[-1]))  # numbers never go backwards
            await self._write(slug, [local.metas[n] for n in given], lifecycle.Pointer(live, history), extra)
        for n in given:
            await trio.to_thread.run_sync(self._copies.mark_complete, slug, n, local.metas[n].sha256)
        self._restores += 1
        log.warning(
            "%s: the store knew no version above %d; restored v%d from this node's copy (%d versions given back)",
            slug,
            known,
            live,
            len(given),
        )
        await self._announce("activate", slug, live)
        return lifecycle.derive(local.metas[live], live)

    async def restore_local(self) -> tuple[int, int]:
        """`restore` every slug this node holds (on start, and when Redis lost data): (restored, failed)."""
        restored = failed = 0
        for slug in await trio.to_thread.run_sync(self._copies.slugs):
            try:
                if await self.restore(slug) is not None:
                    restored += 1
            except StoreError as exc:
                failed += 1
                log.warning("could not restore %s to the store: %s", slug, exc)
        return restored, failed

    async def list(self, *, include_removed: bool = False) -> DeploymentList:
        with self._redis_errors("list functions"):
            slugs = sorted(s.decode() for s in await self._redis.execute("SMEMBERS", f"{self._p}slugs"))
            commands: list[tuple[Any, ...]] = []
            for slug in slugs:
                commands += [("HGETALL", self._key(slug, "meta")), ("GET", self._key(slug, "ptr"))]
            replies = await self._redis.execute_many(commands) if commands else []
        out: DeploymentList = []
        for i, slug in enumerate(slugs):
            if not SLUG_RE.match(slug):
                continue
            state = lifecycle.SlugState(_load_metas(replies[2 * i]), _load_pointer(replies[2 * i + 1]))
            dep = lifecycle.listed(state, include_removed=include_removed)
            if dep is not None:
                out.append(dep)
        return out

    async def versions(self, slug: str) -> DeploymentList:
        check_slug(slug)
        with self._redis_errors(f"list versions of {slug}"):
            metas, ptr = await self._read_slug(slug)
        return lifecycle.versions(lifecycle.SlugState(metas, ptr))

    async def secrets(self, slug: str, version: int) -> dict[str, str]:
        return await read_secrets(await self.ensure_local(slug, version))

    async def archive(self, slug: str, version: int) -> bytes:
        check_slug(slug)
        check_version(version)
        with self._redis_errors(f"read the archive of {slug} v{version}"):
            data = await self._redis.get(self._archive_key(slug, version))
        if data is None:
            raise DeploymentNotFound(f"{slug} has no archive for version {version}")
        return data

    # ------------------------------------------------------------------------------------- local copies

    async def ensure_local(self, slug: str, version: int) -> Path:
        """Make sure `bundle_dir(slug, version)` holds this version's files (fetch + verify + unpack if not);
        returns it. With Redis unreachable, an existing local copy is trusted; else `ClusterStoreUnavailable`.
        `DeploymentNotFound` for an unknown version, `VersionConflict` when its archive is gone (removed)."""
        bundle = self._copies.bundle_dir(slug, version)
        key = (slug, version)
        lock = self._fetch_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                local_sha = await trio.to_thread.run_sync(self._copies.sha256_of, slug, version)
                try:
                    raw = await self._redis.hget(self._key(slug, "meta"), str(version))
                except RedisError as exc:
                    if local_sha is not None:
                        return bundle
                    raise ClusterStoreUnavailable(f"fetch {slug} v{version}: Redis unreachable ({exc})") from exc
                if raw is None:
                    raise DeploymentNotFound(f"{slug} has no version {version}")
                dep = _load_meta(raw)
                if local_sha == dep.sha256:
                    return bundle
                await self._fetch(dep)
                return bundle
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._fetch_locks.pop(key, None)

    async def _fetch(self, dep: Deployment) -> None:
        try:
            with self._redis_errors(f"fetch {dep.key}"):
                data = await self._redis.get(self._archive_key(dep.slug, dep.version))
            if data is None:
                raise VersionConflict(f"{dep.key} has no files any more")
            await trio.to_thread.run_sync(self._copies.install_archive, dep, data)
        except BaseException:
            self._fetch_failures += 1
            raise
        self._fetches += 1

    async def prefetch(self, slug: str, version: int) -> bool:
        """`ensure_local`, bounded in time and never raising (logged): True if the files are there."""
        with trio.move_on_after(_PREFETCH_TIMEOUT_S):
            try:
                await self.ensure_local(slug, version)
                return True
            except StoreError as exc:
                log.warning("could not fetch %s v%d: %s", slug, version, exc)
            except BundleRejected as exc:
                log.error("stored archive of %s v%d is unusable: %s", slug, version, exc)
            except OSError as exc:
                log.error("could not unpack %s v%d locally: %s", slug, version, exc)
        return False

    async def sync(self) -> int:
        """On start: fetch every active version (eager: the node can serve at once and survives a later Redis
        outage), and drop local copies Redis no longer has. Other versions are fetched lazily. Returns the
        number of active versions available locally."""
        await self.restore_local()  # a node joining with deployments (or Redis came back empty): give them first
        deps = await self.list(include_removed=True)
        ready = 0
        for dep in deps:
            with self._redis_errors(f"sync {dep.slug}"):
                metas, _ = await self._read_slug(dep.slug)
            keep = {n for n, m in metas.items() if m.status is not DeploymentStatus.REMOVED}
            await trio.to_thread.run_sync(partial(self._copies.remove, dep.slug, keep, leftovers=True))
            if dep.status is DeploymentStatus.ACTIVE and await self.prefetch(dep.slug, dep.version):
                ready += 1
        known = {d.slug for d in deps}
        await trio.to_thread.run_sync(self._copies.remove_other_slugs, known)
        return ready

    def _schedule_local_prune(self, slug: str) -> None:
        """After `local_grace_s`, remove local copies of `slug`'s versions that Redis no longer keeps."""
        if slug in self._local_prunes:
            return
        self._local_prunes.add(slug)
        self._nursery.start_soon(self._local_prune_later, slug)

    async def _local_prune_later(self, slug: str) -> None:
        try:
            await trio.sleep(self.local_grace_s)
            try:
                await self.prune_local(slug)
            except StoreError as exc:
                log.info("local prune of %s skipped: %s", slug, exc)
        finally:
            self._local_prunes.discard(slug)

    async def prune_local(self, slug: str) -> int:
        """Remove this node's copies of `slug`'s versions that Redis no longer keeps (deleted or pruned) now.
        Runs by itself `local_grace_s` after such changes; returns how many copies were removed."""
        check_slug(slug)
        with self._redis_errors(f"prune local copies of {slug}"):
            metas, _ = await self._read_slug(slug)
        keep = {n for n, m in metas.items() if m.status is not DeploymentStatus.REMOVED}
        return await trio.to_thread.run_sync(self._copies.remove, slug, keep)

    # ------------------------------------------------------------------------------------------ watching

    @asynccontextmanager
    async def _watch(self) -> AsyncIterator[AsyncIterator[StoreChange]]:
        async with self._changes.watch() as reader:
            yield _Changes(self, reader)

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[StoreChange]]:
        return self._watch()

    def _notify(self, change: StoreChange) -> None:
        self._changes.notify(change)

    def _seen_epoch(self, epoch: int, *, own: bool = False) -> bool:
        """Record a change number; True if numbers were skipped (changes this node never heard of)."""
        last, self._epoch = self._epoch, max(self._epoch or 0, epoch)
        # Announcements from two nodes can arrive out of order: a false gap only costs one extra resync.
        return not own and last is not None and epoch > last + 1

    async def _restore_after_loss(self, why: str) -> None:
        """After a gap that may have cost Redis its data: restore what this node holds, then resync watchers.

        The change feed may be back before the command connections are: retried with a backoff, bounded (past
        it, the resync's reconcile still restores slug by slug through `get_active`)."""
        restored, delay = 0, 0.05
        with trio.move_on_after(_RESTORE_RETRY_S):
            while True:
                done, failed = await self.restore_local()
                restored += done
                if not failed:
                    break
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._resync(f"{why}; {restored} functions restored from this node")

    def _resync(self, why: str) -> None:
        self._resyncs += 1
        log.info("deployment watchers resync: %s", why)
        self._notify(StoreChange("resync", None, None))

    async def serve_reconcile(self, interval_s: float) -> None:
        """Every `interval_s`, compare the cluster's change counter with the last one seen: catches an
        announcement that was never published (its node lost Redis between the write and the publish)."""
        while True:
            await trio.sleep(interval_s)
            try:
                current = int(await self._redis.get(self._epoch_key) or 0)
            except RedisError:
                continue  # the pub/sub side reports the outage and resyncs after it
            except ValueError:
                log.warning("%s is not a number: the missed-change check is off", self._epoch_key)
                return
            if self._epoch is not None and current < self._epoch:
                # The counter went backwards: Redis lost its data (FLUSHALL, a restart without persistence, a
                # stale replica). Give back what this node serves before anyone reconciles against the gap.
                why = f"change counter at {current}, was {self._epoch}"
                self._epoch = current
                await self._restore_after_loss(why)
            elif self._epoch is not None and current > self._epoch:
                self._epoch = current
                self._resync(f"change counter at {current}: announcements were missed")
            elif self._epoch is None:
                self._epoch = current

    async def serve_changes(self, pubsub: PubSub) -> None:
        """Hand other nodes' changes to this node's watchers (subscribed by `open_redis_deployment_store`)."""
        async for event in pubsub.messages:
            if isinstance(event, PubSubMessage):
                decoded = self._decode(event.data)
                if decoded is None:
                    continue
                change, epoch = decoded
                if epoch is not None and self._seen_epoch(epoch):
                    self._resync(f"change {epoch} arrived after {epoch - 1} was missed")
                if change is None:
                    continue
                self._remote_changes += 1
                if change.kind in ("put", "delete") and change.slug is not None:
                    self._schedule_local_prune(change.slug)
                if change.kind == "delete" and change.slug is not None:  # no longer this node's to restore
                    await trio.to_thread.run_sync(self._copies.set_live, change.slug, None)
                elif change.kind in ("activate", "rollback") and change.slug is not None and change.version:
                    await trio.to_thread.run_sync(self._copies.note_live, change.slug, change.version)
                self._notify(change)
            elif isinstance(event, PubSubResubscribed):
                await self._restore_after_loss("the change feed was resubscribed after a gap")
            elif isinstance(event, PubSubDisconnected):
                log.warning("deployment change feed lost (%s); resync follows the reconnect", event.reason)

    def _decode(self, data: bytes) -> tuple[StoreChange | None, int | None] | None:
        """(the change, or None when it is ours or unusable; its change number), or None if unreadable."""
        try:
            message = msgpack.unpackb(data)
            kind, slug, version, origin = message["k"], message["s"], message["v"], message["o"]
            epoch = message.get("e")
        except Exception as exc:  # a foreign or corrupt message must not stop the feed
            log.warning("ignoring an unreadable deployment change: %s", exc)
            return None
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        if origin == self.node_id or kind not in _KINDS:
            return None, epoch  # our own changes were delivered directly
        if kind == "secrets":
            return StoreChange("secrets", None, None), epoch
        if not (isinstance(slug, str) and SLUG_RE.match(slug)) or not (version is None or isinstance(version, int)):
            return None, epoch
        return StoreChange(cast(Any, kind), slug, version), epoch

    async def quarantined(self) -> QuarantineList:
        """Nothing is set aside here: Redis holds the truth and a damaged local copy is fetched again."""
        return []

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(puts=self._puts, rejected=self._rejected, watchers=len(self._changes))

    def cluster_statistics(self) -> RedisStoreStatistics:
        return RedisStoreStatistics(
            fetches=self._fetches,
            fetch_failures=self._fetch_failures,
            remote_changes=self._remote_changes,
            resyncs=self._resyncs,
            publish_failures=self._publish_failures,
            local_removals=self._copies.removals,
            restores=self._restores,
        )


@asynccontextmanager
async def open_redis_deployment_store(
    client: RedisClient,
    local_root: Path,
    *,
    sync: bool = True,
    reconcile_interval_s: float = 30.0,
    **options: Any,
) -> AsyncIterator[RedisDeploymentStore]:
    """The cluster deployment store, owned by the block (its pub/sub connection and tasks end with it).

    Subscribes to changes first, then (with `sync`) fetches every active version, then yields: a new node is
    ready to serve what the cluster serves. Every `reconcile_interval_s` it checks for missed announcements.
    `options` go to `RedisDeploymentStore` (`prefix`, `node_id`, `keep_versions`, `limits`, `locks`,
    `watch_buffer`, `lock_ttl_s`, `lock_timeout_s`, `local_grace_s`).
    Raises `ClusterStoreUnavailable` if Redis can't be reached."""
    local_root = Path(local_root)
    await trio.to_thread.run_sync(lambda: local_root.mkdir(parents=True, exist_ok=True))
    async with AsyncExitStack() as stack:
        try:
            pubsub = await stack.enter_async_context(client.pubsub(buffer=1024))
        except RedisError as exc:
            raise ClusterStoreUnavailable(f"deployment change feed: Redis unreachable ({exc})") from exc
        nursery = await stack.enter_async_context(open_owned_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        store = RedisDeploymentStore(client, local_root, nursery, **options)
        with store._redis_errors("subscribe to deployment changes"):
            await pubsub.subscribe(store.channel)
        nursery.start_soon(store.serve_changes, pubsub)
        with store._redis_errors("read the deployment change counter"):
            store._epoch = int(await client.get(store._epoch_key) or 0)
        nursery.start_soon(store.serve_reconcile, reconcile_interval_s)
        if sync:
            await store.sync()
        yield store


if TYPE_CHECKING:
    _conforms: DeploymentStore = RedisDeploymentStore(...)  # type: ignore[arg-type, call-arg]
