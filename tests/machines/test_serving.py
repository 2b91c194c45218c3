"""The machines cluster serves for real, seen from the host side of the public zone through the proxy's public
address only, over TLS verified with the cluster CA (`<state dir>/ca.pem`; that :80 only redirects is asserted
in test_pillars_serve.py), on the shared `cluster` fixture.

1. A function deployed from the host through the control plane (`mbworker deploy --cluster cluster.toml`: HTTPS
   to the system node's public address, verified with the cluster CA) answers 200 through the proxy, from both
   workers: the command returns once both serve it. Which worker answered is what HAProxy counts per server (its
   stats listener, inside the proxy machine).
2. Two stock realtime-js clients (wss through the proxy) that HAProxy sends to different workers see each other's
   presence and broadcasts: the workers share them through the state pillar's Redis.
"""

from __future__ import annotations

import csv
import io
import json
import ssl
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.node_driver import run_node_driver
from tests.provision.local_cluster import run_cli

from .conftest import Cluster

pytestmark = pytest.mark.slow

PROBE = "Deno.serve(() => Response.json({ ok: true }));\n"


def _sh(cluster: Cluster, node: str, script: str, input: str | None = None, timeout: float = 120.0) -> str:
    done = cluster.provider.exec(node, ["sh", "-c", script], input=input, timeout=timeout)
    return done.stdout + done.stderr


def _workers_stats(cluster: Cluster, proxy: str, *, backups: bool = False) -> dict[str, dict[str, str]]:
    """HAProxy's own rows for each worker of the `workers` backend (stats CSV on the proxy's loopback): the
    primaries, or the backups (each worker is both; the backups are used only while no primary is up)."""
    rows = csv.DictReader(io.StringIO(_sh(cluster, proxy, "curl -fsS 'http://127.0.0.1:7000/;csv'").lstrip("# ")))
    bck = "1" if backups else "0"
    return {r["svname"]: r for r in rows if r["pxname"] == "workers" and r["svname"] != "BACKEND" and r["bck"] == bck}


def _answered_2xx(cluster: Cluster, proxy: str) -> dict[str, int]:
    """2xx responses per worker, as HAProxy counts them: which worker answered."""
    return {name: int(row["hrsp_2xx"] or 0) for name, row in _workers_stats(cluster, proxy).items()}


def _wait_serving(cluster: Cluster, proxy: str) -> str:
    """Every machine has finished cloud-init and both workers are in the proxy's rotation (their /ready checks
    pass); the proxy's public address."""
    for name in cluster.names():
        status = cluster.wait_cloud_init(name)
        assert status == "status: done", name + status + _sh(cluster, name, "tail -n 30 /var/log/cloud-init-output.log")
    workers = cluster.names("worker")
    deadline = time.monotonic() + 180
    while True:
        stats = _workers_stats(cluster, proxy)
        if sorted(stats) == workers and all(row["status"] == "UP" for row in stats.values()):
            return str(cluster.server(proxy)["public_ip"])
        logs = [_sh(cluster, w, "journalctl -u mbworker -n 20 --no-pager") for w in workers]
        assert time.monotonic() < deadline, (stats, logs)
        time.sleep(2)


def test_a_function_deployed_to_the_cluster_answers_from_both_workers_through_the_proxy(cluster: Cluster) -> None:
    workers = cluster.names("worker")
    proxy = cluster.names("proxy")[0]
    public = _wait_serving(cluster, proxy)
    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    with httpx.Client(verify=tls, timeout=10, trust_env=False) as client:
        # 1: deploy from the host through the control plane
        with tempfile.TemporaryDirectory() as tmp:
            fn = Path(tmp) / "serving-probe"
            fn.mkdir()
            (fn / "index.ts").write_text(PROBE)
            code, out = trio.run(
                partial(run_cli, "deploy", str(fn), "--no-verify-jwt", "--cluster", str(cluster.spec_path), timeout=300)
            )
        assert code == 0, out
        assert "✓ serving-probe v1" in out, out
        assert "live on 2/2 workers" in out, out

        before = _answered_2xx(cluster, proxy)
        deadline = time.monotonic() + 120
        seen: list[tuple[int, str | None]] = []
        while True:
            r = client.get(f"https://{public}/functions/v1/serving-probe")
            seen.append((r.status_code, r.headers.get("x-mbworker-version")))
            after = _answered_2xx(cluster, proxy)
            if r.status_code == 200 and all(after.get(w, 0) > before.get(w, 0) for w in workers):
                break
            assert time.monotonic() < deadline, (seen[-10:], before, after)
            time.sleep(0.2)
        assert r.json() == {"ok": True}
        assert r.headers["x-mbworker-version"] == "1"
    print(json.dumps({"requests_until_both_workers_answered": len(seen), "per_worker_2xx": after}))


async def test_realtime_clients_on_different_workers_see_each_other_through_the_proxy(cluster: Cluster) -> None:
    proxy = cluster.names("proxy")[0]
    public = await trio.to_thread.run_sync(_wait_serving, cluster, proxy)
    anon = cluster.anon_key()
    env = {
        "RT_URL_A": f"wss://{public}/realtime/v1",
        "RT_URL_B": f"wss://{public}/realtime/v1",
        "RT_APIKEY": anon,
        "NODE_EXTRA_CA_CERTS": str(cluster.state_dir / "ca.pem"),
    }
    async with run_node_driver("cluster.mjs", env) as driver:
        events = driver.events
        both = ["alice", "bob"]
        await events.wait(lambda e: e.get("on") == "alice" and e.get("presence") == both, 60)
        await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == both, 60)
        # leastconn: the second WebSocket goes to the worker that holds none; HAProxy says where each one is
        stats = await trio.to_thread.run_sync(_workers_stats, cluster, proxy)
        assert [int(row["scur"]) for row in stats.values()] == [1, 1], stats
        await driver.send(go=True)
        await events.wait(lambda e: e.get("on") == "bob" and e.get("broadcast") == {"from": "alice"}, 20)
        await events.wait(lambda e: e.get("on") == "alice" and e.get("broadcast") == {"from": "bob"}, 20)
