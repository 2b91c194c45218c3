"""The cluster's layout: every node the provisioner created (name, role, private IP), whether it reports or not.

The provisioner writes it to the system node (`/etc/mbsystem/targets.json`, in the user-data at creation and
rewritten by `mbworker provision` when nodes change) in Prometheus `file_sd` form, one group per target:

    {"targets": ["10.0.0.11:9100"], "labels": {"node": "c-state-001", "role": "state", "kind": "node"}}
    {"targets": ["10.0.1.1:8001"], "labels": {"node": "c-worker-001", "kind": "mbworker"}}

`kind: node` is a node's node-exporter (one per node: the layout), `kind: mbworker` a worker's mbworker
`/metrics` on its admin listener. `layout_json` writes it (provision/render.py), `read_layout` reads it (the
control plane: `--layout-file`). One format, so the file written before this reader existed reads the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mbworker.control.errors import ControlError

NODE_EXPORTER_PORT = 9100
PATRONI_PORT = 8008
"""Patroni's REST API on state nodes: its peers, HAProxy's checks and the control plane's probe use it."""
ROLES = ("system", "proxy", "worker", "state", "nat")


class LayoutError(ControlError):
    """The layout file is unreadable or not the provisioner's format: the last good layout stays in force."""


@dataclass(frozen=True)
class LayoutNode:
    name: str
    role: str
    private_ip: str
    admin_port: int = 0
    """A worker's admin listener (its `/metrics`); 0 for nodes without mbworker's daemon."""
    exporter_port: int = NODE_EXPORTER_PORT


def layout_json(nodes: Iterable[LayoutNode]) -> str:
    """The file_sd JSON of `nodes`: node-exporter on every node, mbworker's metrics on workers' admin ports."""
    ordered = sorted(nodes, key=lambda n: n.name)
    groups: list[dict[str, Any]] = [
        {
            "targets": [f"{n.private_ip}:{n.exporter_port}"],
            "labels": {"node": n.name, "role": n.role, "kind": "node"},
        }
        for n in ordered
    ]
    groups += [
        {"targets": [f"{n.private_ip}:{n.admin_port}"], "labels": {"node": n.name, "kind": "mbworker"}}
        for n in ordered
        if n.role == "worker" and n.admin_port
    ]
    return json.dumps(groups, indent=2)


def read_layout(path: Path) -> tuple[LayoutNode, ...]:
    """The nodes in `path` (blocking: run it in a thread); `LayoutError` saying what is wrong."""
    try:
        groups = json.loads(path.read_text())
    except OSError as exc:
        raise LayoutError(f"cannot read the layout {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise LayoutError(f"the layout {path} is not JSON: {exc}") from None
    return parse_layout(groups, str(path))


def parse_layout(groups: Any, where: str = "the layout") -> tuple[LayoutNode, ...]:
    if not isinstance(groups, list):
        raise LayoutError(f"{where}: expected a list of target groups")
    nodes: dict[str, LayoutNode] = {}
    admin: dict[str, int] = {}
    for i, group in enumerate(groups):
        try:
            labels = group["labels"]
            host, _, port = str(group["targets"][0]).rpartition(":")
            kind, name = labels["kind"], str(labels["node"])
            if not host or not name:
                raise ValueError("a target needs a host and a node name")
            if kind == "node":
                role = str(labels["role"])
                if role not in ROLES:
                    raise ValueError(f"unknown role {role!r}")
                nodes[name] = LayoutNode(name, role, host, exporter_port=int(port))
            elif kind == "mbworker":
                admin[name] = int(port)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise LayoutError(f"{where}: target group {i} is not a layout entry ({exc!r})") from None
    return tuple(replace(n, admin_port=admin.get(n.name, 0)) for n in sorted(nodes.values(), key=_order))


def _order(n: LayoutNode) -> tuple[str, str]:
    return (n.role, n.name)
