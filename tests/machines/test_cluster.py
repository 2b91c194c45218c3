"""The issue's cluster (1 system, 1 proxy, 2 workers, 3 state, NAT) booted as machines: what the provider owns.

Every node boots from its rendered user-data and cloud-init finishes; the namespace keeps the private range
private (must-hold 6: nothing on the public bridge reaches a private address, and the host has no route there);
status lists every node; a re-apply of the unchanged spec has nothing to do and restarts nothing (must-hold 7;
the fixture's teardown checks that destroy leaves nothing behind). What the pillars' services do once booted
(TLS, functions, realtime, Postgres, failover) is asserted as the templates make it work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbworker.control.endpoint import read_endpoint
from mbworker.provision import desired as d
from mbworker.provision.cli import main as provision_main
from mbworker.provision.machines_net import PUB_BRIDGE, run

from .conftest import READY_TIMEOUT, Cluster, tcp_connects

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_every_machine_finishes_cloud_init(cluster: Cluster) -> None:
    deadline = time.monotonic() + READY_TIMEOUT  # for the whole cluster: they boot side by side
    for name in cluster.names():
        status = cluster.wait_cloud_init(name, timeout=max(1.0, deadline - time.monotonic()))
        assert status in ("status: done", "status: error"), f"{name}: {status}"
    report = {
        "apply_seconds": round(cluster.apply_seconds, 1),
        "ready_seconds": {k: round(v, 1) for k, v in cluster.ready_seconds.items()},
        "cloud_init": cluster.cloud_init,
    }
    (cluster.state_dir / "timings.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def test_every_machine_has_its_addresses(cluster: Cluster) -> None:
    prefix = cluster.spec.network.prefixlen
    for name in cluster.names():
        record = cluster.server(name)
        addrs = cluster.provider.exec(name, ["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {record['private_ip']}/{prefix} " in addrs, f"{name}: {addrs}"
        if record["public_ip"]:
            assert f"inet {record['public_ip']}/24 " in addrs, f"{name}: {addrs}"
        else:
            assert record["role"] in ("worker", "state")


def _icmp_from(netns: str, addr: str) -> bool:
    code = (
        "import sys\nfrom tests.machines.conftest import icmp_echo\nsys.exit(0 if icmp_echo(sys.argv[1], 3.0) else 1)"
    )
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, addr], cwd=REPO, timeout=30)
    return done.returncode == 0


def _tcp_from(netns: str, addr: str, port: int) -> bool:
    code = (
        "import sys\nfrom tests.machines.conftest import tcp_connects\n"
        "sys.exit(0 if tcp_connects(sys.argv[1], int(sys.argv[2]), 3.0) else 1)"
    )
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", code, addr, str(port)]
    return subprocess.run(argv, cwd=REPO, timeout=30).returncode == 0


@pytest.fixture
def internet_host(cluster: Cluster) -> Iterator[str]:
    """A namespace on the public bridge with a public test address: a host somewhere on the internet."""
    net = cluster.provider.net()
    assert net is not None
    probe = f"{net.plan.ns}-x"
    run(["ip", "netns", "add", probe])
    try:
        run(["ip", "-n", net.plan.ns, "link", "add", "probe0", "type", "veth", "peer", "name", "eth0", "netns", probe])
        run(["ip", "-n", net.plan.ns, "link", "set", "probe0", "master", PUB_BRIDGE, "up"])
        run(["ip", "-n", probe, "addr", "add", f"198.18.{net.plan.slot}.250/24", "dev", "eth0"])
        run(["ip", "-n", probe, "link", "set", "eth0", "up"])
        run(["ip", "-n", probe, "route", "add", "default", "via", net.plan.public_gateway])
        yield probe
    finally:
        run(["ip", "netns", "del", probe], check=False)  # its veth goes with it


def test_the_private_range_is_not_reachable_from_outside(cluster: Cluster, internet_host: str) -> None:
    net = cluster.provider.net()
    assert net is not None
    proxy = cluster.server(cluster.names("proxy")[0])
    # the probe is really on the internet side: it reaches the proxy's public address
    assert _icmp_from(internet_host, str(proxy["public_ip"]))
    for name in cluster.names("worker") + cluster.names("state"):
        private = str(cluster.server(name)["private_ip"])
        # the network's gateway side does reach it (the node answers ICMP: the check below is not vacuous)
        assert _icmp_from(net.plan.ns, private), name
        assert not _icmp_from(internet_host, private), name
        assert not _tcp_from(internet_host, private, 9100), name
        # and the host has no route into the private range through the cluster's namespace
        route = subprocess.run(["ip", "route", "get", private], capture_output=True, text=True).stdout
        assert net.plan.host_if not in route


def test_cloud_firewall_closes_what_the_spec_does_not_open(cluster: Cluster) -> None:
    nat = cluster.server(cluster.names("nat")[0])
    # the NAT firewall opens ICMP (and SSH from the safe-list, empty here): TCP from the host is dropped
    assert not tcp_connects(str(nat["public_ip"]), 22, timeout=2.0)


def test_status_lists_every_node(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["status", "-c", str(cluster.spec_path), "--provider", "machines", "--state-dir", str(cluster.state_dir)]
    assert provision_main(["provision", *argv, "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {n["name"] for n in status["nodes"]} == set(cluster.names())
    assert all(n["state"] == "running" for n in status["nodes"])
    # clients go to the floating IP (the spec has one), routed to proxy 1
    fip = cluster.provider.load()["floating_ips"][d.floating_ip_name(cluster.spec)]
    assert status["public_url"] == f"https://{fip['ip']}"
    # the control plane's URL: what the CLI reads from the state dir (`--cluster cluster.toml`)
    assert status["control_url"] == read_endpoint(cluster.state_dir).url


def test_reapply_of_the_unchanged_spec_changes_nothing(cluster: Cluster) -> None:
    before = {n: cluster.server(n)["pid"] for n in cluster.names()}
    plan = cluster.provider.plan()
    assert plan.empty, plan.render()
    after = {n: cluster.server(n)["pid"] for n in cluster.names()}
    assert after == before
