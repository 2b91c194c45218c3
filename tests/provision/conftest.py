"""Fixtures for the provisioner tests: a spec file, the fake Hetzner API, providers wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mbworker.provision.errors import DrainError, HealthError
from mbworker.provision.hetzner import HetznerProvider
from mbworker.provision.nodeops import NodeRef, RefreshKind
from mbworker.provision.secrets import ClusterSecrets, load_or_create_secrets
from mbworker.provision.shipment import Shipment
from mbworker.provision.spec import ClusterSpec, parse_spec
from mbworker.provision.wheels import Wheelhouse, read_wheelhouse

from .fake_hcloud import FakeHcloud

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxvC6p1l0+0vH8Zq3G2pZt6Y3hGkq3Jp7aE9mX0pQ2a ops@example"

SPEC_TOML = f"""
name = "demo"
location = "fsn1"
network = "10.0.0.0/16"
image = "debian-12"
ssh_keys = ["{KEY}"]
ssh_allow = ["203.0.113.0/24"]

[system]
type = "cpx32"

[proxy]
type = "cx23"
count = 2

[worker]
type = "cx33"
count = 3

[state]
type = "ccx13"
count = 3
"""


def spec_dict(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "demo",
        "location": "fsn1",
        "network": "10.0.0.0/16",
        "ssh_keys": [KEY],
        "ssh_allow": ["203.0.113.0/24"],
        "system": {"type": "cpx32"},
        "proxy": {"type": "cx23", "count": 2},
        "worker": {"type": "cx33", "count": 3},
        "state": {"type": "ccx13", "count": 3},
    }
    base.update(changes)
    return base


def make_spec(**changes: object) -> ClusterSpec:
    return parse_spec(spec_dict(**changes))


class FakeNodeOps:
    """Records drains and refreshes instead of reaching nodes (their addresses are not ours to reach)."""

    def __init__(self, undrainable: tuple[str, ...] = (), unhealthy: tuple[str, ...] = ()) -> None:
        self.undrainable = set(undrainable)
        self.unhealthy = set(unhealthy)
        self.gated: list[tuple[NodeRef, NodeRef | None]] = []
        self.drained: list[NodeRef] = []
        self.refreshed: list[tuple[str, RefreshKind, str]] = []
        self.published: list[tuple[str, list[str]]] = []
        self.events: list[tuple[str, str]] = []

    def drain(self, node: NodeRef, *, timeout: float) -> None:
        if node.name in self.undrainable:
            raise DrainError(f"{node.name} still has work after {timeout:.0f}s")
        self.drained.append(node)
        self.events.append(("drain", node.name))

    def refresh(self, node: NodeRef, kind: RefreshKind, content: str) -> None:
        self.refreshed.append((node.name, kind, content))
        self.events.append(("refresh", node.name))

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        self.published.append((node.name, sorted(p.name for p in directory.glob("*.whl"))))
        self.events.append(("publish", node.name))

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        self.gated.append((node, via))
        self.events.append(("health", node.name))
        if node.name in self.unhealthy:
            raise HealthError(f"{node.name} not healthy within {timeout:.0f}s: etcd member unhealthy")


@pytest.fixture
def fake() -> Iterator[FakeHcloud]:
    with FakeHcloud() as f:
        yield f


@pytest.fixture
def secrets(tmp_path: Path) -> ClusterSecrets:
    return load_or_create_secrets(tmp_path / "state")


@pytest.fixture
def node_ops() -> FakeNodeOps:
    return FakeNodeOps()


def fake_wheelhouse(directory: Path) -> Wheelhouse:
    """Stand-in wheels (tests of the API side never install them; building the real ones is tests/provision's
    test_wheels' job)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mbworker-0.1.0-py3-none-any.whl").write_bytes(b"mbworker")
    (directory / "trio-0.35.0-py3-none-any.whl").write_bytes(b"trio")
    return read_wheelhouse(directory)


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Wheelhouse:
    return fake_wheelhouse(tmp_path / "wheels")


MakeProvider = Callable[..., HetznerProvider]


@pytest.fixture
def make_provider(
    fake: FakeHcloud, secrets: ClusterSecrets, node_ops: FakeNodeOps, wheelhouse: Wheelhouse, tmp_path: Path
) -> MakeProvider:
    def make(
        spec: ClusterSpec | None = None, ops: FakeNodeOps | None = None, the_secrets: ClusterSecrets | None = None
    ) -> HetznerProvider:
        spec = spec or make_spec()
        p = HetznerProvider(
            spec, the_secrets or secrets, Shipment(spec, tmp_path / "state", wheelhouse), token="test-token",
            endpoint=fake.endpoint, poll_interval=0, node_ops=ops or node_ops,
        )  # fmt: skip
        # the client sleeps 1 s or more before retrying conflicts and rate limits; not in tests
        p.client._client._retry_interval_func = lambda retries: 0
        return p

    return make
