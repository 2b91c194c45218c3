"""The unpacker against hostile archives: each is refused with a clear reason and nothing lands outside dest."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from mbworker.worker.deployments.archive import (
    ArchiveFile,
    BundleRejected,
    BundleTooLarge,
    Symlink,
    pack_files,
    sha256_hex,
    unpack_bundle,
)
from mbworker.worker.deployments.manifest import Manifest

MANIFEST = Manifest(slug="evil", runtime="deno", entrypoint="evil/index.ts")


def tar_gz(build: Callable[[tarfile.TarFile], None], *, manifest: Manifest | None = MANIFEST) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        if manifest is not None:
            add_file(tar, "mbworker.json", manifest.model_dump_json().encode())
            add_file(tar, manifest.entrypoint, b"Deno.serve(() => new Response('x'));\n")
        build(tar)
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A store-like folder; `dest` goes inside it, and its parent must stay untouched."""
    (tmp_path / "store").mkdir()
    return tmp_path


def everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(area: Path, data: bytes, match: str, *, status: int = 400, **limits: int | float) -> None:
    before = everything(area)
    dest = area / "store" / "v1"
    with pytest.raises(BundleRejected, match=match) as info:
        unpack_bundle(data, dest, **limits)  # type: ignore[arg-type]
    assert info.value.status == status
    assert not dest.exists()
    assert everything(area) == before  # no temp dir left, nothing written anywhere


def test_valid_bundle_unpacks(area: Path) -> None:
    data = tar_gz(lambda tar: add_file(tar, "evil/lib/a.ts", b"export const a = 1;\n"))
    manifest = unpack_bundle(data, area / "store" / "v1", sha256=sha256_hex(data))
    assert manifest == MANIFEST
    assert (area / "store" / "v1" / "evil" / "lib" / "a.ts").read_bytes() == b"export const a = 1;\n"
    assert everything(area / "store") == {
        "v1", "v1/mbworker.json", "v1/evil", "v1/evil/index.ts", "v1/evil/lib", "v1/evil/lib/a.ts",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/etc/passwd-mbworker", "unsafe path"),
        ("../escaped.ts", "unsafe path"),
        ("evil/../../escaped.ts", "unsafe path"),
        ("./evil/x.ts", "unsafe path"),
        ("evil\\..\\x.ts", "unsafe path"),
    ],
)
def test_escaping_paths(area: Path, name: str, match: str) -> None:
    assert_refused(area, tar_gz(lambda tar: add_file(tar, name, b"x")), match)
    assert not (area / "escaped.ts").exists()


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("evil/link", "/etc/passwd"),  # absolute
        ("evil/link", "../../etc"),  # climbs above the bundle
        ("evil/link", "../.."),
        ("link", "../x"),
        ("evil/link", "."),  # a link to its own folder lets a later `..` climb out
        ("evil/link", "a/../../.."),  # `..` after a name
        ("evil/link", "a//b"),
        ("evil/link", ""),
    ],
)
def test_symlinks_outside_or_unclear_are_refused(area: Path, name: str, target: str) -> None:
    data = tar_gz(lambda tar: add_special(tar, name, tarfile.SYMTYPE, target))
    assert_refused(area, data, "only relative links inside the bundle are allowed")


