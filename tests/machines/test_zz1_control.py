"""The control plane on the system node, on the shared `cluster` fixture, from the host side of the public zone:
its HTTPS on the system node's public address, verified with the cluster CA, found by the CLI from the spec
(`--cluster cluster.toml`: URL, token and CA in the state dir).

1. `cluster status -o json` lists every node of the cluster's layout with its role: the workers, the proxy and
   the system node (by their reports, with their mbworker versions; the proxy its HAProxy's), the state nodes
   (probed: node-exporter and Patroni's health, PostgreSQL's version) and the NAT node (node-exporter), all
   ready. VictoriaMetrics on the system node scrapes the targets the control plane lists (http_sd): every node's
   node-exporter and both workers' mbworker metrics, all up.
2. A wrong token gets 401; a source outside `control_allow` (the namespace's own public address) never connects,
   while the host (inside it) does.
3. A session revoked through the control plane: the realtime channel joined with its token (through the proxy)
   gets `system` + `phx_close` within 1 s of the command returning, and every worker answers its token 401.
4. A worker machine stopped while a client sends a request every 50 ms through the proxy: the status shows it down
   within 20 s of the machine being off, it leaves the upstreams (control plane and the proxy's list), and every
   request answers 200; started again, it comes back into the upstreams. This file changes the cluster and leaves
   it as it found it (both workers serving).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from websockets.trio.client import connect

from mbworker.cli.control_client import ControlClient
from mbworker.control.endpoint import read_endpoint
from mbworker.provision import desired as d
from mbworker.provision.wheels import read_wheelhouse
from mbworker.worker.errors import AdminApiError
from tests.provision.local_cluster import run_cli
from tests.realtime.helpers import Phx

from .conftest import Cluster
from .test_serving import _sh, _wait_serving, _workers_stats

pytestmark = pytest.mark.slow

GUARDED = "Deno.serve(() => Response.json({ guarded: true }));\n"
REVOKED = "InvalidJWTToken: Session has been revoked"
#: How long a stopped worker may stay listed as up once its machine is off (the issue's bound).
DOWN_WITHIN_S = 20.0


def _client(cluster: Cluster, token: str | None = None) -> ControlClient:
    endpoint = read_endpoint(cluster.state_dir)
    if token is not None:
        endpoint = dataclasses.replace(endpoint, token=token)
    return ControlClient.connect(endpoint, timeout=30)


def _nodes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    with _client(cluster) as client:
        return {n["name"]: n for n in client.nodes()}


def _upstreams(cluster: Cluster) -> list[str]:
    with _client(cluster) as client:
        return sorted(u["name"] for u in client.upstreams())


def _proxy_list(cluster: Cluster, proxy: str) -> list[str]:
    """The workers the proxy's HAProxy is configured with (its pulled list)."""
    lines = _sh(cluster, proxy, "cat /etc/mbgateway/workers").splitlines()
    return sorted(line.split()[0] for line in lines if line.strip() and not line.startswith("#"))


_BOOTED: set[int] = set()
"""The clusters seen fully booted by this module (every machine's boot is checked once, it is slow to ask)."""


def _control_ready(cluster: Cluster) -> tuple[str, str]:
    """Every machine booted and both workers serving through the proxy and listed by the control plane: the
    proxy's public address and the proxy's name."""
    proxy = cluster.names("proxy")[0]
    public = str(cluster.server(proxy)["public_ip"])
    if id(cluster) not in _BOOTED:
        _wait_serving(cluster, proxy)
        _BOOTED.add(id(cluster))
    workers = cluster.names("worker")
    deadline = time.monotonic() + 120
    while _upstreams(cluster) != workers:
        assert time.monotonic() < deadline, _nodes(cluster)
        time.sleep(0.5)
    return public, proxy


