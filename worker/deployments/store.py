"""Deployment store: immutable unpacked versions per function, one live pointer per function, change events.

`DeploymentStore` is the seam; `LocalDeploymentStore` (a directory, the embedded default) implements it. A Redis
store for clusters would keep metadata and archives in Redis and still unpack into a local store on each node.

Layout under `root` (everything below a slug is owned by this store; runtimes only read `bundle/`):

    <slug>/.lock            flock: metadata changes from several processes take turns
    <slug>/active.json      {"version": N | null, "history": [...]}: replaced atomically (write temp, rename)
    <slug>/v<N>/            created with mkdir, which is what reserves number N (atomic across processes)
    <slug>/v<N>/meta.json   the version's metadata (status as stored; ACTIVE is derived from active.json)
    <slug>/v<N>/bundle/     the unpacked files (read-only)
    <slug>/v<N>/bundle.tar.gz  the archive as uploaded (for replication to other nodes)

A file that can't be read (truncated, damaged) is set aside as `<name>.corrupt` (`quarantined()`): that version
(or, for active.json, the slug's live pointer) is not served; every other function is.

The highest `v<N>` folder is never removed (pruning and delete keep it), so numbers never go backwards.
All filesystem work runs in worker threads; the trio lock only keeps this process's own updates in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio
from pydantic import ValidationError

from mbworker.runtimes.api import FunctionVersion
from mbworker.worker.deployments import lifecycle, project_secrets
from mbworker.worker.deployments.archive import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_UNPACKED_BYTES,
    BundleRejected,
    BundleTooLarge,
    sha256_hex,
    unpack_bundle,
)
from mbworker.worker.deployments.changes import ChangeFeed, StoreChange
from mbworker.worker.deployments.manifest import (
    MANIFEST_NAME,
    SLUG_RE,
    Manifest,
)
from mbworker.worker.deployments.model import ATTEMPTS_KEPT, Attempt, is_disk_full
from mbworker.worker.deployments.model import Deployment as Deployment
from mbworker.worker.deployments.model import DeploymentList as DeploymentList
from mbworker.worker.deployments.model import DeploymentNotFound as DeploymentNotFound
from mbworker.worker.deployments.model import DeploymentStatus as DeploymentStatus
from mbworker.worker.deployments.model import StorageFull as StorageFull
from mbworker.worker.deployments.model import StoreError as StoreError
from mbworker.worker.deployments.model import VersionConflict as VersionConflict

log = logging.getLogger("mbworker.deployments")

_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")
_LOCK_TIMEOUT_S = 10.0
_ORPHAN_AGE_S = 3600.0
"""A version folder without meta.json older than this is a crashed put and may be pruned."""


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """What the store accepts from an upload."""

    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    """Compressed size (413 above)."""
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
    """Decompressed bytes, tar headers included."""
    max_files: int = DEFAULT_MAX_FILES
    max_member_bytes: int | None = None
    """One file's size; None means `max_unpacked_bytes`."""
    max_ratio: float = DEFAULT_MAX_RATIO
    """Decompressed/compressed past 1 MiB."""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A file set aside because it could not be read (truncated, damaged): kept for inspection, never served."""

    slug: str
    version: int | None
    """None for the slug's pointer (active.json)."""
    path: str
    reason: str


