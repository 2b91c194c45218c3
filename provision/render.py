"""cloud-init user-data per pillar, rendered from the templates in provision/templates/.

Placeholders are `{{ name }}`; a multi-line value is indented to the placeholder's column, so blocks (a systemd
unit, an nftables file) drop into YAML literal blocks unchanged. A missing or unknown placeholder is an error, not
an empty string. Values come from the spec (validated), from secrets (hex) and from facts (IP addresses), so no
value can break out of its YAML scalar.

`NodeContext` is what the executor knows when it creates a server: the IPs of workers and nodes that exist.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass
from importlib import resources

from mbworker.control.layout import PATRONI_PORT, LayoutNode, layout_json

from . import desired as d
from .secrets import ClusterSecrets
from .spec import ClusterSpec
from .wheels import WHEEL_PORT, Wheelhouse

_PLACEHOLDER = re.compile(r"\{\{ *([a-z_]+) *\}\}")
#: Cloud-init user data is limited to 32 KiB by the API.
USER_DATA_LIMIT = 32 * 1024
PG_BIN_DIR = "/usr/lib/postgresql/15/bin"  # Debian 12's PostgreSQL
#: What private nodes try to reach at boot to prove their egress (through the NAT node) works: Debian's archive.
EGRESS_PROBE = "deb.debian.org"

#: Ports open to the private network on private-only nodes (host firewall; reference §3.3). 22 is for a bastion.
WORKER_PORTS = (22, 9100)
#: On state nodes, what clients use (Postgres through HAProxy, Redis and its Sentinels: workers ask them where the
#: master is, with the Sentinel password) ...
STATE_PORTS = (22, 5000, 5001, 6379, 9100, d.SENTINEL_PORT)
#: ... and what only the other state nodes may reach: etcd, PostgreSQL and PgBouncer (replication, HAProxy's
#: backends) and Patroni's REST API. A worker that is compromised cannot force a failover or rewrite etcd.
STATE_PEER_PORTS = (2379, 2380, 5432, 6432, PATRONI_PORT)
#: Patroni's REST API (`PATRONI_PORT`) is also open to the system node, whose control plane probes `GET /health`.
#: systemd-journal-remote on the system node's private address: every other node uploads its journal there.
JOURNAL_PORT = 19532


class RenderError(ValueError):
    """A template references a value that was not given (or a value was given that no template uses)."""


def template(name: str) -> str:
    return resources.files("mbworker.provision.templates").joinpath(name).read_text()


def render_text(text: str, values: dict[str, str]) -> str:
    used: set[str] = set()
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        indent = " " * (len(line) - len(line.lstrip(" ")))

        def sub(m: re.Match[str], indent: str = indent) -> str:
            key = m.group(1)
            if key not in values:
                raise RenderError(f"template needs {{{{ {key} }}}}, which was not given")
            used.add(key)
            return values[key].rstrip("\n").replace("\n", "\n" + indent)

        out.append(_PLACEHOLDER.sub(sub, line))
    unused = set(values) - used
    if unused:
        raise RenderError(f"values given but never used: {', '.join(sorted(unused))}")
    return "".join(out)


def render(name: str, values: dict[str, str]) -> str:
    return render_text(template(name), values)


@dataclass(frozen=True)
class NodeAddr:
    name: str
    role: str
    private_ip: str


@dataclass(frozen=True)
class NodeContext:
    """What exists when a server is created: used for worker lists and scrape targets."""

    workers: tuple[NodeAddr, ...] = ()
    nodes: tuple[NodeAddr, ...] = ()
    #: The proxy's TLS certificate chain + key (PEM), issued by the cluster CA (provision/tls.py). Needed for proxies.
    tls_pem: str = ""
    #: The wheels workers and the system node install (provision/wheels.py), served by the system node.
    wheels: Wheelhouse | None = None
    #: The control plane's certificate chain + key (cluster CA). Needed for the system node.
    control_pem: str = ""
    #: The control token (system node) and the read-only node token (system node, proxies).
    control_token: str = ""
    node_token: str = ""
    #: The cluster's floating IP when the spec has one: proxies add it to their public interface.
    floating_ip: str = ""


def worker_lines(spec: ClusterSpec, workers: tuple[NodeAddr, ...]) -> str:
    """The gateway's worker list, one `name ip:port` per line (what mbgateway-render reads)."""
    return "\n".join(f"{w.name} {w.private_ip}:{spec.daemon.port}" for w in sorted(workers, key=lambda w: w.name))


