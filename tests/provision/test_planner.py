"""The planner is pure: given facts and a spec, the expected plan. Cases are data."""

from __future__ import annotations

import dataclasses

import pytest

from mbworker.provision import desired as d
from mbworker.provision.errors import SpecError
from mbworker.provision.facts import (
    Facts,
    FirewallFact,
    NetworkFact,
    PlacementGroupFact,
    ServerFact,
    SshKeyFact,
    ssh_fingerprint,
)
from mbworker.provision.plan import AwaitHealthy, Plan
from mbworker.provision.planner import plan_cluster, plan_destroy
from mbworker.provision.spec import ClusterSpec

from .conftest import KEY, make_spec


def converged(spec: ClusterSpec) -> Facts:
    """The facts of a cluster that matches `spec` exactly."""
    servers = []
    names = [s.name for s in d.desired_servers(spec)]
    for i, s in enumerate(d.desired_servers(spec)):
        extra = {"system": {"targets-rev": d.targets_revision(names)},
                 "worker": {"port": str(spec.daemon.port)}}.get(s.role, {})  # fmt: skip
        servers.append(
            ServerFact(
                id=1000 + i, name=s.name, server_type=s.server_type, labels=s.labels(spec.name, extra),
                ipv4="198.51.100.1" if s.public else None, private_ip=s.fixed_ip, image=spec.image,
            )
        )  # fmt: skip
    firewalls = [
        FirewallFact(1, d.public_firewall_name(spec), d.public_firewall_rules(spec), (d.public_selector(spec),)),
        FirewallFact(4, d.system_firewall_name(spec), d.system_firewall_rules(spec), (d.system_selector(spec),)),
    ]
    if spec.nat:
        firewalls.append(
            FirewallFact(2, d.nat_firewall_name(spec), d.nat_firewall_rules(spec), (d.nat_selector(spec),))
        )
    routes = (("0.0.0.0/0", d.nat_ip(spec)),) if spec.nat else ()
    return Facts(
        network=NetworkFact(1, d.network_name(spec), str(spec.network), (str(spec.subnet_cidr),), routes),
        servers=tuple(servers),
        firewalls=tuple(firewalls),
        ssh_keys=(SshKeyFact(5, "someone-elses-name", ssh_fingerprint(KEY)),),
        placement_groups=(PlacementGroupFact(3, d.placement_group_name(spec), {"state-count": str(spec.state.count)}),),
    )


SMALL = make_spec(proxy={"type": "cx23", "count": 1}, worker={"type": "cx33", "count": 1},
                  state={"type": "ccx13", "count": 1})  # fmt: skip

