"""A rolling upgrade of the machines cluster's workers, through the control plane on the system node, on the shared
`cluster` fixture (after test_zz1_control.py, which leaves both workers serving).

The second version is the cluster's own wheelhouse (what `provision` built and the workers installed at boot) with
its mbworker wheel retagged to a new number (tests/provision/rewheel.py): same code, new version. Pushed with
`cluster wheels push`, it is rolled out by `cluster upgrade` while a client sends a request every 50 ms through
the proxy's TLS: no request fails, and `cluster status` ends with every worker on the new version, ready.
A version the control plane does not hold is refused first, before any worker changes.

This file changes the cluster: it is left serving, on the new version.
"""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import trio

from mbworker.provision.wheels import read_wheelhouse
from tests.provision.local_cluster import run_cli
from tests.provision.rewheel import retag_wheel

from .conftest import Cluster
from .test_zz1_control import _anon, _control_ready, _nodes

pytestmark = pytest.mark.slow


def _second_wheelhouse(cluster: Cluster, into: Path) -> str:
    """The cluster's wheelhouse with mbworker retagged to a new version in `into`; that version."""
    house = read_wheelhouse(cluster.state_dir / "wheelhouse")
    new = house.version + ".post1" if "post" not in house.version else house.version + "1"
    for w in house.wheels:
        if w.name != "mbworker":
            shutil.copy2(house.directory / w.filename, into / w.filename)
        else:
            retag_wheel(house.directory / w.filename, new, into)
    return new


async def test_a_rolling_upgrade_under_load_loses_no_request_and_ends_on_the_new_version(cluster: Cluster) -> None:
    public, _ = await trio.to_thread.run_sync(_control_ready, cluster)
    spec = str(cluster.spec_path)
    before = await trio.to_thread.run_sync(_nodes, cluster)
    workers = cluster.names("worker")
    old = {before[w]["version"] for w in workers}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "upgraded").mkdir()
        (Path(tmp) / "upgraded" / "index.ts").write_text("Deno.serve(() => new Response('still here'));\n")
        code, out = await run_cli("deploy", str(Path(tmp) / "upgraded"), "--cluster", spec)
        assert code == 0, out

        # not held: refused before any worker is touched
        code, out = await run_cli("cluster", "upgrade", "--version", "999.0", "-c", spec)
        assert code != 0
        assert "holds no wheels for mbworker 999.0" in out, out
        after = await trio.to_thread.run_sync(_nodes, cluster)
        assert {w: (after[w]["version"], after[w]["state"]) for w in workers} == {
            w: (before[w]["version"], "ready") for w in workers
        }

        house = Path(tmp) / "wheels"
        house.mkdir()
        new = await trio.to_thread.run_sync(_second_wheelhouse, cluster, house)
        code, out = await run_cli("cluster", "wheels", "push", str(house), "-c", spec, timeout=600)
        assert code == 0, out

    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    auth = {"authorization": f"Bearer {_anon(cluster)}"}
    answers: list[str] = []
    stop_load = trio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(verify=tls, timeout=10, trust_env=False) as client:
            while not stop_load.is_set():
                try:
                    r = await client.get(f"https://{public}/functions/v1/upgraded", headers=auth)
                    answers.append(f"{r.status_code} {r.text[:60]}")
                except httpx.HTTPError as exc:
                    answers.append(repr(exc))
                with trio.move_on_after(0.05):
                    await stop_load.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        started = time.monotonic()
        code, out = await run_cli("cluster", "upgrade", "--version", new, "-c", spec, timeout=1200)
        seconds = time.monotonic() - started
        stop_load.set()
    assert code == 0, out
    failed = [a for a in answers if a != "200 still here"]
    assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:5]}"
    code, out = await run_cli("cluster", "status", "-c", spec, "-o", "json")
    assert code == 0, out
    nodes = {n["name"]: n for n in json.loads(out)}
    assert {w: (nodes[w]["version"], nodes[w]["state"]) for w in workers} == {w: (new, "ready") for w in workers}
    print(json.dumps({"upgrade_s": round(seconds, 1), "from": sorted(old), "to": new, "requests": len(answers)}))