def _anon(cluster: Cluster, **claims: Any) -> str:
    secret = json.loads((cluster.state_dir / "secrets.json").read_text())["jwt_secret"]
    body = {"role": "anon", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def _status(cluster: Cluster) -> dict[str, dict[str, Any]]:
    code, out = trio.run(run_cli, "cluster", "status", "-c", str(cluster.spec_path), "-o", "json")
    assert code == 0, out
    return {n["name"]: n for n in json.loads(out)}


def test_cluster_status_lists_every_node_with_its_role_and_version(cluster: Cluster) -> None:
    _control_ready(cluster)
    version = read_wheelhouse(cluster.state_dir / "wheelhouse").version
    # the probed nodes (state, NAT) are seen within a probe round (5 s) of the control plane reading the layout
    deadline = time.monotonic() + 60
    while True:
        nodes = _status(cluster)
        if all(n["state"] == "ready" for n in nodes.values()):
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(1)
    roles = ("system", "proxy", "worker", "state", "nat")
    assert {name: n["role"] for name, n in nodes.items()} == {n: r for r in roles for n in cluster.names(r)}
    for name, n in nodes.items():
        assert n["private_ip"] == cluster.server(name)["private_ip"], n
        assert n["reports"] == ("probe" if n["role"] in ("state", "nat") else "heartbeat"), n
        if n["role"] == "proxy":
            assert n["version"].startswith("haproxy-"), n
        elif n["role"] == "state":
            assert n["version"].startswith("postgresql-15."), n
        elif n["role"] == "nat":
            assert n["version"] == "-", n
        else:
            assert n["version"] == version, n
    print(json.dumps({"system_node_ready_s": cluster.ready_seconds.get(cluster.names("system")[0])}))


def test_victoria_metrics_scrapes_every_node_at_the_targets_the_control_plane_lists(cluster: Cluster) -> None:
    _control_ready(cluster)
    system = cluster.names("system")[0]
    system_ip = d.system_ip(cluster.spec)
    sd_url = f"http://{system_ip}:{d.CONTROL_PORT}/control/v1/scrape-targets"
    want = {(n, "nodes") for n in cluster.names()} | {(n, "mbworker") for n in cluster.names("worker")}
    # VictoriaMetrics asks the control plane every 15 s and scrapes every 15 s: each target is up within a minute
    started = time.monotonic()
    while True:
        answer = json.loads(_sh(cluster, system, f"curl -fsS http://{system_ip}:8428/api/v1/targets"))
        targets = answer["data"]["activeTargets"]
        up = {(t["labels"]["node"], t["labels"]["job"]) for t in targets if t["health"] == "up"}
        if want <= up:
            break
        assert time.monotonic() - started < 120, [(t["labels"], t["health"], t["lastError"]) for t in targets]
        time.sleep(2)
    # discovered through the control plane (http_sd), not a file
    assert {t["discoveredLabels"].get("__meta_url") for t in targets} == {sd_url}
    print(json.dumps({"vm_targets_up_s": round(time.monotonic() - started, 1), "targets": len(targets)}))


def test_a_wrong_token_is_refused_and_a_source_outside_control_allow_never_connects(cluster: Cluster) -> None:
    _control_ready(cluster)
    with pytest.raises(AdminApiError) as refused, _client(cluster, token="x" * 64) as client:
        client.nodes()
    assert refused.value.status == 401
    system = str(cluster.server(cluster.names("system")[0])["public_ip"])
    # the host's veth address is in control_allow: it connects
    with socket.create_connection((system, 443), timeout=5):
        pass
    # the namespace's own public address (198.18.<slot>.1) is not: the cloud firewall drops it, nothing answers
    probe = f"import socket\nsocket.create_connection(({system!r}, 443), timeout=3)\n"
    done = cluster.in_ns("python3", "-c", probe)
    assert done.returncode != 0, done.stdout
    assert "timed out" in done.stderr, done.stderr


async def test_a_session_revoked_through_the_control_plane_is_refused_on_every_worker(cluster: Cluster) -> None:
    public, _ = await trio.to_thread.run_sync(_control_ready, cluster)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "guarded").mkdir()
        (Path(tmp) / "guarded" / "index.ts").write_text(GUARDED)
        code, out = await run_cli("deploy", str(Path(tmp) / "guarded"), "--cluster", str(cluster.spec_path))
    assert code == 0, out
    assert "live on 2/2 workers" in out, out
    session = f"zz1-{time.time_ns()}"
    user = _anon(cluster, role="authenticated", sub="u-1", session_id=session)
    port = cluster.spec.daemon.port
    check = f"curl -s -o /dev/null -w '%{{http_code}}' -H 'authorization: Bearer {user}' " \
            f"http://127.0.0.1:{port}/functions/v1/guarded"  # fmt: skip
    workers = cluster.names("worker")
    for w in workers:
        assert await trio.to_thread.run_sync(_sh, cluster, w, check) == "200", w

    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    url = f"wss://{public}/realtime/v1/websocket?apikey={_anon(cluster)}&vsn=2.0.0"
    async with connect(url, ssl=tls, open_timeout=10, ping_interval=None) as ws:
        phx = Phx(ws, "2.0.0")
        _, reply = await phx.join("realtime:zz1", access_token=user)
        assert reply[4]["status"] == "ok", reply
        code, out = await run_cli("cluster", "sessions", "revoke", session, "-c", str(cluster.spec_path))
        assert code == 0, out
        revoked = time.monotonic()
        system = await phx.expect("system", "realtime:zz1", timeout=1)
        assert system[4]["message"] == REVOKED
        await phx.expect("phx_close", "realtime:zz1", timeout=max(0.0, revoked + 1 - time.monotonic()))
        closed_s = time.monotonic() - revoked
    for w in workers:
        assert await trio.to_thread.run_sync(_sh, cluster, w, check) == "401", w
    print(json.dumps({"realtime_closed_after_revoke_s": round(closed_s, 3)}))


