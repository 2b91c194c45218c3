"""The cloud planner: facts + spec → plan. Pure (no I/O), so its test cases are data.

Order of steps is the order of apply: SSH keys, network (+ subnet), firewalls, placement group, floating IP
(created unassigned, so proxies are rendered with its address), servers in creation order (NAT and its route first,
then state, workers, proxies, system), type changes, load balancer, the floating IP routed to proxy 1; then the
system node's scrape targets, drains of servers that go away (through the control plane, which proxies pull their
upstreams from), and finally deletes (servers first, then what they used).
"""

from __future__ import annotations

from . import desired as d
from .errors import SpecError
from .facts import Facts, Rule, ServerFact, ssh_fingerprint
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
    PowerOnServer,
    PublishWheels,
    RefreshNode,
    SetFirewallRules,
    SetFirewallSelector,
    Step,
)
from .spec import ClusterSpec

PROVIDER = "hetzner"

#: What "back and healthy" means for each role after its type change (NodeOps.wait_healthy checks it).
HEALTH = {
    "state": "back and healthy before the next node: etcd has every member healthy, its Patroni member runs "
    "and the cluster has a leader",
    "worker": "back in service before the next node: /ready answers 200",
    "proxy": "back before the next node: HTTPS answers on its public address",
    "system": "running again",
    "nat": "running again",
}


def _rules_key(rules: tuple[Rule, ...]) -> set[tuple[str, str, str | None, tuple[str, ...]]]:
    return {r.key() for r in rules}


def _refuse_unsupported_edits(spec: ClusterSpec, facts: Facts, secrets_digest: str | None) -> None:
    """Edits a re-apply cannot carry out safely are refused before anything is planned, each with the reason."""
    problems: list[str] = []
    net = facts.network
    have_digest = net.labels.get(d.SECRETS_LABEL) if net is not None else None
    if secrets_digest is not None and have_digest is not None and have_digest != secrets_digest:
        problems.append(
            "the cluster exists and was created with other secrets than the ones in this state dir: use the state "
            "dir it was created with (--state-dir); new nodes would not be able to join"
        )
    wanted = {s.name: s for s in d.desired_servers(spec)}
    for have in facts.servers:
        want = wanted.get(have.name)
        if want is None:
            continue
        if have.image is not None and have.image != spec.image:
            problems.append(
                f"{have.name} runs image {have.image} and the spec says {spec.image}: changing the image of existing "
                "servers is not supported (scale the pillar in and out, or destroy and re-create)"
            )
        if d.architecture(have.server_type) != d.architecture(want.server_type):
            problems.append(
                f"{have.name}: {have.server_type} → {want.server_type} changes the CPU architecture "
                f"({d.architecture(have.server_type)} → {d.architecture(want.server_type)}); its disk cannot boot there"
            )
        port = have.labels.get("port")
        if want.role == "worker" and port is not None and port != str(spec.daemon.port):
            problems.append(
                f"{have.name} serves on port {port} and the spec says daemon.port = {spec.daemon.port}: a worker's "
                "port is set when it is created; replace the workers (or keep the port)"
            )
        if have.private_ip is not None and want.fixed_ip not in (have.private_ip, *have.alias_ips):
            problems.append(
                f"{have.name} has private address {have.private_ip}, the address layout gives it {want.fixed_ip}: "
                "replace it (scale in and out)"
            )
    if problems:
        raise SpecError("cannot apply this spec to the existing cluster:\n  " + "\n  ".join(problems))


