"""Real machines: the cluster spec applied with the machines provider (systemd-nspawn machines on this host).

`cluster` (package scope) applies the issue's spec once: 1 system, 1 proxy, 2 workers, 3 state, 1 NAT, and
destroys it at the end, checking the host is left as it was. Tests share it, so add assertions as tests that use
`cluster` rather than applying again. Traffic goes only to this cluster's namespace: to public addresses through
the host route the provider adds, or from inside the namespace / a machine.

Needs root, systemd-nspawn and mmdebstrap (make system-deps); under CI=true a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from mbworker.provision.machines import MachinesProvider
from mbworker.provision.provider import ApplyOptions
from mbworker.provision.secrets import default_state_dir, load_or_create_secrets
from mbworker.provision.spec import ClusterSpec, load_spec
from tests.conftest import IN_CI, require_binary

#: How long one machine may take from boot until cloud-init has finished (package installs from the image's cache).
READY_TIMEOUT = 600.0
#: Every host-side veth address the machines provider gives a cluster (machines_net.LINK_RANGE).
CONTROL_ALLOW = "198.19.0.0/16"


def spec_toml(name: str, *, proxies: int = 1, workers: int = 2, state: int = 3, nat: bool = True) -> str:
    nat_table = '[nat]\ntype = "cx23"\n' if nat else ""
    return f"""
name = "{name}"
location = "fsn1"
network = "10.0.0.0/16"
image = "debian-12"
# the host reaches the public zone from its end of the namespace's veth (198.19.<slot>.1): the control plane is
# open to it, and not to the namespace's own public address (198.18.<slot>.1), the test's client from outside
control_allow = ["{CONTROL_ALLOW}"]
floating_ip = true

[system]
type = "cx23"

[proxy]
type = "cx23"
count = {proxies}

[worker]
type = "cx23"
count = {workers}

[state]
type = "cx23"
count = {state}

{nat_table}"""


def require_machines() -> None:
    """Root, systemd-nspawn and mmdebstrap, or a failure in CI (a skip there would hide a missing install)."""
    require_binary("systemd-nspawn")
    require_binary("mmdebstrap")
    require_binary("nft")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the machines tests need root")
        pytest.skip("the machines tests need root")


def cluster_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(2)}"


@dataclass
class Cluster:
    """An applied cluster: its provider, spec file and what the harness measured."""

    provider: MachinesProvider
    spec_path: Path
    state_dir: Path
    apply_seconds: float = 0.0
    ready_seconds: dict[str, float] = field(default_factory=dict)
    cloud_init: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> ClusterSpec:
        return self.provider.spec

    def server(self, name: str) -> dict[str, object]:
        record: dict[str, object] = self.provider.load()["servers"][name]
        return record

    def names(self, role: str | None = None) -> list[str]:
        servers = self.provider.load()["servers"].values()
        return sorted(s["name"] for s in servers if role is None or s["role"] == role)

    def wait_cloud_init(self, name: str, timeout: float = READY_TIMEOUT) -> str:
        """Block until cloud-init has finished in `name`; its status line (`status: done` or `status: error`)."""
        # the boot (cloud-final included) is over; `cloud-init status --wait` returns at an early stage's error
        self.provider.wait_booted(name, timeout)
        done = self.provider.exec(name, ["cloud-init", "status"])
        status = (done.stdout.strip().splitlines() or [""])[-1]
        self.cloud_init[name] = status
        record = self.server(name)
        # the machine's own files, read from its overlay's upper directory (instance/ is an absolute link)
        instance = f"{name}-{record['id']}"
        marker = self.provider.dir / name / "upper" / "var/lib/cloud/instances" / instance / "boot-finished"
        booted = record.get("booted_at")
        if isinstance(booted, float) and marker.exists():
            self.ready_seconds[name] = marker.stat().st_mtime - booted
        return status

    def anon_key(self) -> str:
        """A Supabase-style anon JWT signed with the cluster's secret (an hour), as a browser client holds one."""
        secrets = json.loads((self.state_dir / "secrets.json").read_text())
        claims = {"role": "anon", "exp": int(time.time()) + 3600}
        return str(jwt.encode(claims, secrets["jwt_secret"], algorithm="HS256"))

    def in_ns(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        net = self.provider.net()
        assert net is not None
        return subprocess.run(net.plan.in_ns(*argv), capture_output=True, text=True, timeout=timeout)


def deploy_function(cluster: Cluster, name: str, source: str) -> None:
    """Deploy `source` as function `name` through the first worker's admin API, from inside that worker (its own
    loopback and admin token); the version lives in the state pillar's Redis, so every worker serves it."""
    fn = f"/var/tmp/{name}"
    port = cluster.spec.daemon.admin_port
    script = (
        f"mkdir -p {fn} && cat > {fn}/index.ts && set -a && . /etc/mbworker/env && set +a && "
        f"/opt/mbworker/bin/mbworker deploy {fn} --no-verify-jwt --url http://127.0.0.1:{port}"
    )
    done = cluster.provider.exec(cluster.names("worker")[0], ["sh", "-c", script], input=source, timeout=300)
    assert f"✓ {name} v" in done.stdout + done.stderr, done.stdout + done.stderr


def apply_cluster(provider: MachinesProvider) -> float:
    started = time.monotonic()
    report = provider.apply(provider.plan(), ApplyOptions())
    assert report.complete
    return time.monotonic() - started


def destroy_cluster(provider: MachinesProvider) -> None:
    provider.apply(provider.destroy_plan(), ApplyOptions())
    provider.close()


def make_provider(tmp: Path, toml: str) -> tuple[MachinesProvider, Path, Path]:
    spec_path = tmp / "cluster.toml"
    spec_path.write_text(toml)
    spec = load_spec(spec_path)
    state_dir = default_state_dir(spec_path, spec.name)  # where the CLI looks (`--cluster cluster.toml`)
    return MachinesProvider(spec, load_or_create_secrets(state_dir), state_dir), spec_path, state_dir


@pytest.fixture(scope="package")  # destroyed once tests/machines is done: the rest of the suite runs without it
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_machines()
    provider, spec_path, state_dir = make_provider(tmp_path_factory.mktemp("cluster"), spec_toml(cluster_name("mbt")))
    try:
        c = Cluster(provider, spec_path, state_dir)
        c.apply_seconds = apply_cluster(provider)
        yield c
    finally:
        destroy_cluster(provider)
        assert provider.leftovers() == []


def icmp_echo(addr: str, timeout: float = 5.0) -> bool:
    """One ICMP echo from this host to `addr` (raw socket, root): True when the matching reply came back."""
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"mbworker-machines"
    checksum = _checksum(header + payload)
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, (src, _) = sock.recvfrom(1024)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if src == addr and kind == 0 and rid == ident:
                return True
    return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def tcp_connects(addr: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False
