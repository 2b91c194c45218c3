"""Every node's journal reaches the system node (systemd-journal-upload → systemd-journal-remote, both Debian's),
so an operator reads the whole cluster's logs in one place: `journalctl -D /var/log/journal/remote`. Checked on the
shared machines cluster: each node's own lines arrive, and each worker's mbworker.service lines with them.
"""

from __future__ import annotations

import json
import time

import pytest

from .conftest import Cluster

REMOTE = "/var/log/journal/remote"
#: Uploads start when each node's cloud-init has run; allow for a slow, shared host before calling it lost.
ARRIVAL_TIMEOUT = 120.0


@pytest.mark.slow
def test_every_nodes_journal_reaches_the_system_node(cluster: Cluster) -> None:
    system = cluster.names("system")[0]
    others = [name for name in cluster.names() if name != system]
    for name in [system, *others]:
        assert cluster.wait_cloud_init(name) == "status: done", name
    workers = set(cluster.names("worker"))

    def arrived() -> tuple[set[str], set[str]]:
        """The hostnames that have lines on the system node, and the workers among them with mbworker lines."""
        hosts = cluster.provider.exec(system, ["journalctl", "-D", REMOTE, "-F", "_HOSTNAME"])
        seen = set(hosts.stdout.split())
        daemons = set()
        for worker in workers & seen:
            line = cluster.provider.exec(
                system, ["journalctl", "-D", REMOTE, f"_HOSTNAME={worker}", "_SYSTEMD_UNIT=mbworker.service",
                         "-n", "1", "-o", "json"],
            )  # fmt: skip
            if line.stdout.strip() and json.loads(line.stdout.splitlines()[-1]).get("MESSAGE"):
                daemons.add(worker)
        return seen, daemons

    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    seen, daemons = arrived()
    while (not set(others) <= seen or daemons != workers) and time.monotonic() < deadline:
        time.sleep(2)  # polling a file other processes append to: there is no event to wait on from here
        seen, daemons = arrived()
    assert set(others) <= seen, f"no journal from {sorted(set(others) - seen)} on {system}"
    assert daemons == workers, f"no mbworker.service lines from {sorted(workers - daemons)}"