QuarantineList = list[Quarantined]
AttemptList = list[Attempt]


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A snapshot for metrics."""

    puts: int
    """Versions stored by this instance since start."""
    rejected: int
    """Uploads refused (BundleRejected) since start."""
    watchers: int
    """Open `watch()` subscriptions."""


class DeploymentStore(Protocol):
    """Immutable function versions and the pointer to the live one. Implementations own their files."""

    async def put(self, slug: str, archive: bytes, sha256: str | None = None) -> Deployment:
        """Verify, unpack and store `archive` as a new STAGED version (the next number for `slug`).

        Raises `BundleRejected` (400/413) for a bad archive, a manifest for another slug, or a sha256 mismatch.
        The active version does not change until `activate`.
        """
        ...

    async def activate(self, slug: str, version: int, *, only_if_newer: bool = False) -> Deployment:
        """Make `version` the live one (atomic switch). `DeploymentNotFound` / `VersionConflict`.

        With `only_if_newer`, a live version newer than `version` stays live and is what is returned: a deploy
        that finished booting after a later one was activated (on any node) must not take it back.
        """
        ...

    async def rollback(self, slug: str, to: int | None = None) -> Deployment:
        """Re-activate the previously active version (walking back on repeated calls), or version `to`."""
        ...

    async def delete(self, slug: str) -> DeploymentList:
        """Stop serving `slug`: every version becomes REMOVED and its files go. Returns the removed versions."""
        ...

    async def mark_failed(self, slug: str, version: int, error: str) -> Deployment:
        """Record that `version` failed to boot (status FAILED, `boot_error`)."""
        ...

    async def discard(self, slug: str, version: int, error: str) -> Attempt:
        """A stored version failed to boot: remove it and give its number back (the next `put` takes it unless a
        later number was taken meanwhile); the failure is kept in `attempts`. Never the live version."""
        ...

    async def attempts(self, slug: str) -> AttemptList:
        """The newest failed attempts of `slug` (at most `ATTEMPTS_KEPT`), newest first."""
        ...

    async def project_secrets(self) -> dict[str, str]:
        """The project secrets (every function's env besides its own). Never put these in listings or logs."""
        ...

    async def set_secrets(self, values: Mapping[str, str]) -> None:
        """Set (add or replace) project secrets; `StoreError` (400) for a name or value the rules refuse."""
        ...

    async def unset_secrets(self, names: Sequence[str]) -> list[str]:
        """Remove project secrets; returns the names that were set."""
        ...

    async def get(self, slug: str, version: int) -> Deployment | None: ...

    async def get_active(self, slug: str) -> Deployment | None:
        """The live version of `slug`, or None (never deployed, nothing activated, or deleted)."""
        ...

    async def list(self, *, include_removed: bool = False) -> DeploymentList:
        """One entry per function, sorted by slug: its active version, else its newest."""
        ...

    async def versions(self, slug: str) -> DeploymentList:
        """Every stored version of `slug`, oldest first (pruned ones are gone)."""
        ...

    async def secrets(self, slug: str, version: int) -> dict[str, str]:
        """The function's own secrets (from its manifest). Never put these in listings or logs."""
        ...

    async def archive(self, slug: str, version: int) -> bytes:
        """The archive as uploaded (to copy a version to another node)."""
        ...

    def bundle_dir(self, slug: str, version: int) -> Path:
        """Where `version`'s files are unpacked (read-only for everybody else)."""
        ...

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[StoreChange]]:
        """Subscribe to changes: `async with store.watch() as changes: async for change in changes: ...`.

        Subscribed on enter, so nothing made after enter is missed; bounded, a slow reader gets `resync`.
        """
        ...

    def statistics(self) -> StoreStatistics: ...

    async def quarantined(self) -> QuarantineList:
        """Files this store could not read and set aside (the rest is served); empty when all is well."""
        ...


def staged_deployment(slug: str, version: int, manifest: Manifest, sha256: str, size: int) -> Deployment:
    """The metadata of a version just stored from a bundle with `manifest` (every store builds it this way)."""
    now = _now_ms()
    return Deployment(
        slug=slug,
        version=version,
        status=DeploymentStatus.STAGED,
        sha256=sha256,
        size_bytes=size,
        runtime=manifest.runtime,
        entrypoint=manifest.entrypoint,
        import_map=manifest.import_map,
        verify_jwt=manifest.verify_jwt,
        static_patterns=manifest.static_patterns,
        limits=manifest.limits,
        env_names=sorted(manifest.env),
        cache=manifest.cache,
        net=manifest.net,
        source_entrypoint=manifest.source_entrypoint,
        deno_config=manifest.deno_config,
        created_at=now,
        updated_at=now,
    )