async def test_a_stopped_worker_is_down_and_out_of_the_upstreams_while_requests_keep_answering(
    cluster: Cluster,
) -> None:
    public, proxy = await trio.to_thread.run_sync(_control_ready, cluster)
    workers = cluster.names("worker")
    victim = workers[-1]
    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    answers: list[int] = []
    failures: list[str] = []
    stop_load = trio.Event()
    auth = {"authorization": f"Bearer {_anon(cluster)}"}

    async def load() -> None:
        async with httpx.AsyncClient(verify=tls, timeout=10, trust_env=False) as client:
            while not stop_load.is_set():
                try:
                    r = await client.get(f"https://{public}/functions/v1/guarded", headers=auth)
                    answers.append(r.status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                with trio.move_on_after(0.05):
                    await stop_load.wait()

    timings: dict[str, float] = {}

    async def watch_upstreams(since: float) -> None:
        """When the control plane first leaves the victim out: its draining beat, or its silence."""
        while True:
            if victim not in await trio.to_thread.run_sync(_upstreams, cluster):
                break
            await trio.sleep(0.2)
        timings["left_upstreams_after_stop_s"] = time.monotonic() - since

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        started = time.monotonic()
        nursery.start_soon(watch_upstreams, started)
        await trio.to_thread.run_sync(cluster.provider.stop_machine, victim)
        off = time.monotonic()
        timings["machine_stop_s"] = off - started
        while (await trio.to_thread.run_sync(_nodes, cluster))[victim]["state"] != "down":
            assert time.monotonic() - off < DOWN_WITHIN_S, await trio.to_thread.run_sync(_nodes, cluster)
            await trio.sleep(0.5)
        timings["down_after_off_s"] = time.monotonic() - off
        assert await trio.to_thread.run_sync(_upstreams, cluster) == workers[:-1]
        # the proxy pulls once a second: its list follows within a few pulls
        left = time.monotonic()
        while await trio.to_thread.run_sync(_proxy_list, cluster, proxy) != workers[:-1]:
            assert time.monotonic() - left < 10, await trio.to_thread.run_sync(_proxy_list, cluster, proxy)
            await trio.sleep(0.5)
        timings["proxy_list_after_off_s"] = time.monotonic() - off

        # back again: booted from its disk, it reports ready and is put back into the upstreams and the proxy
        back = time.monotonic()
        await trio.to_thread.run_sync(cluster.provider.start_machine, victim)
        while await trio.to_thread.run_sync(_proxy_list, cluster, proxy) != workers:
            assert time.monotonic() - back < 300, await trio.to_thread.run_sync(_nodes, cluster)
            await trio.sleep(1)
        timings["back_in_upstreams_s"] = time.monotonic() - back
        deadline = time.monotonic() + 60
        while not all(
            r["status"] == "UP" for r in (await trio.to_thread.run_sync(_workers_stats, cluster, proxy)).values()
        ):
            assert time.monotonic() < deadline
            await trio.sleep(1)
        stop_load.set()
    assert failures == [], failures[:5]
    assert set(answers) == {200}, sorted(set(answers))
    print(json.dumps({**{k: round(v, 1) for k, v in timings.items()}, "requests": len(answers)}))
