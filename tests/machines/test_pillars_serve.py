"""Workers, proxy and system pillars booted on the shared machines cluster: workers install the operator's wheels
from the system node and run mbworker against the state pillar's Sentinels; the proxy terminates TLS with the
cluster CA (its certificate in the state dir), redirects :80 and routes to the workers; VictoriaMetrics scrapes
every worker's mbworker /metrics with the admin token. Clients reach only the proxy's public address.
"""

from __future__ import annotations

import json
import ssl
import time

import httpx
import pytest

from mbworker.provision import desired as d

from .conftest import Cluster


@pytest.mark.slow
def test_workers_install_shipped_wheels_and_serve_behind_the_proxy(cluster: Cluster) -> None:
    provider = cluster.provider
    spec = cluster.spec
    workers = [d.server_name(spec.name, "worker", i) for i in range(1, spec.worker.count + 1)]
    proxy = d.server_name(spec.name, "proxy", 1)
    system = d.server_name(spec.name, "system", 0)

    def sh(node: str, script: str) -> str:
        done = provider.exec(node, ["sh", "-c", script], timeout=60)
        return done.stdout + done.stderr

    states = [d.server_name(spec.name, "state", i) for i in range(1, spec.state.count + 1)]
    for name in [*states, system, *workers, proxy]:
        status = cluster.wait_cloud_init(name)
        assert status == "status: done", name + status + sh(name, "tail -n 30 /var/log/cloud-init-output.log")
    # a worker that came up before the state pillar keeps restarting until the Sentinels answer, then serves
    for name in workers:
        assert "--require-hashes" in sh(name, "cat /usr/local/sbin/mbworker-install")
        deadline = time.monotonic() + 120
        ready = f"curl -sS http://{d.worker_ip(spec, workers.index(name) + 1)}:{spec.daemon.port}/ready"
        while '"ready": true' not in sh(name, ready):
            assert time.monotonic() < deadline, sh(name, "journalctl -u mbworker -n 30 --no-pager")
            time.sleep(2)

    public = str(cluster.server(proxy)["public_ip"])
    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    with httpx.Client(verify=tls, timeout=10) as client:
        # the workers join the proxy's rotation once their /ready checks pass: wait for that, bounded
        deadline = time.monotonic() + 60
        while True:
            r = client.get(f"https://{public}/functions/v1/no-such-function")
            if r.status_code == 404 and r.json().get("code") == "NOT_FOUND":  # the worker's answer, not HAProxy's
                break
            assert time.monotonic() < deadline, (r.status_code, r.text)
            time.sleep(1)
        assert client.get(f"https://{public}/elsewhere").json() == {"code": "not_found", "message": "no route"}
        plain = client.get(f"http://{public}/functions/v1/x")
        assert plain.status_code == 301
        assert plain.headers["location"] == f"https://{public}/functions/v1/x"

    # VictoriaMetrics scrapes mbworker's /metrics (admin listener, 401 without the token) on every worker
    deadline = time.monotonic() + 90
    while True:
        targets = json.loads(sh(system, f"curl -fsS http://{d.system_ip(spec)}:8428/api/v1/targets"))
        up = {t["scrapeUrl"] for t in targets["data"]["activeTargets"] if t["health"] == "up"}
        want = {f"http://{d.worker_ip(spec, i)}:{spec.daemon.admin_port}/metrics" for i in range(1, len(workers) + 1)}
        if want <= up:
            break
        assert time.monotonic() < deadline, targets
        time.sleep(3)
    print("ready after:", {n: round(cluster.ready_seconds.get(n, -1)) for n in [system, *workers, proxy]})
