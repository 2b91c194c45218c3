"""One machine, booted by the machines provider from the user-data the Hetzner provider would send.

Applies the network, firewalls and the NAT node of a spec (the rest of the plan is left out), and checks the
machine the way an operator would: cloud-init ran the rendered document and finished, the machine has its
private and public addresses, the host reaches the public one (ICMP, which the NAT firewall allows) and has no
route into the private range, a re-plan leaves what exists alone, and destroy leaves nothing on the host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mbworker.provision import desired as d
from mbworker.provision.plan import Plan
from mbworker.provision.provider import ApplyOptions
from mbworker.provision.render import NodeContext, user_data
from mbworker.provision.secrets import load_or_create_secrets

from .conftest import cluster_name, destroy_cluster, icmp_echo, make_provider, require_machines, spec_toml, tcp_connects


def _only(plan: Plan, server: str) -> Plan:
    """The plan's steps for everything but servers, and for the one server `server`."""
    skipped = ("server", "private_ip", "wheelhouse", "floating_ip")  # the floating IP goes to a proxy
    steps = tuple(s for s in plan.steps if s.kind not in skipped or s.name == server)
    return Plan(plan.cluster, plan.provider, steps)


@pytest.mark.slow
def test_one_machine_boots_from_the_rendered_user_data(tmp_path: Path) -> None:
    require_machines()
    provider, _, state_dir = make_provider(tmp_path, spec_toml(cluster_name("mbs"), workers=1, state=1))
    spec = provider.spec
    nat = d.server_name(spec.name, "nat", 0)
    try:
        provider.apply(_only(provider.plan(), nat), ApplyOptions())
        record = provider.load()["servers"][nat]
        provider.wait_booted(nat, 300)
        done = provider.exec(nat, ["cloud-init", "status"])
        assert "status: done" in done.stdout or "status: error" in done.stdout, done.stdout + done.stderr

        # cloud-init ran exactly what the Hetzner provider sends for this server
        want = next(s for s in d.desired_servers(spec) if s.name == nat)
        expected = user_data(spec, want, load_or_create_secrets(state_dir), NodeContext())
        got = provider.exec(nat, ["cat", "/var/lib/cloud/instance/user-data.txt"])
        assert got.stdout == expected
        assert "ip_forward = 1" in provider.exec(nat, ["cat", "/etc/sysctl.d/90-nat.conf"]).stdout

        addrs = provider.exec(nat, ["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {d.nat_ip(spec)}/16" in addrs
        assert f"inet {record['public_ip']}/24" in addrs

        # the host reaches the public address through the namespace, and is not routed into the private range
        assert icmp_echo(record["public_ip"])
        net = provider.net()
        assert net is not None
        route = subprocess.run(["ip", "route", "get", d.nat_ip(spec)], capture_output=True, text=True).stdout
        assert net.plan.host_if not in route
        # the NAT firewall allows ICMP and nothing else from the internet side
        assert not tcp_connects(record["public_ip"], 22, timeout=2.0)

        # what exists is left alone by a re-plan
        again = _only(provider.plan(), nat)
        assert again.empty, again.render()
        assert provider.load()["servers"][nat]["pid"] == record["pid"]
    finally:
        destroy_cluster(provider)
    assert provider.leftovers() == []
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not (provider.dir / nat).exists()
