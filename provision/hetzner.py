"""HetznerProvider: facts from the Hetzner Cloud API (official hcloud client), and an executor for plan steps.

The provider owns its `hcloud.Client`. Every mutating call's action is waited for (including a server's
`next_actions`) with a deadline; hcloud, requests and action failures are mapped to ProviderError / StepFailed
here and nowhere else. Idempotency comes from the planner: apply executes only the steps that differ from facts,
so applying an empty plan sends no mutating request; after a failure half-way, a new plan starts from what
exists.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from hcloud import APIException, Client
from hcloud.actions import ActionFailedException, ActionTimeoutException, BoundAction
from hcloud.firewalls import Firewall, FirewallResource, FirewallResourceLabelSelector, FirewallRule
from hcloud.floating_ips import FloatingIP
from hcloud.images import Image
from hcloud.load_balancer_types import LoadBalancerType
from hcloud.load_balancers import (
    LoadBalancer,
    LoadBalancerAlgorithm,
    LoadBalancerHealthCheck,
    LoadBalancerService,
    LoadBalancerTarget,
    LoadBalancerTargetLabelSelector,
)
from hcloud.locations import Location
from hcloud.networks import Network, NetworkRoute, NetworkSubnet
from hcloud.placement_groups import PlacementGroup
from hcloud.server_types import ServerType
from hcloud.servers import Server, ServerCreatePublicNetwork
from hcloud.ssh_keys import SSHKey

from . import desired as d
from .errors import DrainError, ProviderError, SpecError, StepFailed
from .facts import (
    Facts,
    FirewallFact,
    FloatingIpFact,
    LoadBalancerFact,
    NetworkFact,
    PlacementGroupFact,
    Rule,
    ServerFact,
    SshKeyFact,
    ssh_fingerprint,
)
from .nodeops import NodeOps, NodeRef
from .plan import (
    AddRoute,
    AddSubnet,
    AssignFloatingIp,
    AttachFixedIp,
    AwaitHealthy,
    ChangeServerType,
    CreateFirewall,
    CreateFloatingIp,
    CreateLoadBalancer,
    CreateNetwork,
    CreatePlacementGroup,
    CreateServer,
    CreateSshKey,
    DeleteFirewall,
    DeleteFloatingIp,
    DeleteLoadBalancer,
    DeleteNetwork,
    DeletePlacementGroup,
    DeleteRoute,
    DeleteServer,
    DeleteSshKey,
    DrainServer,
    FixLoadBalancer,
    Plan,
    PowerOn,
    PowerOnServer,
    PublishWheels,
    RefreshNode,
    SetFirewallRules,
    SetFirewallSelector,
    Step,
)
from .planner import plan_cluster, plan_destroy
from .provider import ApplyOptions, ApplyReport, Progress, no_progress
from .render import NodeAddr, scrape_targets, user_data
from .secrets import ClusterSecrets
from .shipment import Shipment
from .spec import ClusterSpec

DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"
#: Action polling starts at poll_interval and grows by this factor up to POLL_MAX seconds between polls.
POLL_BACKOFF = 1.5
POLL_MAX = 10.0


@contextmanager
def _api(what: str) -> Iterator[None]:
    """Map hcloud / transport exceptions to ours. Messages never include request bodies (user data has secrets)."""
    try:
        yield
    except APIException as exc:
        raise ProviderError(f"{what}: Hetzner API error {exc.code}: {exc.message}") from exc
    except ActionFailedException as exc:
        raise ProviderError(f"{what}: action {exc.action.command} failed: {exc.action.error}") from exc
    except ActionTimeoutException as exc:
        raise ProviderError(f"{what}: action {exc.action.command} timed out") from exc
    except requests.RequestException as exc:
        raise ProviderError(f"{what}: cannot reach the Hetzner API: {type(exc).__name__}") from exc


@dataclass
class _Ctx:
    """What the executor knows while applying: ids of what exists, updated as steps create things."""

    network_id: int | None
    ssh_key_ids: list[int]
    firewalls: dict[str, FirewallFact]
    placement_group_id: int | None
    servers: dict[str, ServerFact]
    #: The cluster's floating IP (id, address) once it exists: proxies are rendered with its address.
    floating_ip: tuple[int, str] | None = None
    kept: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)


class HetznerProvider:
    name = "hetzner"

    def __init__(
        self,
        spec: ClusterSpec,
        secrets: ClusterSecrets,
        shipment: Shipment,
        *,
        token: str,
        endpoint: str | None = None,
        node_ops: NodeOps | None = None,
        poll_interval: float = 1.0,
        action_timeout: float = 600.0,
        request_timeout: float = 30.0,
    ) -> None:
        if not token:
            raise ProviderError("no Hetzner API token: set HCLOUD_TOKEN")
        self.spec = spec
        self._secrets = secrets
        self._shipment = shipment
        self._node_ops = node_ops
        self._poll = poll_interval
        self._action_timeout = action_timeout
        self.client = Client(
            token=token,
            api_endpoint=endpoint or DEFAULT_ENDPOINT,
            poll_interval=poll_interval,
            timeout=request_timeout,
            application_name="mbworker-provision",
            application_version="0.1",
        )
        self._facts: Facts | None = None
        #: How many times an action was polled (the API budget a test can check).
        self.polls = 0

    # --- facts -------------------------------------------------------------------------------------------------------

    def read_facts(self) -> Facts:
        """Everything labelled for the cluster (cluster=<name>, managed-by=mbworker), plus all SSH keys."""
        sel = d.cluster_selector(self.spec)
        # hcloud's attributes are all Optional in its type hints; the API always sends these fields
        with _api("reading facts"):
            nets = _any(self.client.networks.get_all(label_selector=sel))
            servers = _any(self.client.servers.get_all(label_selector=sel))
            firewalls = _any(self.client.firewalls.get_all(label_selector=sel))
            pgs = _any(self.client.placement_groups.get_all(label_selector=sel))
            lbs = _any(self.client.load_balancers.get_all(label_selector=sel))
            fips = _any(self.client.floating_ips.get_all(label_selector=sel))
            keys = _any(self.client.ssh_keys.get_all())
        net = next((n for n in nets if n.name == d.network_name(self.spec)), None)
        net_fact = (
            NetworkFact(
                id=net.id,
                name=net.name,
                ip_range=net.ip_range,
                subnets=tuple(s.ip_range for s in net.subnets or []),
                routes=tuple((r.destination, r.gateway) for r in net.routes or []),
                labels=dict(net.labels or {}),
            )
            if net is not None
            else None
        )
        facts = Facts(
            network=net_fact,
            servers=tuple(self._server_fact(s, net_fact) for s in servers),
            firewalls=tuple(
                FirewallFact(
                    id=f.id,
                    name=f.name,
                    rules=tuple(
                        Rule(r.direction, r.protocol, r.port, tuple(r.source_ips or ()), r.description)
                        for r in f.rules or []
                    ),
                    selectors=tuple(
                        a.label_selector.selector for a in f.applied_to or [] if a.type == "label_selector"
                    ),
                    labels=dict(f.labels or {}),
                    applied_server_ids=tuple(
                        r.server.id
                        for a in f.applied_to or []
                        for r in (a.applied_to_resources or [])
                        if r.server is not None
                    ),
                )
                for f in firewalls
            ),
            ssh_keys=tuple(SshKeyFact(k.id, k.name, k.fingerprint, dict(k.labels or {})) for k in keys),
            placement_groups=tuple(PlacementGroupFact(p.id, p.name, dict(p.labels or {})) for p in pgs),
            load_balancers=tuple(
                LoadBalancerFact(
                    id=lb.id,
                    name=lb.name,
                    lb_type=lb.load_balancer_type.name,
                    services=tuple((s.listen_port, s.destination_port) for s in lb.services or []),
                    selectors=tuple(t.label_selector.selector for t in lb.targets or [] if t.type == "label_selector"),
                    network_ids=tuple(p.network.id for p in lb.private_net or []),
                    labels=dict(lb.labels or {}),
                )
                for lb in lbs
            ),
            floating_ips=tuple(
                FloatingIpFact(f.id, f.name, f.ip, f.server.id if f.server else None, dict(f.labels or {}))
                for f in fips
            ),
        )
        self._facts = facts
        return facts

    @staticmethod
    def _server_fact(s: Any, net: NetworkFact | None) -> ServerFact:
        pub = s.public_net
        private = [p for p in s.private_net or [] if net is None or p.network.id == net.id]
        return ServerFact(
            id=s.id,
            name=s.name,
            server_type=s.server_type.name,
            status=s.status,
            labels=dict(s.labels or {}),
            ipv4=pub.ipv4.ip if pub is not None and pub.ipv4 is not None else None,
            ipv6=pub.ipv6.ip if pub is not None and pub.ipv6 is not None else None,
            private_ip=private[0].ip if private else None,
            alias_ips=tuple(private[0].alias_ips or ()) if private else (),
            network_ids=tuple(p.network.id for p in s.private_net or []),
            placement_group_id=s.placement_group.id if s.placement_group is not None else None,
            image=s.image.name if s.image is not None else None,
        )

    def validate_online(self) -> None:
        """Check the spec's server types against `GET /server_types`: known, not deprecated, offered here."""
        with _api("reading server types"):
            types = {t.name: t for t in self.client.server_types.get_all()}
        problems = []
        for role in ("system", "proxy", "worker", "state", "nat"):
            pillar = getattr(self.spec, role)
            if pillar is None:
                continue
            t = types.get(pillar.type)
            if t is None:
                problems.append(f"{role}.type: the API does not offer server type {pillar.type!r}")
                continue
            # deprecation and availability are per location since 2025-09 (the type-level field is deprecated)
            here = next((loc for loc in t.locations or [] if loc.location.name == self.spec.location), None)
            if here is None or here.available is False:
                problems.append(f"{role}.type: {pillar.type!r} is not offered in {self.spec.location}")
            elif here.deprecation is not None:
                problems.append(f"{role}.type: server type {pillar.type!r} is deprecated in {self.spec.location}")
        if problems:
            raise SpecError("invalid cluster spec:\n  " + "\n  ".join(problems))

    # --- plans ---------------------------------------------------------------------------------------------------

    def plan(self, *, drain: bool = True) -> Plan:
        self.validate_online()
        return plan_cluster(self.spec, self.read_facts(), drain=drain, secrets_digest=self._secrets.digest())

    def destroy_plan(self) -> Plan:
        return plan_destroy(self.spec, self.read_facts())

    # --- apply -----------------------------------------------------------------------------------------------------

    def apply(self, plan: Plan, options: ApplyOptions, progress: Progress = no_progress) -> ApplyReport:
        facts = self._facts if self._facts is not None else self.read_facts()
        fps = {ssh_fingerprint(k) for k in self.spec.ssh_keys}
        ctx = _Ctx(
            network_id=facts.network.id if facts.network else None,
            ssh_key_ids=[k.id for k in facts.ssh_keys if k.fingerprint in fps],
            firewalls={f.name: f for f in facts.firewalls},
            placement_group_id=next(
                (p.id for p in facts.placement_groups if p.name == d.placement_group_name(self.spec)), None
            ),
            servers={s.name: s for s in facts.servers},
            floating_ip=next(
                ((f.id, f.ip) for f in facts.floating_ips if f.name == d.floating_ip_name(self.spec)), None
            ),
        )
        report = ApplyReport()
        changes = plan.changes
        for i, step in enumerate(changes, 1):
            label = f"{step.action} {step.kind} {step.name}"
            progress(f"[{i}/{len(changes)}] {label}{f' ({step.detail})' if step.detail else ''}")
            started = time.monotonic()
            try:
                self._execute(step, ctx, options, report, progress)
            except ProviderError as exc:
                self._facts = None  # what exists changed: the next plan must read again
                raise StepFailed(label, str(exc).removeprefix(f"{label}: ")) from exc
            progress(f"      done in {time.monotonic() - started:.1f}s")
            report.done.append(label)
        self._facts = None
        system = ctx.servers.get(d.server_name(self.spec.name, "system", 0))
        self._shipment.record_control(system.ipv4 if system is not None and system.ipv4 else None)
        return report

    def _execute(self, step: Step, ctx: _Ctx, options: ApplyOptions, report: ApplyReport, progress: Progress) -> None:
        op = step.op
        c = self.client
        spec = self.spec
        what = f"{step.action} {step.kind} {step.name}"
        with _api(what):
            match op:
                case CreateSshKey():
                    key = c.ssh_keys.create(name=op.name, public_key=op.public_key, labels=op.labels)
                    ctx.ssh_key_ids.append(_id(key.id))
                case DeleteSshKey():
                    c.ssh_keys.delete(SSHKey(id=op.id))
                case CreateNetwork():
                    net = c.networks.create(
                        name=op.name,
                        ip_range=op.ip_range,
                        subnets=[NetworkSubnet(type="cloud", ip_range=op.subnet, network_zone=op.zone)],
                        labels=op.labels,
                    )
                    ctx.network_id = net.id
                case AddSubnet():
                    self._wait(
                        c.networks.add_subnet(
                            Network(id=op.network_id),
                            NetworkSubnet(type="cloud", ip_range=op.subnet, network_zone=op.zone),
                        )
                    )
                case AddRoute():
                    self._wait(c.networks.add_route(self._network(ctx), NetworkRoute(op.destination, op.gateway)))
                case DeleteRoute():
                    self._wait(c.networks.delete_route(self._network(ctx), NetworkRoute(op.destination, op.gateway)))
                case DeleteNetwork():
                    c.networks.delete(Network(id=op.id))
                case CreateFirewall():
                    resp = c.firewalls.create(
                        name=op.name,
                        rules=[_rule(r) for r in op.rules],
                        resources=[_selector_resource(op.selector)],
                        labels=op.labels,  # type: ignore[arg-type]  # hcloud 2.27 annotates labels as str
                    )
                    self._wait(*(resp.actions or []))
                case SetFirewallRules():
                    self._wait(*c.firewalls.set_rules(Firewall(id=op.id), [_rule(r) for r in op.rules]))
                case SetFirewallSelector():
                    fw = Firewall(id=op.id)
                    if op.remove:
                        self._wait(*c.firewalls.remove_from_resources(fw, [_selector_resource(s) for s in op.remove]))
                    if op.selector:
                        self._wait(*c.firewalls.apply_to_resources(fw, [_selector_resource(op.selector)]))
                case DeleteFirewall():
                    bound = c.firewalls.get_by_id(op.id)
                    if bound.applied_to:
                        self._wait(*c.firewalls.remove_from_resources(bound, list(bound.applied_to)))
                    c.firewalls.delete(Firewall(id=op.id))
                case CreatePlacementGroup():
                    pg_resp = c.placement_groups.create(name=op.name, type="spread", labels=op.labels)
                    if pg_resp.action is not None:
                        self._wait(pg_resp.action)
                    ctx.placement_group_id = pg_resp.placement_group.id
                case DeletePlacementGroup():
                    c.placement_groups.delete(PlacementGroup(id=op.id))
                case CreateServer():
                    self._create_server(op, ctx)
                case AttachFixedIp():
                    server = self._server(ctx, op.server_name)
                    if op.alias:
                        if server.private_ip is None:
                            raise ProviderError(f"{server.name} is not attached to the network")
                        self._wait(c.servers.change_alias_ips(Server(id=server.id), self._network(ctx), [op.ip]))
                    else:
                        self._wait(c.servers.attach_to_network(Server(id=server.id), self._network(ctx), ip=op.ip))
                    self._reload_server(ctx, server.id)
                case ChangeServerType():
                    self._change_type(op, progress)
                case PowerOn():
                    self._wait(c.servers.power_on(Server(id=op.server_id)))
                case PowerOnServer():
                    server = self._server(ctx, op.server_name)
                    self._wait(c.servers.power_on(Server(id=server.id)))
                    ctx.servers[server.name] = dataclasses.replace(server, status="running")
                case PublishWheels():
                    wheels = self._shipment.wheels()
                    if self._node_ops is None:
                        raise ProviderError("no node transport configured for publishing the worker wheels")
                    progress(f"      {len(wheels.wheels)} wheels, mbworker {wheels.version}")
                    self._node_ops.publish_wheels(
                        self._node(ctx, op.system_name), wheels.directory, timeout=self._action_timeout
                    )
                case DrainServer():
                    self._drain(op, ctx, options, report, progress)
                case AwaitHealthy():
                    if self._node_ops is None:
                        raise ProviderError("no node transport configured for the health gate")
                    system = ctx.servers.get(d.server_name(spec.name, "system", 0))
                    via = self._node(ctx, system.name) if system is not None else None
                    node = self._node(ctx, op.server_name)
                    self._node_ops.wait_healthy(node, timeout=options.health_timeout, via=via)
                case RefreshNode():
                    self._refresh(op, ctx)
                case DeleteServer():
                    if op.name in ctx.kept:
                        progress(f"      left in place: {op.name} was not drained (use --force to delete anyway)")
                        return
                    self._wait(c.servers.delete(Server(id=op.server_id)))
                    ctx.deleted.add(op.name)
                    ctx.servers.pop(op.name, None)
                case CreateLoadBalancer():
                    lb_resp = c.load_balancers.create(
                        name=op.name,
                        load_balancer_type=LoadBalancerType(name=op.lb_type),
                        location=Location(name=spec.location),
                        network=self._network(ctx),
                        algorithm=LoadBalancerAlgorithm(type="round_robin"),
                        services=[_lb_service(listen, dest) for listen, dest in d.LB_SERVICES],
                        targets=[_lb_target(op.selector)],
                        labels=op.labels,
                    )
                    self._wait(lb_resp.action)
                case FixLoadBalancer():
                    lb = LoadBalancer(id=op.id)
                    if op.attach_network:
                        self._wait(c.load_balancers.attach_to_network(lb, self._network(ctx)))
                    if op.lb_type:
                        self._wait(c.load_balancers.change_type(lb, LoadBalancerType(name=op.lb_type)))
                    for listen, dest in op.add_services:
                        self._wait(c.load_balancers.add_service(lb, _lb_service(listen, dest)))
                    if op.add_selector:
                        self._wait(c.load_balancers.add_target(lb, _lb_target(op.add_selector)))
                case DeleteLoadBalancer():
                    # not load_balancers.delete(): hcloud 2.27 reads an "action" from the 204 it gets (reference §1.5)
                    c.request(method="DELETE", url=f"/load_balancers/{op.id}")
                case CreateFloatingIp():
                    fip_resp = c.floating_ips.create(
                        type="ipv4", name=op.name, labels=op.labels, home_location=Location(name=op.home_location)
                    )
                    created = fip_resp.floating_ip
                    assert created.id is not None  # the API always sends both
                    assert created.ip is not None
                    ctx.floating_ip = (created.id, created.ip)
                case AssignFloatingIp():
                    target = ctx.servers[op.server_name]
                    if ctx.floating_ip is None:
                        raise ProviderError(f"floating IP {op.name} does not exist")
                    self._wait(c.floating_ips.assign(FloatingIP(id=ctx.floating_ip[0]), Server(id=target.id)))
                case DeleteFloatingIp():
                    c.floating_ips.delete(FloatingIP(id=op.id))
                case _:
                    raise ProviderError(f"no executor for {type(op).__name__}")

    # --- step helpers ----------------------------------------------------------------------------------------------

    def _server(self, ctx: _Ctx, name: str) -> ServerFact:
        server = ctx.servers.get(name)
        if server is None:
            raise ProviderError(f"{name} does not exist")
        return server

    def _network(self, ctx: _Ctx) -> Network:
        if ctx.network_id is None:
            raise ProviderError("the cluster network does not exist")
        return Network(id=ctx.network_id)

    def _wait(self, *actions: BoundAction | None) -> None:
        """Wait for every action with a deadline; an action in error fails the step."""
        deadline = time.monotonic() + self._action_timeout
        for action in actions:
            if action is None:
                continue
            status, command, error = action.status, action.command, action.error
            delay = self._poll
            while status == "running":
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"action {command} ({action.id}) still running after {self._action_timeout:.0f}s"
                    )
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                # back off: a large apply must not spend the project's 3,600 requests/hour on polling
                delay = min(delay * POLL_BACKOFF, POLL_MAX)
                self.polls += 1
                fresh = self.client.actions.get_by_id(action.id)
                status, error = fresh.status, fresh.error
            if status == "error":
                detail = f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else str(error)
                raise ProviderError(f"action {command} ({action.id}) failed: {detail}")

    def _create_server(self, op: CreateServer, ctx: _Ctx) -> None:
        """Create stopped and off the network: the next steps attach it at its chosen address and start it (the
        API lets a server without public IPs be created without a network only when it is not started)."""
        want = op.server
        spec = self.spec
        wanted = {s.name: s for s in d.desired_servers(spec)}
        live = [s for s in ctx.servers.values() if s.name in wanted]
        node_ctx = self._shipment.node_context(
            want,
            workers=tuple(NodeAddr(s.name, s.role, wanted[s.name].fixed_ip) for s in live if s.role == "worker"),
            nodes=tuple(NodeAddr(s.name, s.role, wanted[s.name].fixed_ip) for s in live),
            floating_ip=ctx.floating_ip[1] if ctx.floating_ip else "",
        )
        ud = user_data(spec, want, self._secrets, node_ctx)
        resp = self.client.servers.create(
            name=want.name,
            server_type=ServerType(name=want.server_type),
            image=Image(name=spec.image),
            location=Location(name=spec.location),
            ssh_keys=[SSHKey(id=i) for i in ctx.ssh_key_ids] or None,
            networks=None,
            start_after_create=False,
            public_net=None if want.public else ServerCreatePublicNetwork(enable_ipv4=False, enable_ipv6=False),
            placement_group=(
                PlacementGroup(id=ctx.placement_group_id)
                if want.placement_group and ctx.placement_group_id is not None
                else None
            ),
            user_data=ud,
            labels=op.labels,
        )
        self._wait(resp.action, *(resp.next_actions or []))
        self._reload_server(ctx, _id(resp.server.id))

    def _reload_server(self, ctx: _Ctx, server_id: int) -> None:
        fresh = self.client.servers.get_by_id(server_id)
        net = NetworkFact(ctx.network_id, "", "") if ctx.network_id is not None else None
        fact = self._server_fact(fresh, net)
        ctx.servers[fact.name] = fact

    def _change_type(self, op: ChangeServerType, progress: Progress) -> None:
        c = self.client
        server = Server(id=op.server_id)
        progress("      shutdown")
        self._wait(c.servers.shutdown(server))
        self._wait_status(op.server_id, "off", grace=120.0)
        progress(f"      change type → {op.server_type} (disk kept, so it can shrink again)")
        self._wait(c.servers.change_type(server, ServerType(name=op.server_type), upgrade_disk=False))
        progress("      power on")
        self._wait(c.servers.power_on(server))

    def _wait_status(self, server_id: int, status: str, *, grace: float) -> None:
        """An ACPI shutdown may take a while; after `grace` seconds, power off hard."""
        deadline = time.monotonic() + grace
        while self.client.servers.get_by_id(server_id).status != status:
            if time.monotonic() > deadline:
                self._wait(self.client.servers.power_off(Server(id=server_id)))
                return
            time.sleep(max(self._poll, 0.01))

    def _node(self, ctx: _Ctx, name: str) -> NodeRef:
        s = ctx.servers.get(name)
        if s is None:
            raise ProviderError(f"{name} does not exist")
        return NodeRef(s.name, s.role, _addr(s), s.ipv4)

    def _drain(
        self, op: DrainServer, ctx: _Ctx, options: ApplyOptions, report: ApplyReport, progress: Progress
    ) -> None:
        if self._node_ops is None:
            raise ProviderError("no node transport configured for draining (use --no-drain to skip)")
        try:
            self._node_ops.drain(self._node(ctx, op.name), timeout=options.drain_timeout)
        except DrainError as exc:
            if options.force:
                progress(f"      drain failed ({exc}); deleting anyway (--force)")
                report.forced.append((op.name, str(exc)))
            else:
                progress(f"      drain failed ({exc}); leaving {op.name} in place")
                report.left_in_place.append((op.name, str(exc)))
                ctx.kept.add(op.name)

    def _refresh(self, op: RefreshNode, ctx: _Ctx) -> None:
        if self._node_ops is None:
            raise ProviderError("no node transport configured for refreshing node configs")
        node = ctx.servers[op.server_name]
        wanted = {s.name for s in d.desired_servers(self.spec)} | ctx.kept
        live = [s for s in ctx.servers.values() if s.name in wanted and s.name not in ctx.deleted]
        nodes = tuple(NodeAddr(s.name, s.role, _addr(s)) for s in live)
        content = scrape_targets(self.spec, nodes) + "\n"
        labels = node.labels | {"targets-rev": d.targets_revision([n.name for n in nodes])}
        self._node_ops.refresh(self._node(ctx, op.server_name), op.kind, content)
        self.client.servers.update(Server(id=node.id), labels=labels)
        ctx.servers[node.name] = dataclasses.replace(node, labels=labels)


