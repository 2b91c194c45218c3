"""What `serve` finds in its data dir: one damaged file is set aside and the rest served; secrets stay private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx

from mbworker.worker.deployments.manifest import MANIFEST_NAME
from mbworker.worker.deployments.store import LocalDeploymentStore
from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.deployments.test_store import bundle
from tests.worker_process import run_worker


async def deployed(root: Path, slug: str) -> Path:
    """Deploy and activate `slug` the way a previous run of the node did; returns its version folder."""
    store = LocalDeploymentStore(root)
    dep = await store.put(slug, bundle(slug, body=slug))
    await store.activate(slug, dep.version)
    return root / slug / f"v{dep.version}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_corrupt_file_is_quarantined_and_the_rest_served(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    data = tmp_path / "data"
    root = data / "deployments"
    good = await deployed(root, "good")
    await deployed(root, "truncated")
    damaged = await deployed(root, "damaged")
    (root / "truncated" / "active.json").write_bytes(b'{"version": 1, "hist')  # a crash mid-write, a bad disk
    manifest = damaged / "bundle" / MANIFEST_NAME
    os.chmod(manifest, 0o600)
    manifest.write_bytes(manifest.read_bytes()[:40])
    # What an older release left behind: everything readable by others.
    os.chmod(data, 0o755)
    os.chmod(good / "bundle" / MANIFEST_NAME, 0o444)
    os.chmod(good / "bundle.tar.gz", 0o644)

    async with run_worker(data) as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
        answer = await http.get(f"{w.public_url}/functions/v1/good", headers=w.auth())
        assert answer.status_code == 200
        assert answer.text == "good"
        assert (await http.get(f"{w.public_url}/functions/v1/truncated", headers=w.auth())).status_code == 404

        ready = await http.get(f"{w.public_url}/ready")
        assert ready.status_code == 200
        assert {q["slug"] for q in ready.json()["quarantined"]} == {"truncated", "damaged"}

        listing = (await w.cli("functions", "list", check=True)).stdout.decode()
        assert "QUARANTINED" in listing
        assert "truncated" in listing
        assert "damaged" in listing
        await w.wait_for_output("quarantined")  # logged

        # The set-aside file is kept for the operator; a new deploy of the slug serves again.
        assert (root / "truncated" / "active.json.corrupt").exists()
        source = "Deno.serve(() => new Response('again'));\n"
        await w.deploy(write_function(tmp_path / "src", "truncated", source), "--no-verify-jwt")
        assert (await http.get(f"{w.public_url}/functions/v1/truncated")).text == "again"

    assert mode(data) == 0o700
    assert mode(good / "bundle" / MANIFEST_NAME) == 0o400
    assert mode(good / "bundle.tar.gz") == 0o600
    assert not mode(data / "secrets" / "keys.env") & 0o077
