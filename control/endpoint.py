"""Where operators' tools find a cluster's control plane: two files in the cluster's state dir (next to the spec).

    <state dir>/control_token   the control token (0600), created with the cluster's secrets
    <state dir>/control_node_token  the read-only token proxies and metrics use (upstreams, scrape targets)
    <state dir>/control.json    {"url", "ca", "server_name"}: written by the provider that started the control plane

The local provider writes a loopback `http://` URL. A cloud provider writes `https://<system node's public
address>`, the cluster CA's certificate (`ca`, a path in the state dir) clients verify it with, and the DNS name
the control plane's certificate is issued for (`server_name`): the CLI sends it as the TLS server name, so the
certificate needs no IP address (Hetzner gives the address only once the server exists).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from mbworker.control.errors import ControlError
from mbworker.control.token import load_or_create_token

TOKEN_FILE = "control_token"
NODE_TOKEN_FILE = "control_node_token"
ENDPOINT_FILE = "control.json"


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def node_token_path(state_dir: Path) -> Path:
    return state_dir / NODE_TOKEN_FILE


def control_token(state_dir: Path) -> str:
    """The cluster's control token, created on first use (the provider calls this with the other secrets)."""
    return load_or_create_token(token_path(state_dir))


def node_token(state_dir: Path) -> str:
    """The read-only token for proxies and metrics, created on first use."""
    return load_or_create_token(node_token_path(state_dir))


def server_name(cluster: str) -> str:
    """The DNS name in the control plane's certificate (never resolved: clients send it as the TLS server name)."""
    return f"control.{cluster}.cluster.internal"


@dataclass(frozen=True)
class ControlEndpoint:
    url: str
    token: str
    ca_file: Path | None = None
    """The CA certificate that verifies the control plane (None: a plain-HTTP local one)."""
    server_name: str | None = None
    """The TLS server name to verify (None: the URL's host)."""

    def verify(self) -> ssl.SSLContext | bool:
        """How an HTTP client trusts this control plane: the cluster CA when it has one (`ControlError` when the
        file cannot be read), else the system's."""
        if self.ca_file is None:
            return True
        try:
            return ssl.create_default_context(cafile=str(self.ca_file))
        except OSError as exc:
            raise ControlError(f"cannot read the cluster CA {self.ca_file}: {exc.strerror}") from None


def tls_name_hook(server_name: str | None) -> Callable[[httpx.Request], None]:
    """An httpx request hook that sends and verifies `server_name` as the TLS name (the URL holds an address)."""

    def hook(request: httpx.Request) -> None:
        if server_name is not None:
            request.extensions["sni_hostname"] = server_name

    return hook


def write_endpoint(state_dir: Path, url: str, *, ca_file: Path | None = None, name: str | None = None) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    record: dict[str, str] = {"url": url}
    if ca_file is not None:
        record["ca"] = str(ca_file)
    if name is not None:
        record["server_name"] = name
    tmp = state_dir / (ENDPOINT_FILE + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, state_dir / ENDPOINT_FILE)


def read_endpoint(state_dir: Path) -> ControlEndpoint:
    """Where the cluster's control plane is and how to trust it; `ControlError` saying what is missing."""
    path = state_dir / ENDPOINT_FILE
    try:
        record = json.loads(path.read_text())
        url = str(record["url"])
        ca = record.get("ca")
        name = record.get("server_name")
    except FileNotFoundError:
        raise ControlError(f"no control plane recorded for this cluster ({path} is missing): is it up?") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ControlError(f"cannot read {path}: {exc}") from None
    if not token_path(state_dir).exists():
        raise ControlError(f"no control token in {state_dir}")
    return ControlEndpoint(
        url.rstrip("/"),
        load_or_create_token(token_path(state_dir)),
        Path(ca) if isinstance(ca, str) else None,
        name if isinstance(name, str) else None,
    )