def plan_cluster(spec: ClusterSpec, facts: Facts, *, drain: bool = True, secrets_digest: str | None = None) -> Plan:
    """Diff `facts` (what exists, by labels) against `spec`; drain=False skips draining servers that go away.

    `secrets_digest` (ClusterSecrets.digest) is checked against the network's label: a plan made with another
    cluster's secrets is refused."""
    _refuse_unsupported_edits(spec, facts, secrets_digest)
    steps: list[Step] = []
    # The state pillar's size is fixed when it is created (the placement group records it), so a resumed
    # half-built pillar is fine and a resize is refused.
    pg = facts.placement_group(d.placement_group_name(spec))
    built_for = pg.labels.get("state-count") if pg is not None else None
    if built_for is not None and built_for != str(spec.state.count) and any(s.role == "state" for s in facts.servers):
        raise SpecError(
            f"the state pillar was built for {built_for} node(s) and the spec asks for {spec.state.count}: resizing "
            "it in place is not supported (etcd, Patroni and Sentinel membership are set at creation)"
        )
    servers_wanted = d.desired_servers(spec)
    wanted_names = {s.name for s in servers_wanted}

    # SSH keys: unique per project by content, so a key may already exist under any name: reuse it.
    wanted_fps = set()
    for i, key in enumerate(spec.ssh_keys):
        fp = ssh_fingerprint(key)
        wanted_fps.add(fp)
        found = facts.ssh_key_by_fingerprint(fp)
        if found is None:
            name = d.ssh_key_name(spec, i)
            steps.append(Step("create", "ssh_key", name, fp, CreateSshKey(name, key, d.base_labels(spec))))
        else:
            steps.append(Step("noop", "ssh_key", found.name, fp))

    # Network and its subnet; the NAT route comes after the NAT server exists.
    net = facts.network
    subnet = str(spec.subnet_cidr)
    if net is None:
        steps.append(
            Step(
                "create",
                "network",
                d.network_name(spec),
                f"{spec.network}, subnet {subnet} in {spec.zone}",
                CreateNetwork(
                    d.network_name(spec),
                    str(spec.network),
                    subnet,
                    spec.zone,
                    d.base_labels(spec) | ({d.SECRETS_LABEL: secrets_digest} if secrets_digest else {}),
                ),
            )
        )
    else:
        if net.ip_range != str(spec.network):
            raise SpecError(
                f"network ip_range is {net.ip_range}, the spec says {spec.network}: "
                "changing it in place is not supported (destroy and re-create)"
            )
        if subnet not in net.subnets:
            steps.append(
                Step("change", "network", net.name, f"add subnet {subnet}", AddSubnet(net.id, subnet, spec.zone))
            )
        else:
            steps.append(Step("noop", "network", net.name, f"{net.ip_range}"))

    # Firewalls by label selector: they follow scale-out on their own.
    wanted_fw = {
        d.public_firewall_name(spec): (d.public_firewall_rules(spec), d.public_selector(spec)),
        d.system_firewall_name(spec): (d.system_firewall_rules(spec), d.system_selector(spec)),
    }
    if spec.nat is not None:
        wanted_fw[d.nat_firewall_name(spec)] = (d.nat_firewall_rules(spec), d.nat_selector(spec))
    for name, (rules, selector) in wanted_fw.items():
        fw = facts.firewall(name)
        if fw is None:
            ports = ", ".join(f"{r.protocol}/{r.port or '*'}" for r in rules)
            steps.append(
                Step(
                    "create",
                    "firewall",
                    name,
                    f"{ports} → {selector}",
                    CreateFirewall(name, rules, selector, d.base_labels(spec)),
                )
            )
            continue
        changed = False
        if _rules_key(fw.rules) != _rules_key(rules):
            steps.append(Step("change", "firewall", name, "set rules", SetFirewallRules(fw.id, rules)))
            changed = True
        if tuple(fw.selectors) != (selector,):
            remove = tuple(s for s in fw.selectors if s != selector)
            steps.append(
                Step(
                    "change",
                    "firewall",
                    name,
                    f"apply to {selector}",
                    SetFirewallSelector(fw.id, selector if selector not in fw.selectors else "", remove),
                )
            )
            changed = True
        if not changed:
            steps.append(Step("noop", "firewall", name))

    # Placement group: spread the state nodes over hosts.
    pg_name = d.placement_group_name(spec)
    if facts.placement_group(pg_name) is None:
        steps.append(
            Step(
                "create",
                "placement_group",
                pg_name,
                "spread",
                CreatePlacementGroup(pg_name, d.base_labels(spec, "state") | {"state-count": str(spec.state.count)}),
            )
        )
    else:
        steps.append(Step("noop", "placement_group", pg_name))

    # Floating IP, created before the servers: proxies are rendered with its address (the OS must own it).
    fip_name = d.floating_ip_name(spec)
    fip = facts.floating_ip(fip_name)
    if spec.floating_ip and fip is None:
        steps.append(
            Step("create", "floating_ip", fip_name, f"ipv4 in {spec.location}",
                 CreateFloatingIp(fip_name, d.base_labels(spec), spec.location))
        )  # fmt: skip

    # Servers.
    # Proxies are not refreshed: they pull their upstreams (ready workers only) from the control plane, which a
    # list pushed here would override with workers that are not ready yet.
    all_names = [s.name for s in servers_wanted]
    revs = {
        "system": {"targets-rev": d.targets_revision(all_names)},
        "worker": {"port": str(spec.daemon.port)},
    }
    refresh: list[Step] = []
    system = d.server_name(spec.name, "system", 0)
    new_workers = any(s.role == "worker" and facts.server(s.name) is None for s in servers_wanted)
    publish = Step("change", "wheelhouse", system, "publish the worker wheels it serves", PublishWheels(system))
    for want in servers_wanted:
        if want.role == "worker" and new_workers and facts.server(system) is not None and publish not in steps:
            steps.append(publish)  # before the first new worker: it installs from what the system node serves
        steps.extend(_server_steps(spec, facts, want, revs.get(want.role, {}), refresh))
        if want.role == "nat":
            steps.extend(_route_steps(spec, facts))
        if want.role == "system" and new_workers and publish not in steps:
            steps.append(publish)  # the system node is new: new workers wait for it to serve the wheels
    if spec.nat is None:
        steps.extend(_route_steps(spec, facts))

    # Load balancer in front of the proxies.
    lb_name = d.load_balancer_name(spec)
    lb = facts.load_balancer(lb_name)
    if spec.load_balancer is not None:
        selector = d.proxy_selector(spec)
        if lb is None:
            steps.append(
                Step(
                    "create",
                    "load_balancer",
                    lb_name,
                    f"{spec.load_balancer.type}, tcp 80/443 → {selector}",
                    CreateLoadBalancer(lb_name, spec.load_balancer.type, selector, d.base_labels(spec)),
                )
            )
        else:
            missing = tuple(s for s in d.LB_SERVICES if s[0] not in {x[0] for x in lb.services})
            fix = FixLoadBalancer(
                lb.id,
                spec.load_balancer.type if lb.lb_type != spec.load_balancer.type else None,
                missing,
                selector if selector not in lb.selectors else None,
                not lb.network_ids,
            )
            if fix.lb_type or fix.add_services or fix.add_selector or fix.attach_network:
                steps.append(Step("change", "load_balancer", lb_name, "fix type/services/targets/network", fix))
            else:
                steps.append(Step("noop", "load_balancer", lb_name))

    # The floating IP routed to the first proxy.
    first_proxy = d.server_name(spec.name, "proxy", 1)
    if spec.floating_ip:
        proxy = facts.server(first_proxy)
        if fip is None or proxy is None or fip.server_id != proxy.id:
            steps.append(
                Step("change", "floating_ip", fip_name, f"assign to {first_proxy}",
                     AssignFloatingIp(fip_name, first_proxy))
            )  # fmt: skip
        else:
            steps.append(Step("noop", "floating_ip", fip_name, fip.ip))

    # Servers that go away: workers drain (highest number first) through the control plane, which first takes each
    # out of the upstreams and waits until every proxy has applied that; then the servers are deleted.
    leaving = sorted(
        (s for s in facts.servers if s.name not in wanted_names),
        key=lambda s: (s.role != "worker", -s.index, s.name),
    )
    steps.extend(refresh)
    for s in leaving:
        if s.role == "worker" and drain:
            how = "through the control plane (or the node's admin API)"
            steps.append(Step("drain", "server", s.name, how, DrainServer(s.id, s.name)))
    for s in leaving:
        steps.append(
            Step(
                "delete",
                "server",
                s.name,
                f"{s.role}, {s.server_type}",
                DeleteServer(s.id, s.name, drained=s.role == "worker" and drain),
            )
        )

    if spec.load_balancer is None and lb is not None:
        steps.append(Step("delete", "load_balancer", lb.name, op=DeleteLoadBalancer(lb.id)))
    if not spec.floating_ip and fip is not None:
        steps.append(Step("delete", "floating_ip", fip.name, fip.ip, DeleteFloatingIp(fip.id)))
    for fw in facts.firewalls:
        if fw.name not in wanted_fw:
            steps.append(Step("delete", "firewall", fw.name, op=DeleteFirewall(fw.id)))
    for pg in facts.placement_groups:
        if pg.name != pg_name:
            steps.append(Step("delete", "placement_group", pg.name, op=DeletePlacementGroup(pg.id)))
    for k in facts.ssh_keys:
        if k.labels.get("cluster") == spec.name and k.fingerprint not in wanted_fps:
            steps.append(Step("delete", "ssh_key", k.name, k.fingerprint, DeleteSshKey(k.id)))
    return Plan(spec.name, PROVIDER, tuple(steps))


