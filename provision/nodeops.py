"""Talking to nodes (not to the cloud API): draining a worker and refreshing a node's config lists.

`NodeOps` is the seam: the executor calls it, tests inject a fake (they must never send traffic to the fake's
10.x or 198.51.100.x addresses). `RemoteNodeOps` is the default for real clusters:
- drain: `POST http://<private-ip>:<admin-port>/admin/v1/drain` with the admin token. Needs a route into the
  private network (run from the system node, a VPN, or `sshuttle -r root@<system-ip> 10.0.0.0/16`).
  Contract: 2xx with JSON `{"drained": true}` (or no `drained` field) means idle; `{"drained": false}` means
  still draining — the request is repeated (it is idempotent) until drained or the timeout.
- refresh: writes the list over SSH to the node's public address (proxies and system are in the SSH safe-list
  zone) and runs the node's render/reload script.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from .errors import DrainError, ProviderError

RefreshKind = Literal["workers", "targets"]


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
        """Install `content` as the node's worker list (proxy) or scrape targets (system) and reload."""
        ...


_REFRESH_SCRIPTS: dict[RefreshKind, str] = {
    "workers": "cat > /etc/mbgateway/workers.new && mv /etc/mbgateway/workers.new /etc/mbgateway/workers"
    " && /usr/local/sbin/mbgateway-render",
    # VictoriaMetrics re-reads file_sd files on its own (-promscrape.configCheckInterval)
    "targets": "cat > /etc/mbsystem/targets.json.new && mv /etc/mbsystem/targets.json.new /etc/mbsystem/targets.json",
}


class RemoteNodeOps:
    """Drain over HTTP on the private network; refresh over SSH. Owns its HTTP client: call close()."""

    def __init__(
        self,
        admin_token: str,
        admin_port: int,
        *,
        ssh: tuple[str, ...] = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"),
        ssh_user: str = "root",
        poll_interval: float = 1.0,
        request_timeout: float = 10.0,
    ) -> None:
        self._token = admin_token
        self._port = admin_port
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
