"""The machines provider's networks: one network namespace per cluster holding every bridge, plus its host plumbing.

Inside namespace `mbw-<cluster>` (owned by MachinesNet; created by `up`, removed by `down`):
- `br-priv` stands for the cluster network. It carries the network's first address (the Hetzner network gateway,
  e.g. 10.0.0.1). Packets that private nodes send to that gateway are routed by a table of their own (policy rule
  `iif br-priv`): 0.0.0.0/0 via the NAT node's private IP when the network has that route, else unreachable. This
  is what a Hetzner network route does.
- `br-pub` stands for the internet: public-zone nodes get addresses from 198.18.<slot>.0/24 (RFC 2544 test range,
  never a real public address); the namespace's own `.1` there is their default gateway.
- `mbw<slot>h` (host) / `mbw<slot>n` (namespace): a veth with a /30 from 198.19.<slot>.0. The host routes only
  198.18.<slot>.0/24 into the namespace, so a client on the host reaches public addresses as an internet client
  would; nothing on the host routes to the private range.

Firewalls (nftables, table `inet mbw` inside the namespace): the internet side may never open a connection into
the private bridge, and the cloud firewall rules apply to traffic towards each public node's address, routed
(from the host) or sent by the namespace itself.
Egress (package installs): the host masquerades the namespace's traffic (table `inet mbw_<slot>` on the host),
only TCP 80/443 are forwarded, and DNS to any resolver is sent to the host's own resolver instead.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ProviderError
from .facts import Rule

PUBLIC_RANGE = ipaddress.ip_network("198.18.0.0/16")  # public-zone node addresses: one /24 per cluster slot
LINK_RANGE = ipaddress.ip_network("198.19.0.0/16")  # host <-> namespace veths: one /30 per slot
PRIV_BRIDGE = "br-priv"
PUB_BRIDGE = "br-pub"
NAT_TABLE = 100  # the routing table private nodes' gateway traffic is looked up in
INOTIFY_INSTANCES = "/proc/sys/fs/inotify/max_user_instances"
#: Raised to this when lower, never lowered again (other clusters of the host may be using it).
MIN_INOTIFY_INSTANCES = 1024
#: Present while the host forwards only because a cluster needs it (it did not before the first `up`).
FORWARD_MARKER = Path("/run/mbworker-machines-ip-forward")


def run(argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 30.0) -> str:
    """Run one host command; failures become ProviderError with the command's own stderr."""
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProviderError(f"{' '.join(argv[:4])}: {type(exc).__name__}: {exc}") from exc
    if check and done.returncode != 0:
        raise ProviderError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


def namespace_name(cluster: str) -> str:
    return f"mbw-{cluster}"


def host_resolver() -> str:
    """The host's first IPv4 nameserver: machines' DNS is answered through it (they reach no other resolver)."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError as exc:
        raise ProviderError(f"cannot read /etc/resolv.conf: {exc.strerror}") from exc
    for m in re.finditer(r"(?m)^nameserver\s+(\S+)", text):
        try:
            addr = ipaddress.ip_address(m.group(1))
        except ValueError:
            continue
        if addr.version == 4 and not addr.is_loopback:
            return str(addr)
    raise ProviderError("/etc/resolv.conf names no IPv4 nameserver the machines could use")


def free_slot() -> int:
    """The lowest slot whose public /24 the host does not route yet (another cluster of this host has it)."""
    routes = run(["ip", "-4", "route", "show"])
    used = {int(m.group(1)) for m in re.finditer(r"^198\.18\.(\d+)\.0/24", routes, re.M)}
    for slot in range(0, 256):
        if slot not in used:
            return slot
    raise ProviderError("no free 198.18.x.0/24 slot on this host")


@dataclass(frozen=True)
class NetPlan:
    """Addresses of one cluster's namespace; everything is derived from the slot and the spec's network."""

    cluster: str
    slot: int
    network: ipaddress.IPv4Network

    @property
    def ns(self) -> str:
        return namespace_name(self.cluster)

    @property
    def host_if(self) -> str:
        return f"mbw{self.slot}h"

    @property
    def ns_if(self) -> str:
        return f"mbw{self.slot}n"

    @property
    def public_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.slot}.0/24")

    @property
    def public_gateway(self) -> str:
        return f"198.18.{self.slot}.1"

    @property
    def link_host(self) -> str:
        return f"198.19.{self.slot}.1"

    @property
    def link_ns(self) -> str:
        return f"198.19.{self.slot}.2"

    @property
    def private_gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def host_table(self) -> str:
        return f"mbw_{self.slot}"

    def in_ns(self, *argv: str) -> list[str]:
        """`argv` run in the namespace's network stack only (`ip netns exec` would also remount /sys, which
        hides the cgroup tree systemd-nspawn needs)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]