def _server_steps(
    spec: ClusterSpec, facts: Facts, want: d.DesiredServer, extra: dict[str, str], refresh: list[Step]
) -> list[Step]:
    """Steps for one wanted server; refreshes of its config go to `refresh` (they run before drains).

    A server is created stopped, attached to the network at the address we chose for it, then started: the
    cloud's allocator never picks an address, so every node's address is known up front and never collides."""
    steps: list[Step] = []
    have = facts.server(want.name)
    attach = Step(
        "create", "private_ip", want.name, want.fixed_ip, AttachFixedIp(want.name, want.fixed_ip, alias=False)
    )
    start = Step("change", "server", want.name, "power on", PowerOnServer(want.name))
    if have is None:
        where = "public" if want.public else "private only"
        detail = f"{want.role}, {want.server_type}, {where}, {want.fixed_ip}"
        steps.append(Step("create", "server", want.name, detail, CreateServer(want, want.labels(spec.name, extra))))
        return [*steps, attach, start]
    changed = False
    if have.private_ip is None:
        steps.append(attach)
        changed = True
    if have.server_type != want.server_type:
        detail = f"type {have.server_type} → {want.server_type} (shutdown, change type, power on)"
        if want.role == "worker":
            # the node leaves the proxies' rotation on its own (/ready answers 503 while draining)
            steps.append(Step("drain", "server", want.name, "before its type change", DrainServer(have.id, want.name)))
        steps.append(Step("change", "server", want.name, detail, ChangeServerType(have.id, want.server_type)))
        # one node at a time: the next one is touched only once this one is back and healthy
        steps.append(Step("check", "server", want.name, HEALTH[want.role], AwaitHealthy(want.name, want.role)))
        changed = True
    elif have.status == "off":
        # created stopped and not started yet, or a type change interrupted after shutdown: power on
        steps.append(start)
        changed = True
    for key, value in extra.items():
        if key == "port":
            continue  # a worker's port is checked (and a change refused) by _refuse_unsupported_edits
        if have.labels.get(key) != value:
            refresh.append(
                Step("change", "server", want.name, "refresh scrape targets", RefreshNode(want.name, "targets"))
            )
            changed = True
    if not changed:
        steps.append(Step("noop", "server", want.name, f"{want.role}, {have.server_type}"))
    return steps


