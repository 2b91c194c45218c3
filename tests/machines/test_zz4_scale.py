"""Must-hold 5 on the shared machines cluster (runs last and leaves one worker): `provision scale worker=3`, then
`provision scale worker=1`, while a client on the internet side sends a function request through the proxy every
50 ms and holds WebSockets through it. No request fails; a WebSocket on a leaving worker is closed with 1012
(realtime-js reconnects on that) and one on the staying worker stays open. Scale-out to ready (the new worker
answers through the proxy) and scale-in (the apply) are printed; docs/benchmarks.md records them.

The new worker comes up on the cluster's release, not on the version the cluster was created with: after
test_zz2_upgrade.py that is the upgraded version, which its daemon installs before it first starts (mbworker.service's
ExecStartPre). Watched through the control plane from the apply on: every heartbeat of the new worker, before and
after it enters the upstreams, reports the release.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from mbworker.provision.cli import main as provision_main
from mbworker.worker.errors import AdminApiError

from .conftest import Cluster, deploy_function
from .test_serving import _wait_serving, _workers_stats
from .test_zz1_control import _client

pytestmark = pytest.mark.slow

FUNCTION = "scale-probe"
PROBE = "Deno.serve(() => Response.json({ scale: true }));\n"
INTERVAL = 0.05


@dataclass
class Traffic:
    """A request every 50 ms through the proxy, each on a new connection (as many clients would), from a thread."""

    url: str
    tls: ssl.SSLContext
    results: list[tuple[float, str]] = field(default_factory=list)
    """(when, "200" or what went wrong)."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with httpx.Client(verify=self.tls, timeout=10, trust_env=False) as client:
                    r = client.get(self.url)
                outcome = str(r.status_code) if r.status_code != 200 else "200"
                if r.status_code != 200:
                    outcome += f" {r.text[:120]}"
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            self.results.append((started, outcome))
            self.stop.wait(max(0.0, started + INTERVAL - time.monotonic()))

    @property
    def failures(self) -> list[tuple[float, str]]:
        return [(t, o) for t, o in self.results if o != "200"]


@dataclass
class Socket:
    """One WebSocket held through the proxy: joined to a channel, heartbeating; how it ended, if it did."""

    label: str
    close_code: int | None = None
    ended: str | None = None


async def hold(url: str, tls: ssl.SSLContext, sock: Socket, joined: trio.Event) -> None:
    try:
        async with connect(url, ssl=tls, ping_interval=None, open_timeout=20) as ws:
            await ws.send('["1","1","realtime:scale","phx_join",{"config":{}}]')
            assert '"ok"' in await ws.recv()
            joined.set()
            await _heartbeat_until_closed(ws)
    except ConnectionClosed as exc:
        sock.close_code = exc.rcvd.code if exc.rcvd is not None else None
        sock.ended = str(exc)
    except OSError as exc:
        sock.ended = f"{type(exc).__name__}: {exc}"


async def _heartbeat_until_closed(ws: ClientConnection) -> None:
    """Read until the server closes; a Phoenix heartbeat every 5 s keeps the channel (and HAProxy's tunnel) alive."""
    ref = 2
    while True:
        with trio.move_on_after(5):
            while True:
                await ws.recv()
        await ws.send(f'[null,"{ref}","phoenix","heartbeat",{{}}]')
        ref += 1


def _scale(cluster: Cluster, count: int) -> float:
    argv = ["provision", "scale", "-c", str(cluster.spec_path), "--provider", "machines"]
    argv += ["--state-dir", str(cluster.state_dir), "-y", f"worker={count}"]
    started = time.monotonic()
    assert provision_main(argv) == 0
    return time.monotonic() - started


