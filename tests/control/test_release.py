"""The cluster's release (control/release.py): what a rollout leaves it at, where it is kept, and how a worker's
helper reads it. A version becomes the release only once every worker runs it; a rollout in progress is announced
(`rolling_to`, by the process it runs in: never stored, so it cannot go stale) so a worker that starts meanwhile is
not turned back; a failed rollout leaves the release as it was. It lives in the cluster's Redis and outlives a
control-plane restart, which forgets a rollout left running; `cluster status` shows it and the workers off it (a
registry scan the workers' helpers do not pay for)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from mbworker import __version__
from mbworker.cli.main import main as cli_main
from mbworker.control.audit import MemoryAuditLog
from mbworker.control.registry import NodeView
from mbworker.control.release import MemoryReleaseStore, RedisReleaseStore, Release
from mbworker.control.upgrade import Rollout, Timeouts
from mbworker.lib.redis import open_redis
from mbworker.worker.cluster.heartbeat import NodeIdentity, serve_heartbeat
from tests.provision.local_cluster import write_local_spec
from tests.redis_server import RedisServer

from .test_api import _state, _wait_nodes, control_plane
from .test_upgrade import Cluster, Node


class Watched(Cluster):
    """The stand-in cluster, noting the release each upgrade request was made under; `joins` come up (on their
    own version) at the first request."""

    def __init__(self, *nodes: Node, joins: tuple[Node, ...] = (), **kw: Any) -> None:
        super().__init__(*nodes, **kw)
        self.store = MemoryReleaseStore("1.0")
        self.joins = list(joins)
        self.seen: list[Release] = []
        self.rollout: Rollout | None = None

    async def call(self, node: NodeView, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        assert self.rollout is not None
        self.seen.append(await self.rollout.current())  # as GET /release serves it
        assert (await self.store.get()).rolling_to is None  # never stored
        for n in self.joins:
            self.nodes_[n.name] = n
        self.joins = []
        return await super().call(node, method, path, timeout=timeout, **kw)


def _rollout(cluster: Watched) -> Rollout:
    cluster.rollout = Rollout(
        cluster, cluster, cluster, MemoryAuditLog(), token_name="control", timeouts=Timeouts(5, 5, 5),
        clock=cluster.clock, release=cluster.store,
    )  # fmt: skip
    return cluster.rollout


async def test_a_version_is_the_release_once_every_worker_runs_it(autojump_clock: object) -> None:
    cluster = Watched(Node("w1"), Node("w2"), joins=(Node("w3", version="0.9"),))  # w3: added mid-rollout
    rollout = _rollout(cluster)
    status, report = await rollout.upgrade("2.0")
    assert status == 200, report
    # announced while it ran: a worker (re)starting meanwhile keeps 2.0 or 1.0, and is not turned back
    assert {(r.version, r.rolling_to) for r in cluster.seen} == {("1.0", "2.0")}
    # the worker that came up on another version during the rollout was upgraded too, before the release moved
    assert report["upgraded"] == ["w1", "w2", "w3"]
    assert {n.version for n in cluster.nodes_.values()} == {"2.0"}
    release = await rollout.current()  # the rollout ended: nothing to clear, in Redis or anywhere
    assert (release.version, release.rolling_to, release.source) == ("2.0", None, "upgrade")
    assert release.accepts("2.0")
    assert not release.accepts("1.0")


async def test_a_failed_rollout_leaves_the_release_where_it_was(autojump_clock: object) -> None:
    cluster = Watched(Node("w1"), Node("w2", comes_back_on="1.0"))  # w2's install is rolled back
    rollout = _rollout(cluster)
    status, report = await rollout.upgrade("2.0")
    assert (status, report["failed"]["node"], report["upgraded"]) == (502, "w2", ["w1"])
    # w1 runs 2.0, w2 and any worker added now the release: 1.0, which every worker but w1 runs
    release = await rollout.current()
    assert (release.version, release.rolling_to, release.source) == ("1.0", None, "shipped")
    # run again once fixed: it resumes, and the release moves
    cluster.nodes_["w2"].comes_back_on = None
    status, report = await _rollout(cluster).upgrade("2.0")
    assert (status, report["skipped"], report["upgraded"]) == (200, ["w1"], ["w2"])
    assert (await cluster.store.get()).version == "2.0"


async def test_the_release_is_kept_in_redis_read_by_workers_helpers_and_outlives_a_restart(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_redis(redis_server.url) as redis, trio.open_nursery() as nursery:
        w1 = NodeIdentity("worker", "w1", "10.0.1.5", 8000, 8001, "2.0")
        w2 = NodeIdentity("worker", "w2", "10.0.1.6", 8000, 8001, "1.0")
        for node in (w1, w2):
            nursery.start_soon(partial(serve_heartbeat, redis, node, _state, lambda: None))
        async with control_plane(redis_server, tmp_path) as (_, http):
            node_auth = {"authorization": f"Bearer {(tmp_path / 'node_token').read_text().strip()}"}
            r = await http.get("/control/v1/release", headers=node_auth)  # what a worker's helper asks at every start
            assert r.status_code == 200, r.text
            assert r.json()["version"] == __version__  # nothing upgraded yet: the control plane's own, shipped
            assert (r.json()["source"], r.json()["rolling_to"]) == ("shipped", None)
            await _wait_nodes(http, 2)
            store = RedisReleaseStore(redis, __version__)
            await store.settle("2.0")  # as a rollout that reached every worker does
            body = (await http.get("/control/v1/release?workers=1")).json()
            assert (body["version"], body["source"], body["rolling_to"]) == ("2.0", "upgrade", None)
        # a record with a rollout in it, as an earlier control plane left one that stopped mid-rollout
        stale = json.loads(await redis.get("mbw:release") or b"{}") | {"rolling_to": "3.0"}
        await redis.set("mbw:release", json.dumps(stale))
        assert (await RedisReleaseStore(redis, __version__).get()).rolling_to is None  # ignored
        async with control_plane(redis_server, tmp_path) as (handle, http):
            # kept; the rollout did not survive its process, so a starting worker is not sent to 3.0, from the
            # first answer on (nothing has to clear it)
            body = (await http.get("/control/v1/release", headers=node_auth)).json()
            assert body == {"version": "2.0", "source": "upgrade", "since": body["since"], "rolling_to": None}
            # the workers' path scans no registry; cluster status asks for who runs another version
            body = (await http.get("/control/v1/release?workers=1")).json()
            assert body["workers_off_release"] == [{"name": "w2", "version": "1.0"}]
            (tmp_path / "control.json").write_text(json.dumps({"url": handle.url}))
            argv = ["cluster", "status", "-c", str(write_local_spec(tmp_path)), "--state-dir", str(tmp_path)]
            assert await trio.to_thread.run_sync(cli_main, argv) == 0
            out = capsys.readouterr().out
            assert "release: mbworker 2.0 (upgrade)\n" in out
            assert "  ! w2 runs 1.0, not the release: it installs it at its next start" in out
        assert json.loads(await redis.get("mbw:release") or b"{}")["version"] == "2.0"
        nursery.cancel_scope.cancel()
