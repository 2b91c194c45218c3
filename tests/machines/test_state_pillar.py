"""The state pillar booted for real on the shared machines cluster (three state machines from the rendered
user-data). Patroni elects a leader over etcd, HAProxy sends writes (5000) to it and reads (5001)
to a replica, Redis has a master behind three Sentinels; etcd, Patroni's REST API and PostgreSQL answer only
state nodes (a worker is refused), and each of them asks for its credential. Checked from inside the machines.
"""

from __future__ import annotations

import json
import time

import pytest

from mbworker.provision import desired as d

from .conftest import Cluster

PROBE = (
    "import socket,sys\n"
    "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close(); print('open')\n"
    "except OSError as e:\n print('closed', type(e).__name__)\n"
)


@pytest.mark.slow
def test_state_pillar_serves_and_keeps_its_internals_to_itself(cluster: Cluster) -> None:
    provider = cluster.provider
    spec = cluster.spec
    secrets = json.loads((cluster.state_dir / "secrets.json").read_text())
    states = [d.server_name(spec.name, "state", i) for i in range(1, spec.state.count + 1)]
    worker = d.server_name(spec.name, "worker", 1)
    ips = d.state_ips(spec)

    def sh(node: str, script: str, timeout: float = 60.0) -> str:
        done = provider.exec(node, ["sh", "-c", script], timeout=timeout)
        return done.stdout + done.stderr

    for name in states:
        status = cluster.wait_cloud_init(name)
        assert status == "status: done", name + status + sh(name, "tail -n 40 /var/log/cloud-init-output.log")

    # Patroni: one leader and two streaming replicas, elected over etcd (with auth on)
    members: list[dict[str, object]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        out = sh(states[0], f"curl -fsS http://{ips[0]}:8008/cluster")
        members = json.loads(out).get("members", []) if out.startswith("{") else []
        roles = sorted(str(m["role"]) for m in members if m.get("state") in ("running", "streaming"))
        if roles == ["leader", "replica", "replica"]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"Patroni did not converge: {members}")

    # writes through HAProxy 5000, read back from a replica through 5001 (on another node's HAProxy)
    pg = f"PGPASSWORD={secrets['postgres_password']} psql -X -q -t -A -U postgres -d postgres"
    out = sh(
        states[2], f"{pg} -h {ips[2]} -p 5000 -c 'create table pillar_t(v text); insert into pillar_t values (42)'"
    )
    assert "ERROR" not in out, out
    deadline = time.monotonic() + 30
    while (
        got := sh(states[1], f"{pg} -h {ips[1]} -p 5001 -c 'select pg_is_in_recovery(), v from pillar_t'")
    ) != "t|42\n":
        assert time.monotonic() < deadline, got
        time.sleep(1)

    # Redis: a master behind three Sentinels, which want their password; their files are the redis user's alone
    sentinel = f"redis-cli -h {ips[1]} -p 26379"
    master = sh(states[1], f"{sentinel} --no-auth-warning -a {secrets['sentinel_password']} "
                           "sentinel get-master-addr-by-name mbredis").split()  # fmt: skip
    assert master[0] in ips
    assert master[1:] == ["6379"]
    assert "NOAUTH" in sh(states[1], f"{sentinel} sentinel get-master-addr-by-name mbredis")
    assert sh(states[0], "stat -c '%a %U' /etc/redis/redis.conf /etc/redis/sentinel.conf").split() == [
        "600", "redis", "600", "redis"
    ]  # fmt: skip

    # etcd wants its root user; Patroni's REST API wants its credential for changes
    assert "user name is empty" in sh(states[0], "ETCDCTL_API=3 etcdctl get /service/ --prefix")
    assert sh(states[0], f"curl -s -o /dev/null -w '%{{http_code}}' -X POST http://{ips[0]}:8008/restart") == "401"

    # from a worker: Postgres (5000) and the Sentinels yes; etcd, Patroni REST, PostgreSQL itself, PgBouncer no
    expected = {
        5000: "open",
        26379: "open",
        2379: "closed",
        2380: "closed",
        8008: "closed",
        5432: "closed",
        6432: "closed",
    }
    for port, want in expected.items():
        answer = provider.exec(worker, ["python3", "-c", PROBE, ips[0], str(port)]).stdout.split()
        assert answer[:1] == [want], (port, answer)
    print("state pillar ready after:", {n: round(cluster.ready_seconds.get(n, -1)) for n in states})