@dataclass
class NodeWatch:
    """The control plane's view of workers not in `known` that have reported, twice a second, from a thread: (name,
    version, whether it is in the upstreams) at each look, until `stop`."""

    cluster: Cluster
    known: set[str]
    seen: list[tuple[str, str, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        with _client(self.cluster) as client:
            while not self.stop.wait(0.5):
                try:
                    upstreams = {u["name"] for u in client.upstreams()}
                    nodes = client.nodes()
                except AdminApiError as exc:  # a look missed: the next one follows
                    self.errors.append(str(exc))
                    continue
                for n in nodes:
                    # a worker of the layout that never reported is listed too (version "-"): only its beats count
                    if n["role"] == "worker" and n["name"] not in self.known and n["last_seen_s"] is not None:
                        self.seen.append((n["name"], n["version"], n["name"] in upstreams))


def control_nodes(cluster: Cluster) -> list[dict[str, object]]:
    with _client(cluster) as client:
        return client.nodes()


def _in_rotation(cluster: Cluster, proxy: str, worker: str, timeout: float) -> None:
    """Until `worker` is UP in the proxy and has answered a 2xx through it."""
    deadline = time.monotonic() + timeout
    while True:
        row = _workers_stats(cluster, proxy).get(worker)
        if row is not None and row["status"] == "UP" and int(row["hrsp_2xx"] or 0) > 0:
            return
        assert time.monotonic() < deadline, (worker, row)
        time.sleep(1)


async def test_scale_out_and_in_under_traffic_loses_nothing(cluster: Cluster) -> None:
    proxy = cluster.names("proxy")[0]
    public = await trio.to_thread.run_sync(_wait_serving, cluster, proxy)
    await trio.to_thread.run_sync(deploy_function, cluster, FUNCTION, PROBE)
    tls = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.pem"))
    anon = cluster.anon_key()
    ws_url = f"wss://{public}/realtime/v1/websocket?apikey={anon}&vsn=2.0.0"

    traffic = Traffic(f"https://{public}/functions/v1/{FUNCTION}", tls)
    # the function answers through the proxy before the clock starts
    async with httpx.AsyncClient(verify=tls, timeout=10, trust_env=False) as client:
        deadline = time.monotonic() + 60
        while (await client.get(traffic.url)).status_code != 200:
            assert time.monotonic() < deadline
            await trio.sleep(0.5)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    sockets: list[Socket] = []
    watch = NodeWatch(cluster, set())
    watcher = threading.Thread(target=watch.run, daemon=True)
    report: dict[str, object] = {}
    marks: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:

            async def open_sockets(prefix: str, n: int) -> None:
                for i in range(n):  # one after another: leastconn spreads them over the workers
                    sock = Socket(f"{prefix}{i}")
                    sockets.append(sock)
                    joined = trio.Event()
                    nursery.start_soon(hold, ws_url, tls, sock, joined)
                    with trio.fail_after(30):
                        await joined.wait()

            await open_sockets("before", 4)
            with _client(cluster) as control:
                release = control.release()
            # the version every worker runs (test_zz2_upgrade.py upgraded them), which is the cluster's release
            assert {n["version"] for n in control_nodes(cluster) if n["role"] == "worker"} == {release["version"]}
            watch.known = set(cluster.names("worker"))
            watcher.start()
            marks["scale out"] = time.monotonic()
            report["scale_out_apply_s"] = round(await trio.to_thread.run_sync(_scale, cluster, 3), 1)
            marks["scale out applied"] = time.monotonic()
            for worker in cluster.names("worker"):
                await trio.to_thread.run_sync(_in_rotation, cluster, proxy, worker, 600.0)
            report["scale_out_to_ready_s"] = round(time.monotonic() - marks["scale out"], 1)
            watch.stop.set()
            report["release"] = release["version"]
            report["new_workers_seen"] = sorted({(name, version) for name, version, _ in watch.seen})
            # every look at a new worker, before and once in the upstreams: on the release
            assert {version for _, version, _ in watch.seen} == {release["version"]}, report
            assert {name for name, _, listed in watch.seen if listed} == set(cluster.names("worker")) - watch.known
            await open_sockets("after", 4)
            staying = cluster.names("worker")[0]

            marks["scale in"] = time.monotonic()
            report["scale_in_s"] = round(await trio.to_thread.run_sync(_scale, cluster, 1), 1)
            marks["scale in applied"] = time.monotonic()
            await trio.sleep(3)  # traffic after the last change: the proxy serves from the one worker left
            nursery.cancel_scope.cancel()
    finally:
        traffic.stop.set()
        watch.stop.set()
        thread.join(timeout=30)
        if watcher.is_alive():
            watcher.join(timeout=30)
    report["requests"] = len(traffic.results)
    # each failure placed after the last step it followed: "scale in +3.2s: 503 ..."
    report["failed"] = [
        f"{max((m for m in marks.items() if m[1] <= t), key=lambda m: m[1], default=('start', t))[0]} "
        f"+{t - max((v for v in marks.values() if v <= t), default=t):.1f}s: {o}"
        for t, o in traffic.failures[:10]
    ]
    report["websockets"] = {s.label: s.close_code or s.ended for s in sockets}
    print("scale:", json.dumps(report))
    assert cluster.names("worker") == [staying]
    assert traffic.failures == [], report
    closed = [s for s in sockets if s.ended is not None]
    assert all(s.close_code == 1012 for s in closed), report
    # not vacuous: the leaving workers held some of them, the staying one the rest (still open)
    assert closed, report
    assert len(sockets) > len(closed), report
