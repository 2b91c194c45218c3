"""The proxy pillar's HAProxy, run for real on loopback with the rendered configuration: TLS from the cluster CA
on 443, :80 only redirects, routed paths reach a worker (with X-Forwarded-For set by the proxy, not the client),
everything else is a 404; `haproxy -c` has nothing to say about it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from mbworker.cli.control_client import ControlClient
from mbworker.control.endpoint import ControlEndpoint, server_name
from mbworker.provision import desired as d
from mbworker.provision.render import NodeAddr, NodeContext, user_data
from mbworker.provision.secrets import ClusterSecrets
from mbworker.provision.shipment import Shipment
from mbworker.worker.errors import AdminApiError
from tests.conftest import free_port, require_binary

from .conftest import make_spec
from .test_render import CTX, block


class _Worker(BaseHTTPRequestHandler):
    """A stand-in worker: /ready is 200, every other path echoes what the proxy sent."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "path": self.path,
                "xff": self.headers.get("X-Forwarded-For"),
                "proto": self.headers.get("X-Forwarded-Proto"),
                "xfh": self.headers.get("X-Forwarded-Host"),
                "forwarded": self.headers.get("Forwarded"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def worker() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Worker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _status(client: httpx.Client, url: str) -> int:
    try:
        return client.get(url).status_code
    except httpx.TransportError:
        return 0


def _swap(text: str, *pairs: tuple[str, str]) -> str:
    """The rendered config with this host's paths and ports: each part must be there (a template change that
    renames one fails here, instead of leaving a node's path in a config checked on this host)."""
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    return text


@dataclasses.dataclass(frozen=True)
class Proxy:
    """A proxy's rendered configuration, moved to loopback."""

    cfg: Path
    ca: Path
    stats: int
    """The stats listener's port (`/;csv`)."""


def proxy_config(tmp_path: Path, workers: dict[str, int], http: int, https: int) -> Proxy:
    """The proxy's haproxy.cfg as `mbgateway-config` (from the rendered user-data) prints it for `workers`
    (name → port on 127.0.0.1), moved to loopback."""
    spec = make_spec(proxy={"type": "cx23", "count": 1})
    shipment = Shipment(spec, tmp_path / "state")
    ctx = NodeContext(
        workers=(NodeAddr("demo-worker-001", "worker", "127.0.0.1"),),
        tls_pem=shipment.proxy_pem(("127.0.0.1",)),
        node_token="n" * 64,
    )
    proxy = next(s for s in d.desired_servers(spec) if s.role == "proxy")
    doc = user_data(spec, proxy, ClusterSecrets.generate(), ctx)
    assert block(doc, "/etc/mbgateway/workers") == "demo-worker-001 127.0.0.1:8080\n"
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "site.pem").write_text(block(doc, "/etc/haproxy/certs/site.pem"))
    chroot = tmp_path / "chroot"
    chroot.mkdir()
    head = block(doc, "/etc/mbgateway/haproxy.head.cfg")
    assert "user haproxy" in head
    assert "chroot /var/lib/haproxy" in head
    stats = free_port()
    parts = tmp_path / "mbgateway"
    parts.mkdir()
    (parts / "haproxy.head.cfg").write_text(
        _swap(
            head,
            ("bind :::80 v4v6\n", f"bind 127.0.0.1:{http}\n"),
            ("bind :::443 v4v6 ssl crt /etc/haproxy/certs/", f"bind 127.0.0.1:{https} ssl crt {certs}/"),
            ("chroot /var/lib/haproxy", f"chroot {chroot}"),
            ("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")),
            ("bind 127.0.0.1:7000", f"bind 127.0.0.1:{stats}"),
            ("maxconn 100000", "maxconn 1000"),  # this host's fd limit, not the node's
            ("log /dev/log local0", f"log 127.0.0.1:{free_port()} local0"),
        )
    )
    (parts / "haproxy.local.cfg").write_text(block(doc, "/etc/mbgateway/haproxy.local.cfg"))
    (parts / "workers").write_text("# name address\n" + "".join(f"{n} 127.0.0.1:{p}\n" for n, p in workers.items()))
    script = tmp_path / "mbgateway-config"
    script.write_text(block(doc, "/usr/local/sbin/mbgateway-config"))
    printed = subprocess.run(["sh", str(script), str(parts)], capture_output=True, text=True, timeout=30, check=True)
    path = tmp_path / "haproxy.cfg"
    path.write_text(printed.stdout)
    return Proxy(path, shipment.ca().cert_path, stats)


