"""cloud-init per pillar: every document passes Debian's `cloud-init schema`, and says what each pillar needs."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import subprocess
from pathlib import Path

import pytest

from mbworker.provision import desired as d
from mbworker.provision.render import USER_DATA_LIMIT, NodeAddr, NodeContext, RenderError, render_text, user_data
from mbworker.provision.secrets import ClusterSecrets
from mbworker.provision.spec import ClusterSpec
from mbworker.provision.wheels import Wheel, Wheelhouse
from tests.conftest import require_binary

from .conftest import make_spec

SECRETS = ClusterSecrets.generate()
#: Only the shape matters to rendering: a PEM with a private key (real ones are issued in test_proxy).
PEM = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nAA==\n"
WHEELS = Wheelhouse(
    Path("/nowhere"),
    (Wheel("mbworker-0.1.0-py3-none-any.whl", "ab" * 32), Wheel("pydantic_core-2.50.5-cp311-x.whl", "cd" * 32)),
)
CTX = NodeContext(
    workers=(NodeAddr("demo-worker-001", "worker", "10.0.1.128"), NodeAddr("demo-worker-002", "worker", "10.0.1.129")),
    nodes=(NodeAddr("demo-worker-001", "worker", "10.0.1.128"), NodeAddr("demo-state-001", "state", "10.0.1.11")),
    tls_pem=PEM,
    wheels=WHEELS,
    control_pem=PEM,
    control_token="c" * 64,
    node_token="n" * 64,
)


def docs(spec: ClusterSpec, ctx: NodeContext = CTX) -> dict[str, str]:
    return {s.name: user_data(spec, s, SECRETS, ctx) for s in d.desired_servers(spec)}


def block(doc: str, path: str) -> str:
    """The content of one write_files entry, unindented."""
    start = doc.index(f"path: {path}")
    body = doc[doc.index("content: |", start) + len("content: |") + 1 :]
    lines = []
    for line in body.splitlines():
        if line.startswith("  - path:") or (line and not line.startswith("      ")):
            break
        lines.append(line[6:])
    return "\n".join(lines) + "\n"


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
    workers = tuple(NodeAddr(f"demo-worker-{i:03d}", "worker", f"10.0.{i // 250}.{i % 250}") for i in range(300))
    big = dataclasses.replace(CTX, workers=workers, nodes=workers)
    for s in d.desired_servers(spec):
        if s.role in ("state", "proxy", "system") and s.index in (0, 1):
            assert len(user_data(spec, s, SECRETS, big).encode()) < USER_DATA_LIMIT, s.name


def test_worker_runs_mbworker_pointed_at_the_state_pillar() -> None:
    text = docs(make_spec())["demo-worker-002"]
    redis, sentinel = SECRETS.redis_password.get_secret_value(), SECRETS.sentinel_password.get_secret_value()
    sentinels = "10.0.1.11:26379,10.0.1.12:26379,10.0.1.13:26379"
    assert f"MBWORKER_REDIS_URL=redis+sentinel://:{redis}@{sentinels}/mbredis/0?sentinel_password={sentinel}" in text
    single = docs(make_spec(state={"type": "ccx13", "count": 1}))["demo-worker-001"]
    assert f"MBWORKER_REDIS_URL=redis://:{redis}@10.0.1.11:6379/0" in single
    assert f"MBWORKER_JWT_SECRET={SECRETS.jwt_secret.get_secret_value()}" in text
    assert f"MBWORKER_ADMIN_TOKEN={SECRETS.admin_token.get_secret_value()}" in text
    assert "net.ipv6.conf.all.disable_ipv6 = 1" in text  # what Deno's --deny-net cannot cover (docs/security.md)
    assert (
        "ExecStart=/opt/mbworker/bin/mbworker serve --host 0.0.0.0 --port 8080 --admin-host 0.0.0.0 --admin-public"
        " --admin-port 8081" in text
    )
    assert "path: /etc/systemd/system/mbworker.service" in text
    # workers often come up before the state pillar: systemd keeps restarting mbworker until Redis answers
    assert "StartLimitIntervalSec=0" in text
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
    for name in ("demo-worker-001", "demo-state-001"):  # egress is checked before packages are installed
        text = all_docs[name]
        assert text.index("EGRESS CHECK FAILED") < text.index("packages:")
    for name in ("demo-proxy-001", "demo-system", "demo-nat"):
        assert "ip route replace default" not in all_docs[name]


def test_state_pillar_quorum_and_single_node() -> None:
    three = docs(make_spec(state={"type": "ccx13", "count": 3}))["demo-state-003"]
    assert "sentinel monitor mbredis 10.0.1.11 6379 2" in three
    assert f"requirepass {SECRETS.sentinel_password.get_secret_value()}" in block(three, "/etc/mbstate/sentinel.conf")
    assert "replicaof 10.0.1.11 6379" in three
    assert "ETCD_INITIAL_CLUSTER=demo-state-001=http://10.0.1.11:2380,demo-state-002=http://10.0.1.12:2380," in three
    assert "bind 10.0.1.13:5000" in three
    assert "option httpchk OPTIONS /primary" in three
    assert "bind 10.0.1.13:5001" in three
    assert "option httpchk OPTIONS /replica" in three
    assert f'password: "{SECRETS.patroni_rest_password.get_secret_value()}"' in block(three, "/etc/patroni/config.yml")
    # the passwords live in files only their service reads
    assert SECRETS.redis_password.get_secret_value() not in block(three, "/etc/haproxy/haproxy.cfg")
    for path in ("/etc/mbstate/redis.conf", "/etc/mbstate/sentinel.conf", "/etc/patroni/config.yml"):
        assert three[three.index(f"path: {path}") :].split("\n")[1].strip() == 'permissions: "0600"', path
    assert '[install, -o, redis, -g, redis, -m, "0600", /etc/mbstate/redis.conf, /etc/redis/redis.conf]' in three
    # etcd, PostgreSQL, PgBouncer and Patroni's REST API: state nodes only
    nft = block(three, "/etc/nftables.conf")
    assert "ip saddr { 10.0.1.11, 10.0.1.12, 10.0.1.13 } tcp dport { 2379, 2380, 5432, 6432, 8008 } accept" in nft
    assert "ip saddr 10.0.0.0/16 tcp dport { 22, 5000, 5001, 6379, 9100, 26379 } accept" in nft
    # ... and the system node, to Patroni's health only (the control plane probes GET /health)
    assert f"ip saddr {d.system_ip(make_spec())} tcp dport 8008 accept" in nft
    one = docs(make_spec(state={"type": "ccx13", "count": 1}))["demo-state-001"]
    assert "sentinel monitor" not in one
    assert "redis-sentinel.service || true" in one
    assert "replicaof" not in one.replace("# first node starts as master", "")


def test_proxy_lists_the_workers_and_system_scrapes_every_node() -> None:
    all_docs = docs(make_spec())
    proxy = all_docs["demo-proxy-001"]
    assert "demo-worker-001 10.0.1.128:8080\n      demo-worker-002 10.0.1.129:8080" in proxy
    assert "acl is_realtime path_beg /realtime/v1/" in proxy
    assert "acl is_functions path_beg /functions/v1/" in proxy
    system = all_docs["demo-system"]
    packed = system.split("path: /etc/mbsystem/targets.json", 1)[1].split("content: ", 1)[1].split("\n", 1)[0]
    targets = json.loads(gzip.decompress(base64.b64decode(packed)))
    # the layout the control plane reads: the nodes that exist, and the system node itself (created last)
    system_ip = d.system_ip(make_spec())
    assert {t["targets"][0] for t in targets} == {
        "10.0.1.128:9100",
        "10.0.1.11:9100",
        "10.0.1.128:8081",
        f"{system_ip}:9100",
    }
    roles = {t["labels"]["node"]: t["labels"]["role"] for t in targets if t["labels"]["kind"] == "node"}
    assert roles["demo-system"] == "system"
    assert "--layout-file /etc/mbsystem/targets.json" in block(system, "/etc/systemd/system/mbcontrol.service")
    # VictoriaMetrics asks the control plane for its targets (http_sd with the node token, a file its group reads);
    # mbworker's /metrics is behind the admin token: the mbworker job sends it
    scrape = block(system, "/etc/mbsystem/scrape.yml")
    sd = f"url: http://{system_ip}:{d.CONTROL_PORT}/control/v1/scrape-targets"
    for job in scrape.split("- job_name: ")[1:]:
        assert sd in job
        assert "bearer_token_file: /etc/mbsystem/node-token" in job
    assert "file_sd_configs" not in scrape
    assert "bearer_token_file: /etc/mbsystem/admin-token" in scrape.split("job_name: mbworker")[1]
    assert block(system, "/etc/mbsystem/admin-token").strip() == SECRETS.admin_token.get_secret_value()
    assert block(system, "/etc/mbsystem/node-token").strip() == "n" * 64
    assert "[chgrp, _victoria-metrics, /etc/mbsystem/admin-token, /etc/mbsystem/node-token]" in system


def test_workers_install_the_shipped_wheels_pinned_with_hashes_from_the_system_node() -> None:
    text = docs(make_spec())["demo-worker-001"]
    assert "pip, install" not in text
    assert 'pip install --quiet "' not in text
    reqs = block(text, "/etc/mbworker/requirements.txt")
    assert reqs == f"mbworker==0.1.0 --hash=sha256:{'ab' * 32}\npydantic-core==2.50.5 --hash=sha256:{'cd' * 32}\n"
    install = block(text, "/usr/local/sbin/mbworker-install")
    assert "--no-index --require-hashes" in install
    assert "--find-links http://10.0.1.3:8404/ --trusted-host 10.0.1.3" in install  # pip ignores it otherwise
    system = docs(make_spec())["demo-system"]
    assert "http.server --bind 10.0.1.3 --directory /var/lib/mbwheels 8404" in system
    with pytest.raises(RenderError, match="wheelhouse"):
        docs(make_spec(), NodeContext(tls_pem=PEM))


def test_nat_installs_what_it_enables() -> None:
    nat = docs(make_spec(nat={"type": "cx23"}))["demo-nat"]
    assert "packages:\n  - nftables" in nat
    assert "[systemctl, enable, --now, nftables.service]" in nat


def test_placeholders_must_match_values() -> None:
    assert render_text("a: {{ x }}\n  b: {{y}}\n", {"x": "1\n2", "y": "3"}) == "a: 1\n2\n  b: 3\n"
    assert render_text("  k: |\n    {{ v }}\n", {"v": "l1\nl2"}) == "  k: |\n    l1\n    l2\n"
    with pytest.raises(RenderError, match="needs"):
        render_text("{{ missing }}", {})
    with pytest.raises(RenderError, match="never used"):
        render_text("nothing", {"extra": "1"})
