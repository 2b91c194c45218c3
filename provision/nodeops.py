"""Talking to nodes (not to the cloud API): draining a worker and refreshing a node's config lists.

`NodeOps` is the seam: the executor calls it, tests inject a fake (they must never send traffic to the fake's
10.x or 198.51.100.x addresses). `RemoteNodeOps` is the default for real clusters:
- drain: `POST http://<private-ip>:<admin-port>/admin/v1/drain` with the admin token. Needs a route into the
  private network (run from the system node, a VPN, or `sshuttle -r root@<system-ip> 10.0.0.0/16`).
  Contract: 2xx with JSON `{"drained": true}` (or no `drained` field) means idle; `{"drained": false}` means
  still draining — the request is repeated (it is idempotent) until drained or the timeout.
- refresh: writes the list over SSH to the node's public address (proxies and system are in the SSH safe-list
  zone) and runs the node's render/reload script.
- wait_healthy (the gate between two nodes of a rolling type change): a worker's `/ready` over the private
  network (as drain); a state node runs `STATE_HEALTH_SCRIPT` itself, over SSH jumping through the system node
  (state nodes have no public address, and etcd/Patroni answer only state nodes); a proxy answers on 443.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx

from .errors import DrainError, HealthError, ProviderError

#: What the provisioner pushes to a node: only the system node's scrape targets (proxies pull their upstreams).
RefreshKind = Literal["targets"]


@dataclass(frozen=True)
class NodeRef:
    name: str
    role: str
    private_ip: str | None
    public_ip: str | None
    #: The node's admin port when it differs from the cluster-wide one (local clusters).
    admin_port: int | None = None


class NodeOps(Protocol):
    def drain(self, node: NodeRef, *, timeout: float) -> None:
        """Return once `node` is idle; raise DrainError if it cannot be drained within `timeout` seconds."""
        ...

    def refresh(self, node: NodeRef, kind: RefreshKind, content: str) -> None:
        """Install `content` as the system node's scrape targets (VictoriaMetrics re-reads them)."""
        ...

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        """Make the system node serve exactly the wheels in `directory` (its /var/lib/mbwheels); the node may
        still be booting, so keep trying until `timeout`."""
        ...

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        """Return once `node` (just powered on again) is healthy for its role; HealthError after `timeout`.
        `via` is a node with a public address that reaches the private network (the system node)."""
        ...


_REFRESH_SCRIPTS: dict[RefreshKind, str] = {
    # VictoriaMetrics re-reads file_sd files on its own (-promscrape.configCheckInterval)
    "targets": "cat > /etc/mbsystem/targets.json.new && mv /etc/mbsystem/targets.json.new /etc/mbsystem/targets.json",
}


#: Unpack a tar of wheels (stdin) as the served wheelhouse, swapping the directory whole.
PUBLISH_SCRIPT = (
    "set -e; rm -rf /var/lib/mbwheels.new; install -d -m 0755 /var/lib/mbwheels.new; tar -x -C /var/lib/mbwheels.new;"
    " rm -rf /var/lib/mbwheels.old;"
    " if [ -d /var/lib/mbwheels ]; then mv /var/lib/mbwheels /var/lib/mbwheels.old; fi;"
    " mv /var/lib/mbwheels.new /var/lib/mbwheels; rm -rf /var/lib/mbwheels.old"
)


#: Run on a state node: exit 0 when etcd has every member healthy (quorum, and this member back), this node's
#: PostgreSQL runs under Patroni, the Patroni cluster has a running leader, and the local Redis answers.
STATE_HEALTH_SCRIPT = """set -u
fail() { echo "$1" >&2; exit 1; }
export ETCDCTL_API=3 ETCDCTL_ENDPOINTS=http://127.0.0.1:2379
etcdctl --user "root:$(cat /etc/mbstate/etcd-root)" endpoint health --cluster >/dev/null 2>&1 \\
  || fail "etcd: not every member is healthy"
ip=$(sed -n 's|^ETCD_ADVERTISE_CLIENT_URLS=http://\\(.*\\):2379$|\\1|p' /etc/default/etcd)
curl -fsS -o /dev/null --max-time 5 "http://$ip:8008/health" 2>/dev/null \\
  || fail "patroni: this member's PostgreSQL is not running"
curl -fsS --max-time 5 "http://$ip:8008/cluster" 2>/dev/null | python3 -c '
import json, sys
members = json.load(sys.stdin)["members"]
sys.exit(0 if any(m["role"] == "leader" and m["state"] == "running" for m in members) else 1)' \\
  || fail "patroni: the cluster has no running leader"
# Redis rewrites its own config (failover): the password may come back quoted
pw=$(sed -n 's/^requirepass //p' /etc/redis/redis.conf | tr -d '"')
[ "$(REDISCLI_AUTH="$pw" redis-cli -h 127.0.0.1 ping 2>/dev/null)" = PONG ] || fail "redis: no PONG"
"""


