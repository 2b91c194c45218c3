"""`mbworker provision status`: the cluster's URLs and nodes, from what the provider reads (never from the spec alone).

One shape for every provider: `{"public_url", "control_url", "nodes": [{"name", "role", "public_ip",
"private_ip", "state"}]}`. Cloud providers (Hetzner, machines) derive it from their Facts; the local provider from
its processes. `public_url` is where clients go (load balancer, floating IP or the first proxy); `control_url` is
the system node's public address, where the operator reaches the cluster's own services.
"""

from __future__ import annotations

from typing import Any

from . import desired as d
from .facts import Facts
from .local import LocalProvider
from .spec import ClusterSpec

_ORDER = {"nat": 0, "state": 1, "worker": 2, "proxy": 3, "system": 4}


def status_from_facts(spec: ClusterSpec, facts: Facts) -> dict[str, Any]:
    servers = sorted(facts.servers, key=lambda s: (_ORDER.get(s.role, 9), s.index, s.name))
    proxies = [s for s in servers if s.role == "proxy" and s.ipv4]
    fip = facts.floating_ip(d.floating_ip_name(spec))
    front = fip.ip if fip is not None else (proxies[0].ipv4 if proxies else None)
    system = next((s for s in servers if s.role == "system" and s.ipv4), None)
    return {
        "public_url": f"https://{front}" if front else None,
        "control_url": f"https://{system.ipv4}" if system is not None else None,
        "nodes": [
            {
                "name": s.name,
                "role": s.role,
                "public_ip": s.ipv4,
                "private_ip": s.alias_ips[0] if s.alias_ips else s.private_ip,
                "state": s.status,
            }
            for s in servers
        ],
    }


def status_local(provider: LocalProvider) -> dict[str, Any]:
    """The local provider's processes: redis is the state pillar, the gateway the proxy."""
    alive = provider.running()
    host = provider.host
    nodes = []
    for key in sorted(alive):
        role = {"redis": "state", "gateway": "proxy", "control": "system"}.get(key, "worker")
        nodes.append({"name": key, "role": role, "public_ip": None, "private_ip": host, "state": "running"})
    gateway = alive.get("gateway")
    return {
        "public_url": f"http://{host}:{gateway['port']}" if gateway else None,
        "control_url": provider.control_url() if "control" in alive else None,
        "nodes": nodes,
    }


def render_status(status: dict[str, Any]) -> str:
    lines = [f"public:  {status['public_url'] or '-'}", f"control: {status['control_url'] or '-'}"]
    for n in status["nodes"]:
        lines.append(
            f"  {n['name']:<28} {n['role']:<7} {n['state']:<8} "
            f"public {n['public_ip'] or '-':<15} private {n['private_ip'] or '-'}"
        )
    if not status["nodes"]:
        lines.append("  no nodes")
    return "\n".join(lines)
