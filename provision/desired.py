"""What the spec asks for, in resource terms: names, labels, addresses and firewall rules. Pure functions.

Naming is what makes create-if-missing idempotent: `<cluster>-<role>-<NNN>` (system and NAT have no number),
so the nth worker is always the same server and scale-in removes the highest numbers first.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from .facts import MANAGED_BY, Rule
from .spec import WORKER_BASE, ClusterSpec

ROLES = ("system", "proxy", "worker", "state")
PUBLIC_ROLES = frozenset({"system", "proxy", "nat"})


@dataclass(frozen=True)
class DesiredServer:
    name: str
    role: str  # system | proxy | worker | state | nat
    index: int  # 1-based; 0 for system and nat
    server_type: str
    public: bool
    #: The server's private address, chosen by us (never by the cloud's allocator): every node's address is known
    #: before it exists, so peers, lists and routes are rendered up front and re-plans are stable.
    fixed_ip: str
    placement_group: str | None = None

    def labels(self, cluster: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        labels = {"cluster": cluster, "role": self.role, "managed-by": MANAGED_BY, "index": str(self.index)}
        labels.update(extra or {})
        return labels


def architecture(server_type: str) -> str:
    """Hetzner's name for a server type's CPU architecture: cax types are Ampere (arm64), the rest x86."""
    return "arm64" if server_type.startswith("cax") else "x86_64"


def architectures(spec: ClusterSpec) -> tuple[str, ...]:
    """Every CPU architecture the spec's servers run on (what the shipped wheels must cover)."""
    return tuple(sorted({architecture(s.server_type) for s in desired_servers(spec)}))


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


#: Address layout inside the subnet (its .1 is the cloud's gateway): NAT .2, system .3, state .11-.15, proxies
#: from .20 (at most 100), workers from .128 to the end of the subnet.
STATE_BASE = 10
PROXY_BASE = 20


def state_ip(spec: ClusterSpec, index: int) -> str:
    """State node n's address: .10+n in the subnet, known before the server exists so peers can be configured."""
    return subnet_host(spec, STATE_BASE + index)


def proxy_ip(spec: ClusterSpec, index: int) -> str:
    return subnet_host(spec, PROXY_BASE + index - 1)


def proxy_networks(spec: ClusterSpec) -> list[str]:
    """CIDRs covering every address a proxy may have (.20 up to 100 of them): the peers whose X-Forwarded-* a
    worker believes (its `trusted_proxies`), whatever the proxy count becomes later."""
    first = ipaddress.ip_address(proxy_ip(spec, 1))
    last = ipaddress.ip_address(proxy_ip(spec, 100))
    return [str(n) for n in ipaddress.summarize_address_range(first, last)]


def worker_ip(spec: ClusterSpec, index: int) -> str:
    return subnet_host(spec, WORKER_BASE + index - 1)


def max_workers(spec: ClusterSpec) -> int:
    """How many workers the subnet has addresses for (its last address is the broadcast one)."""
    return spec.subnet_cidr.num_addresses - 1 - WORKER_BASE


def state_ips(spec: ClusterSpec) -> list[str]:
    return [state_ip(spec, i) for i in range(1, spec.state.count + 1)]


#: HAProxy on every state node fronts the Redis master here (Redis itself listens on 6379).
REDIS_FRONT_PORT = 6380
POSTGRES_RW_PORT = 5000
POSTGRES_RO_PORT = 5001


#: The master's name as the Sentinels know it.
SENTINEL_SERVICE = "mbredis"
SENTINEL_PORT = 26379


def redis_url(spec: ClusterSpec, password: str, sentinel_password: str) -> str:
    """What workers connect to: every state node's Sentinel (3 or 5 nodes), or the one Redis of a single node."""
    if spec.state.count == 1:
        return f"redis://:{password}@{state_ip(spec, 1)}:6379/0"
    hosts = ",".join(f"{ip}:{SENTINEL_PORT}" for ip in state_ips(spec))
    return f"redis+sentinel://:{password}@{hosts}/{SENTINEL_SERVICE}/0?sentinel_password={sentinel_password}"


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
        out.append(
            DesiredServer(server_name(spec.name, "worker", i), "worker", i, spec.worker.type, False, worker_ip(spec, i))
        )
    for i in range(1, spec.proxy.count + 1):
        out.append(
            DesiredServer(server_name(spec.name, "proxy", i), "proxy", i, spec.proxy.type, True, proxy_ip(spec, i))
        )
    out.append(DesiredServer(server_name(spec.name, "system", 0), "system", 0, spec.system.type, True, system_ip(spec)))
    return out


def _anywhere() -> tuple[str, ...]:
    return ("0.0.0.0/0", "::/0")


def system_firewall_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-system"


#: The control plane: HTTPS on the system node's public address (HAProxy there terminates TLS) ...
CONTROL_PUBLIC_PORT = 443
#: ... in front of `mbworker control serve` on the system node's private address, where proxies pull upstreams.
CONTROL_PORT = 8002


def control_private_url(spec: ClusterSpec) -> str:
    return f"http://{system_ip(spec)}:{CONTROL_PORT}"


def public_firewall_rules(spec: ClusterSpec) -> tuple[Rule, ...]:
    """Proxy nodes: 80/443 from anywhere, SSH only from the safe-list, ICMP. Outbound stays open."""
    rules = [
        Rule("in", "tcp", "443", _anywhere(), "https"),
        Rule("in", "tcp", "80", _anywhere(), "http (ACME, redirect)"),
        Rule("in", "icmp", None, _anywhere(), "ping"),
    ]
    if spec.ssh_allow:
        rules.append(Rule("in", "tcp", "22", tuple(str(c) for c in spec.ssh_allow), "ssh safe-list"))
    return tuple(rules)


def system_firewall_rules(spec: ClusterSpec) -> tuple[Rule, ...]:
    """The system node: the control plane's HTTPS only from `control_allow` (no rule at all when it is empty: then
    nothing public reaches it), SSH from the safe-list, ICMP."""
    rules = [Rule("in", "icmp", None, _anywhere(), "ping")]
    if spec.control_allow:
        rules.append(
            Rule("in", "tcp", str(CONTROL_PUBLIC_PORT), tuple(str(c) for c in spec.control_allow), "control plane")
        )
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
    return f"cluster={spec.name},role=proxy"


def system_selector(spec: ClusterSpec) -> str:
    return f"cluster={spec.name},role=system"


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


#: The network label holding ClusterSecrets.digest().
SECRETS_LABEL = "secrets-digest"


def targets_revision(node_names: list[str]) -> str:
    return revision(node_names)


def is_private(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_private
