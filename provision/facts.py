"""Facts: what exists now, as plain frozen data read by a provider. The planner compares them with the spec.

Nothing here talks to an API; providers build these from their own reads (HetznerProvider from hcloud objects,
tests from literals), which is what lets plan test cases be data.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

MANAGED_BY = "mbworker"


@dataclass(frozen=True)
class Rule:
    """One inbound Cloud Firewall rule, normalized so two equal rule sets compare equal."""

    direction: str
    protocol: str
    port: str | None
    source_ips: tuple[str, ...]
    description: str | None = None

    def key(self) -> tuple[str, str, str | None, tuple[str, ...]]:
        # descriptions are cosmetic: they do not make a rule set different
        return (self.direction, self.protocol, self.port, tuple(sorted(self.source_ips)))


@dataclass(frozen=True)
class NetworkFact:
    id: int
    name: str
    ip_range: str
    subnets: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = ()  # (destination, gateway)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerFact:
    id: int
    name: str
    server_type: str
    status: str = "running"
    labels: dict[str, str] = field(default_factory=dict)
    ipv4: str | None = None
    ipv6: str | None = None
    private_ip: str | None = None
    alias_ips: tuple[str, ...] = ()
    network_ids: tuple[int, ...] = ()
    placement_group_id: int | None = None
    #: The image the server was created from (None when the API no longer says).
    image: str | None = None

    @property
    def role(self) -> str:
        return self.labels.get("role", "")

    @property
    def index(self) -> int:
        try:
            return int(self.labels.get("index", "0"))
        except ValueError:
            return 0


@dataclass(frozen=True)
class FirewallFact:
    id: int
    name: str
    rules: tuple[Rule, ...] = ()
    selectors: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    applied_server_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SshKeyFact:
    id: int
    name: str
    fingerprint: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementGroupFact:
    id: int
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadBalancerFact:
    id: int
    name: str
    lb_type: str
    services: tuple[tuple[int, int], ...] = ()  # (listen_port, destination_port)
    selectors: tuple[str, ...] = ()
    network_ids: tuple[int, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FloatingIpFact:
    id: int
    name: str
    ip: str
    server_id: int | None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Facts:
    """Everything labelled for one cluster, plus every SSH key in the project (keys are unique per project)."""

    network: NetworkFact | None = None
    servers: tuple[ServerFact, ...] = ()
    firewalls: tuple[FirewallFact, ...] = ()
    ssh_keys: tuple[SshKeyFact, ...] = ()
    placement_groups: tuple[PlacementGroupFact, ...] = ()
    load_balancers: tuple[LoadBalancerFact, ...] = ()
    floating_ips: tuple[FloatingIpFact, ...] = ()

    def server(self, name: str) -> ServerFact | None:
        return next((s for s in self.servers if s.name == name), None)

    def firewall(self, name: str) -> FirewallFact | None:
        return next((f for f in self.firewalls if f.name == name), None)

    def placement_group(self, name: str) -> PlacementGroupFact | None:
        return next((p for p in self.placement_groups if p.name == name), None)

    def load_balancer(self, name: str) -> LoadBalancerFact | None:
        return next((lb for lb in self.load_balancers if lb.name == name), None)

    def floating_ip(self, name: str) -> FloatingIpFact | None:
        return next((f for f in self.floating_ips if f.name == name), None)

    def ssh_key_by_fingerprint(self, fingerprint: str) -> SshKeyFact | None:
        return next((k for k in self.ssh_keys if k.fingerprint == fingerprint), None)


def ssh_fingerprint(public_key: str) -> str:
    """The MD5 fingerprint Hetzner reports for an OpenSSH public key (`aa:bb:…`)."""
    blob = base64.b64decode(public_key.split()[1])
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