def scrape_targets(spec: ClusterSpec, nodes: tuple[NodeAddr, ...]) -> str:
    """The cluster's layout the control plane reads (control/layout.py: file_sd JSON, node-exporter on every node
    plus mbworker's metrics on workers' admin port)."""
    admin = spec.daemon.admin_port
    return layout_json(LayoutNode(n.name, n.role, n.private_ip, admin if n.role == "worker" else 0) for n in nodes)


def _gz_b64(text: str) -> str:
    """For a write_files entry with `encoding: gz+b64` (deterministic: no timestamp in the gzip header)."""
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


def wheel_url(spec: ClusterSpec) -> str:
    """Where workers find the wheelhouse: the system node, on the private network."""
    return f"http://{d.system_ip(spec)}:{WHEEL_PORT}/"


def _install(spec: ClusterSpec, server: d.DesiredServer, wheels: Wheelhouse | None) -> dict[str, str]:
    """mbworker from the system node's wheelhouse, pinned by version and hash (workers and the system node)."""
    if wheels is None:
        raise RenderError(f"{server.name}: needs the wheelhouse it installs from (NodeContext.wheels)")
    return {
        "version": wheels.version,
        "requirements": wheels.requirements(),
        "install": render("mbworker-install.sh", {"wheel_url": wheel_url(spec), "wheel_host": d.system_ip(spec)}),
    }


def _upgrade(spec: ClusterSpec, server: d.DesiredServer, node_token: str) -> dict[str, str]:
    """A worker's upgrade helper (provision/upgrade_helper.py) and the read-only node token it fetches wheels with."""
    if not node_token:
        raise RenderError(f"{server.name}: a worker needs the node token its upgrade helper fetches wheels with")
    return {
        "node_token": node_token,
        "control_url": d.control_private_url(spec),
        "upgrade_helper": _gz_b64(resources.files("mbworker.provision").joinpath("upgrade_helper.py").read_text()),
    }


def _common(spec: ClusterSpec, hostname: str) -> dict[str, str]:
    return {"hostname": hostname, "journal_upload": _journal("journal-upload.yaml", spec)}


def _journal(fragment: str, spec: ClusterSpec) -> str:
    """The write_files entries that ship a node's journal to the system node (or, there, receive them)."""
    return render(fragment, {"system_ip": d.system_ip(spec), "journal_port": str(JOURNAL_PORT)})


def _private(
    spec: ClusterSpec,
    ports: tuple[int, ...],
    peers: tuple[str, ...] = (),
    peer_ports: tuple[int, ...] = (),
    health_from: str = "",
) -> dict[str, str]:
    """`health_from`: the system node, let in to Patroni's REST API (the control plane probes `GET /health`;
    changes need Patroni's password)."""
    rules = []
    if peers:
        ports_list = ", ".join(str(p) for p in peer_ports)
        rules.append(f"ip saddr {{ {', '.join(peers)} }} tcp dport {{ {ports_list} }} accept")
    if health_from:
        rules.append(f"ip saddr {health_from} tcp dport {PATRONI_PORT} accept")
    return {
        "private_bootcmd": render(
            "private-bootcmd.yaml",
            {
                "gateway": d.network_gateway(spec),
                "dns": " ".join(str(r) for r in spec.resolvers),
                "egress_probe": EGRESS_PROBE,
            },
        ),
        "nftables": render(
            "nftables-private.tmpl",
            {
                "network": str(spec.network),
                "tcp_ports": ", ".join(str(p) for p in sorted(set(ports))),
                "peer_rule": "\n".join(rules) or "# no ports reserved to peers",
            },
        ),
    }


