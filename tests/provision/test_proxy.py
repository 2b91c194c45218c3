"""The proxy pillar's HAProxy, run for real on loopback with the rendered configuration: TLS from the cluster CA
on 443, :80 only redirects, routed paths reach a worker (with X-Forwarded-For set by the proxy, not the client),
everything else is a 404; `haproxy -c` has nothing to say about it."""

from __future__ import annotations

import dataclasses
import json
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


def proxy_config(tmp_path: Path, worker_port: int, http: int, https: int) -> tuple[str, Path]:
    """The proxy's rendered haproxy.cfg (head + server lines as mbgateway-render writes them), moved to loopback."""
    spec = make_spec(proxy={"type": "cx23", "count": 1})
    shipment = Shipment(spec, tmp_path / "state")
    ctx = NodeContext(
        workers=(NodeAddr("demo-worker-001", "worker", "127.0.0.1"),),
        tls_pem=shipment.proxy_pem(("127.0.0.1",)),
        node_token="n" * 64,
    )
    proxy = next(s for s in d.desired_servers(spec) if s.role == "proxy")
    doc = user_data(spec, proxy, ClusterSecrets.generate(), ctx)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "site.pem").write_text(block(doc, "/etc/haproxy/certs/site.pem"))
    chroot = tmp_path / "chroot"
    chroot.mkdir()
    head = block(doc, "/etc/mbgateway/haproxy.head.cfg")
    assert "user haproxy" in head
    assert "chroot /var/lib/haproxy" in head
    cfg = _swap(
        head,
        ("bind :::80 v4v6\n", f"bind 127.0.0.1:{http}\n"),
        ("bind :::443 v4v6 ssl crt /etc/haproxy/certs/", f"bind 127.0.0.1:{https} ssl crt {certs}/"),
        ("chroot /var/lib/haproxy", f"chroot {chroot}"),
        ("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")),
        ("bind 127.0.0.1:7000", f"bind 127.0.0.1:{free_port()}"),
        ("maxconn 100000", "maxconn 1000"),  # this host's fd limit, not the node's
        ("log /dev/log local0", f"log 127.0.0.1:{free_port()} local0"),
    )
    lines = block(doc, "/etc/mbgateway/workers").replace("127.0.0.1:8080", f"127.0.0.1:{worker_port}")
    cfg += "".join(f"    server {n} {a}\n" for n, a in (line.split() for line in lines.splitlines() if line.strip()))
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    return cfg, shipment.ca().cert_path


def test_proxy_terminates_tls_redirects_http_and_routes(tmp_path: Path, worker: int) -> None:
    haproxy = require_binary("haproxy", "/usr/sbin/haproxy")
    require_binary("openssl")
    http, https = free_port(), free_port()
    _, ca = proxy_config(tmp_path, worker, http, https)
    cfg = tmp_path / "haproxy.cfg"
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr  # e.g. a rule that makes use_backend unreachable
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tls = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(verify=tls, timeout=5) as client:
            base = f"https://127.0.0.1:{https}"
            # the worker joins the rotation once its /ready check passed twice (2 s apart): wait for that, bounded
            deadline = time.monotonic() + 30
            while _status(client, f"{base}/functions/v1/hello") != 200:
                assert time.monotonic() < deadline, "the worker never became healthy behind the proxy"
                threading.Event().wait(0.1)
            r = client.get(f"{base}/functions/v1/hello", headers={"X-Forwarded-For": "6.6.6.6"})
            assert r.status_code == 200
            assert r.json() == {"path": "/functions/v1/hello", "xff": "127.0.0.1", "proto": "https"}
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
