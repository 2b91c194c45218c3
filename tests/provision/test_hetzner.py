"""HetznerProvider with the real hcloud client against the stateful fake API."""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import time

import pytest

from mbworker.control.endpoint import read_endpoint
from mbworker.provision import desired as d
from mbworker.provision.errors import SpecError, StepFailed
from mbworker.provision.hetzner import POLL_MAX, HetznerProvider
from mbworker.provision.nodeops import NodeRef
from mbworker.provision.provider import ApplyOptions, ApplyReport
from mbworker.provision.spec import ClusterSpec

from .conftest import FakeNodeOps, MakeProvider, make_spec
from .fake_hcloud import FakeHcloud, match_selector


def converge(p: HetznerProvider, **options: object) -> ApplyReport:
    return p.apply(p.plan(drain=not options.pop("no_drain", False)), ApplyOptions(**options))  # type: ignore[arg-type]


def names(fake: FakeHcloud, role: str) -> list[str]:
    return sorted(s["name"] for s in fake.servers() if s["labels"].get("role") == role)


FULL = make_spec(nat={"type": "cx23"}, load_balancer={"type": "lb11"}, floating_ip=True)


def test_apply_builds_everything_then_reapply_sends_nothing_mutating(
    fake: FakeHcloud, make_provider: MakeProvider
) -> None:
    p = make_provider(FULL)
    report = converge(p)
    assert report.complete
    assert names(fake, "worker") == ["demo-worker-001", "demo-worker-002", "demo-worker-003"]
    assert names(fake, "state") == ["demo-state-001", "demo-state-002", "demo-state-003"]
    assert names(fake, "proxy") == ["demo-proxy-001", "demo-proxy-002"]
    assert names(fake, "system") == ["demo-system"]
    assert names(fake, "nat") == ["demo-nat"]
    for s in fake.servers():
        assert s["labels"]["cluster"] == "demo"
        assert s["labels"]["managed-by"] == "mbworker"
    net = next(iter(fake.resources["networks"].values()))
    assert net["routes"] == [{"destination": "0.0.0.0/0", "gateway": "10.0.1.2"}]
    assert fake.server_by_name("demo-nat")["private_net"][0]["ip"] == "10.0.1.2"
    assert fake.server_by_name("demo-system")["private_net"][0]["ip"] == "10.0.1.3"
    # the CLI finds the control plane: the system node's public address, the cluster CA and the certificate's name
    endpoint = read_endpoint(p._shipment.state_dir)
    assert endpoint.url == f"https://{fake.server_by_name('demo-system')['public_net']['ipv4']['ip']}"
    assert endpoint.ca_file == p._shipment.ca().cert_path
    assert endpoint.server_name == "control.demo.cluster.internal"
    # every node sits at the address the layout gives it, whatever the cloud's allocator would have picked
    layout = {s.name: s.fixed_ip for s in d.desired_servers(FULL)}
    assert {s["name"]: s["private_net"][0]["ip"] for s in fake.servers()} == layout
    assert all(s["status"] == "running" for s in fake.servers())
    pg = next(iter(fake.resources["placement_groups"].values()))
    assert sorted(pg["servers"]) == sorted(s["id"] for s in fake.servers() if s["labels"]["role"] == "state")
    lb = next(iter(fake.resources["load_balancers"].values()))
    assert lb["targets"][0]["label_selector"]["selector"] == "cluster=demo,role=proxy"
    assert lb["targets"][0]["use_private_ip"] is True
    assert {(s["listen_port"], s["destination_port"]) for s in lb["services"]} == {(80, 80), (443, 443)}
    fip = next(iter(fake.resources["floating_ips"].values()))
    assert fip["server"] == fake.server_by_name("demo-proxy-001")["id"]
    # created before the proxies, so they own its address (the cloud only routes it to them)
    assert f"ip addr replace {fip['ip']}/32" in (fake.user_data("demo-proxy-001") or "")

    # every action the provider started was polled to completion, next_actions included
    polled = {int(r.path.split("/")[-1]) for r in fake.requests if r.path.startswith("/actions/")}
    assert set(fake.actions) <= polled
    assert all(a["status"] == "success" for a in fake.actions.values())

    fake.clear_log()
    again = make_provider(FULL)
    assert again.plan().empty
    assert again.apply(again.plan(), ApplyOptions()).done == []
    assert fake.mutations() == []