def user_data(
    spec: ClusterSpec, server: d.DesiredServer, secrets: ClusterSecrets, ctx: NodeContext | None = None
) -> str:
    """The cloud-init document for one server. Contains secrets: never print it."""
    ctx = ctx or NodeContext()
    values = _common(spec, server.name)
    if server.role == "worker":
        ports = (*WORKER_PORTS, spec.daemon.port, spec.daemon.admin_port)
        values |= _private(spec, ports)
        values |= {
            "redis_url": d.redis_url(
                spec, secrets.redis_password.get_secret_value(), secrets.sentinel_password.get_secret_value()
            ),
            "jwt_secret": secrets.jwt_secret.get_secret_value(),
            "admin_token": secrets.admin_token.get_secret_value(),
            "trusted_proxies": json.dumps(d.proxy_networks(spec)),
            "unit": render(
                "mbworker.service",
                {
                    "port": str(spec.daemon.port),
                    "admin_port": str(spec.daemon.admin_port),
                    "control_url": d.control_private_url(spec),
                },
            ),
        }
        values |= _install(spec, server, ctx.wheels)
        values |= _upgrade(spec, server, ctx.node_token)
        return render("worker.yaml", values)
    if server.role == "state":
        values |= _private(spec, STATE_PORTS, tuple(d.state_ips(spec)), STATE_PEER_PORTS, d.system_ip(spec))
        values |= _state_values(spec, server, secrets)
        return render("state.yaml", values)
    if server.role == "proxy":
        if "PRIVATE KEY" not in ctx.tls_pem:
            raise RenderError(f"{server.name}: a proxy needs its TLS certificate and key (NodeContext.tls_pem)")
        if not ctx.node_token:
            raise RenderError(f"{server.name}: a proxy needs the node token it pulls its upstreams with")
        acme = spec.proxy.tls_source == "acme"
        values |= {
            "control_url": d.control_private_url(spec),
            "node_token": ctx.node_token,
            "workers": worker_lines(spec, ctx.workers) or "# no workers yet",
            "tls_pem": ctx.tls_pem,
            "acme_domain": (spec.proxy.domain or "") if acme else "",
            "acme_email": (spec.proxy.acme_email or "") if acme else "",
        }
        values |= _floating_ip(spec, ctx.floating_ip, server.name)
        return render("proxy.yaml", values)
    if server.role == "system":
        del values["journal_upload"]
        if "PRIVATE KEY" not in ctx.control_pem or not ctx.control_token or not ctx.node_token:
            raise RenderError(f"{server.name}: the control plane needs its certificate and tokens (NodeContext)")
        values |= _install(spec, server, ctx.wheels)
        values |= {
            "journal_remote": _journal("journal-remote.yaml", spec),
            "redis_url": d.redis_url(
                spec, secrets.redis_password.get_secret_value(), secrets.sentinel_password.get_secret_value()
            ),
            "control_token": ctx.control_token,
            "node_token": ctx.node_token,
            "control_pem": ctx.control_pem,
            "control_unit": render(
                "mbcontrol.service",
                {"host": d.system_ip(spec), "port": str(d.CONTROL_PORT), "node_name": server.name},
            ),
            "control_port": str(d.CONTROL_PORT),
            "control_public_port": str(d.CONTROL_PUBLIC_PORT),
            "system_ip": d.system_ip(spec),
            # the system node is created last, so it is not among the nodes that exist yet: it lists itself
            "targets_gz": _gz_b64(scrape_targets(spec, _with(ctx.nodes, server, d.system_ip(spec))) + "\n"),
            "admin_token": secrets.admin_token.get_secret_value(),
            "wheel_port": str(WHEEL_PORT),
            "grafana_password": secrets.grafana_password.get_secret_value(),
        }
        return render("system.yaml", values)
    if server.role == "nat":
        values |= {"nat_ip": d.nat_ip(spec), "network": str(spec.network)}
        return render("nat.yaml", values)
    raise RenderError(f"no template for role {server.role!r}")


def _with(nodes: tuple[NodeAddr, ...], server: d.DesiredServer, private_ip: str) -> tuple[NodeAddr, ...]:
    if any(n.name == server.name for n in nodes):
        return nodes
    return (*nodes, NodeAddr(server.name, server.role, private_ip))