def drain_through_control(
    http: httpx.Client, url: str, token: str, name: str, *, timeout: float, poll: float = 1.0
) -> None:
    """Scale-in's drain, asked of the control plane (`url`, its token) instead of the node itself.

    `POST /control/v1/nodes/<name>/drain` takes the node out of the upstreams the proxies pull at once; the node
    starts draining at its next heartbeat (WebSockets closed with 1012, requests in flight finished) and exits when
    it is done; systemd starts it again, cordoned (idle, not ready). Done when the control plane reports it cordoned
    or down (or no longer knows it); DrainError if it is still there after `timeout` seconds or the control plane
    refuses."""
    headers = {"Authorization": f"Bearer {token}"}
    base = f"{url.rstrip('/')}/control/v1/nodes"
    deadline = time.monotonic() + timeout
    try:
        r = http.post(f"{base}/{name}/drain", headers=headers)
        if r.status_code == 404:
            return  # never beat, or long gone: no proxy sends to it
        if r.status_code >= 300:
            raise DrainError(f"{name}: the control plane refused the drain with HTTP {r.status_code}: {r.text[:200]}")
        while True:
            r = http.get(base, headers=headers)
            if r.status_code >= 300:
                raise DrainError(f"{name}: the control plane answered HTTP {r.status_code} to GET /nodes")
            node = next((n for n in r.json() if n.get("name") == name), None)
            # done: gone, or drained and started again by systemd, idle until undrained (`cordoned`)
            if node is None or node.get("state") in ("down", "cordoned"):
                return
            if time.monotonic() + poll > deadline:
                raise DrainError(f"{name} still {node.get('state')} after {timeout:.0f}s of draining")
            time.sleep(poll)
    except httpx.HTTPError as exc:
        raise DrainError(f"{name}: drain through the control plane failed: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        raise DrainError(f"{name}: the control plane's node list is not JSON") from exc


def poll_until(check: Callable[[], str | None], *, what: str, timeout: float, interval: float = 2.0) -> None:
    """Call `check` (None: healthy, else why not) until it passes; HealthError with the last reason after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        why = check()
        if why is None:
            return
        if time.monotonic() + interval > deadline:
            raise HealthError(f"{what} not healthy within {timeout:.0f}s: {why}")
        time.sleep(interval)


class RemoteNodeOps:
    """Drain over HTTP on the private network; refresh over SSH. Owns its HTTP client: call close()."""

    def __init__(
        self,
        admin_token: str,
        admin_port: int,
        *,
        # accept-new: a node's host key is new on first contact (the cloud just made it); a changed one still fails
        ssh: tuple[str, ...] = (
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "StrictHostKeyChecking=accept-new",
        ),
        ssh_user: str = "root",
        poll_interval: float = 1.0,
        request_timeout: float = 10.0,
        daemon_port: int = 8080,
    ) -> None:
        self._token = admin_token
        self._port = admin_port
        self._daemon_port = daemon_port
        self._ssh = ssh
        self._user = ssh_user
        self._poll = poll_interval
        self._http = httpx.Client(timeout=request_timeout)

    def close(self) -> None:
        self._http.close()

    def drain(self, node: NodeRef, *, timeout: float) -> None:
        if node.private_ip is None:
            raise DrainError(f"{node.name} has no private IP")
        url = f"http://{node.private_ip}:{node.admin_port or self._port}/admin/v1/drain"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DrainError(f"{node.name} did not finish draining within {timeout:.0f}s")
            try:
                r = self._http.post(url, headers={"Authorization": f"Bearer {self._token}"}, timeout=min(left, 10.0))
            except httpx.HTTPError as exc:
                raise DrainError(f"{node.name}: drain request failed: {type(exc).__name__}") from exc
            if r.status_code >= 300:
                raise DrainError(f"{node.name}: drain refused with HTTP {r.status_code}")
            try:
                drained = bool(r.json().get("drained", True))
            except ValueError:
                drained = True
            if drained:
                return
            time.sleep(min(self._poll, max(0.0, deadline - time.monotonic())))

    def refresh(self, node: NodeRef, kind: RefreshKind, content: str) -> None:
        if node.public_ip is None:
            raise ProviderError(f"{node.name} has no public IP to reach over SSH")
        argv = [*self._ssh, f"{self._user}@{node.public_ip}", _REFRESH_SCRIPTS[kind]]
        try:
            subprocess.run(argv, input=content.encode(), check=True, timeout=60, capture_output=True)
        except subprocess.CalledProcessError as exc:
            raise ProviderError(f"refresh {kind} on {node.name} failed: exit {exc.returncode}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProviderError(f"refresh {kind} on {node.name} failed: {type(exc).__name__}") from exc

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        if node.public_ip is None:
            raise ProviderError(f"{node.name} has no public IP to reach over SSH")
        files = sorted(p.name for p in directory.glob("*.whl"))
        argv = [*self._ssh, f"{self._user}@{node.public_ip}", PUBLISH_SCRIPT]
        deadline = time.monotonic() + timeout
        while True:
            tar = subprocess.run(["tar", "-c", "-C", str(directory), *files], capture_output=True, check=True)
            try:
                subprocess.run(argv, input=tar.stdout, check=True, timeout=300, capture_output=True)
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                if time.monotonic() > deadline:
                    raise ProviderError(f"publishing wheels to {node.name} failed: {type(exc).__name__}") from exc
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        poll_until(lambda: self._why_unhealthy(node, via), what=node.name, timeout=timeout, interval=self._poll * 2)

    def _why_unhealthy(self, node: NodeRef, via: NodeRef | None) -> str | None:
        if node.role == "worker":
            if node.private_ip is None:
                return "no private IP"
            try:
                r = self._http.get(f"http://{node.private_ip}:{self._daemon_port}/ready", timeout=5.0)
            except httpx.HTTPError as exc:
                return f"/ready: {type(exc).__name__}"
            return None if r.status_code == 200 else f"/ready answers {r.status_code}"
        if node.role == "state":
            if via is None or via.public_ip is None or node.private_ip is None:
                raise HealthError(f"{node.name}: no node to reach it through (the system node's public address)")
            jump = f"{self._user}@{via.public_ip}"
            argv = [*self._ssh, "-J", jump, f"{self._user}@{node.private_ip}", STATE_HEALTH_SCRIPT]
            try:
                done = subprocess.run(argv, timeout=60, capture_output=True, text=True)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return type(exc).__name__
            return (
                None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            )
        if node.role == "proxy" and node.public_ip is not None:
            return tcp_refused(node.public_ip, 443)
        return None  # system, NAT: powered on again is all the gate asks


def tcp_refused(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when `host:port` accepts a TCP connection, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


class ControlDrainOps:
    """NodeOps whose drain goes through the cluster's control plane when the cluster has one (its endpoint is
    recorded in the state dir): the control plane takes the node out of the upstreams the proxies pull, and the
    node drains at its next heartbeat; the provisioner never reaches the node itself. Everything else, and the
    drains of a cluster without a control plane, go to `inner`. Owns `inner`: close() closes it."""

    def __init__(
        self,
        inner: NodeOps,
        state_dir: Path,
        *,
        poll_interval: float = 1.0,
        transport: httpx.BaseTransport | None = None,  # tests: a stand-in control plane
    ) -> None:
        self._inner = inner
        self._state_dir = state_dir
        self._poll = poll_interval
        self._transport = transport

    def drain(self, node: NodeRef, *, timeout: float) -> None:
        from mbworker.control.endpoint import ENDPOINT_FILE, read_endpoint, tls_name_hook
        from mbworker.control.errors import ControlError

        if not (self._state_dir / ENDPOINT_FILE).exists():
            self._inner.drain(node, timeout=timeout)
            return
        try:
            endpoint = read_endpoint(self._state_dir)
            verify = endpoint.verify()
        except ControlError as exc:
            raise DrainError(f"{node.name}: {exc}") from exc
        with httpx.Client(
            verify=verify, timeout=10.0, trust_env=False, transport=self._transport,
            event_hooks={"request": [tls_name_hook(endpoint.server_name)]},
        ) as http:  # fmt: skip
            drain_through_control(http, endpoint.url, endpoint.token, node.name, timeout=timeout, poll=self._poll)

    def refresh(self, node: NodeRef, kind: RefreshKind, content: str) -> None:
        self._inner.refresh(node, kind, content)

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        self._inner.publish_wheels(node, directory, timeout=timeout)

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        self._inner.wait_healthy(node, timeout=timeout, via=via)

    def close(self) -> None:
        closer = getattr(self._inner, "close", None)
        if callable(closer):
            closer()
