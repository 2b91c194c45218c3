"""Raw HTTP/1.1 over a real socket: for requests no client library will send (bad framing, odd hosts); and raw
bundles, for archives the CLI would refuse to build."""

from __future__ import annotations

import io
import tarfile

import trio


def tar_archive(members: dict[str, bytes], *, gzip: bool = False, symlinks: dict[str, str] | None = None) -> bytes:
    """A tar of `members` (name → content, written as given: `..` and absolute names included), plus `symlinks`
    (name → target); gzipped with `gzip`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") if gzip else tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return out.getvalue()


def gzip_bundle(members: dict[str, bytes]) -> bytes:
    """A .tar.gz of `members` (name → content) as the admin API's deploy takes it."""
    return tar_archive(members, gzip=True)


async def exchange(port: int, request: bytes, *, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Send `request` as is, read until the server closes or one response is complete; (status, head, body)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and _complete(head, body):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, head, body


def _complete(head: bytes, body: bytes) -> bool:
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return len(body) >= int(value.strip())
    return False