def test_symlink_then_write_through_it(area: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_special(tar, "evil/out", tarfile.SYMTYPE, str(area))
        add_file(tar, "evil/out/pwned.ts", b"x")

    assert_refused(area, tar_gz(build), "only relative links inside the bundle")
    assert not (area / "pwned.ts").exists()


def test_nothing_goes_under_a_link(area: Path) -> None:
    # each link is fine alone; a member under one would be written (or resolved) through it
    def build(tar: tarfile.TarFile) -> None:
        add_special(tar, "evil/up", tarfile.SYMTYPE, "../evil")
        add_file(tar, "evil/up/pwned.ts", b"x")

    assert_refused(area, tar_gz(build), "'evil/up/pwned.ts' is inside the link 'evil/up'")

    def chain(tar: tarfile.TarFile) -> None:
        add_special(tar, "evil/a", tarfile.SYMTYPE, "b")
        add_special(tar, "evil/a/c", tarfile.SYMTYPE, "../x")

    assert_refused(area, tar_gz(chain), "inside the link 'evil/a'")


def test_links_inside_the_bundle_unpack_as_links(area: Path) -> None:
    """A vendored node_modules in Deno's layout: each package once, linked where it is depended on."""
    pkg = "evil/node_modules/.deno/ms@2.1.3/node_modules/ms"
    files: dict[str, ArchiveFile] = {
        "evil/index.ts": b"export {};\n",
        f"{pkg}/index.js": b"module.exports = 1;\n",
        "evil/node_modules/ms": Symlink(".deno/ms@2.1.3/node_modules/ms"),
        "evil/node_modules/.deno/debug@2.6.9/node_modules/ms": Symlink("../../ms@2.1.3/node_modules/ms"),
    }
    packed = pack_files(files, MANIFEST)
    dest = area / "store" / "v1"
    unpack_bundle(packed.data, dest)
    top = dest / "evil" / "node_modules" / "ms"
    assert top.is_symlink()
    assert os.readlink(top) == ".deno/ms@2.1.3/node_modules/ms"
    assert (top / "index.js").read_bytes() == b"module.exports = 1;\n"
    nested = dest / "evil/node_modules/.deno/debug@2.6.9/node_modules/ms/index.js"
    assert nested.resolve() == (dest / pkg / "index.js").resolve()
    with pytest.raises(BundleRejected, match="only relative links inside the bundle"):
        pack_files({**files, "evil/x": Symlink("/etc")}, MANIFEST)


def test_hardlink(area: Path) -> None:
    data = tar_gz(lambda tar: add_special(tar, "evil/hard", tarfile.LNKTYPE, "evil/index.ts"))
    assert_refused(area, data, "hard links are not allowed: 'evil/hard'")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos(area: Path, kind: bytes) -> None:
    data = tar_gz(lambda tar: add_special(tar, "evil/dev", kind))
    assert_refused(area, data, "device files and fifos are not allowed: 'evil/dev'")


def test_duplicate_names(area: Path) -> None:
    data = tar_gz(lambda tar: add_file(tar, "evil/index.ts", b"second copy"))
    assert_refused(area, data, "duplicate name in archive: 'evil/index.ts'")


def test_file_folder_conflict(area: Path) -> None:
    data = tar_gz(lambda tar: add_file(tar, "evil/index.ts/inner.ts", b"x"))
    assert_refused(area, data, "path conflict")


def test_oversize_member(area: Path) -> None:
    data = tar_gz(lambda tar: add_file(tar, "evil/big.bin", b"a" * 5000))
    assert_refused(
        area, data, r"'evil/big.bin' is 5000 bytes, at most 4096 per file", status=413, max_member_bytes=4096
    )


def test_too_many_files(area: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for i in range(20):
            add_file(tar, f"evil/f{i}.ts", b"x")

    assert_refused(area, tar_gz(build), "more than 10 files", status=413, max_files=10)


def test_decompression_bomb_total_limit(area: Path) -> None:
    """100 MB of zeros that compresses to ~100 KB, against a 10 MB limit: stopped by the streaming counter."""

    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("evil/zeros.bin")
        info.size = 100 * 1024 * 1024
        tar.addfile(info, _Zeros(info.size))

    data = tar_gz(build)
    assert len(data) < 200_000
    # The per-file limit is out of the way: only the streaming counter can stop it.
    limits = {"max_bytes": 10 * 1024 * 1024, "max_ratio": 1e9, "max_member_bytes": 10**10}
    assert_refused(area, data, "unpacks to more than 10485760 bytes", status=413, **limits)


def test_decompression_bomb_ratio(area: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("evil/zeros.bin")
        info.size = 100 * 1024 * 1024
        tar.addfile(info, _Zeros(info.size))

    assert_refused(area, tar_gz(build), "compression ratio is over 100:1", status=413, max_ratio=100)


def test_lying_header_size_is_caught(area: Path) -> None:
    """A header claiming 10 bytes followed by a much longer stream: the decompressed total still counts."""
    raw = bytearray(tar_gz(lambda tar: None))
    raw_tar = bytearray(gzip.decompress(bytes(raw)))
    raw_tar.extend(b"\x00" * (4 * 1024 * 1024))  # trailing padding no header mentions
    assert_refused(area, _gzip(bytes(raw_tar)), "unpacks to more than", status=413, max_bytes=1024 * 1024)


def test_sha256_mismatch(area: Path) -> None:
    data = tar_gz(lambda tar: None)
    assert_refused(area, data, "sha256 mismatch", sha256="0" * 64)  # type: ignore[arg-type]


def test_not_gzip_and_truncated(area: Path) -> None:
    assert_refused(area, b"PK\x03\x04 this is a zip", "not valid gzip")
    data = tar_gz(lambda tar: add_file(tar, "evil/a.ts", b"x" * 10_000))
    assert_refused(area, data[: len(data) // 2], "truncated|not a valid tar")
    assert_refused(area, data + b"junk", "data after the end of the gzip stream")


def test_manifest_problems(area: Path) -> None:
    assert_refused(area, tar_gz(lambda tar: add_file(tar, "a.ts", b"x"), manifest=None), "bundle has no mbworker.json")

    def bad_manifest(tar: tarfile.TarFile) -> None:
        add_file(tar, "mbworker.json", json.dumps({"slug": "x", "runtime": "deno", "entrypoint": "../x.ts"}).encode())

    assert_refused(area, tar_gz(bad_manifest, manifest=None), "invalid mbworker.json: entrypoint")
    missing = Manifest(slug="evil", runtime="deno", entrypoint="evil/index.ts", import_map="evil/deno.json")
    data = pack_files({"evil/index.ts": b"x"}, missing)
    assert_refused(area, data.data, "import map 'evil/deno.json' is not in the bundle")
    data = pack_files({"evil/other.ts": b"x"}, MANIFEST)
    assert_refused(area, data.data, "entrypoint 'evil/index.ts' is not in the bundle")


def test_pack_refuses_reserved_and_unsafe_names() -> None:
    with pytest.raises(BundleRejected, match="reserved"):
        pack_files({"mbworker.json": b"{}", "evil/index.ts": b""}, MANIFEST)
    with pytest.raises(BundleRejected, match="not a clean relative path"):
        pack_files({"evil/../x.ts": b""}, MANIFEST)


def test_unpacked_files_are_read_only(area: Path) -> None:
    data = tar_gz(lambda tar: None)
    unpack_bundle(data, area / "store" / "v1")
    assert (area / "store" / "v1" / "evil" / "index.ts").stat().st_mode & 0o777 == 0o444


def test_bundle_too_large_is_a_413() -> None:
    assert BundleTooLarge("x").status == 413
    assert BundleRejected("x").status == 400


class _Zeros(io.RawIOBase):
    """`size` zero bytes without holding them in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_the_manifest_carries_only_the_limits_the_function_set(area: Path) -> None:
    """A worker one release older may not know a newer limit: a bundle that leaves it at the default still
    deploys there (a deploy in the middle of a rolling upgrade), and every worker reads an absent limit as its
    operator's default anyway."""
    files: dict[str, ArchiveFile] = {"evil/index.ts": b"export {};\n"}
    plain = unpack_manifest_json(pack_files(files, MANIFEST).data)
    assert plain["limits"] == {}
    assert plain["slug"] == "evil"
    tuned = MANIFEST.model_copy(update={"limits": MANIFEST.limits.model_copy(update={"memory_mb": 64})})
    packed = pack_files(files, tuned)
    assert unpack_manifest_json(packed.data)["limits"] == {"memory_mb": 64}
    assert unpack_bundle(packed.data, area / "store" / "v1") == tuned


def unpack_manifest_json(data: bytes) -> dict[str, object]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        member = tar.extractfile("mbworker.json")
        assert member is not None
        loaded: dict[str, object] = json.loads(member.read())
        return loaded
