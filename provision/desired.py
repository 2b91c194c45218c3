"""What the spec asks for, in resource terms: names, labels, addresses and firewall rules. Pure functions.

Naming is what makes create-if-missing idempotent: `<cluster>-<role>-<NNN>` (system and NAT have no number),
so the nth worker is always the same server and scale-in removes the highest numbers first.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from .facts import MANAGED_BY, Rule
from .spec import ClusterSpec

ROLES = ("system", "proxy", "worker", "state")
PUBLIC_ROLES = frozenset({"system", "proxy", "nat"})
#: Hetzner's recursive resolvers; private-only nodes get no DHCP DNS (reference §3.2).
HETZNER_DNS = ("185.12.64.1", "185.12.64.2")


@dataclass(frozen=True)
class DesiredServer:
    name: str
    role: str  # system | proxy | worker | state | nat
    index: int  # 1-based; 0 for system and nat
    server_type: str
    public: bool
    #: A fixed private address (NAT: the route target; state: an alias IP peers are configured with up front).
    fixed_ip: str | None = None
    placement_group: str | None = None

    def labels(self, cluster: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        labels = {"cluster": cluster, "role": self.role, "managed-by": MANAGED_BY, "index": str(self.index)}
        labels.update(extra or {})
        return labels


def base_labels(spec: ClusterSpec, role: str | None = None) -> dict[str, str]:
    labels = {"cluster": spec.name, "managed-by": MANAGED_BY}
    if role is not None:
        labels["role"] = role
    return labels


def cluster_selector(spec: ClusterSpec) -> str:
    return f"cluster={spec.name},managed-by={MANAGED_BY}"


def server_name(cluster: str, role: str, index: int) -> str:
    return f"{cluster}-{role}" if role in ("system", "nat") else f"{cluster}-{role}-{index:03d}"


def network_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-net"


def public_firewall_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-public"


def nat_firewall_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-nat"


def placement_group_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-state"


def load_balancer_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-lb"


def floating_ip_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-ip"


def ssh_key_name(spec: ClusterSpec, i: int) -> str:
    return f"{spec.name}-key-{i + 1}"


def subnet_host(spec: ClusterSpec, n: int) -> str:
    return str(spec.subnet_cidr.network_address + n)


def network_gateway(spec: ClusterSpec) -> str:
    """The virtual gateway private nodes route through: the network's first address (reference §3.2)."""
    return str(spec.network.network_address + 1)


def nat_ip(spec: ClusterSpec) -> str:
    return subnet_host(spec, 2)


def system_ip(spec: ClusterSpec) -> str:
    """The system node's fixed private IP: every node ships logs there, so it is known before the node exists."""
    return subnet_host(spec, 3)


def state_ip(spec: ClusterSpec, index: int) -> str:
    """State node n's alias IP: .10+n in the subnet, known before the server exists so peers can be configured."""
    return subnet_host(spec, 10 + index)


def state_ips(spec: ClusterSpec) -> list[str]:
    return [state_ip(spec, i) for i in range(1, spec.state.count + 1)]


#: HAProxy on every state node fronts the Redis master here (Redis itself listens on 6379).
REDIS_FRONT_PORT = 6380
POSTGRES_RW_PORT = 5000
POSTGRES_RO_PORT = 5001


def redis_url(spec: ClusterSpec, password: str) -> str:
    return f"redis://:{password}@{state_ip(spec, 1)}:{REDIS_FRONT_PORT}/0"


def desired_servers(spec: ClusterSpec) -> list[DesiredServer]:
    """Every server the spec asks for, in creation order: NAT, state, workers, proxies, system.

    State comes before workers (their env names the state pillar) and workers before proxies and system (their
    configs list the workers / scrape targets).
    """
    out: list[DesiredServer] = []
    if spec.nat is not None:
        out.append(DesiredServer(server_name(spec.name, "nat", 0), "nat", 0, spec.nat.type, True, nat_ip(spec)))
    for i in range(1, spec.state.count + 1):
        out.append(
            DesiredServer(
                server_name(spec.name, "state", i),
                "state",
                i,
                spec.state.type,
                False,
                fixed_ip=state_ip(spec, i),
                placement_group=placement_group_name(spec),
            )
        )
    for i in range(1, spec.worker.count + 1):
        out.append(DesiredServer(server_name(spec.name, "worker", i), "worker", i, spec.worker.type, False))
    for i in range(1, spec.proxy.count + 1):
        out.append(DesiredServer(server_name(spec.name, "proxy", i), "proxy", i, spec.proxy.type, True))
    out.append(DesiredServer(server_name(spec.name, "system", 0), "system", 0, spec.system.type, True, system_ip(spec)))
    return out


def _anywhere() -> tuple[str, ...]:
    return ("0.0.0.0/0", "::/0")


def public_firewall_rules(spec: ClusterSpec) -> tuple[Rule, ...]:
    """Proxy and system nodes: 80/443 from anywhere, SSH only from the safe-list, ICMP. Outbound stays open."""
    rules = [
        Rule("in", "tcp", "443", _anywhere(), "https"),
        Rule("in", "tcp", "80", _anywhere(), "http (ACME, redirect)"),
        Rule("in", "icmp", None, _anywhere(), "ping"),
    ]
    if spec.ssh_allow:
        rules.append(Rule("in", "tcp", "22", tuple(str(c) for c in spec.ssh_allow), "ssh safe-list"))
    return tuple(rules)


def nat_firewall_rules(spec: ClusterSpec) -> tuple[Rule, ...]:
    """The NAT gateway: SSH from the safe-list only; forwarded traffic arrives on the private interface."""
    rules = [Rule("in", "icmp", None, _anywhere(), "ping")]
    if spec.ssh_allow:
        rules.append(Rule("in", "tcp", "22", tuple(str(c) for c in spec.ssh_allow), "ssh safe-list"))
    return tuple(rules)


def public_selector(spec: ClusterSpec) -> str:
    return f"cluster={spec.name},role in (proxy,system)"


def nat_selector(spec: ClusterSpec) -> str:
    return f"cluster={spec.name},role=nat"


def proxy_selector(spec: ClusterSpec) -> str:
    return f"cluster={spec.name},role=proxy"


#: (listen, destination) TCP passthrough services of the optional load balancer.
LB_SERVICES: tuple[tuple[int, int], ...] = ((80, 80), (443, 443))


def revision(names: list[str], *salt: object) -> str:
    """A short stable digest of a node set, kept as a label on the nodes whose config lists that set.

    It is how a re-plan knows a proxy's worker list (or the system node's scrape targets) is current without
    reading the node's disk: the label changes exactly when the set does.
    """
    h = hashlib.sha256(("|".join(sorted(names)) + "|" + "|".join(map(str, salt))).encode()).hexdigest()
    return h[:12]


def workers_revision(spec: ClusterSpec, worker_names: list[str]) -> str:
    return revision(worker_names, spec.daemon.port)


def targets_revision(node_names: list[str]) -> str:
    return revision(node_names)


def is_private(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_private
