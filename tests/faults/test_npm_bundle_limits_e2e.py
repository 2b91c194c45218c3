"""The bundle limits hold for bundles that ship npm packages (a node_modules folder with links): a bomb and a link
out of the bundle are refused by a real worker with a clear 4xx, nothing stored, no traceback. (The file-count
limit is the unpacker's, tested in tests/deployments/test_archive.py: 10,000 files written through a real worker
take minutes on a loaded CI host.)"""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import httpx

from mbworker.worker.deployments.archive import ArchiveFile, Symlink, pack_files
from mbworker.worker.deployments.manifest import Manifest
from tests.worker_process import RunningWorker

MANIFEST = Manifest(slug="pkgs", runtime="deno", entrypoint="pkgs/index.ts", deno_config="pkgs/deno.json")
PACKAGE = "pkgs/node_modules/.deno/big@1.0.0/node_modules/big"


def packaged(extra: dict[str, ArchiveFile]) -> bytes:
    files: dict[str, ArchiveFile] = {
        "pkgs/index.ts": b'import big from "npm:big@1.0.0";\nDeno.serve(() => new Response(big));\n',
        "pkgs/deno.json": json.dumps(
            {"nodeModulesDir": "auto", "lock": {"path": "./deno.lock", "frozen": True}}
        ).encode(),
        "pkgs/deno.lock": b'{"version": "5"}\n',
        "pkgs/node_modules/big": Symlink(".deno/big@1.0.0/node_modules/big"),
        f"{PACKAGE}/package.json": b'{"name": "big", "version": "1.0.0", "main": "index.js"}\n',
        **extra,
    }
    return pack_files(files, MANIFEST, max_bytes=1 << 30).data


def with_escaping_link() -> bytes:
    """A hostile client's archive (our packer refuses to make one): a valid bundle plus a link to /etc."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(packaged({})), mode="r:gz") as valid,
        gzip.GzipFile(fileobj=out, mode="wb") as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for member in valid:
            tar.addfile(member, valid.extractfile(member) if member.isreg() else None)
        link = tarfile.TarInfo("pkgs/node_modules/.deno/node_modules/x")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../../etc"
        tar.addfile(link)
    return out.getvalue()


async def test_npm_bundles_keep_the_limits(worker: RunningWorker, http: httpx.AsyncClient) -> None:
    admin = {"authorization": f"Bearer {worker.admin_token}", "content-type": "application/gzip"}
    url = f"{worker.admin_url}/admin/v1/functions/pkgs/deploy"
    cases = [
        # 16 MB of zeros in a package's data file: compresses ~1000:1, refused as it streams
        (packaged({f"{PACKAGE}/data.bin": bytes(16 * 2**20)}), 413, "compression ratio is over 200:1"),
        # a link that leaves the bundle, hidden among the packages
        (with_escaping_link(), 400, "only relative links inside the bundle"),
    ]
    for archive, status, reason in cases:
        r = await http.post(url, headers=admin, content=archive)
        assert r.status_code == status, r.text
        assert reason in r.text
    listed = await http.get(f"{worker.admin_url}/admin/v1/functions", headers=admin)
    assert "pkgs" not in listed.text
    assert not [line for line in worker.output if "Traceback" in line], "\n".join(worker.output[-40:])
