"""`LocalCopies`: this node's unpacked copies of function versions, for the Redis deployment store.

Owner: one `RedisDeploymentStore` owns one `LocalCopies` and its `root` (one node, one process: never share
`root`). Every method here is blocking file I/O: call it through `trio.to_thread.run_sync`.

Layout under `root`:

    <slug>/v<N>/bundle/     the unpacked files (read-only for runtimes)
    <slug>/v<N>/sha256      hex sha256 of the archive the files came from (written last: marks a complete copy)
    <slug>/.incoming-*/     unpacks in progress (renamed to v<N> when complete)
    <slug>/.stale-*/        replaced copies on their way out

A copy is only trusted if its `sha256` matches the version's digest in Redis, so a copy made under a number
that Redis later reused (data loss) is replaced, never served.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from mbworker.worker.deployments.archive import BundleRejected, sha256_hex, unpack_bundle
from mbworker.worker.deployments.manifest import MANIFEST_NAME, SLUG_RE, Manifest
from mbworker.worker.deployments.store import StoreError, UnpackLimits


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

    def install(self, slug: str, version: int, incoming: Path, digest: str) -> None:
        """Move an unpacked `incoming` folder into place as v<N>, replacing any previous copy."""
        (incoming / "sha256").write_text(digest)
        vdir = self.version_dir(slug, version)
        if vdir.exists():
            stale = vdir.with_name(f".stale-{vdir.name}-{secrets.token_hex(4)}")
            os.rename(vdir, stale)
            rmtree(stale)
        os.rename(incoming, vdir)

    def install_archive(self, slug: str, version: int, archive: bytes, sha256: str) -> None:
        """Unpack a fetched archive as v<N> after checking it against `sha256` (`BundleRejected` if not)."""
        incoming = self._new_incoming(slug)
        try:
            self._unpack(archive, incoming / "bundle", sha256=sha256)
            self.install(slug, version, incoming, sha256)
        finally:
            rmtree(incoming)

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
