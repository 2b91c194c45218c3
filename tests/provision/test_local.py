"""LocalProvider: a real redis-server, stand-in workers (the daemon's cluster mode is built elsewhere), the gateway."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from mbworker.provision.errors import StepFailed
from mbworker.provision.local import LocalProvider, _start_time
from mbworker.provision.nodeops import RemoteNodeOps
from mbworker.provision.provider import ApplyOptions, ApplyReport
from mbworker.provision.secrets import ClusterSecrets, load_or_create_secrets
from mbworker.provision.spec import ClusterSpec
from tests.conftest import require_binary

from .conftest import make_spec

STANDIN = [sys.executable, str(Path(__file__).with_name("standin_worker.py"))]


def free_base(span: int = 40) -> int:
    """A base port with `span` free ports above it, below the ephemeral range (clients' TIME_WAIT ports live there)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        try:
            for p in range(base, base + span):
                with socket.socket() as t:
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves do
                    t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


@pytest.fixture
def local_spec() -> ClusterSpec:
    redis_server = require_binary("redis-server")
    return make_spec(
        name="loc",
        worker={"type": "cx33", "count": 2},
        local={"worker_command": STANDIN, "redis_server": redis_server, "base_port": free_base()},
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def secrets(state_dir: Path) -> ClusterSecrets:
    return load_or_create_secrets(state_dir)


@pytest.fixture
def ops(secrets: ClusterSecrets) -> Iterator[RemoteNodeOps]:
    # the real HTTP drain client, against the stand-ins' admin ports on 127.0.0.1
    o = RemoteNodeOps(secrets.admin_token.get_secret_value(), 0, poll_interval=0.05)
    yield o
    o.close()


@pytest.fixture
def provider_for(
    local_spec: ClusterSpec, secrets: ClusterSecrets, state_dir: Path, ops: RemoteNodeOps
) -> Iterator[type[LocalProvider]]:
    made: list[LocalProvider] = []

    def make(count: int | None = None) -> LocalProvider:
        spec = local_spec if count is None else local_spec.with_count("worker", count)
        p = LocalProvider(spec, secrets, state_dir, node_ops=ops, ready_timeout=20)
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    # teardown: whatever a test left running is stopped, and must be gone
    p = make()
    pids = [r["pid"] for r in p.running().values()]
    p.apply(p.destroy_plan(), ApplyOptions())
    assert all(_start_time(pid) is None for pid in pids)


def up(p: LocalProvider, **opts: object) -> ApplyReport:
    return p.apply(p.plan(), ApplyOptions(**opts))  # type: ignore[arg-type]


def answers(p: LocalProvider, n: int = 6) -> list[str]:
    url = f"http://127.0.0.1:{p.port('gateway')}/functions/v1/hello"
    out = []
    for _ in range(n):
        with httpx.Client(timeout=5) as c:  # a fresh connection each time: the gateway balances connections
            out.append(c.get(url).json()["worker"])
    return out


def test_up_runs_redis_workers_and_gateway(provider_for, secrets: ClusterSecrets, state_dir: Path) -> None:  # type: ignore[no-untyped-def]
    p = provider_for()
    report = up(p)
    assert report.complete
    assert set(p.running()) == {"redis", "control", "worker-1", "worker-2", "gateway"}
    env = json.loads((state_dir / "local" / "worker-1" / "env.json").read_text())
    assert env["MBWORKER_REDIS_URL"] == p.redis_url()
    assert env["MBWORKER_JWT_SECRET"] == secrets.jwt_secret.get_secret_value()
    assert env["MBWORKER_ADMIN_TOKEN"] == secrets.admin_token.get_secret_value()
    assert env["MBWORKER_NODE_ID"] == "loc-worker-001"
    # both workers share the one redis, which wants the password
    client = redis.Redis.from_url(env["MBWORKER_REDIS_URL"])
    try:
        assert client.ping()
    finally:
        client.close()
    assert set(answers(p)) == {"loc-worker-001", "loc-worker-002"}
    assert p.plan().empty  # idempotent
    assert "password" in p.urls()["redis"]
    assert secrets.redis_password.get_secret_value() not in str(p.urls())


def test_scale_out_then_in_with_drain(provider_for, state_dir: Path) -> None:  # type: ignore[no-untyped-def]
    up(provider_for())
    up(provider_for(3))
    assert set(answers(provider_for(3), 9)) == {"loc-worker-001", "loc-worker-002", "loc-worker-003"}
    p1 = provider_for(1)
    plan = p1.plan()
    assert plan.summaries() == [("drain", "process", "worker-3"), ("drain", "process", "worker-2"),
                                ("change", "gateway", "backends"),
                                ("delete", "process", "worker-3"), ("delete", "process", "worker-2")]  # fmt: skip
    pids = {k: r["pid"] for k, r in p1.running().items()}
    assert p1.apply(plan, ApplyOptions()).complete
    for i in (2, 3):
        assert (state_dir / "local" / f"worker-{i}" / "drained").exists()
        assert _start_time(pids[f"worker-{i}"]) is None
    assert set(p1.running()) == {"redis", "control", "worker-1", "gateway"}
    assert set(answers(p1)) == {"loc-worker-001"}


def test_undrainable_worker_is_left_running_unless_forced(provider_for, state_dir: Path) -> None:  # type: ignore[no-untyped-def]
    up(provider_for(2))
    (state_dir / "local" / "worker-2" / "undrainable").write_text("busy")
    report = up(provider_for(1), drain_timeout=0.3)
    assert [n for n, _ in report.left_in_place] == ["worker-2"]
    assert "worker-2" in provider_for(1).running()
    report = up(provider_for(1), drain_timeout=0.3, force=True)
    assert [n for n, _ in report.forced] == ["worker-2"]
    assert "worker-2" not in provider_for(1).running()


def test_no_drain_stops_directly(provider_for, state_dir: Path) -> None:  # type: ignore[no-untyped-def]
    up(provider_for(2))
    p = provider_for(1)
    p.apply(p.plan(drain=False), ApplyOptions())
    assert not (state_dir / "local" / "worker-2" / "drained").exists()
    assert "worker-2" not in p.running()


def test_down_leaves_no_process(provider_for) -> None:  # type: ignore[no-untyped-def]
    p = provider_for()
    up(p)
    pids = [r["pid"] for r in p.running().values()]
    assert len(pids) == 5  # redis, control, two workers, gateway
    p.apply(p.destroy_plan(), ApplyOptions())
    assert p.running() == {}
    for pid in pids:
        assert _start_time(pid) is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped, not a zombie


def test_a_worker_that_exits_at_once_fails_the_step(
    local_spec: ClusterSpec, secrets: ClusterSecrets, state_dir: Path
) -> None:
    spec = local_spec.model_copy(update={"local": local_spec.local.model_copy(update={"worker_command": ["false"]})})
    p = LocalProvider(spec, secrets, state_dir, ready_timeout=10)
    try:
        with pytest.raises(StepFailed, match="control exited with status 1"):  # the first to run the command
            up(p)
        assert "control" not in p.running()
    finally:
        p.apply(p.destroy_plan(), ApplyOptions())
    assert p.running() == {}