CASES = [
    pytest.param(
        SMALL, Facts(),
        [("create", "ssh_key", "demo-key-1"), ("create", "network", "demo-net"), ("create", "firewall", "demo-public"),
         ("create", "firewall", "demo-system"), ("create", "placement_group", "demo-state"),
         *[(a, k, n) for n in ("demo-state-001", "demo-worker-001", "demo-proxy-001", "demo-system")
           for a, k in (("create", "server"), ("create", "private_ip"), ("change", "server"))],
         ("change", "wheelhouse", "demo-system")],
        id="empty-project",
    ),
    pytest.param(make_spec(), converged(make_spec()), [], id="converged-nothing-to-do"),
    pytest.param(
        make_spec(nat={"type": "cx23"}), converged(make_spec()),
        [("create", "firewall", "demo-nat"), ("create", "server", "demo-nat"), ("create", "private_ip", "demo-nat"),
         ("change", "server", "demo-nat"), ("create", "route", "demo-net"), ("change", "server", "demo-system")],
        id="add-nat-gateway",
    ),
    pytest.param(
        make_spec(), converged(make_spec(nat={"type": "cx23"})),
        [("delete", "route", "demo-net"), ("change", "server", "demo-system"), ("delete", "server", "demo-nat"),
         ("delete", "firewall", "demo-nat")],
        id="remove-nat-gateway",
    ),
    pytest.param(
        make_spec(worker={"type": "cx33", "count": 2}), converged(make_spec(worker={"type": "cx33", "count": 5})),
        [("change", "server", "demo-system"), ("drain", "server", "demo-worker-005"),
         ("drain", "server", "demo-worker-004"), ("drain", "server", "demo-worker-003"),
         ("delete", "server", "demo-worker-005"), ("delete", "server", "demo-worker-004"),
         ("delete", "server", "demo-worker-003")],
        id="scale-in-drains-highest-first-proxies-pull-their-upstreams",
    ),
    pytest.param(
        make_spec(worker={"type": "cx33", "count": 4}), converged(make_spec()),
        [("change", "wheelhouse", "demo-system"), ("create", "server", "demo-worker-004"),
         ("create", "private_ip", "demo-worker-004"), ("change", "server", "demo-worker-004"),
         ("change", "server", "demo-system")],
        id="scale-out-adds-next-number",
    ),
    pytest.param(
        make_spec(system={"type": "cpx42"}), converged(make_spec()),
        [("change", "server", "demo-system"), ("check", "server", "demo-system")],
        id="vertical-scale-system",
    ),
    pytest.param(
        make_spec(ssh_allow=["198.51.100.0/24"]), converged(make_spec()),
        [("change", "firewall", "demo-public"), ("change", "firewall", "demo-system")],
        id="ssh-safe-list-changed",
    ),
    pytest.param(
        make_spec(control_allow=["203.0.113.0/24"]), converged(make_spec()),
        [("change", "firewall", "demo-system")],
        id="control-allow-opens-the-control-plane-on-the-system-node-only",
    ),
    pytest.param(
        make_spec(load_balancer={"type": "lb11"}, floating_ip=True), converged(make_spec()),
        # the floating IP exists before the proxies (they own its address), and is routed to proxy 1 at the end
        [
            ("create", "floating_ip", "demo-ip"),
            ("create", "load_balancer", "demo-lb"),
            ("change", "floating_ip", "demo-ip"),
        ],
        id="lb-and-floating-ip",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "facts", "expected"), CASES)
def test_plan_cases(spec: ClusterSpec, facts: Facts, expected: list[tuple[str, str, str]]) -> None:
    assert plan_cluster(spec, facts).summaries() == expected


def test_no_drain_plans_deletes_only() -> None:
    plan = plan_cluster(make_spec(worker={"type": "cx33", "count": 1}), converged(make_spec()), drain=False)
    assert [s for s in plan.summaries() if s[0] in ("drain", "delete")] == [
        ("delete", "server", "demo-worker-003"),
        ("delete", "server", "demo-worker-002"),
    ]


def test_existing_key_under_another_name_is_reused() -> None:
    plan = plan_cluster(make_spec(), converged(make_spec()))
    assert ("noop", "ssh_key", "someone-elses-name") in plan.summaries(include_noop=True)


def test_interrupted_type_change_is_finished() -> None:
    facts = converged(make_spec())
    servers = tuple(dataclasses.replace(s, status="off") if s.role == "system" else s for s in facts.servers)
    plan = plan_cluster(make_spec(), dataclasses.replace(facts, servers=servers))
    assert [(s.summary(), s.detail) for s in plan.changes] == [(("change", "server", "demo-system"), "power on")]


def test_changed_network_range_is_refused() -> None:
    facts = converged(make_spec())
    net = dataclasses.replace(facts.network, ip_range="10.9.0.0/16")  # type: ignore[type-var]
    with pytest.raises(SpecError, match="changing it in place is not supported"):
        plan_cluster(make_spec(), dataclasses.replace(facts, network=net))


def test_destroy_deletes_servers_before_what_they_use() -> None:
    plan = plan_destroy(make_spec(), converged(make_spec(nat={"type": "cx23"})))
    kinds = [kind for _, kind, _ in plan.summaries()]
    assert kinds.index("network") > max(i for i, k in enumerate(kinds) if k == "server")
    assert "ssh_key" not in kinds  # the key is not labelled for this cluster: it is not ours to delete


def test_render_is_readable() -> None:
    text = plan_cluster(SMALL, Facts()).render()
    assert "+ create    server          demo-worker-001  (worker, cx33, private only, 10.0.1.128)" in text
    assert text.splitlines()[-1] == "Summary: 13 to create, 5 to change, 0 to drain, 0 to delete, 0 unchanged"
    assert "nothing to do" in Plan("demo", "hetzner", ()).render()