def _any(items: Any) -> list[Any]:
    return list(items)


def _id(value: int | None) -> int:
    if value is None:
        raise ProviderError("the API returned an object without an id")
    return value


def _addr(s: ServerFact) -> str:
    """The address other nodes use: the fixed alias (state) or the primary private IP."""
    return s.alias_ips[0] if s.alias_ips else (s.private_ip or "")


def _rule(r: Rule) -> FirewallRule:
    return FirewallRule(
        direction=r.direction,
        protocol=r.protocol,
        source_ips=list(r.source_ips),
        port=r.port,
        description=r.description,
    )


def _selector_resource(selector: str) -> FirewallResource:
    return FirewallResource(type="label_selector", label_selector=FirewallResourceLabelSelector(selector=selector))


def _lb_service(listen: int, dest: int) -> LoadBalancerService:
    return LoadBalancerService(
        protocol="tcp",
        listen_port=listen,
        destination_port=dest,
        proxyprotocol=False,
        health_check=LoadBalancerHealthCheck(protocol="tcp", port=dest, interval=15, timeout=10, retries=3),
    )


def _lb_target(selector: str) -> LoadBalancerTarget:
    return LoadBalancerTarget(
        type="label_selector", label_selector=LoadBalancerTargetLabelSelector(selector=selector), use_private_ip=True
    )


__all__: Sequence[str] = ["DEFAULT_ENDPOINT", "HetznerProvider"]
