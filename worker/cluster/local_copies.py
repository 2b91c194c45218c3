"""`LocalCopies`: this node's unpacked copies of function versions, for the Redis deployment store.

Owner: one `RedisDeploymentStore` owns one `LocalCopies` and its `root` (one node, one process: never share
`root`). Every method here is blocking file I/O: call it through `trio.to_thread.run_sync`.

Layout under `root` (the local store's layout, plus `sha256`: a single node's data dir reads the same way):

    <slug>/active.json      the version this node last knew live {"version", "history"} (its claim after a
                            Redis data loss)
    <slug>/v<N>/bundle/     the unpacked files (read-only for runtimes)
    <slug>/v<N>/meta.json   the version's metadata as last seen (status as stored)
    <slug>/v<N>/bundle.tar.gz  the archive (0600: it holds the function's env), to give back to Redis
    <slug>/v<N>/sha256      hex sha256 of the archive the files came from (written last: marks a complete copy)
    <slug>/.incoming-*/     unpacks in progress (renamed to v<N> when complete)
    <slug>/.stale-*/        replaced copies on their way out
    .secrets.json           the project secrets as last read from Redis, with their revision (0600)

A copy is only trusted if its `sha256` matches the version's digest in Redis, so a copy made under a number
that Redis later reused (data loss) is replaced, never served. What a node holds (metadata, archive, live
pointer) is what it restores when Redis comes back empty or behind (`read_local`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from pydantic import ValidationError

from mbworker.worker.deployments import lifecycle
from mbworker.worker.deployments.archive import BundleRejected, sha256_hex, unpack_bundle
from mbworker.worker.deployments.manifest import MANIFEST_NAME, SLUG_RE, Manifest
from mbworker.worker.deployments.model import Deployment
from mbworker.worker.deployments.store import (
    StoreError,
    UnpackLimits,
    pointer_from_json,
    pointer_json,
    write_atomic,
)


def check_slug(slug: str) -> str:
    if not isinstance(slug, str) or not SLUG_RE.match(slug):
        raise StoreError(f"invalid function name {slug!r}")
    return slug


def check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"invalid version {version!r}")
    return version


def rmtree(path: Path) -> None:
    """Remove a folder whose files are read-only (their folders are writable, so unlink works)."""
    shutil.rmtree(path, ignore_errors=True)


class LocalCopies:
    def __init__(self, root: Path, limits: UnpackLimits) -> None:
        self.root = Path(root)
        self.limits = limits
        self.removals = 0
        """Version copies removed since start."""

    def version_dir(self, slug: str, version: int) -> Path:
        return self.root / check_slug(slug) / f"v{check_version(version)}"

    def bundle_dir(self, slug: str, version: int) -> Path:
        return self.version_dir(slug, version) / "bundle"

    def sha256_of(self, slug: str, version: int) -> str | None:
        """The archive digest of a complete local copy, or None (no complete copy)."""
        vdir = self.version_dir(slug, version)
        try:
            sha = (vdir / "sha256").read_text().strip()
        except FileNotFoundError:
            return None
        return sha if (vdir / "bundle" / MANIFEST_NAME).is_file() else None

    def unpack_incoming(self, slug: str, archive: bytes, sha256: str | None) -> tuple[Path, Manifest, str]:
        """Verify and unpack an upload into a fresh `.incoming-*` folder: (folder, manifest, digest).

        Raises `BundleRejected` (sha256 mismatch, unsafe or oversized archive, manifest for another slug)
        and leaves nothing behind. The caller owns the folder: `install` it or `rmtree` it."""
        digest = sha256_hex(archive)
        if sha256 is not None and digest != sha256.strip().lower():
            raise BundleRejected("sha256 mismatch: the archive is not the one that was announced (corrupt upload?)")
        incoming = self._new_incoming(slug)
        try:
            manifest = self._unpack(archive, incoming / "bundle")
            if manifest.slug != slug:
                raise BundleRejected(f"bundle is for {manifest.slug!r}, not {slug!r}")
            return incoming, manifest, digest
        except BaseException:
            rmtree(incoming)
            raise

    def install(self, dep: Deployment, incoming: Path, archive: bytes) -> None:
        """Move an unpacked `incoming` folder into place as v<N> (with its metadata and archive), replacing any
        previous copy."""
        write_atomic(incoming / "bundle.tar.gz", archive)
        write_atomic(incoming / "meta.json", lifecycle.stored(dep).model_dump_json().encode())
        (incoming / "sha256").write_text(dep.sha256)
        vdir = self.version_dir(dep.slug, dep.version)
        if vdir.exists():
            stale = vdir.with_name(f".stale-{vdir.name}-{secrets.token_hex(4)}")
            os.rename(vdir, stale)
            rmtree(stale)
        os.rename(incoming, vdir)

    def install_archive(self, dep: Deployment, archive: bytes) -> None:
        """Unpack a fetched archive as v<N> after checking it against its digest (`BundleRejected` if not)."""
        incoming = self._new_incoming(dep.slug)
        try:
            self._unpack(archive, incoming / "bundle", sha256=dep.sha256)
            self.install(dep, incoming, archive)
        finally:
            rmtree(incoming)

    def set_live(self, slug: str, pointer: lifecycle.Pointer | None) -> None:
        """Remember which version this node serves (None: the slug was deleted)."""
        path = self.root / check_slug(slug) / "active.json"
        if pointer is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, pointer_json(pointer))

    def note_live(self, slug: str, version: int) -> None:
        """`set_live` with `version`, the previously noted one pushed on the history (unless it is the same)."""
        old = self.read_pointer(slug)
        if old.version == version:
            return
        history = (*old.history, old.version)[-lifecycle.HISTORY_MAX :] if old.version is not None else old.history
        self.set_live(slug, lifecycle.Pointer(version, tuple(v for v in history if v != version)))

    def read_pointer(self, slug: str) -> lifecycle.Pointer:
        try:
            return pointer_from_json(json.loads((self.root / check_slug(slug) / "active.json").read_bytes()))
        except (FileNotFoundError, ValueError, StoreError):
            return lifecycle.Pointer()  # none, or unreadable: this node claims nothing

    def read_local(self, slug: str) -> lifecycle.SlugState:
        """What this node holds of `slug`: metadata, its live pointer, and (`files`) the versions whose archive
        is here (those it can give back). Unreadable files count as absent."""
        slug_dir = self.root / check_slug(slug)
        metas: dict[int, Deployment] = {}
        files: set[int] = set()
        for name in _names(slug_dir):
            if not (name.startswith("v") and name[1:].isdigit()):
                continue
            n = int(name[1:])
            try:
                metas[n] = Deployment.model_validate_json((slug_dir / name / "meta.json").read_bytes())
            except (FileNotFoundError, ValidationError):
                continue
            if (slug_dir / name / "bundle.tar.gz").is_file() and (slug_dir / name / "bundle" / MANIFEST_NAME).is_file():
                files.add(n)
        return lifecycle.SlugState(metas, self.read_pointer(slug), frozenset(files))

    def archive(self, slug: str, version: int) -> bytes:
        return (self.version_dir(slug, version) / "bundle.tar.gz").read_bytes()

    def mark_complete(self, slug: str, version: int, sha256: str) -> None:
        """Write the `sha256` marker of a copy that lacks it (a single node's layout): it is trusted from now on."""
        (self.version_dir(slug, version) / "sha256").write_text(sha256)

    def read_secrets(self) -> dict[str, str] | None:
        """This node's copy of the project secrets (with their revision), or None if it has none."""
        try:
            raw = json.loads((self.root / ".secrets.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}

    def write_secrets(self, stored: dict[str, str]) -> None:
        if self.read_secrets() != stored:
            write_atomic(self.root / ".secrets.json", json.dumps(stored).encode())

    def slugs(self) -> list[str]:
        return sorted(n for n in _names(self.root) if SLUG_RE.match(n) and (self.root / n).is_dir())

    def remove(self, slug: str, keep: set[int], *, leftovers: bool = False) -> int:
        """Remove `slug`'s copies except the versions in `keep` (and with `leftovers`, interrupted unpacks:
        only when nothing else is unpacking, i.e. at start). Returns how many version copies went."""
        slug_dir = self.root / check_slug(slug)
        try:
            names = os.listdir(slug_dir)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            if name.startswith(".stale-") or (leftovers and name.startswith(".incoming-")):
                rmtree(slug_dir / name)
            elif name.startswith("v") and name[1:].isdigit() and int(name[1:]) not in keep:
                rmtree(slug_dir / name)
                removed += 1
        self.removals += removed
        return removed

    def remove_version(self, slug: str, version: int) -> None:
        rmtree(self.version_dir(slug, version))

    def remove_other_slugs(self, known: set[str]) -> None:
        """Remove the copies of every slug not in `known` (functions this cluster no longer has)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            if name not in known and SLUG_RE.match(name):
                rmtree(self.root / name)

    def _new_incoming(self, slug: str) -> Path:
        slug_dir = self.root / check_slug(slug)
        slug_dir.mkdir(parents=True, exist_ok=True)
        incoming = slug_dir / f".incoming-{secrets.token_hex(6)}"
        incoming.mkdir()
        return incoming

    def _unpack(self, archive: bytes, dest: Path, sha256: str | None = None) -> Manifest:
        lim = self.limits
        return unpack_bundle(
            archive,
            dest,
            max_bytes=lim.max_unpacked_bytes,
            max_files=lim.max_files,
            max_ratio=lim.max_ratio,
            max_member_bytes=lim.max_member_bytes,
            sha256=sha256,
        )


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
