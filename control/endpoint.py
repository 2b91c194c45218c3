"""Where operators' tools find a cluster's control plane: two files in the cluster's state dir (next to the spec).

    <state dir>/control_token   the control token (0600), created with the cluster's secrets
    <state dir>/control_node_token  the read-only token proxies and metrics use (upstreams, scrape targets)
    <state dir>/control.json    {"url": "..."}: written by the provider that started the control plane

The local provider writes both; a cloud provider writes the URL of the system node's public address.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def write_endpoint(state_dir: Path, url: str) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state_dir / (ENDPOINT_FILE + ".tmp")
    tmp.write_text(json.dumps({"url": url}) + "\n")
    os.replace(tmp, state_dir / ENDPOINT_FILE)


def read_endpoint(state_dir: Path) -> tuple[str, str]:
    """(URL, token) of the cluster's control plane; `ControlError` saying what is missing."""
    path = state_dir / ENDPOINT_FILE
    try:
        url = str(json.loads(path.read_text())["url"])
    except FileNotFoundError:
        raise ControlError(f"no control plane recorded for this cluster ({path} is missing): is it up?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"cannot read {path}: {exc}") from None
    if not token_path(state_dir).exists():
        raise ControlError(f"no control token in {state_dir}")
    return url.rstrip("/"), load_or_create_token(token_path(state_dir))