def test_private_nodes_never_get_a_public_ip(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    converge(make_provider(FULL))
    creates = [r.body for r in fake.mutations() if r.path == "/servers"]
    for body in creates:
        role = body["labels"]["role"]
        if role in ("worker", "state"):
            assert body["public_net"] == {"enable_ipv4": False, "enable_ipv6": False}
            # created stopped, off the network: attached at its chosen address, then started
            assert body["start_after_create"] is False
            assert not body.get("networks")
        else:
            assert "public_net" not in body
    for s in fake.servers():
        if s["labels"]["role"] in ("worker", "state"):
            assert s["public_net"]["ipv4"] is None
            assert s["public_net"]["ipv6"] is None
            assert ipaddress.ip_address(s["private_net"][0]["ip"]).is_private
        else:
            assert s["public_net"]["ipv4"] is not None


def test_firewall_rules_and_selectors_match_the_right_servers(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    converge(make_provider(FULL))
    fws = {f["name"]: f for f in fake.resources["firewalls"].values()}
    public = fws["demo-public"]
    rules = {(r["protocol"], r["port"]): sorted(r["source_ips"]) for r in public["rules"]}
    assert rules == {
        ("tcp", "443"): ["0.0.0.0/0", "::/0"],
        ("tcp", "80"): ["0.0.0.0/0", "::/0"],
        ("tcp", "22"): ["203.0.113.0/24"],
        ("icmp", None): ["0.0.0.0/0", "::/0"],
    }
    by_id = {s["id"]: s["name"] for s in fake.servers()}
    applied = sorted(by_id[r["server"]["id"]] for r in public["applied_to"][0]["applied_to_resources"])
    assert applied == ["demo-proxy-001", "demo-proxy-002"]
    # the system node: the control plane's HTTPS only from control_allow (FULL lists none: no public address)
    system = fws["demo-system"]
    assert {(r["protocol"], r["port"]) for r in system["rules"]} == {("tcp", "22"), ("icmp", None)}
    assert [by_id[r["server"]["id"]] for r in system["applied_to"][0]["applied_to_resources"]] == ["demo-system"]
    nat_applied = [by_id[r["server"]["id"]] for r in fws["demo-nat"]["applied_to"][0]["applied_to_resources"]]
    assert nat_applied == ["demo-nat"]
    assert {(r["protocol"], r["port"]) for r in fws["demo-nat"]["rules"]} == {("tcp", "22"), ("icmp", None)}
    # nothing public reaches private nodes: no Cloud Firewall could, so none is attached to them
    for s in fake.servers():
        if s["labels"]["role"] in ("worker", "state"):
            assert s["public_net"]["firewalls"] == []


def test_selector_semantics() -> None:
    labels = {"cluster": "demo", "role": "proxy"}
    assert match_selector("cluster=demo,role in (proxy,system)", labels)
    assert not match_selector("cluster=demo,role notin (proxy,system)", labels)
    assert match_selector("cluster==demo,!gone,role!=worker", labels)
    assert not match_selector("cluster=demo,role=worker", labels)


def test_failure_half_way_then_resume_converges(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    p = make_provider(FULL)
    fake.fail_on_mutation(9)  # somewhere among the servers
    with pytest.raises(StepFailed) as info:
        converge(p)
    assert "injected failure" in str(info.value)
    partial = len(fake.servers())
    assert 0 < partial < 10
    resumed = make_provider(FULL)
    plan = resumed.plan()
    assert not any(s.action == "delete" for s in plan.steps)
    assert ("create", "ssh_key", "demo-key-1") not in plan.summaries()  # done before the failure
    resumed.apply(plan, ApplyOptions())
    assert len(fake.servers()) == 10
    fake.clear_log()
    assert make_provider(FULL).plan().empty


@pytest.mark.parametrize("n", [3, 12, 17, 23])
def test_failure_at_any_point_resumes(fake: FakeHcloud, make_provider: MakeProvider, n: int) -> None:
    fake.fail_on_mutation(n)
    with pytest.raises(StepFailed):
        converge(make_provider(FULL))
    converge(make_provider(FULL))
    assert make_provider(FULL).plan().empty
    assert len(fake.servers()) == 10


def test_retried_conflict_does_not_fail_the_apply(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    fake.fail_on_mutation(2, code="conflict", status=409)  # the client retries conflicts (sleep patched)
    converge(make_provider())
    assert make_provider().plan().empty


def scale(make_provider: MakeProvider, ops: FakeNodeOps, count: int, **options: object) -> ApplyReport:
    return converge(make_provider(make_spec(worker={"type": "cx33", "count": count}), ops), **options)


def test_scale_out_and_in_with_drain(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    ops = FakeNodeOps()
    scale(make_provider, ops, 1)
    assert names(fake, "worker") == ["demo-worker-001"]
    scale(make_provider, ops, 5)
    assert names(fake, "worker") == [f"demo-worker-00{i}" for i in range(1, 6)]
    # proxies pull their upstreams (ready workers) from the control plane: no list is pushed to them
    assert [n for n, _, _ in ops.refreshed if n.startswith("demo-proxy")] == []

    fake.clear_log()
    scale(make_provider, ops, 2)
    assert names(fake, "worker") == ["demo-worker-001", "demo-worker-002"]
    # drained (the control plane takes each out of the upstreams first), highest first, before any delete
    assert [n.name for n in ops.drained] == ["demo-worker-005", "demo-worker-004", "demo-worker-003"]
    assert all(ipaddress.ip_address(n.private_ip or "").is_private for n in ops.drained)
    assert [n for n, _, _ in ops.refreshed if n.startswith("demo-proxy")] == []
    assert make_provider(make_spec(worker={"type": "cx33", "count": 2})).plan().empty


def test_no_drain_skips_the_drain(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    ops = FakeNodeOps()
    scale(make_provider, ops, 3)
    scale(make_provider, ops, 1, no_drain=True)
    assert ops.drained == []
    assert names(fake, "worker") == ["demo-worker-001"]


def test_undrainable_node_is_left_in_place_unless_forced(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    ops = FakeNodeOps(undrainable=("demo-worker-003",))
    scale(make_provider, ops, 3)
    report = scale(make_provider, ops, 1)
    assert [n for n, _ in report.left_in_place] == ["demo-worker-003"]
    assert "still has work" in report.left_in_place[0][1]
    assert names(fake, "worker") == ["demo-worker-001", "demo-worker-003"]

    report = scale(make_provider, ops, 1, force=True)
    assert [n for n, _ in report.forced] == ["demo-worker-003"]
    assert names(fake, "worker") == ["demo-worker-001"]


def test_system_type_change_is_shutdown_change_poweron(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    converge(make_provider())
    fake.clear_log()
    converge(make_provider(make_spec(system={"type": "cpx42"})))
    sid = fake.server_by_name("demo-system")["id"]
    calls = [(r.method, r.path.removeprefix(f"/servers/{sid}/actions/")) for r in fake.mutations()]
    assert calls == [("POST", "shutdown"), ("POST", "change_type"), ("POST", "poweron")]
    change = next(r for r in fake.mutations() if r.path.endswith("change_type"))
    assert change.body == {"server_type": "cpx42", "upgrade_disk": False}
    s = fake.server_by_name("demo-system")
    assert s["server_type"]["name"] == "cpx42"
    assert s["status"] == "running"
    assert make_provider(make_spec(system={"type": "cpx42"})).plan().empty


class TypeWatchingOps(FakeNodeOps):
    """Notes, at each health gate, which state nodes already run the new type (the rolling order)."""

    def __init__(self, fake: FakeHcloud, unhealthy: tuple[str, ...] = ()) -> None:
        super().__init__(unhealthy=unhealthy)
        self.fake = fake
        self.changed_at_gate: list[tuple[str, list[str]]] = []

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        new = sorted(s["name"] for s in self.fake.servers() if s["server_type"]["name"] == "ccx23")
        self.changed_at_gate.append((node.name, new))
        super().wait_healthy(node, timeout=timeout, via=via)


def test_state_type_change_rolls_one_node_at_a_time_behind_the_health_gate(
    fake: FakeHcloud, make_provider: MakeProvider
) -> None:
    converge(make_provider())
    ops = TypeWatchingOps(fake)
    bigger = make_spec(state={"type": "ccx23", "count": 3})
    converge(make_provider(bigger, ops))
    # each node was changed, then found healthy, before the next one was touched
    assert ops.changed_at_gate == [
        ("demo-state-001", ["demo-state-001"]),
        ("demo-state-002", ["demo-state-001", "demo-state-002"]),
        ("demo-state-003", ["demo-state-001", "demo-state-002", "demo-state-003"]),
    ]
    # state nodes are private: the gate reaches them through the system node's public address
    assert all(via is not None and via.name == "demo-system" and via.public_ip for _, via in ops.gated)
    assert make_provider(bigger).plan().empty


def test_the_rolling_type_change_stops_at_the_first_node_that_does_not_come_back(
    fake: FakeHcloud, make_provider: MakeProvider
) -> None:
    converge(make_provider())
    ops = TypeWatchingOps(fake, unhealthy=("demo-state-002",))
    bigger = make_spec(state={"type": "ccx23", "count": 3})
    with pytest.raises(StepFailed) as info:
        converge(make_provider(bigger, ops))
    assert info.value.step == "check server demo-state-002"
    assert "not healthy" in str(info.value)
    types = {s["name"]: s["server_type"]["name"] for s in fake.servers() if s["labels"]["role"] == "state"}
    assert types == {"demo-state-001": "ccx23", "demo-state-002": "ccx23", "demo-state-003": "ccx13"}
    # once the node is healthy again, a re-apply gates it (its type is done) and goes on with the next one
    ops = TypeWatchingOps(fake)
    converge(make_provider(bigger, ops))
    assert [n for n, _ in ops.changed_at_gate] == ["demo-state-003"]


def test_destroy_removes_everything_labelled(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    other = make_provider(make_spec(name="other", network="10.1.0.0/16", ssh_keys=[]))
    converge(other)
    converge(make_provider(FULL))
    p = make_provider(FULL)
    p.apply(p.destroy_plan(), ApplyOptions())
    left = {k: [o["name"] for o in v.values()] for k, v in fake.resources.items()}
    assert all(n.startswith("other") for kind in left.values() for n in kind if n), left
    assert left["servers"]
    assert left["networks"] == ["other-net"]
    assert make_provider(FULL).destroy_plan().empty


def test_unlabelled_name_clash_is_a_clear_error(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    p = make_provider()
    p.client.networks.create(name="demo-net", ip_range="10.0.0.0/16")  # someone else's, no labels
    with pytest.raises(StepFailed) as info:
        converge(p)
    assert "uniqueness_error" in str(info.value)
    assert "create network demo-net" in str(info.value)


def test_types_the_api_does_not_offer_are_rejected(
    fake: FakeHcloud, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from . import fake_hcloud

    monkeypatch.setattr(fake_hcloud, "SERVER_TYPES", [t for t in fake_hcloud.SERVER_TYPES if t != "ccx13"])
    monkeypatch.setattr(fake_hcloud, "DEPRECATED_TYPES", {"cpx32"})
    with pytest.raises(SpecError) as info:
        make_provider().plan()
    assert "state.type: the API does not offer server type 'ccx13'" in str(info.value)
    assert "system.type: server type 'cpx32' is deprecated in fsn1" in str(info.value)
    assert fake.mutations() == []


def test_a_type_sold_out_in_the_spec_location_is_refused_before_any_change(
    fake: FakeHcloud, make_provider: MakeProvider
) -> None:
    spec = make_spec(location="nbg1", worker={"type": "cx53", "count": 3})
    with pytest.raises(SpecError) as info:
        make_provider(spec).plan()
    assert "worker.type: 'cx53' is not offered in nbg1" in str(info.value)
    assert fake.mutations() == []


def test_user_data_per_pillar(fake: FakeHcloud, make_provider: MakeProvider, secrets: object) -> None:
    converge(make_provider(FULL))
    worker = fake.user_data("demo-worker-001") or ""
    assert "mbworker.service" in worker
    redis, sentinel = secrets.redis_password.get_secret_value(), secrets.sentinel_password.get_secret_value()  # type: ignore[attr-defined]
    hosts = "10.0.1.11:26379,10.0.1.12:26379,10.0.1.13:26379"
    assert f"MBWORKER_REDIS_URL=redis+sentinel://:{redis}@{hosts}/mbredis/0?sentinel_password={sentinel}" in worker
    assert "ip route replace default via 10.0.0.1" in worker
    assert "mbworker==0.1.0 --hash=sha256:" in worker
    assert "--no-index --require-hashes" in worker
    # The proxies' X-Forwarded-* reach functions (from any other peer the worker replaces them): every address a
    # proxy may have is trusted, whatever their count becomes.
    (line,) = [x.strip() for x in worker.splitlines() if "MBWORKER_TRUSTED_PROXIES=" in x]
    trusted = [ipaddress.ip_network(n) for n in json.loads(line.split("=", 1)[1].strip("'"))]
    proxies = [s["private_net"][0]["ip"] for s in fake.servers() if s["labels"]["role"] == "proxy"]
    assert proxies
    assert all(any(ipaddress.ip_address(ip) in n for n in trusted) for ip in proxies)
    assert not any(ipaddress.ip_address("10.0.1.128") in n for n in trusted)  # a worker's address is not
    proxy = fake.user_data("demo-proxy-002") or ""
    workers = {s["name"]: s["private_net"][0]["ip"] for s in fake.servers() if s["labels"]["role"] == "worker"}
    for name, ip in workers.items():
        assert f"{name} {ip}:8080" in proxy
    system = fake.user_data("demo-system") or ""
    packed = system.split("path: /etc/mbsystem/targets.json", 1)[1].split("content: ", 1)[1].split("\n", 1)[0]
    targets = gzip.decompress(base64.b64decode(packed)).decode()
    for ip in workers.values():
        assert f'"{ip}:9100"' in targets
    assert "listen postgres_master" in (fake.user_data("demo-state-002") or "")
    assert "masquerade" in (fake.user_data("demo-nat") or "")


def test_wheels_are_published_to_the_system_node_for_new_workers_only(
    fake: FakeHcloud, make_provider: MakeProvider, node_ops: FakeNodeOps
) -> None:
    converge(make_provider())
    assert node_ops.published == [("demo-system", ["mbworker-0.1.0-py3-none-any.whl", "trio-0.35.0-py3-none-any.whl"])]
    converge(make_provider())  # nothing new: nothing published
    assert len(node_ops.published) == 1
    converge(make_provider(make_spec(worker={"type": "cx33", "count": 4})))
    assert len(node_ops.published) == 2
    events = [e for e in node_ops.events if e[0] in ("publish",)]
    assert events == [("publish", "demo-system"), ("publish", "demo-system")]
    # on scale-out the system node already serves the new wheels when the new worker is created
    publish_at = next(i for i, r in enumerate(fake.requests) if r.method == "PUT" or r.path == "/servers")
    assert publish_at >= 0


def test_a_plan_with_other_secrets_is_refused(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    from mbworker.provision.secrets import ClusterSecrets

    converge(make_provider())
    net = next(iter(fake.resources["networks"].values()))
    assert len(net["labels"][d.SECRETS_LABEL]) == 32
    fake.clear_log()
    with pytest.raises(SpecError, match="other secrets"):
        make_provider(the_secrets=ClusterSecrets.generate()).plan()
    assert fake.mutations() == []


def test_action_polling_backs_off(
    fake: FakeHcloud, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the module hetzner's polling sleeps through
    fake.action_polls = 12
    p = make_provider()
    p._poll = 1.0
    p.apply(p.plan(), ApplyOptions())
    one_action = sleeps[:12]
    assert one_action[:4] == [1.0, 1.5, 2.25, 3.375]
    assert max(sleeps) == POLL_MAX
    # 12 polls each at 1 s would be 12 s; backing off covers ~80 s of a slow action with the same 12 requests
    assert sum(one_action) > 60


def _spec_with(spec: ClusterSpec, **kw: object) -> ClusterSpec:
    return make_spec(**kw)


def test_lb_and_floating_ip_can_be_removed(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    converge(make_provider(FULL))
    converge(make_provider(make_spec(nat={"type": "cx23"})))
    assert fake.resources["load_balancers"] == {}
    assert fake.resources["floating_ips"] == {}
    assert make_provider(make_spec(nat={"type": "cx23"})).plan().empty


def test_names_are_stable(fake: FakeHcloud) -> None:
    spec = make_spec()
    assert d.server_name(spec.name, "worker", 7) == "demo-worker-007"


def test_pagination_sees_every_server(fake: FakeHcloud, make_provider: MakeProvider) -> None:
    spec = make_spec(worker={"type": "cx33", "count": 52})  # 58 servers: two pages of 50
    converge(make_provider(spec))
    fake.clear_log()
    assert make_provider(spec).plan().empty
    pages = [r.query.get("page") for r in fake.requests if r.path == "/servers"]
    assert pages == [["1"], ["2"]]