def start_haproxy(cfg: Path, *, reloadable: bool = False) -> subprocess.Popen[bytes]:
    """`haproxy -c` has nothing to say about `cfg` (no warning either); then HAProxy runs it in the foreground
    (`reloadable`: in master-worker mode, as systemd runs it, so SIGUSR2 is a graceful reload)."""
    haproxy = require_binary("haproxy", "/usr/sbin/haproxy")
    require_binary("openssl")
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr  # e.g. a rule that makes use_backend unreachable
    mode = ["-W"] if reloadable else []
    return subprocess.Popen(
        [haproxy, *mode, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _until_routed(client: httpx.Client, url: str) -> None:
    """The worker joins the rotation once its /ready check passed twice (2 s apart): wait for that, bounded."""
    deadline = time.monotonic() + 30
    while _status(client, url) != 200:
        assert time.monotonic() < deadline, "the worker never became healthy behind the proxy"
        threading.Event().wait(0.1)


def test_proxy_terminates_tls_redirects_http_and_routes(tmp_path: Path, worker: int) -> None:
    http, https = free_port(), free_port()
    proxy = proxy_config(tmp_path, {"demo-worker-001": worker}, http, https)
    proc = start_haproxy(proxy.cfg)
    try:
        tls = ssl.create_default_context(cafile=str(proxy.ca))
        with httpx.Client(verify=tls, timeout=5) as client:
            base = f"https://127.0.0.1:{https}"
            _until_routed(client, f"{base}/functions/v1/hello")
            # what a client says of itself is dropped: the workers trust the proxy's X-Forwarded-* (and a function's
            # URL, and with it the result cache's key, takes the host from them)
            spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example", "Forwarded": "for=6.6.6.6"}
            r = client.get(f"{base}/functions/v1/hello", headers=spoofed)
            assert r.status_code == 200
            assert r.json() == {
                "path": "/functions/v1/hello", "xff": "127.0.0.1", "proto": "https", "xfh": None, "forwarded": None
            }  # fmt: skip
            assert client.get(f"{base}/realtime/v1/websocket?vsn=1.0.0").json()["path"].startswith("/realtime/v1/")
            nope = client.get(f"{base}/admin/v1/drain")
            assert nope.status_code == 404
            assert nope.json()["code"] == "not_found"
            plain = client.get(f"http://127.0.0.1:{http}/functions/v1/hello")
            assert plain.status_code == 301
            assert plain.headers["location"] == f"https://127.0.0.1:{http}/functions/v1/hello"
            # ACME challenges are the one thing :80 answers itself (certbot is not running here: 503, not 301)
            assert client.get(f"http://127.0.0.1:{http}/.well-known/acme-challenge/x").status_code == 503
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _one_response(sock: ssl.SSLSocket) -> bytes:
    """One response (head and its Content-Length body) read from `sock`; b"" when the proxy closed instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def test_a_reload_answers_a_request_on_a_connection_left_idle_across_it(tmp_path: Path, worker: int) -> None:
    """An upstream change is a graceful reload. A keep-alive client idle across it keeps its connection: its next
    request is answered by the old process, which then closes it. (HAProxy's default closes idle connections
    at once on a reload, and a request sent at that moment is lost: "server disconnected".)"""
    http, https = free_port(), free_port()
    proxy = proxy_config(tmp_path, {"demo-worker-001": worker}, http, https)
    proc = start_haproxy(proxy.cfg, reloadable=True)
    try:
        tls = ssl.create_default_context(cafile=str(proxy.ca))
        with httpx.Client(verify=tls, timeout=5) as client:
            _until_routed(client, f"https://127.0.0.1:{https}/functions/v1/hello")
        request = b"GET /functions/v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        raw = socket.create_connection(("127.0.0.1", https), timeout=10)
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(request)
            assert _status_of(_one_response(conn)) == 200
            before = set(_children(proc.pid))
            proc.send_signal(signal.SIGUSR2)  # systemctl reload: a new worker process, the old one soft-stops
            deadline = time.monotonic() + 30
            while not set(_children(proc.pid)) - before:
                assert time.monotonic() < deadline, "HAProxy did not reload"
                threading.Event().wait(0.05)
            # the old process keeps the idle connection: no close comes (HAProxy's default sends it at once)
            assert select.select([conn], [], [], 1.0)[0] == [], "the reload closed an idle client connection"
            conn.sendall(request)
            again = _one_response(conn)
            assert _status_of(again) == 200, again
            assert conn.recv(1) == b""  # then the old process closes it, and can finish
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _children(pid: int) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout.split()


class _Standin(ThreadingHTTPServer):
    """A stand-in worker whose `/ready` and `/ready/local` answer what the test sets; it counts the function
    requests it answered."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StandinHandler)
        self.ready = 200
        self.local = 200
        self.answered = 0
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _StandinHandler(BaseHTTPRequestHandler):
    server: _Standin

    def do_GET(self) -> None:
        if self.path == "/ready":
            status = self.server.ready
        elif self.path == "/ready/local":
            status = self.server.local
        else:
            status = 200
            with self.server.lock:
                self.server.answered += 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _servers(stats_port: int) -> dict[str, str]:
    """HAProxy's `workers` backend: server name → status (UP, DOWN, ...); empty while HAProxy starts."""
    try:
        text = httpx.get(f"http://127.0.0.1:{stats_port}/;csv", timeout=5).text.lstrip("# ")
    except httpx.TransportError:
        return {}
    rows = csv.DictReader(io.StringIO(text))
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "workers" and r["svname"] != "BACKEND"}


def test_while_no_worker_is_ready_the_proxy_sends_to_the_locally_ready_ones_never_to_a_draining_one(
    tmp_path: Path,
) -> None:
    """The cluster's Redis away: every worker's /ready fails at once, /ready/local still passes (a draining
    worker's fails too). Through real HAProxy with the config `mbgateway-config` prints: no request goes
    unanswered while the primaries go down, the backups answer, the draining worker gets none, and once a worker
    is ready again the backups are left alone."""
    standins = {name: _Standin() for name in ("w-a", "w-b", "w-drain")}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in standins.values()]
    for thread in threads:
        thread.start()
    http, https = free_port(), free_port()
    proxy = proxy_config(tmp_path, {name: s.port for name, s in standins.items()}, http, https)
    proc = start_haproxy(proxy.cfg)
    a, _, draining = standins.values()

    def wait_for(want: dict[str, str]) -> None:
        deadline = time.monotonic() + 30  # checks every 2 s, fall 2 / rise 2
        while {k: v for k, v in _servers(proxy.stats).items() if k in want} != want:
            assert time.monotonic() < deadline, _servers(proxy.stats)
            threading.Event().wait(0.1)

    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(proxy.ca)), timeout=5) as client:
            url = f"https://127.0.0.1:{https}/functions/v1/hello"
            wait_for({name: "UP" for name in standins} | {f"{name}:backup": "UP" for name in standins})
            assert _status(client, url) == 200

            # Redis away: /ready fails everywhere; one worker also starts draining (its local check fails too)
            for s in standins.values():
                s.ready = 503
            draining.local = 503
            # every request is answered while HAProxy takes the primaries out and turns to the backups
            deadline = time.monotonic() + 30
            statuses: list[int] = []
            want = {f"{name}{kind}": "DOWN" for name in standins for kind in ("", ":backup")}
            want |= {"w-a:backup": "UP", "w-b:backup": "UP"}
            while _servers(proxy.stats) != want:
                assert time.monotonic() < deadline, _servers(proxy.stats)
                statuses.append(_status(client, url))
            assert set(statuses) == {200}, statuses

            before = {name: s.answered for name, s in standins.items()}
            assert [_status(client, url) for _ in range(40)] == [200] * 40
            got = {name: s.answered - before[name] for name, s in standins.items()}
            assert got["w-drain"] == 0, got
            assert got["w-a"] + got["w-b"] == 40, got
            assert min(got["w-a"], got["w-b"]) > 0, got  # every backup takes requests, not only the first

            # one worker ready again: it takes everything, the backups none
            a.ready = 200
            wait_for({"w-a": "UP"})
            before = {name: s.answered for name, s in standins.items()}
            assert [_status(client, url) for _ in range(20)] == [200] * 20
            assert {name: s.answered - before[name] for name, s in standins.items()} == {
                "w-a": 20,
                "w-b": 0,
                "w-drain": 0,
            }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for s in standins.values():
            s.shutdown()
            s.server_close()