def _route_steps(spec: ClusterSpec, facts: Facts) -> list[Step]:
    """The NAT default route (0.0.0.0/0 via the NAT server's private IP), added or removed to match the spec."""
    net = facts.network
    have = set(net.routes) if net is not None else set()
    want = {("0.0.0.0/0", d.nat_ip(spec))} if spec.nat is not None else set()
    name = d.network_name(spec)
    steps = [Step("create", "route", name, f"{dst} via {gw}", AddRoute(dst, gw)) for dst, gw in sorted(want - have)]
    steps += [Step("delete", "route", name, f"{dst} via {gw}", DeleteRoute(dst, gw)) for dst, gw in sorted(have - want)]
    if not steps and want:
        steps.append(Step("noop", "route", name, "0.0.0.0/0 via NAT"))
    return steps


def plan_destroy(spec: ClusterSpec, facts: Facts) -> Plan:
    """Delete everything labelled for the cluster: servers first, then what they used. No drain."""
    steps: list[Step] = []
    for s in sorted(facts.servers, key=lambda s: s.name):
        steps.append(Step("delete", "server", s.name, f"{s.role}, {s.server_type}", DeleteServer(s.id, s.name, True)))
    for lb in facts.load_balancers:
        steps.append(Step("delete", "load_balancer", lb.name, op=DeleteLoadBalancer(lb.id)))
    for fip in facts.floating_ips:
        steps.append(Step("delete", "floating_ip", fip.name, fip.ip, DeleteFloatingIp(fip.id)))
    for fw in facts.firewalls:
        steps.append(Step("delete", "firewall", fw.name, op=DeleteFirewall(fw.id)))
    for pg in facts.placement_groups:
        steps.append(Step("delete", "placement_group", pg.name, op=DeletePlacementGroup(pg.id)))
    if facts.network is not None:
        steps.append(
            Step("delete", "network", facts.network.name, facts.network.ip_range, DeleteNetwork(facts.network.id))
        )
    for key in facts.ssh_keys:
        if key.labels.get("cluster") == spec.name:
            steps.append(Step("delete", "ssh_key", key.name, key.fingerprint, DeleteSshKey(key.id)))
    return Plan(spec.name, PROVIDER, tuple(steps))


def leaving_workers(facts: Facts, spec: ClusterSpec) -> list[ServerFact]:
    wanted = {s.name for s in d.desired_servers(spec)}
    return [s for s in facts.servers if s.role == "worker" and s.name not in wanted]