class MachinesNet:
    """Owns one cluster's namespace, bridges, veth, host route and nft tables. Every method is idempotent."""

    def __init__(self, plan: NetPlan) -> None:
        self.plan = plan

    def exists(self) -> bool:
        return Path(f"/run/netns/{self.plan.ns}").exists()

    def up(self) -> None:
        p = self.plan
        if not self.exists():
            run(["ip", "netns", "add", p.ns])
        ns = p.in_ns
        run(ns("ip", "link", "set", "lo", "up"))
        for bridge, addr in (
            (PRIV_BRIDGE, f"{p.private_gateway}/{p.network.prefixlen}"),
            (PUB_BRIDGE, f"{p.public_gateway}/{p.public_net.prefixlen}"),
        ):
            if run(ns("ip", "link", "show", bridge), check=False) == "":
                run(ns("ip", "link", "add", bridge, "type", "bridge"))
            run(ns("ip", "addr", "replace", addr, "dev", bridge))
            run(ns("ip", "link", "set", bridge, "up"))
        if run(["ip", "link", "show", p.host_if], check=False) == "":
            run(["ip", "link", "add", p.host_if, "type", "veth", "peer", "name", p.ns_if, "netns", p.ns])
        run(["ip", "addr", "replace", f"{p.link_host}/30", "dev", p.host_if])
        run(["ip", "link", "set", p.host_if, "up"])
        run(ns("ip", "addr", "replace", f"{p.link_ns}/30", "dev", p.ns_if))
        run(ns("ip", "link", "set", p.ns_if, "up"))
        run(ns("ip", "route", "replace", "default", "via", p.link_host))
        # the namespace is the router of both bridges; redirects would teach nodes shortcuts a cloud has not
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ):
            run(ns("sysctl", "-q", "-w", f"{key}={value}"))
        run(["ip", "route", "replace", str(p.public_net), "via", p.link_ns, "dev", p.host_if])
        # private nodes' gateway traffic: its own table, unreachable unless the network has a NAT route
        run(ns("ip", "route", "replace", str(p.network), "dev", PRIV_BRIDGE, "table", str(NAT_TABLE)))
        run(ns("ip", "route", "replace", "unreachable", "default", "metric", "1000", "table", str(NAT_TABLE)))
        if f"lookup {NAT_TABLE}" not in run(ns("ip", "rule", "show")):
            run(ns("ip", "rule", "add", "iif", PRIV_BRIDGE, "lookup", str(NAT_TABLE), "priority", "100"))
        # every machine's systemd takes inotify instances from the host's per-user budget (128 by default): a few
        # clusters side by side exhaust it and a new machine's PID 1 exits at once ("Too many open files")
        if int(Path(INOTIFY_INSTANCES).read_text()) < MIN_INOTIFY_INSTANCES:
            run(["sysctl", "-q", "-w", f"fs.inotify.max_user_instances={MIN_INOTIFY_INSTANCES}"])
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0":
            FORWARD_MARKER.touch()  # the last cluster's `down` puts the host back as it was
            run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self._host_nft()

    def set_nat_route(self, gateway: str | None) -> None:
        """0.0.0.0/0 via `gateway` (the NAT node's private IP) for the private bridge, or none."""
        ns = self.plan.in_ns
        table = str(NAT_TABLE)
        if gateway is None:
            run(ns("ip", "route", "del", "default", "metric", "10", "table", table), check=False)
        else:
            run(ns("ip", "route", "replace", "default", "via", gateway, "metric", "10", "table", table))

    def nat_route(self) -> str | None:
        out = run(self.plan.in_ns("ip", "route", "show", "table", str(NAT_TABLE)), check=False)
        m = re.search(r"^default via (\S+)", out, re.M)
        return m.group(1) if m else None

    def set_firewall(self, public: dict[str, tuple[Rule, ...]]) -> None:
        """Namespace nftables: nothing from outside into the private bridge; cloud rules per public address.

        `public` maps a public node's address to the rules of the firewall applied to it; an address with no
        entry is open, as a Hetzner server without a firewall is.
        """
        p = self.plan
        cloud: list[str] = []
        for addr, rules in sorted(public.items()):
            for rule in rules:
                cloud.append(f"    {_nft_rule(addr, rule)} accept")
            cloud.append(f"    ip daddr {addr} drop")
        lines = [
            "table inet mbw {",
            "  chain forward {",
            "    type filter hook forward priority 0; policy accept;",
            "    ct state established,related accept",
            f'    oifname "{PRIV_BRIDGE}" iifname != "{PRIV_BRIDGE}" drop',
            # only the public range leaves for the host (a private source would be answered to the host's LAN);
            # rejected rather than dropped, so a node behind a NAT that does not masquerade fails fast
            f'    oifname "{p.ns_if}" ip saddr != {p.public_net} reject with icmp type admin-prohibited',
            *cloud,
            "  }",
            # the namespace is the internet too: what it sends itself (from its public gateway address) meets the
            # same cloud firewall, so a test can be an internet client that is not the host
            "  chain output {",
            "    type filter hook output priority 0; policy accept;",
            "    ct state established,related accept",
            *cloud,
            "  }",
            "}",
        ]
        script = "\n".join(lines) + "\n"
        run(p.in_ns("nft", "delete", "table", "inet", "mbw"), check=False)
        run(p.in_ns("nft", "-f", "-"), input=script)

    def _host_nft(self) -> None:
        p = self.plan
        resolver = host_resolver()
        script = f"""table inet {p.host_table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{p.host_if}" meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {resolver}
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{p.host_if}" ip saddr != {{ {p.public_net}, {p.link_ns} }} drop
    iifname "{p.host_if}" ct status dnat accept
    iifname "{p.host_if}" ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 }} drop
    iifname "{p.host_if}" tcp dport {{ 80, 443 }} accept
    iifname "{p.host_if}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname "{p.host_if}" oifname != "{p.host_if}" masquerade
  }}
}}
"""
        run(["nft", "delete", "table", "inet", p.host_table], check=False)
        run(["nft", "-f", "-"], input=script)

    def down(self) -> None:
        """Remove everything `up` made; machines must be stopped first (their veths die with them)."""
        p = self.plan
        run(["nft", "delete", "table", "inet", p.host_table], check=False)
        run(["ip", "route", "del", str(p.public_net)], check=False)
        run(["ip", "link", "del", p.host_if], check=False)
        if self.exists():
            run(["ip", "netns", "del", p.ns])
        others = [n for n in run(["ip", "netns", "list"]).split() if n.startswith("mbw-")]
        if FORWARD_MARKER.exists() and not others:
            run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
            FORWARD_MARKER.unlink()

    def leftovers(self) -> list[str]:
        """What of this cluster is still on the host (empty after `down`): for tests and `status`."""
        p = self.plan
        out = []
        if self.exists():
            out.append(f"namespace {p.ns}")
        if run(["ip", "link", "show", p.host_if], check=False):
            out.append(f"link {p.host_if}")
        if run(["ip", "route", "show", str(p.public_net)], check=False).strip():
            out.append(f"route {p.public_net}")
        if run(["nft", "list", "table", "inet", p.host_table], check=False).strip():
            out.append(f"nft table {p.host_table}")
        return out


def _nft_rule(addr: str, rule: Rule) -> str:
    sources = [s for s in rule.source_ips if ipaddress.ip_network(s, strict=False).version == 4]
    src = "" if "0.0.0.0/0" in sources else f"ip saddr {{ {', '.join(sources) or '0.0.0.0/32'} }} "
    if rule.protocol == "icmp":
        return f"ip daddr {addr} {src}ip protocol icmp"
    port = f" {rule.protocol} dport {rule.port}" if rule.port else f" meta l4proto {rule.protocol}"
    return f"ip daddr {addr} {src}{port.strip()}"
