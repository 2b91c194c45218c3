"""The control plane's wheels, per mbworker version: what a rolling upgrade installs on the workers.

    <wheels dir>/<version>/*.whl   the mbworker wheel of that version and the wheels of its dependencies

An operator pushes a wheelhouse (`mbworker cluster wheels push`: a tar of `*.whl`, the one `provision` builds);
it is unpacked beside the store, checked (plain wheel files only, exactly one mbworker wheel, of the version named)
and moved in whole, so a version is either held completely or not at all. Workers read the list of a version's
files with their sha256 (`manifest`) and the files themselves; their upgrade helper installs them with
`pip --no-index --require-hashes` against exactly these hashes.

Owner: `WheelStore` owns its directory. Blocking file work runs in threads.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import trio

from mbworker.control.errors import ControlError, NotFound
from mbworker.worker.upgrade_request import VERSION

PROJECT = "mbworker"
WHEEL_FILE = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")
MAX_WHEELS = 200
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
MAX_DIGESTS = 4 * MAX_WHEELS


@dataclass(frozen=True)
class HeldWheel:
    filename: str
    sha256: str
    size: int


def check_version(version: str) -> str:
    if not VERSION.match(version):
        raise ControlError(f"version {version!r} must match {VERSION.pattern}", code="INVALID_VERSION")
    return version


def _project_version(filename: str) -> tuple[str, str]:
    name, _, rest = filename.partition("-")
    return name.lower().replace("_", "-"), rest.partition("-")[0]


class WheelStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._digests: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) → sha256

    def _dir(self, version: str) -> Path:
        return self.directory / check_version(version)

    async def versions(self) -> list[dict[str, object]]:
        return await trio.to_thread.run_sync(self._versions)

    def _versions(self) -> list[dict[str, object]]:
        if not self.directory.is_dir():
            return []
        out: list[dict[str, object]] = []
        for d in sorted(p for p in self.directory.iterdir() if p.is_dir() and VERSION.match(p.name)):
            files = sorted(d.glob("*.whl"))
            out.append({"version": d.name, "wheels": len(files), "bytes": sum(f.stat().st_size for f in files)})
        return out

    async def manifest(self, version: str) -> list[HeldWheel]:
        """Every wheel of `version` with its sha256; `NotFound` (saying which versions are held) if none."""
        return await trio.to_thread.run_sync(self._manifest, version)

    def _manifest(self, version: str) -> list[HeldWheel]:
        d = self._dir(version)
        if not d.is_dir():
            held = ", ".join(str(v["version"]) for v in self._versions()) or "none"
            raise NotFound(
                f"the control plane holds no wheels for mbworker {version} (held: {held}); "
                "push them with `mbworker cluster wheels push`",
                code="NO_SUCH_WHEELS",
            )
        return [self._held(f) for f in sorted(d.glob("*.whl"))]

    def _held(self, f: Path) -> HeldWheel:
        """A wheel with its sha256, hashed once per file: every node's helper asks for the manifest (node token),
        and a version's files never change in place (a push replaces the directory: new inodes)."""
        st = f.stat()
        key = (str(f), st.st_ino, st.st_size, st.st_mtime_ns)
        digest = self._digests.get(key)
        if digest is None:
            if len(self._digests) >= MAX_DIGESTS:
                self._digests.clear()  # versions come and go: what is asked again is hashed again
            digest = self._digests[key] = hashlib.sha256(f.read_bytes()).hexdigest()
        return HeldWheel(f.name, digest, st.st_size)

    async def read(self, version: str, filename: str) -> bytes:
        if not WHEEL_FILE.match(filename):
            raise NotFound(f"no wheel {filename!r}")
        path = self._dir(version) / filename

        def read() -> bytes:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise NotFound(f"no wheel {filename} for mbworker {version}") from None

        return await trio.to_thread.run_sync(read)

    async def put(self, version: str, archive: bytes) -> list[HeldWheel]:
        """Hold the wheels in `archive` (a tar of `*.whl`) as `version`, replacing what was held for it."""
        check_version(version)
        return await trio.to_thread.run_sync(self._put, version, archive)

    def _put(self, version: str, archive: bytes) -> list[HeldWheel]:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".push-", dir=self.directory) as tmp:
            staged = Path(tmp) / version
            staged.mkdir()
            try:
                with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
                    members = tar.getmembers()
                    if len(members) > MAX_WHEELS:
                        raise ControlError(f"at most {MAX_WHEELS} wheels in one push")
                    for m in members:
                        # plain files named *.whl at the top level: nothing else is unpacked (no links, no paths)
                        if not m.isfile() or not WHEEL_FILE.match(m.name):
                            raise ControlError(f"{m.name!r}: a push holds only wheel files (*.whl) at its top level")
                    # a compressed push is read whole as it unpacks: its declared sizes bound what that costs
                    if sum(m.size for m in members) > MAX_UNPACKED_BYTES:
                        raise ControlError(f"the wheels unpack to more than {MAX_UNPACKED_BYTES} bytes")
                    for m in members:
                        src = tar.extractfile(m)
                        assert src is not None  # a regular file
                        (staged / m.name).write_bytes(src.read())
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:  # a truncated or corrupt stream
                raise ControlError(f"not a tar of wheels: {exc or type(exc).__name__}") from None
            own = [f.name for f in staged.glob("*.whl") if _project_version(f.name)[0] == PROJECT]
            if len(own) != 1:
                raise ControlError(f"a push holds exactly one {PROJECT} wheel (found {len(own)})")
            if _project_version(own[0])[1] != version:
                raise ControlError(f"{own[0]} is not mbworker {version}", code="VERSION_MISMATCH")
            final = self.directory / version
            old = Path(tmp) / "replaced"
            if final.exists():
                final.rename(old)
            staged.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        return self._manifest(version)
