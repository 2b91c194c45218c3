"""The rolling upgrade's orchestration against a stand-in cluster (control/upgrade.py): one worker at a time, out of
the upstreams before its drain, back only when the new process is ready; the first failure stops the rollout with
the cluster serving; a version the control plane does not hold is refused before any worker is touched. The wheel
store's checks, and the worker's request file."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from mbworker.control.audit import MemoryAuditLog
from mbworker.control.errors import ControlError, NotFound, StateUnavailable, WorkerCallFailed
from mbworker.control.registry import NodeRecord, NodeRegistry, NodeView
from mbworker.control.upgrade import Rollout, Timeouts, plan_rollout
from mbworker.control.wheel_store import HeldWheel, WheelStore
from mbworker.lib.redis import open_redis
from mbworker.provision.upgrade_helper import take_request
from mbworker.worker.upgrade_request import UpgradeRequests, UpgradeUnavailable
from tests.faults._raw import tar_archive
from tests.redis_server import RedisServer


@dataclass
class Node:
    """A stand-in worker: serving → draining (asked) → gone → back on `comes_back_on`, one phase per registry read."""

    name: str
    version: str = "1.0"
    role: str = "worker"
    phase: str = "serving"
    ticks: int = 0
    started_at: float = 0.0
    sent_at: float = 0.0
    comes_back_on: str | None = None
    held: bool = False
    cordoned: bool = False


class Cluster:
    """Registry + admin API + wheels, over stand-in nodes. Every registry read is a tick of a fake clock."""

    def __init__(
        self, *nodes: Node, held: tuple[str, ...] = ("2.0",), refuse: str | None = None, failover_on: str | None = None
    ) -> None:
        self.failover_on = failover_on
        self.away_after_hold: str | None = None
        """Redis goes away for a few reads once this node has been asked to upgrade."""
        self.nodes_ = {n.name: n for n in nodes}
        self.now = 1.0
        self.held = held
        self.refuse = refuse
        self.calls: list[str] = []
        self.redis_away = 0
        self.release_fails = 0
        self.serving_seen: list[int] = []
        """How many workers were in the upstreams at each read (never 0)."""

    def clock(self) -> float:
        return self.now

    def _tick(self) -> None:
        self.now += 1
        for n in self.nodes_.values():
            if n.role == "proxy":
                n.sent_at = self.now  # proxies pull every tick
                continue
            n.sent_at = self.now
            if n.phase == "draining":
                n.ticks += 1
                if n.ticks > 2:
                    n.phase = "gone"
            elif n.phase == "gone":
                n.ticks += 1
                if n.ticks > 5:
                    n.phase, n.started_at = "serving", self.now
                    n.version = n.comes_back_on or n.version

    def _view(self, n: Node) -> NodeView:
        record = NodeRecord(
            role=n.role, name=n.name, private_ip="10.0.1.1", port=1, admin_port=2, version=n.version,
            ready=n.phase != "draining" and not n.cordoned, draining=n.phase != "serving", cordoned=n.cordoned,
            started_at=n.started_at, sent_at=n.sent_at,
        )  # fmt: skip
        return NodeView(record=record, up=True, last_seen_s=0, drain_asked=n.cordoned, held=n.held)

    def _redis(self) -> None:
        """While `redis_away` reads are left, Redis is away (a Sentinel failover): reads and writes fail."""
        if self.redis_away:
            self.redis_away -= 1
            self._tick()
            raise StateUnavailable("the cluster's Redis is unreachable: connection refused")

    async def nodes(self) -> list[NodeView]:
        self._redis()
        self._tick()
        views = [self._view(n) for n in self.nodes_.values()]
        self.serving_seen.append(sum(v.serving for v in views if v.record.role == "worker"))
        return views

    async def hold(self, name: str) -> None:
        if name == self.away_after_hold:
            self.redis_away = 1000  # longer than the proxies' wait: every read fails until it is over
        self.calls.append(f"hold {name}")
        self.nodes_[name].held = True

    async def release(self, name: str) -> None:
        if self.release_fails:
            self.release_fails -= 1
            raise StateUnavailable("the cluster's Redis is unreachable: connection refused")
        self.calls.append(f"release {name}")
        self.nodes_[name].held = False

    async def call(self, node: NodeView, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        name = node.record.name
        self.calls.append(f"{method} {path} {name}")
        if name == self.refuse:
            raise WorkerCallFailed(name, 501, "NOT_IMPLEMENTED", "no upgrade helper watches this node")
        n = self.nodes_[name]
        assert n.held, "asked to upgrade before it left the upstreams"
        n.phase, n.ticks = "draining", 0
        n.comes_back_on = n.comes_back_on or kw["json"]["version"]
        if name == self.failover_on:
            self.redis_away = 4  # the reads while it drains fail
            self.release_fails = 2  # and, later, its release (Redis away again)
        return {"version": kw["json"]["version"], "draining": True}

    async def manifest(self, version: str) -> list[HeldWheel]:
        if version not in self.held:
            raise NotFound(f"the control plane holds no wheels for mbworker {version}", code="NO_SUCH_WHEELS")
        return [HeldWheel(f"mbworker-{version}-py3-none-any.whl", "0" * 64, 1)]


def _rollout(cluster: Cluster, audit: MemoryAuditLog) -> Rollout:
    return Rollout(
        cluster, cluster, cluster, audit, token_name="control", timeouts=Timeouts(5, 5, 5), clock=cluster.clock
    )


async def test_workers_are_upgraded_one_at_a_time_and_the_cluster_serves_throughout(autojump_clock: object) -> None:
    cluster = Cluster(Node("w1"), Node("w2"), Node("p1", role="proxy", version="proxy"))
    audit = MemoryAuditLog()
    status, report = await _rollout(cluster, audit).upgrade("2.0")
    assert status == 200, report
    assert (report["upgraded"], report["skipped"]) == (["w1", "w2"], [])
    assert [n.version for n in cluster.nodes_.values() if n.role == "worker"] == ["2.0", "2.0"]
    # out of the upstreams before the request, the ask withdrawn once it drains, one worker after the other
    assert cluster.calls == [
        "hold w1", "POST /admin/v1/upgrade w1", "release w1",
        "hold w2", "POST /admin/v1/upgrade w2", "release w2",
    ]  # fmt: skip
    assert min(cluster.serving_seen) >= 1
    assert [e.action for e in audit.entries()] == [
        f"upgrade {w} {step}" for w in ("w1", "w2") for step in ("leave", "request", "drain", "ready")
    ] + ["release"]
    # run again: nothing to do
    status, again = await _rollout(cluster, audit).upgrade("2.0")
    assert (status, again["upgraded"], again["skipped"]) == (200, [], ["w1", "w2"])


async def test_a_redis_failover_mid_rollout_is_waited_out(autojump_clock: object) -> None:
    """Redis away while w1 drains (the polls fail) and again at its release: the rollout goes on and w1 is back
    in the upstreams (was: the rollout ended at the first failed read, and w1 stayed held for 15 minutes)."""
    cluster = Cluster(Node("w1"), Node("w2"), Node("p1", role="proxy", version="proxy"), failover_on="w1")
    status, report = await _rollout(cluster, MemoryAuditLog()).upgrade("2.0")
    assert status == 200, report
    assert report["upgraded"] == ["w1", "w2"]
    assert not any(n.held for n in cluster.nodes_.values())
    assert (cluster.redis_away, cluster.release_fails) == (0, 0)


async def test_redis_away_before_the_proxies_are_seen_to_drop_a_worker_stops_short_of_draining_it(
    autojump_clock: object,
) -> None:
    """Held, but no proxy could be seen to pull the upstreams without it (Redis away past the proxies' wait): it
    is not asked to drain (the proxies may still send to it), and it is released."""
    cluster = Cluster(Node("w1"), Node("w2"), Node("p1", role="proxy", version="proxy"))
    cluster.away_after_hold = "w1"
    status, report = await _rollout(cluster, MemoryAuditLog()).upgrade("2.0")
    assert status == 502
    assert (report["failed"]["node"], report["failed"]["step"]) == ("w1", "leave")
    assert cluster.calls == ["hold w1", "release w1"]
    assert not cluster.nodes_["w1"].held


async def test_a_cordoned_worker_sits_the_rollout_out(autojump_clock: object) -> None:
    """A worker drained for maintenance (`cluster drain`, started again cordoned) neither blocks a rollout nor is
    touched by it: it converges to the release when `cluster undrain` starts it afresh."""
    cluster = Cluster(Node("w1"), Node("w2"), Node("w3", cordoned=True), Node("p1", role="proxy", version="proxy"))
    status, report = await _rollout(cluster, MemoryAuditLog()).upgrade("2.0")
    assert status == 200, report
    assert report["upgraded"] == ["w1", "w2"]
    assert not [c for c in cluster.calls if "w3" in c]
    assert cluster.nodes_["w3"].version == "1.0"


async def test_a_version_not_held_is_refused_before_any_worker_is_touched() -> None:
    cluster = Cluster(Node("w1"), Node("w2"))
    with pytest.raises(NotFound, match=r"holds no wheels for mbworker 3\.0"):
        await _rollout(cluster, MemoryAuditLog()).upgrade("3.0")
    with pytest.raises(ControlError, match="must match"):
        await _rollout(cluster, MemoryAuditLog()).upgrade("../etc")
    assert cluster.calls == []


async def test_a_failed_install_stops_the_rollout_with_the_worker_back_on_its_version(autojump_clock: object) -> None:
    cluster = Cluster(Node("w1", comes_back_on="1.0"), Node("w2"))  # w1's helper put the previous install back
    audit = MemoryAuditLog()
    status, report = await _rollout(cluster, audit).upgrade("2.0")
    assert status == 502
    assert report["failed"]["node"] == "w1"
    assert report["failed"]["step"] == "install"
    assert "came back on 1.0" in report["message"]
    assert report["upgraded"] == []
    assert [c for c in cluster.calls if "w2" in c] == []  # w2 untouched
    assert cluster.nodes_["w1"].phase == "serving"
    assert not cluster.nodes_["w1"].held
    assert (audit.entries()[-1].action, audit.entries()[-1].status) == ("upgrade w1 install", 502)


async def test_a_worker_that_refuses_the_request_goes_back_in_the_upstreams(autojump_clock: object) -> None:
    cluster = Cluster(Node("w1"), Node("w2"), refuse="w1")
    status, report = await _rollout(cluster, MemoryAuditLog()).upgrade("2.0")
    assert status == 502
    assert report["failed"]["step"] == "request"
    assert "no upgrade helper" in report["message"]
    assert cluster.calls == ["hold w1", "POST /admin/v1/upgrade w1", "release w1"]


async def test_a_worker_that_never_comes_back_is_left_out_of_the_upstreams(autojump_clock: object) -> None:
    cluster = Cluster(Node("w1"), Node("w2"))
    cluster.nodes_["w1"].comes_back_on = "2.0"
    rollout = _rollout(cluster, MemoryAuditLog())
    original = cluster._tick

    def never_back() -> None:
        original()
        w1 = cluster.nodes_["w1"]
        if w1.phase == "gone":
            w1.ticks = 0  # stays gone

    cluster._tick = never_back  # type: ignore[method-assign]
    status, report = await rollout.upgrade("2.0")
    assert (status, report["failed"]["step"]) == (502, "restart")
    assert "not in the upstreams" in report["message"]
    assert cluster.nodes_["w2"].version == "1.0"
    assert cluster.nodes_["w2"].phase == "serving"


def test_an_upgrade_starts_only_from_a_healthy_cluster_of_two_or_more() -> None:
    def view(name: str, version: str = "1.0", ready: bool = True) -> NodeView:
        r = NodeRecord(
            role="worker", name=name, private_ip="x", port=1, admin_port=2, version=version, ready=ready, sent_at=0
        )
        return NodeView(record=r, up=True, last_seen_s=0, drain_asked=False)

    assert [v.record.name for v in plan_rollout([view("b"), view("a"), view("c", "2.0")], "2.0")] == ["a", "b"]
    assert plan_rollout([view("a", "2.0")], "2.0") == []
    with pytest.raises(ControlError, match="second serving worker") as one:
        plan_rollout([view("a")], "2.0")
    assert one.value.status == 409
    with pytest.raises(ControlError, match=r"not every worker is serving \(b\)"):
        plan_rollout([view("a"), view("b", ready=False)], "2.0")


def _tar(files: dict[str, bytes], *, link: str | None = None) -> bytes:
    return tar_archive(files, symlinks={link: "/etc/passwd"} if link else None)


async def test_the_wheel_store_holds_a_version_whole_or_not_at_all(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "wheels")
    good = {"mbworker-2.0-py3-none-any.whl": b"own", "trio-0.30-py3-none-any.whl": b"dep"}
    held = await store.put("2.0", _tar(good))
    assert [(w.filename, w.size) for w in held] == [
        ("mbworker-2.0-py3-none-any.whl", 3),
        ("trio-0.30-py3-none-any.whl", 3),
    ]
    assert await store.read("2.0", "trio-0.30-py3-none-any.whl") == b"dep"
    assert await store.versions() == [{"version": "2.0", "wheels": 2, "bytes": 6}]
    truncated = gzip.compress(_tar({"mbworker-2.0-py3-none-any.whl": os.urandom(100_000)}))
    for archive, why in (
        (_tar({"mbworker-2.1-py3-none-any.whl": b"x"}), "is not mbworker 2.0"),
        (_tar({"trio-0.30-py3-none-any.whl": b"x"}), "exactly one mbworker wheel"),
        (_tar({"../mbworker-2.0-py3-none-any.whl": b"x"}), "only wheel files"),
        (_tar({"mbworker-2.0-py3-none-any.whl": b"x"}, link="evil.whl"), "only wheel files"),
        (b"not a tar", "not a tar of wheels"),
        (truncated[: len(truncated) // 2], "not a tar of wheels"),  # a push cut short (was: 500)
        (lzma.compress(truncated)[:2000], "not a tar of wheels"),
    ):
        with pytest.raises(ControlError, match=why):
            await store.put("2.0", archive)
    assert await store.read("2.0", "mbworker-2.0-py3-none-any.whl") == b"own"  # the held version is intact
    # a push again of the same version (same names, same sizes, other bytes): the manifest hashes the new files
    before = {w.filename: w.sha256 for w in await store.manifest("2.0")}
    await store.put("2.0", _tar({"mbworker-2.0-py3-none-any.whl": b"OWN", "trio-0.30-py3-none-any.whl": b"DEP"}))
    after = {w.filename: w.sha256 for w in await store.manifest("2.0")}
    assert after == {name: hashlib.sha256(data).hexdigest() for name, data in (
        ("mbworker-2.0-py3-none-any.whl", b"OWN"), ("trio-0.30-py3-none-any.whl", b"DEP"))}  # fmt: skip
    assert after != before
    with pytest.raises(NotFound, match=r"held: 2\.0"):
        await store.manifest("2.1")
    with pytest.raises(NotFound):
        await store.read("2.0", "../../secrets.json")
    assert not list((tmp_path / "wheels").glob(".push-*"))


async def test_the_worker_leaves_only_a_version_and_the_helper_takes_it_once(tmp_path: Path) -> None:
    drained: list[bool] = []
    requests = UpgradeRequests(tmp_path, lambda: drained.append(True))
    with pytest.raises(UpgradeUnavailable):
        await requests.request("2.0")  # no helper watches: the node is not drained for nothing
    assert drained == []
    (tmp_path / "upgrade").mkdir()
    with pytest.raises(ValueError, match="must match"):
        await requests.request("2.0 --index-url http://evil")
    await requests.request("2.0")
    assert drained == [True]
    path = tmp_path / "upgrade" / "request"
    assert json.loads(path.read_text()) == {"version": "2.0"}
    assert take_request(path) == "2.0"
    assert take_request(path) is None  # taken away
    path.write_text(json.dumps({"version": "2.0; rm -rf /"}))
    assert take_request(path) is None
    path.symlink_to(tmp_path / "elsewhere")
    assert take_request(path) is None
    assert not path.is_symlink()
    # the daemon's user owns the directory: a link to a valid request elsewhere is not followed (root would read
    # whatever it points at), a FIFO does not block the root helper; both are removed
    elsewhere = tmp_path / "valid-request"
    elsewhere.write_text(json.dumps({"version": "2.0"}))
    path.symlink_to(elsewhere)
    assert take_request(path) is None
    assert elsewhere.exists()
    assert not path.is_symlink()
    os.mkfifo(path)
    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(take_request, path, abandon_on_cancel=True) is None
    assert not path.exists()


async def test_a_hold_keeps_a_ready_worker_out_of_the_upstreams_without_telling_it(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as redis:
        registry = NodeRegistry(redis)
        record = NodeRecord(
            role="worker", name="w1", private_ip="10.0.1.5", port=8000, admin_port=8001, version="1", ready=True,
            sent_at=time.time(),
        )  # fmt: skip
        await redis.set("mbw:node:w1", record.model_dump_json())
        await redis.zadd("mbw:nodes", {"w1": record.sent_at})
        assert await registry.upstreams() == [{"name": "w1", "address": "10.0.1.5:8000"}]
        await registry.hold("w1")
        (view,) = await registry.nodes()
        assert (view.held, view.serving, view.state, view.drain_asked) == (True, False, "held", False)
        assert await registry.upstreams() == []
        assert await redis.get("mbw:node:w1:drain") is None  # the node's heartbeat reads this one: untouched
        await registry.release("w1")
        assert await registry.upstreams() == [{"name": "w1", "address": "10.0.1.5:8000"}]