def function_version(dep: Deployment, bundle_dir: Path, env: Mapping[str, str]) -> FunctionVersion:
    """What a runtime needs to run `dep`; `env` is the complete environment (platform variables + secrets)."""
    return FunctionVersion(
        slug=dep.slug,
        version=dep.version,
        runtime=dep.runtime,
        bundle_dir=bundle_dir,
        entrypoint=dep.entrypoint,
        import_map=dep.import_map,
        deno_config=dep.deno_config,
        env=dict(env),
        limits=dep.limits,
        net_allow=None if dep.net.allow is None else tuple(dep.net.allow),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_slug(slug: str) -> str:
    if not isinstance(slug, str) or not SLUG_RE.match(slug):
        raise StoreError(f"invalid function name {slug!r}")
    return slug


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # Owner-only: an archive holds the function's env (secrets); metadata and pointers need no one else.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing). Blocking: call from a worker thread."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"timed out waiting for the lock {path}") from None
                time.sleep(0.005)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def read_secrets(bundle_dir: Path) -> dict[str, str]:
    """The env/secrets of the version whose unpacked bundle is `bundle_dir` (its manifest), read in a thread."""
    path = bundle_dir / MANIFEST_NAME

    def read() -> dict[str, str]:
        try:
            return dict(Manifest.model_validate_json(path.read_bytes()).env)
        except FileNotFoundError:
            raise DeploymentNotFound(f"no files at {bundle_dir}") from None
        except ValueError as exc:  # pydantic's ValidationError is one
            raise CorruptFile(path, f"unreadable bundle manifest: {_first_line(exc)}") from exc

    return await trio.to_thread.run_sync(read)


class CorruptFile(StoreError):
    """A stored file can't be read (truncated, damaged): the store sets it aside (`Quarantined`)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_CORRUPT_SUFFIX = ".corrupt"


class LocalDeploymentStore:
    """`DeploymentStore` in a local directory. Several processes may share `root` (numbers stay distinct).

    Changes made by other processes are not reported by `watch()` (this instance only sees its own).
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_versions: int = 10,
        limits: UnpackLimits | None = None,
        watch_buffer: int = 64,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        self.limits = limits or UnpackLimits()
        self._changes = ChangeFeed(watch_buffer)
        self._lock = trio.Lock()
        self._puts = 0
        self._rejected = 0
        self._reasons: dict[str, str] = {}
        """Why each quarantined file (by its set-aside path) was set aside, as far as this instance saw it."""

    # ------------------------------------------------------------------------------------------- paths

    def _slug_dir(self, slug: str) -> Path:
        return self.root / _check_slug(slug)

    def _version_dir(self, slug: str, version: int) -> Path:
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoreError(f"invalid version {version!r}")
        return self._slug_dir(slug) / f"v{version}"

    def bundle_dir(self, slug: str, version: int) -> Path:
        return self._version_dir(slug, version) / "bundle"

    # ------------------------------------------------------------------------------------------- writes

    async def put(self, slug: str, archive: bytes, sha256: str | None = None) -> Deployment:
        _check_slug(slug)
        if len(archive) > self.limits.max_archive_bytes:
            self._rejected += 1
            raise BundleTooLarge(
                f"bundle is {len(archive)} bytes, at most {self.limits.max_archive_bytes} bytes are accepted"
            )
        try:
            dep = await trio.to_thread.run_sync(self._put_sync, slug, archive, sha256)
        except BundleRejected:
            self._rejected += 1
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(f"no space left to store {slug} ({exc.strerror}): nothing was stored") from exc
            raise
        self._puts += 1
        self._notify(StoreChange("put", slug, dep.version))
        async with self._lock:
            await trio.to_thread.run_sync(self._prune_sync, slug)
        return dep

    def _put_sync(self, slug: str, archive: bytes, sha256: str | None) -> Deployment:
        digest = sha256_hex(archive)
        if sha256 is not None and digest != sha256.strip().lower():
            raise BundleRejected("sha256 mismatch: the archive is not the one that was announced (corrupt upload?)")
        slug_dir = self._slug_dir(slug)
        slug_dir.mkdir(parents=True, exist_ok=True)
        vdir, version = self._reserve(slug_dir)
        try:
            lim = self.limits
            manifest = unpack_bundle(
                archive,
                vdir / "bundle",
                max_bytes=lim.max_unpacked_bytes,
                max_files=lim.max_files,
                max_ratio=lim.max_ratio,
                max_member_bytes=lim.max_member_bytes,
            )
            if manifest.slug != slug:
                raise BundleRejected(f"bundle is for {manifest.slug!r}, not {slug!r}")
            write_atomic(vdir / "bundle.tar.gz", archive)
            dep = staged_deployment(slug, version, manifest, digest, len(archive))
            write_atomic(vdir / "meta.json", dep.model_dump_json(indent=2).encode())
            return dep
        except BaseException:
            _rmtree(vdir)
            raise

    @staticmethod
    def _reserve(slug_dir: Path) -> tuple[Path, int]:
        """mkdir the next `v<N>`: mkdir either creates or fails, so two processes never get the same N."""
        n = max(_version_numbers(slug_dir), default=0) + 1
        for _ in range(100_000):
            vdir = slug_dir / f"v{n}"
            try:
                vdir.mkdir()
                return vdir, n
            except FileExistsError:
                n += 1
        raise StoreError(f"can't reserve a version number in {slug_dir}")  # pragma: no cover

    async def activate(self, slug: str, version: int, *, only_if_newer: bool = False) -> Deployment:
        self._version_dir(slug, version)
        dep = await self._transition(
            slug, lambda state: lifecycle.activate(state, slug, version, _now_ms(), only_if_newer=only_if_newer)
        )
        assert dep is not None
        if dep.version == version:
            self._notify(StoreChange("activate", slug, version))
        return dep

    async def rollback(self, slug: str, to: int | None = None) -> Deployment:
        if to is not None:
            self._version_dir(slug, to)
        dep = await self._transition(slug, lambda state: lifecycle.rollback(state, slug, _now_ms(), to))
        assert dep is not None
        self._notify(StoreChange("rollback", slug, dep.version))
        return dep

    async def delete(self, slug: str) -> DeploymentList:
        _check_slug(slug)
        async with self._lock:
            removed = await trio.to_thread.run_sync(self._delete_sync, slug)
        self._notify(StoreChange("delete", slug, None))
        return removed

    def _delete_sync(self, slug: str) -> DeploymentList:
        slug_dir = self._slug_dir(slug)
        if not slug_dir.is_dir():
            raise DeploymentNotFound(f"no function {slug!r}")
        with self._locked(slug):
            step = lifecycle.delete(self._read_state(slug), slug, _now_ms())
            # Unpoint first: from here on nothing is served, whatever happens to the files.
            self._apply(slug, lifecycle.Transition(None, (), step.pointer))
            self._apply(slug, lifecycle.Transition(None, step.changed))
            for n in sorted(_version_numbers(slug_dir)):
                _rmtree(self.bundle_dir(slug, n))
                (slug_dir / f"v{n}" / "bundle.tar.gz").unlink(missing_ok=True)
            return list(step.removed)

    async def mark_failed(self, slug: str, version: int, error: str) -> Deployment:
        self._version_dir(slug, version)
        dep = await self._transition(slug, lambda state: lifecycle.mark_failed(state, slug, version, error, _now_ms()))
        assert dep is not None
        self._notify(StoreChange("failed", slug, version))
        return dep

    async def discard(self, slug: str, version: int, error: str) -> Attempt:
        self._version_dir(slug, version)

        def run() -> Attempt:
            with self._locked(slug):
                attempt = lifecycle.discard(self._read_state(slug), slug, version, error, _now_ms())
                # The whole folder goes: when it was the highest, mkdir gives the number to the next put.
                _rmtree(self._version_dir(slug, version))
                path = self._slug_dir(slug) / "attempts.json"
                kept = [attempt, *self._read_attempts(path)][:ATTEMPTS_KEPT]
                write_atomic(path, json.dumps([a.model_dump(mode="json") for a in kept]).encode())
                return attempt

        async with self._lock:
            attempt = await trio.to_thread.run_sync(run)
        self._notify(StoreChange("failed", slug, version))
        return attempt

    async def attempts(self, slug: str) -> AttemptList:
        return await trio.to_thread.run_sync(self._read_attempts, self._slug_dir(slug) / "attempts.json")

    # ---------------------------------------------------------------------------------- project secrets

    @property
    def _secrets_path(self) -> Path:
        return self.root / ".secrets.json"  # a leading dot: never a slug

    async def project_secrets(self) -> dict[str, str]:
        return await trio.to_thread.run_sync(self._read_secrets_file)

    def _read_secrets_file(self) -> dict[str, str]:
        try:
            raw = json.loads(self._secrets_path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise StoreError(f"unreadable {self._secrets_path}: {exc}") from exc
        return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}

    async def set_secrets(self, values: Mapping[str, str]) -> None:
        await self._change_secrets(lambda current: project_secrets.validated(current, values))

    async def unset_secrets(self, names: Sequence[str]) -> list[str]:
        removed: list[str] = []

        def change(current: dict[str, str]) -> dict[str, str]:
            kept, gone = project_secrets.without(current, names)
            removed.extend(gone)
            return kept

        await self._change_secrets(change)
        return removed

    async def _change_secrets(self, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        def run() -> None:
            with _file_lock(self.root / ".secrets.lock"):
                write_atomic(self._secrets_path, json.dumps(change(self._read_secrets_file())).encode())

        async with self._lock:
            await trio.to_thread.run_sync(run)
        self._notify(StoreChange("secrets", None, None))

    @staticmethod
    def _read_attempts(path: Path) -> AttemptList:
        try:
            return [Attempt.model_validate(a) for a in json.loads(path.read_bytes())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:  # only a record: an unreadable one starts over
            log.warning("ignoring unreadable %s: %s", path, exc)
            return []

    async def _transition(
        self, slug: str, decide: Callable[[lifecycle.SlugState], lifecycle.Transition]
    ) -> Deployment | None:
        """Read the slug's state, let the lifecycle `decide`, write what it changed: under both locks."""

        def run() -> Deployment | None:
            with self._locked(slug):
                step = decide(self._read_state(slug))
                self._apply(slug, step)
                return step.result

        async with self._lock:
            return await trio.to_thread.run_sync(run)

    def _prune_sync(self, slug: str) -> None:
        """Drop what the lifecycle prunes; also reap crashed puts (folders without meta.json) when clearly stale."""
        slug_dir = self._slug_dir(slug)
        with self._locked(slug):
            numbers = _version_numbers(slug_dir)
            if not numbers:
                return
            highest = max(numbers)
            for n in numbers:
                vdir = slug_dir / f"v{n}"
                aside = (vdir / f"meta.json{_CORRUPT_SUFFIX}").exists()  # quarantined: kept for the operator
                if n != highest and not aside and not (vdir / "meta.json").exists():
                    # A put in progress elsewhere, or one that crashed: only reap it when clearly stale.
                    with contextlib.suppress(OSError):
                        if time.time() - vdir.stat().st_mtime > _ORPHAN_AGE_S:
                            _rmtree(vdir)
            for n in lifecycle.prune(self._read_state(slug), self.keep_versions):
                _rmtree(slug_dir / f"v{n}")

    # -------------------------------------------------------------------------------------------- reads

    async def get(self, slug: str, version: int) -> Deployment | None:
        self._version_dir(slug, version)
        return await trio.to_thread.run_sync(self._get_sync, slug, version)

    def _get_sync(self, slug: str, version: int) -> Deployment | None:
        dep = self._read_meta(slug, version)
        if dep is None:
            return None
        return lifecycle.derive(dep, self._read_pointer(self._slug_dir(slug)).version)

    async def get_active(self, slug: str) -> Deployment | None:
        _check_slug(slug)
        return await trio.to_thread.run_sync(self._get_active_sync, slug)

    def _get_active_sync(self, slug: str) -> Deployment | None:
        version = self._read_pointer(self._slug_dir(slug)).version
        if version is None:
            return None
        dep = self._read_meta(slug, version)
        return None if dep is None else lifecycle.derive(dep, version)

    async def list(self, *, include_removed: bool = False) -> DeploymentList:
        return await trio.to_thread.run_sync(self._list_sync, include_removed)

    def _list_sync(self, include_removed: bool) -> DeploymentList:
        out: DeploymentList = []
        for slug_dir in sorted(self.root.iterdir()):
            if not slug_dir.is_dir() or not SLUG_RE.match(slug_dir.name):
                continue
            dep = lifecycle.listed(self._read_state(slug_dir.name), include_removed=include_removed)
            if dep is not None:
                out.append(dep)
        return out

    async def versions(self, slug: str) -> DeploymentList:
        _check_slug(slug)
        return await trio.to_thread.run_sync(lambda: lifecycle.versions(self._read_state(slug)))

    async def secrets(self, slug: str, version: int) -> dict[str, str]:
        try:
            return await read_secrets(self.bundle_dir(slug, version))
        except CorruptFile as exc:
            # A damaged bundle: set the whole folder aside, so this version counts as "no files" from now on.
            await trio.to_thread.run_sync(self._quarantine, self.bundle_dir(slug, version), exc.reason)
            raise

    async def archive(self, slug: str, version: int) -> bytes:
        path = self._version_dir(slug, version) / "bundle.tar.gz"
        try:
            return await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            raise DeploymentNotFound(f"{slug} has no archive for version {version}") from None

    # ------------------------------------------------------------------------------------------ watching

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[StoreChange]]:
        return self._changes.watch()

    def _notify(self, change: StoreChange) -> None:
        self._changes.notify(change)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(puts=self._puts, rejected=self._rejected, watchers=len(self._changes))

    # ------------------------------------------------------------------------------- the file backend

    def _locked(self, slug: str) -> contextlib.AbstractContextManager[None]:
        return _file_lock(self._slug_dir(slug) / ".lock")

    def _read_state(self, slug: str) -> lifecycle.SlugState:
        """The slug's metadata, pointer and which versions still have their files."""
        slug_dir = self._slug_dir(slug)
        metas: dict[int, Deployment] = {}
        for n in _version_numbers(slug_dir):
            dep = self._read_meta(slug, n)
            if dep is not None:
                metas[n] = dep
        files = frozenset(n for n in metas if (self.bundle_dir(slug, n) / MANIFEST_NAME).is_file())
        return lifecycle.SlugState(metas, self._read_pointer(slug_dir), files)

    def _apply(self, slug: str, step: lifecycle.Transition) -> None:
        for dep in step.changed:
            self._write_meta(dep)
        if step.pointer is not None:
            self._write_pointer(self._slug_dir(slug), step.pointer)

    def _read_meta(self, slug: str, version: int) -> Deployment | None:
        """The version's metadata; None if it has none, or if it was unreadable (then it is quarantined)."""
        path = self._version_dir(slug, version) / "meta.json"
        try:
            return Deployment.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as exc:
            self._quarantine(path, f"unreadable metadata: {_first_line(exc)}")
            return None

    def _write_meta(self, dep: Deployment) -> None:
        data = lifecycle.stored(dep).model_dump_json(indent=2).encode()
        write_atomic(self._version_dir(dep.slug, dep.version) / "meta.json", data)

    def _read_pointer(self, slug_dir: Path) -> lifecycle.Pointer:
        """The slug's pointer; an unreadable one is quarantined and reads as "nothing live"."""
        path = slug_dir / "active.json"
        try:
            return pointer_from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return lifecycle.Pointer()
        except (ValueError, StoreError) as exc:
            self._quarantine(path, f"unreadable pointer: {_first_line(exc)}")
            return lifecycle.Pointer()

    def _quarantine(self, path: Path, reason: str) -> None:
        """Set `path` aside as `<name>.corrupt` (kept for the operator) so the rest of the store carries on."""
        aside = path.with_name(path.name + _CORRUPT_SUFFIX)
        try:
            if aside.exists():  # an older one: keep the first, it is the evidence
                _rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            else:
                os.rename(path, aside)
        except FileNotFoundError:
            return  # another reader set it aside first
        self._reasons[str(aside)] = reason
        log.error("quarantined %s: %s (kept as %s; the other functions are served)", path, reason, aside.name)

    async def quarantined(self) -> QuarantineList:
        return await trio.to_thread.run_sync(self._quarantined_sync)

    def _quarantined_sync(self) -> QuarantineList:
        out: QuarantineList = []
        for slug_dir in sorted(self.root.iterdir()):
            if not slug_dir.is_dir() or not SLUG_RE.match(slug_dir.name):
                continue
            found: list[tuple[int | None, Path]] = [(None, slug_dir / ("active.json" + _CORRUPT_SUFFIX))]
            for n in sorted(_version_numbers(slug_dir)):
                for name in ("meta.json", "bundle"):
                    found.append((n, slug_dir / f"v{n}" / (name + _CORRUPT_SUFFIX)))
            for version, path in found:
                if path.exists():
                    reason = self._reasons.get(str(path), f"unreadable (set aside as {path.name})")
                    out.append(Quarantined(slug_dir.name, version, str(path), reason))
        return out

    @staticmethod
    def _write_pointer(slug_dir: Path, ptr: lifecycle.Pointer) -> None:
        write_atomic(slug_dir / "active.json", pointer_json(ptr))


def pointer_json(ptr: lifecycle.Pointer) -> bytes:
    return json.dumps({"version": ptr.version, "history": list(ptr.history)}).encode()


def pointer_from_json(raw: object) -> lifecycle.Pointer:
    """A pointer from its decoded JSON; fields of the wrong type read as unset."""
    if not isinstance(raw, dict):
        raise StoreError("deployment pointer is not a JSON object")
    version = raw.get("version")
    history = raw.get("history", [])
    history = history if isinstance(history, list) else []
    return lifecycle.Pointer(
        version if isinstance(version, int) else None, tuple(v for v in history if isinstance(v, int))
    )


def _version_numbers(slug_dir: Path) -> list[int]:
    try:
        names = os.listdir(slug_dir)
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for name in names if (m := _VERSION_DIR_RE.match(name))]


def _rmtree(path: Path) -> None:
    """Remove a folder whose files are read-only (0444): their folders are writable, so unlink works."""
    shutil.rmtree(path, ignore_errors=True)


if TYPE_CHECKING:  # mypy proves that the local store implements the protocol
    _conforms: DeploymentStore = LocalDeploymentStore(Path())
