"""cloud-init per pillar: every document passes Debian's `cloud-init schema`, and says what each pillar needs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mbworker.provision import desired as d
from mbworker.provision.render import USER_DATA_LIMIT, NodeAddr, NodeContext, RenderError, render_text, user_data
from mbworker.provision.secrets import ClusterSecrets
from mbworker.provision.spec import ClusterSpec
from tests.conftest import require_binary

from .conftest import make_spec

SECRETS = ClusterSecrets.generate()
CTX = NodeContext(
    workers=(NodeAddr("demo-worker-001", "worker", "10.0.1.101"), NodeAddr("demo-worker-002", "worker", "10.0.1.102")),
    nodes=(NodeAddr("demo-worker-001", "worker", "10.0.1.101"), NodeAddr("demo-state-001", "state", "10.0.1.11")),
)


def docs(spec: ClusterSpec) -> dict[str, str]:
    return {s.name: user_data(spec, s, SECRETS, CTX) for s in d.desired_servers(spec)}


def test_every_pillar_passes_cloud_init_schema(tmp_path: Path) -> None:
    cloud_init = require_binary("cloud-init")
    spec = make_spec(nat={"type": "cx23"}, state={"type": "ccx13", "count": 3})
    chosen = {"demo-nat", "demo-system", "demo-proxy-001", "demo-worker-001", "demo-state-002"}
    for name, text in docs(spec).items():
        if name not in chosen:
            continue
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        result = subprocess.run(
            [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "Valid cloud-config" in result.stdout


def test_documents_fit_the_api_limit() -> None:
    spec = make_spec(state={"type": "ccx13", "count": 5}, proxy={"type": "cx23", "count": 100})
    big = NodeContext(workers=tuple(NodeAddr(f"demo-worker-{i:03d}", "worker", f"10.0.{i // 250}.{i % 250}")
                                    for i in range(300)))  # fmt: skip
    for s in d.desired_servers(spec):
        if s.role in ("state", "proxy") and s.index in (0, 1):
            assert len(user_data(spec, s, SECRETS, big).encode()) < USER_DATA_LIMIT, s.name


def test_worker_runs_mbworker_pointed_at_the_state_pillar() -> None:
    text = docs(make_spec())["demo-worker-002"]
    redis = SECRETS.redis_password.get_secret_value()
    assert f"MBWORKER_REDIS_URL=redis://:{redis}@10.0.1.11:6380/0" in text
    assert f"MBWORKER_JWT_SECRET={SECRETS.jwt_secret.get_secret_value()}" in text
    assert f"MBWORKER_ADMIN_TOKEN={SECRETS.admin_token.get_secret_value()}" in text
    assert "net.ipv6.conf.all.disable_ipv6 = 1" in text  # what Deno's --deny-net cannot cover (docs/security.md)
    assert (
        "ExecStart=/opt/mbworker/bin/mbworker serve --host 0.0.0.0 --port 8080 --admin-host 0.0.0.0 --admin-public"
        " --admin-port 8081" in text
    )
    assert "path: /etc/systemd/system/mbworker.service" in text
    assert "[systemctl, enable, --now, mbworker.service]" in text


def test_private_nodes_route_via_the_network_gateway_and_filter_on_the_host() -> None:
    all_docs = docs(make_spec(nat={"type": "cx23"}))
    for name in ("demo-worker-001", "demo-state-001"):
        text = all_docs[name]
        assert "ip route replace default via 10.0.0.1" in text  # the subnet gateway, not the NAT server
        assert "DNS=185.12.64.1 185.12.64.2" in text
        assert "policy drop;" in text
        assert "ip saddr 10.0.0.0/16 tcp dport" in text
    assert "tcp dport { 22, 8080, 8081, 9100 }" in all_docs["demo-worker-001"]
    for name in ("demo-proxy-001", "demo-system", "demo-nat"):
        assert "ip route replace default" not in all_docs[name]


def test_state_pillar_quorum_and_single_node() -> None:
    three = docs(make_spec(state={"type": "ccx13", "count": 3}))["demo-state-003"]
    assert "sentinel monitor mbredis 10.0.1.11 6379 2" in three
    assert "replicaof 10.0.1.11 6379" in three
    assert "ETCD_INITIAL_CLUSTER=demo-state-001=http://10.0.1.11:2380,demo-state-002=http://10.0.1.12:2380," in three
    assert "bind 10.0.1.13:5000" in three
    assert "option httpchk OPTIONS /primary" in three
    assert "bind 10.0.1.13:5001" in three
    assert "option httpchk OPTIONS /replica" in three
    assert "tcp-check expect string role:master" in three
    one = docs(make_spec(state={"type": "ccx13", "count": 1}))["demo-state-001"]
    assert "sentinel monitor" not in one
    assert "redis-sentinel.service || true" in one
    assert "replicaof" not in one.replace("# first node starts as master", "")


def test_proxy_lists_the_workers_and_system_scrapes_every_node() -> None:
    all_docs = docs(make_spec())
    proxy = all_docs["demo-proxy-001"]
    assert "demo-worker-001 10.0.1.101:8080\n      demo-worker-002 10.0.1.102:8080" in proxy
    assert "acl is_realtime path_beg /realtime/v1/" in proxy
    assert "acl is_functions path_beg /functions/v1/" in proxy
    system = all_docs["demo-system"]
    start = system.index("path: /etc/mbsystem/targets.json")
    block = system[system.index("content: |", start) + len("content: |") : system.index("  - path:", start + 10)]
    targets = json.loads("\n".join(line[6:] for line in block.splitlines()))
    assert {t["targets"][0] for t in targets} == {"10.0.1.101:9100", "10.0.1.11:9100", "10.0.1.101:8081"}


def test_placeholders_must_match_values() -> None:
    assert render_text("a: {{ x }}\n  b: {{y}}\n", {"x": "1\n2", "y": "3"}) == "a: 1\n2\n  b: 3\n"
    assert render_text("  k: |\n    {{ v }}\n", {"v": "l1\nl2"}) == "  k: |\n    l1\n    l2\n"
    with pytest.raises(RenderError, match="needs"):
        render_text("{{ missing }}", {})
    with pytest.raises(RenderError, match="never used"):
        render_text("nothing", {"extra": "1"})