def test_planning_a_large_cluster_is_fast_enough_to_be_pure() -> None:
    spec = make_spec(proxy={"type": "cx23", "count": 20}, worker={"type": "cx33", "count": 50},
                     state={"type": "ccx13", "count": 5})  # fmt: skip
    plan = plan_cluster(spec, converged(spec))
    assert plan.empty
    assert len(plan.steps) == 1 + 1 + 2 + 1 + 1 + 20 + 50 + 5


def test_resizing_the_state_pillar_in_place_is_refused() -> None:
    with pytest.raises(SpecError, match="state pillar was built for 3 node"):
        plan_cluster(make_spec(state={"type": "ccx13", "count": 5}), converged(make_spec()))


def test_every_node_gets_its_address_from_the_layout_not_the_allocator() -> None:
    spec = make_spec(nat={"type": "cx23"}, proxy={"type": "cx23", "count": 2}, worker={"type": "cx33", "count": 3})
    ips = {s.name: s.fixed_ip for s in d.desired_servers(spec)}
    assert ips == {
        "demo-nat": "10.0.1.2", "demo-system": "10.0.1.3",
        "demo-state-001": "10.0.1.11", "demo-state-002": "10.0.1.12", "demo-state-003": "10.0.1.13",
        "demo-proxy-001": "10.0.1.20", "demo-proxy-002": "10.0.1.21",
        "demo-worker-001": "10.0.1.128", "demo-worker-002": "10.0.1.129", "demo-worker-003": "10.0.1.130",
    }  # fmt: skip
    attach = [s.op for s in plan_cluster(spec, Facts()).steps if s.kind == "private_ip"]
    assert {a.server_name: a.ip for a in attach} == ips  # type: ignore[attr-defined]


REFUSED = [
    pytest.param(dict(image="debian-12"), "ubuntu-24.04", None, None, "changing the image", id="image"),
    pytest.param(dict(worker={"type": "cax21", "count": 3}), None, None, None, "CPU architecture", id="cx-to-cax"),
    pytest.param(dict(daemon={"port": 9090}), None, None, None, "daemon.port = 9090", id="daemon-port"),
    pytest.param({}, None, "someone-elses", None, "other secrets", id="secrets-mismatch"),
    pytest.param({}, None, None, "10.0.1.150", "address layout gives it", id="foreign-address"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "image", "digest", "ip", "match"), REFUSED)
def test_unsafe_edits_are_refused(
    changes: dict[str, object], image: str | None, digest: str | None, ip: str | None, match: str
) -> None:
    facts = converged(make_spec())
    servers = tuple(
        dataclasses.replace(
            s, image=image or s.image, private_ip=ip if ip and s.name == "demo-worker-002" else s.private_ip
        )
        for s in facts.servers
    )
    net = dataclasses.replace(facts.network, labels={d.SECRETS_LABEL: "ours"})  # type: ignore[type-var]
    facts = dataclasses.replace(facts, servers=servers, network=net)
    with pytest.raises(SpecError, match=match):
        plan_cluster(make_spec(**changes), facts, secrets_digest=digest or "ours")


def test_worker_type_change_drains_first() -> None:
    spec = make_spec(worker={"type": "cx43", "count": 3})
    plan = plan_cluster(spec, converged(make_spec()))
    first = [s.summary() for s in plan.changes][:2]
    assert first == [("drain", "server", "demo-worker-001"), ("change", "server", "demo-worker-001")]


def test_type_changes_go_one_node_at_a_time_each_gated_on_its_health() -> None:
    spec = make_spec(state={"type": "ccx23", "count": 3}, worker={"type": "cx43", "count": 3})
    plan = plan_cluster(spec, converged(make_spec()))
    states = [f"demo-state-00{i}" for i in (1, 2, 3)]
    workers = [f"demo-worker-00{i}" for i in (1, 2, 3)]
    expected = [("change", "server", n) for n in states for _ in range(2)]
    expected[1::2] = [("check", "server", n) for n in states]
    for w in workers:
        expected += [("drain", "server", w), ("change", "server", w), ("check", "server", w)]
    assert plan.summaries() == expected
    gate = plan.changes[1]
    assert "etcd" in gate.detail
    assert "Patroni" in gate.detail
    assert gate.op == AwaitHealthy("demo-state-001", "state")
    assert "3 to drain, 6 to check, 0 to delete" in plan.render()
