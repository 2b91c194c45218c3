"""The bundle archive: a deterministic tar.gz with `mbworker.json` first, and its defensive unpacker.

Why tar.gz and not zip: one gzip stream over the whole archive lets the unpacker count every decompressed byte
as it streams (headers and padding included), so a bomb is caught by one counter however the member headers
lie; zip's central directory repeats sizes that can disagree with the local headers and invites overlapping-
entry bombs. tar.gz also compresses across files (many small sources), is in the standard library on both
sides, and with mtime/owner zeroed it is byte-for-byte reproducible, so the same sources give the same sha256.

Symlinks: a vendored node_modules (Deno's layout: each package once, linked where it is depended on) needs them.
Only relative links that stay inside the bundle by construction are taken (see `check_symlink`); they are created
after every regular file is written, so no write ever goes through one, and each is checked once more on disk.

`pack_files` runs on the deploying machine; `unpack_bundle` runs on the worker (in a thread: it is blocking
and CPU-bound) and owns nothing after it returns: the unpacked directory belongs to whoever passed `dest`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from mbworker.worker.deployments.manifest import MANIFEST_NAME, Manifest, check_relative_path

DEFAULT_MAX_ARCHIVE_BYTES = 20 * 1024 * 1024
"""Supabase's "function size after bundling" limit, applied to the compressed archive."""
DEFAULT_MAX_UNPACKED_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_RATIO = 200.0
RATIO_FLOOR_BYTES = 1024 * 1024
"""The ratio check starts past this many decompressed bytes: a tiny tar is mostly zero padding."""
MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 64 * 1024


class BundleRejected(Exception):
    """The archive is unacceptable. `status` is the admin API's answer (400 malformed/unsafe, 413 too large)."""

    status: int = 400

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.reason = reason
        if status is not None:
            self.status = status
        super().__init__(reason)


class BundleTooLarge(BundleRejected):
    """Over a size, file-count or compression-ratio limit."""

    status = 413


@dataclass(frozen=True, slots=True)
class Symlink:
    """An archive member that is a symbolic link to `target` (relative, inside the bundle: `check_symlink`)."""

    target: str


ArchiveFile = Path | bytes | Symlink
"""What a member is made from: a file to read, its contents, or a link."""


def check_symlink(name: str, target: str) -> str:
    """`target` if a link at archive path `name` may point there, else ValueError.

    The rule keeps every link inside the bundle without looking at the disk: a relative target made of leading
    `..` (no more of them than `name` has folders above it) then plain names, never `.`/`..` after a name. With
    links never nested under other links (checked on the whole archive), resolving one can't climb out.
    """
    if not target or target.startswith("/") or "\\" in target or "\x00" in target:
        raise ValueError(f"link {name!r} → {target!r}: only relative links inside the bundle are allowed")
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if not rest or any(p in ("", ".", "..") for p in rest) or ups > name.count("/"):
        raise ValueError(f"link {name!r} → {target!r}: only relative links inside the bundle are allowed")
    return target


