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
from pathlib import Path
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

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        """Make the system node serve exactly the wheels in `directory` (its /var/lib/mbwheels); the node may
        still be booting, so keep trying until `timeout`."""
        ...


_REFRESH_SCRIPTS: dict[RefreshKind, str] = {
    "workers": "cat > /etc/mbgateway/workers.new && mv /etc/mbgateway/workers.new /etc/mbgateway/workers"
    " && /usr/local/sbin/mbgateway-render",
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
