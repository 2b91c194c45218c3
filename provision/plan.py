"""Plans: ordered steps, each a pure-data operation a provider knows how to execute. No I/O here.

A step's `action` is what the operator reads (create / change / delete / drain / no change); its `op` is what the
executor dispatches on. A plan with only "no change" steps is empty: apply sends nothing that mutates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .desired import DesiredServer
from .facts import Rule

Action = Literal["create", "change", "delete", "drain", "check", "noop"]


# --- operations (what to do); the provider owns how ------------------------------------------------------------


@dataclass(frozen=True)
class CreateSshKey:
    name: str
    public_key: str
    labels: dict[str, str]


@dataclass(frozen=True)
class DeleteSshKey:
    id: int


@dataclass(frozen=True)
class CreateNetwork:
    name: str
    ip_range: str
    subnet: str
    zone: str
    labels: dict[str, str]


@dataclass(frozen=True)
class AddSubnet:
    network_id: int
    subnet: str
    zone: str


@dataclass(frozen=True)
class AddRoute:
    destination: str
    gateway: str


@dataclass(frozen=True)
class DeleteRoute:
    destination: str
    gateway: str


@dataclass(frozen=True)
class DeleteNetwork:
    id: int


@dataclass(frozen=True)
class CreateFirewall:
    name: str
    rules: tuple[Rule, ...]
    selector: str
    labels: dict[str, str]


@dataclass(frozen=True)
class SetFirewallRules:
    id: int
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class SetFirewallSelector:
    id: int
    selector: str
    remove: tuple[str, ...]


@dataclass(frozen=True)
class DeleteFirewall:
    id: int


@dataclass(frozen=True)
class CreatePlacementGroup:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class DeletePlacementGroup:
    id: int


@dataclass(frozen=True)
class CreateServer:
    server: DesiredServer
    labels: dict[str, str]


@dataclass(frozen=True)
class AttachFixedIp:
    """Give a server its chosen private address (attach to the network with that IP; `alias` adds it as an alias)."""

    server_name: str
    ip: str
    alias: bool


@dataclass(frozen=True)
class ChangeServerType:
    """shutdown → change type (disk kept, so it can shrink again) → power on."""

    server_id: int
    server_type: str


@dataclass(frozen=True)
class PowerOn:
    server_id: int


@dataclass(frozen=True)
class PowerOnServer:
    """Start a server known by name (it may have been created earlier in the same apply)."""

    server_name: str


@dataclass(frozen=True)
class PublishWheels:
    """Put the operator's wheelhouse on the system node, which serves it to workers installing at first boot."""

    system_name: str


@dataclass(frozen=True)
class DrainServer:
    server_id: int
    name: str


@dataclass(frozen=True)
class AwaitHealthy:
    """A node changed in place (type change) is back and healthy before the apply touches the next one; if it is
    not within the timeout the apply stops here, leaving the nodes after it as they were."""

    server_name: str
    role: str


@dataclass(frozen=True)
class RefreshNode:
    """Rewrite the system node's scrape targets, then update its revision label (proxies pull their upstreams)."""

    server_name: str
    kind: Literal["targets"]


@dataclass(frozen=True)
class DeleteServer:
    server_id: int
    name: str
    #: Drained (or drain skipped) before; if a drain of this node failed, the executor leaves it in place.
    drained: bool


@dataclass(frozen=True)
class CreateLoadBalancer:
    name: str
    lb_type: str
    selector: str
    labels: dict[str, str]


@dataclass(frozen=True)
class FixLoadBalancer:
    id: int
    lb_type: str | None  # change type if set
    add_services: tuple[tuple[int, int], ...]
    add_selector: str | None
    attach_network: bool


@dataclass(frozen=True)
class DeleteLoadBalancer:
    id: int


@dataclass(frozen=True)
class CreateFloatingIp:
    """Created unassigned in the spec's location before the proxies, so their user-data can carry its address."""

    name: str
    labels: dict[str, str]
    home_location: str


@dataclass(frozen=True)
class AssignFloatingIp:
    """By name: when the floating IP is created in the same apply, its id is not known at plan time."""

    name: str
    server_name: str


@dataclass(frozen=True)
class DeleteFloatingIp:
    id: int


@dataclass(frozen=True)
class NoOp:
    pass


Op = (
    CreateSshKey | DeleteSshKey | CreateNetwork | AddSubnet | AddRoute | DeleteRoute | DeleteNetwork
    | CreateFirewall | SetFirewallRules | SetFirewallSelector | DeleteFirewall
    | CreatePlacementGroup | DeletePlacementGroup
    | CreateServer | AttachFixedIp | ChangeServerType | PowerOn | PowerOnServer | PublishWheels | DrainServer
    | AwaitHealthy | RefreshNode | DeleteServer
    | CreateLoadBalancer | FixLoadBalancer | DeleteLoadBalancer
    | CreateFloatingIp | AssignFloatingIp | DeleteFloatingIp | NoOp
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    action: Action
    kind: str  # ssh_key, network, firewall, placement_group, server, load_balancer, floating_ip, process
    name: str
    detail: str = ""
    op: object = field(default_factory=NoOp)

    def summary(self) -> tuple[str, str, str]:
        """(action, kind, name): the shape plan test cases compare."""
        return (self.action, self.kind, self.name)

    def describe(self) -> str:
        sign = {"create": "+", "change": "~", "delete": "-", "drain": "!", "check": "?", "noop": "="}[self.action]
        word = "no change" if self.action == "noop" else self.action
        text = f"  {sign} {word:<9} {self.kind:<15} {self.name}"
        return f"{text}  ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Plan:
    cluster: str
    provider: str
    steps: tuple[Step, ...]

    @property
    def changes(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.action != "noop")

    @property
    def empty(self) -> bool:
        return not self.changes

    def summaries(self, *, include_noop: bool = False) -> list[tuple[str, str, str]]:
        return [s.summary() for s in self.steps if include_noop or s.action != "noop"]

    def render(self, *, verbose: bool = False) -> str:
        """The readable plan: every change, then counts; unchanged resources only when verbose."""
        lines = [f"Plan for cluster {self.cluster!r} ({self.provider}):"]
        shown = self.steps if verbose else self.changes
        lines.extend(s.describe() for s in shown)
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.action] = counts.get(s.action, 0) + 1
        # health gates are listed only when a plan has them (rolling type changes)
        gates = ("check",) if counts.get("check") else ()
        order = ("create", "change", "drain", *gates, "delete", "noop")
        tally = ", ".join(f"{counts.get(a, 0)} {'unchanged' if a == 'noop' else 'to ' + a}" for a in order)
        if self.empty:
            lines.append("  nothing to do: the cluster matches the spec")
        lines.append(f"Summary: {tally}")
        return "\n".join(lines)