@dataclass(frozen=True, slots=True)
class PackedBundle:
    """An archive ready to upload."""

    data: bytes
    sha256: str
    """Hex sha256 of `data`; the worker verifies it."""
    files: tuple[str, ...]
    """Archive paths of the function's files (the manifest excluded), sorted."""

    @property
    def size(self) -> int:
        return len(self.data)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_files(
    files: Mapping[str, ArchiveFile], manifest: Manifest, *, max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
) -> PackedBundle:
    """A reproducible tar.gz of `files` (archive path → source file, contents or link) plus `mbworker.json`.

    Raises `BundleTooLarge` when the archive exceeds `max_bytes` and `BundleRejected` for a bad archive path.
    """
    names = sorted(files)
    for name in names:
        if name == MANIFEST_NAME:
            raise BundleRejected(f"{MANIFEST_NAME} is reserved for the bundle manifest; rename that file")
        try:
            check_relative_path(name)
            src = files[name]
            if isinstance(src, Symlink):
                check_symlink(name, src.target)
        except ValueError as exc:
            raise BundleRejected(str(exc)) from exc
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs.
    with (
        gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add(tar, MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
        for name in names:
            src = files[name]
            if isinstance(src, Symlink):
                _add_link(tar, name, src.target)
            else:
                _add(tar, name, src if isinstance(src, bytes) else src.read_bytes())
            if buf.tell() > max_bytes:
                break  # already too big: stop compressing, the check below reports it
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise BundleTooLarge(
            f"bundle is over the size limit: {len(data) / 1e6:.1f} MB compressed, at most {max_bytes / 1e6:.1f} MB"
        )
    return PackedBundle(data=data, sha256=sha256_hex(data), files=tuple(names))


def _add(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(content))


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info)


class _Inflater(io.RawIOBase):
    """A gzip stream over `data` that counts decompressed bytes and stops at the limits (bomb guard)."""

    def __init__(self, data: bytes, *, max_bytes: int, max_ratio: float) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self.total = 0
        self._max_bytes = max_bytes
        self._max_ratio = max_ratio
        self._compressed = max(len(data), 1)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(b)
        out = self._read(want)
        b[: len(out)] = out
        return len(out)

    def _read(self, n: int) -> bytes:
        while not self._pending:
            if self._z.eof:
                return b""
            if self._z.unconsumed_tail:
                chunk = self._z.unconsumed_tail
            elif self._pos < len(self._data):
                chunk = bytes(self._data[self._pos : self._pos + _CHUNK])
                self._pos += len(chunk)
            else:
                raise BundleRejected("archive is truncated (gzip stream ends early)")
            try:
                # max_length bounds what one call can inflate, so memory stays flat even for a bomb.
                self._pending = self._z.decompress(chunk, _CHUNK)
            except zlib.error as exc:
                raise BundleRejected(f"archive is not valid gzip: {exc}") from exc
            self._count(len(self._pending))
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def _count(self, n: int) -> None:
        self.total += n
        if self.total > self._max_bytes:
            raise BundleTooLarge(f"bundle unpacks to more than {self._max_bytes} bytes")
        if self.total > RATIO_FLOOR_BYTES and self.total / self._compressed > self._max_ratio:
            raise BundleTooLarge(f"bundle compression ratio is over {self._max_ratio:g}:1 (a decompression bomb?)")

    def finish(self) -> None:
        """Check that the gzip stream ended cleanly with nothing after it."""
        while not self._z.eof:
            if not self._read(_CHUNK):
                break
        if self._z.unused_data or self._pos < len(self._data):
            raise BundleRejected("archive has data after the end of the gzip stream")


def unpack_bundle(
    data: bytes,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_member_bytes: int | None = None,
    max_archive_bytes: int | None = None,
    sha256: str | None = None,
) -> Manifest:
    """Unpack a bundle into `dest` (which must not exist) and return its validated manifest. Blocking.

    Refuses (with `BundleRejected`, nothing left behind): a sha256 mismatch, absolute or `..` paths, symlinks
    other than `check_symlink` allows (or under another link, or resolving outside `dest` on disk), hard links,
    devices, fifos, duplicate names, members over `max_member_bytes`, more than `max_files` members, more than
    `max_bytes` decompressed (counted while streaming, headers included) or a compression ratio over `max_ratio`,
    and a missing or invalid manifest. Files land in a temp dir beside `dest` and are renamed into
    place at the end, so `dest` either appears complete or not at all. The caller owns `dest` afterwards.
    """
    if max_archive_bytes is not None and len(data) > max_archive_bytes:
        raise BundleTooLarge(f"archive is {len(data)} bytes, at most {max_archive_bytes}")
    if sha256 is not None and sha256_hex(data).lower() != sha256.strip().lower():
        raise BundleRejected("sha256 mismatch: the archive is not the one that was announced (corrupt upload?)")
    if dest.exists():
        raise FileExistsError(dest)
    member_limit = max_bytes if max_member_bytes is None else max_member_bytes
    tmp = dest.parent / f".unpack-{dest.name}-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    try:
        manifest = _unpack_into(data, tmp, max_bytes, max_files, max_ratio, member_limit)
        _fsync_dir(tmp)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unpack_into(
    data: bytes, root: Path, max_bytes: int, max_files: int, max_ratio: float, member_limit: int
) -> Manifest:
    inflater = _Inflater(data, max_bytes=max_bytes, max_ratio=max_ratio)
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    links: dict[str, str] = {}
    manifest_bytes: bytes | None = None
    count = 0
    try:
        with tarfile.open(fileobj=inflater, mode="r|") as tar:
            for member in tar:
                count += 1
                if count > max_files:
                    raise BundleTooLarge(f"bundle has more than {max_files} files")
                name = member.name.rstrip("/") if member.isdir() else member.name
                try:
                    check_relative_path(name)
                except ValueError as exc:
                    raise BundleRejected(f"unsafe path in archive: {exc}") from exc
                if name in seen_files or name in seen_dirs or name in links:
                    raise BundleRejected(f"duplicate name in archive: {name!r}")
                if member.issym():
                    try:
                        links[name] = check_symlink(name, member.linkname)
                    except ValueError as exc:
                        raise BundleRejected(str(exc)) from exc
                    continue  # made once every regular file is written: no write ever goes through a link
                if member.islnk():
                    raise BundleRejected(f"hard links are not allowed: {name!r}")
                if member.ischr() or member.isblk() or member.isfifo():
                    raise BundleRejected(f"device files and fifos are not allowed: {name!r}")
                if member.isdir():
                    seen_dirs.add(name)
                    _mkdirs(root, name)
                    continue
                if not member.isreg() or member.issparse():
                    raise BundleRejected(f"unsupported archive member type for {name!r}")
                if member.size > member_limit:
                    raise BundleTooLarge(f"{name!r} is {member.size} bytes, at most {member_limit} per file")
                seen_files.add(name)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have a file object
                    raise BundleRejected(f"can't read {name!r}")
                content = _write_member(root, name, src, member_limit)
                if name == MANIFEST_NAME:
                    manifest_bytes = content
        inflater.finish()
    except (tarfile.TarError, EOFError) as exc:
        raise BundleRejected(f"archive is not a valid tar.gz: {exc}") from exc
    if links:
        _make_links(root, links, seen_files | seen_dirs)
    if manifest_bytes is None:
        raise BundleRejected(f"bundle has no {MANIFEST_NAME}")
    try:
        manifest = Manifest.model_validate(json.loads(manifest_bytes))
    except RecursionError:  # JSON nested past Python's recursion limit
        raise BundleRejected(f"invalid {MANIFEST_NAME}: nested too deeply") from None
    except (ValueError, ValidationError) as exc:
        raise BundleRejected(f"invalid {MANIFEST_NAME}: {_short(exc)}") from exc
    if manifest.entrypoint not in seen_files:
        raise BundleRejected(f"entrypoint {manifest.entrypoint!r} is not in the bundle")
    if manifest.import_map is not None and manifest.import_map not in seen_files:
        raise BundleRejected(f"import map {manifest.import_map!r} is not in the bundle")
    if manifest.deno_config is not None and manifest.deno_config not in seen_files:
        raise BundleRejected(f"Deno config {manifest.deno_config!r} is not in the bundle")
    return manifest


def _make_links(root: Path, links: Mapping[str, str], others: set[str]) -> None:
    """Create `links` (name → target) under `root`; none may sit under another link, nor resolve outside root."""
    for name in sorted({*others, *links}):
        parent = name
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in links:
                raise BundleRejected(f"{name!r} is inside the link {parent!r}: links may not hold other members")
    real_root = root.resolve()
    for name, target in links.items():
        parent, _, base = name.rpartition("/")
        folder = _mkdirs(root, parent) if parent else root
        try:
            os.symlink(target, folder / base)
        except FileExistsError as exc:
            raise BundleRejected(f"path conflict in archive: {name!r}") from exc
    for name in links:  # defence in depth: the rule above already keeps them inside
        resolved = Path(os.path.realpath(root.joinpath(*name.split("/"))))
        if not resolved.is_relative_to(real_root):  # pragma: no cover
            raise BundleRejected(f"link {name!r} resolves outside the bundle")


def _mkdirs(root: Path, rel: str) -> Path:
    path = root.joinpath(*rel.split("/"))
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise BundleRejected(f"path conflict in archive: {rel!r} is both a file and a folder") from exc
    return path


def _write_member(root: Path, name: str, src: IO[bytes], limit: int) -> bytes | None:
    """Copy one member; keeps the bytes only for the manifest."""
    parent, _, base = name.rpartition("/")
    folder = _mkdirs(root, parent) if parent else root
    # Defence in depth: we never create symlinks, but make sure the target still resolves inside root.
    if not folder.resolve().is_relative_to(root.resolve()):  # pragma: no cover
        raise BundleRejected(f"unsafe path in archive: {name!r}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(folder / base, flags, 0o644)
    except (FileExistsError, IsADirectoryError) as exc:
        raise BundleRejected(f"path conflict in archive: {name!r}") from exc
    keep = name == MANIFEST_NAME
    kept: list[bytes] = []
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise BundleTooLarge(f"{name!r} is over {limit} bytes")
            if keep:
                if written > MAX_MANIFEST_BYTES:
                    raise BundleRejected(f"{MANIFEST_NAME} is over {MAX_MANIFEST_BYTES} bytes")
                kept.append(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    # Immutable version: nobody (the function included) rewrites its sources; the manifest holds the function's
    # env (secrets): owner-only.
    os.chmod(folder / base, 0o400 if keep else 0o444)
    return b"".join(kept) if keep else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
    return str(exc)