def _floating_ip(spec: ClusterSpec, address: str, name: str) -> dict[str, str]:
    """Hetzner routes a floating IP to the server it is assigned to, but the server's OS must own the address to
    answer on it. Every proxy owns it, so re-assigning it to another proxy needs no change on the nodes."""
    if not spec.floating_ip:
        return {"floating_ip_files": "# no floating IP", "floating_ip_start": "# no floating IP"}
    if not address:
        raise RenderError(f"{name}: the spec has a floating IP but its address is not known (NodeContext.floating_ip)")
    return {
        "floating_ip_files": render("floating-ip.yaml", {"floating_ip": address}),
        "floating_ip_start": "- [systemctl, enable, --now, mbfloating-ip.service]",
    }


def _state_values(spec: ClusterSpec, server: d.DesiredServer, secrets: ClusterSecrets) -> dict[str, str]:
    ips = d.state_ips(spec)
    names = [d.server_name(spec.name, "state", i) for i in range(1, len(ips) + 1)]
    ip = d.state_ip(spec, server.index)
    redis_pw = secrets.redis_password.get_secret_value()
    sentinel_pw = secrets.sentinel_password.get_secret_value()
    count = spec.state.count
    if count >= 3:
        quorum = count // 2 + 1
        sentinel = "\n".join(
            [
                f"bind {ip} 127.0.0.1",
                f"port {d.SENTINEL_PORT}",
                "daemonize no",
                "supervised systemd",
                "pidfile /run/sentinel/redis-sentinel.pid",
                "logfile /var/log/redis/redis-sentinel.log",
                "dir /var/lib/redis",
                # clients (workers) and the other Sentinels authenticate
                f"requirepass {sentinel_pw}",
                f"sentinel sentinel-pass {sentinel_pw}",
                f"sentinel announce-ip {ip}",
                f"sentinel monitor {d.SENTINEL_SERVICE} {ips[0]} 6379 {quorum}",
                f"sentinel auth-pass {d.SENTINEL_SERVICE} {redis_pw}",
                f"sentinel down-after-milliseconds {d.SENTINEL_SERVICE} 5000",
                f"sentinel failover-timeout {d.SENTINEL_SERVICE} 60000",
                f"sentinel parallel-syncs {d.SENTINEL_SERVICE} 1",
            ]
        )
        sentinel_start = "systemctl enable redis-sentinel.service && systemctl restart redis-sentinel.service"
        mode = f"master + replicas with Sentinel, quorum {quorum}"
    else:
        sentinel = "# one state node: plain Redis, no Sentinel"
        sentinel_start = "systemctl disable --now redis-sentinel.service || true"
        mode = "a single plain instance"
    return {
        "index": str(server.index),
        "count": str(count),
        "cluster": spec.name,
        "ip": ip,
        "first": "yes" if server.index == 1 else "no",
        "etcd_initial_cluster": ",".join(f"{n}=http://{i}:2380" for n, i in zip(names, ips, strict=True)),
        "etcd_hosts": ",".join(f"{i}:2379" for i in ips),
        "etcd_root_password": secrets.etcd_root_password.get_secret_value(),
        "patroni_rest_password": secrets.patroni_rest_password.get_secret_value(),
        "pg_bin_dir": PG_BIN_DIR,
        "pg_hba_peers": "\n".join(
            line
            for i in ips
            for line in (f"- host all all {i}/32 scram-sha-256", f"- host replication replicator {i}/32 scram-sha-256")
        ),
        "postgres_password": secrets.postgres_password.get_secret_value(),
        "replication_password": secrets.replication_password.get_secret_value(),
        "redis_password": redis_pw,
        "redis_mode": mode,
        "pg_servers": "\n".join(
            f"    server {n} {i}:6432 check port {PATRONI_PORT}" for n, i in zip(names, ips, strict=True)
        ),
        "redis_replicaof": "# the first node starts as master" if server.index == 1 else f"replicaof {ips[0]} 6379",
        "sentinel_conf": sentinel,
        "sentinel_start": sentinel_start,
    }