def test_the_control_planes_tls_is_verified_by_name_with_the_cluster_ca(tmp_path: Path, worker: int) -> None:
    """The system node's HAProxy (its rendered config, on loopback) in front of a stand-in control plane: the CLI's
    client verifies the certificate with the cluster CA against the control plane's name (sent as the TLS server
    name), so an address the certificate does not list still verifies; another name does not."""
    haproxy = require_binary("haproxy", "/usr/sbin/haproxy")
    require_binary("openssl")
    spec = make_spec()
    shipment = Shipment(spec, tmp_path / "state")
    ctx = dataclasses.replace(
        CTX, control_pem=shipment.control_pem(), control_token="c" * 64, node_token="n" * 64
    )  # issued for the name only, as on Hetzner (the address is not known before the server exists)
    system = next(s for s in d.desired_servers(spec) if s.role == "system")
    doc = user_data(spec, system, ClusterSecrets.generate(), ctx)
    pem = tmp_path / "tls.pem"
    pem.write_text(block(doc, "/etc/mbcontrol/tls.pem"))
    chroot = tmp_path / "chroot"
    chroot.mkdir()
    https = free_port()
    cfg = _swap(
        block(doc, "/etc/mbcontrol/haproxy.cfg"),
        (f"bind :{d.CONTROL_PUBLIC_PORT} ssl crt /etc/mbcontrol/tls.pem", f"bind 127.0.0.1:{https} ssl crt {pem}"),
        (f"server control {d.system_ip(spec)}:{d.CONTROL_PORT}", f"server control 127.0.0.1:{worker}"),
        ("chroot /var/lib/haproxy", f"chroot {chroot}"),
        ("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")),
        ("log /dev/log local0", f"log 127.0.0.1:{free_port()} local0"),
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    check = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr
    proc = subprocess.Popen([haproxy, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"https://127.0.0.1:{https}"
        endpoint = ControlEndpoint(url, "t" * 64, shipment.ca().cert_path, server_name(spec.name))
        deadline = time.monotonic() + 30
        while not tcp_open(https):  # HAProxy still starting
            assert time.monotonic() < deadline
            threading.Event().wait(0.1)
        with ControlClient.connect(endpoint, timeout=5) as client:
            answer: Any = client.nodes()
        assert answer["path"] == "/control/v1/nodes"
        wrong = dataclasses.replace(endpoint, server_name="evil.example")
        with pytest.raises(AdminApiError, match="certificate verify failed"), ControlClient.connect(wrong) as c:
            c.nodes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
