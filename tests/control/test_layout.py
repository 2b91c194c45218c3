"""Every node of the cluster's layout in the control plane's node list and scrape targets, without machines: a
layout file as the provisioner writes it, a real redis-server, the workers' real heartbeat, and the probed
nodes' node-exporter and Patroni played by real listeners on loopback addresses (127.0.0.x)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from mbworker.cli.cluster_cmds import status_table
from mbworker.control.layout import LayoutError, LayoutNode, layout_json, parse_layout, read_layout
from mbworker.control.serve import ControlHandle
from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
from mbworker.lib.redis import open_redis
from mbworker.worker.cluster.heartbeat import NodeIdentity, NodeLoad, NodeState, serve_heartbeat
from tests.control.test_api import control_plane as serve_control_plane
from tests.redis_server import RedisServer

DOWN_AFTER_S = 2.0


class Answer:
    """A listener answering every GET with one status and JSON body (node-exporter's page, Patroni's /health)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.paths: list[str] = []

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        self.paths.append(request.path)
        await responder.send(self.status, [(b"content-type", b"application/json")], json.dumps(self.body).encode())

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def _listen(nursery: trio.Nursery, app: Answer, host: str, port: int = 0) -> tuple[HttpServer, trio.CancelScope]:
    """`app` on host:port in its own cancel scope (cancelled: the node stops answering)."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_http(app, host, port, task_status=task_status)

    server: HttpServer = await nursery.start(run)
    return server, scope


def control_plane(
    redis: RedisServer, tmp_path: Path, layout: Path, patroni_port: int
) -> AbstractAsyncContextManager[tuple[ControlHandle, httpx.AsyncClient]]:
    """The control plane reading `layout` and probing fast (every 0.2 s)."""
    return serve_control_plane(
        redis,
        tmp_path,
        node_name="c-system",
        layout_file=layout,
        down_after_s=DOWN_AFTER_S,
        probe_interval_s=0.2,
        patroni_port=patroni_port,
    )


async def _until(
    http: httpx.AsyncClient, holds: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 10
) -> dict[str, dict[str, Any]]:
    """The node list, once `holds` is true of it (the probes run every 0.2 s)."""
    with trio.fail_after(timeout):
        while True:
            r = await http.get("/control/v1/nodes")
            assert r.status_code == 200, r.text
            nodes = {n["name"]: n for n in r.json()}
            if holds(nodes):
                return nodes
            await trio.sleep(0.05)


async def test_every_node_of_the_layout_is_listed_and_a_silent_one_is_down_with_the_reason(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    patroni_port = _free_port("127.0.0.2")
    dead_port = _free_port("127.0.0.4")  # nothing listens there: the NAT node never answers
    async with trio.open_nursery() as listeners:
        exporter1, stop_exporter1 = await _listen(listeners, Answer(200, {"page": "Node Exporter"}), "127.0.0.2")
        exporter2, _ = await _listen(listeners, Answer(200, {"page": "Node Exporter"}), "127.0.0.3")
        healthy = Answer(200, {"state": "running", "role": "primary", "server_version": 150005})
        await _listen(listeners, healthy, "127.0.0.2", patroni_port)
        await _listen(
            listeners, Answer(503, {"state": "starting", "server_version": 150005}), "127.0.0.3", patroni_port
        )
        layout = tmp_path / "targets.json"
        nodes = [
            LayoutNode("c-system", "system", "127.0.0.1"),
            LayoutNode("c-proxy-001", "proxy", "127.0.0.5"),
            LayoutNode("c-worker-001", "worker", "127.0.0.1", 8001),
            LayoutNode("c-worker-002", "worker", "127.0.0.6", 8001),
            LayoutNode("c-state-001", "state", "127.0.0.2", exporter_port=exporter1.port),
            LayoutNode("c-state-002", "state", "127.0.0.3", exporter_port=exporter2.port),
            LayoutNode("c-nat", "nat", "127.0.0.4", exporter_port=dead_port),
        ]
        layout.write_text(layout_json(nodes))
        async with (
            control_plane(redis_server, tmp_path, layout, patroni_port) as (_, http),
            open_redis(redis_server.url) as redis,
            trio.open_nursery() as beats,
        ):
            w1 = NodeIdentity("worker", "c-worker-001", "127.0.0.1", 8000, 9301, "1.2.3")
            state = NodeState(True, None, False, NodeLoad(0, 0, 0), {})
            beats.start_soon(partial(serve_heartbeat, redis, w1, lambda: state, lambda: None))

            def settled(n: dict[str, dict[str, Any]]) -> bool:
                states = {name: str(n[name]["state"]) for name in ("c-worker-001", "c-system", "c-state-001")}
                return set(states.values()) == {"ready"} and n["c-state-002"]["state"] == "not ready"

            listed = await _until(http, settled)
            # every node of the layout, with its role: reporting ones by heartbeat, state and NAT by probes
            assert {name: (n["role"], n["reports"]) for name, n in listed.items()} == {
                "c-system": ("system", "heartbeat"),
                "c-proxy-001": ("proxy", "heartbeat"),
                "c-worker-001": ("worker", "heartbeat"),
                "c-worker-002": ("worker", "heartbeat"),
                "c-state-001": ("state", "probe"),
                "c-state-002": ("state", "probe"),
                "c-nat": ("nat", "probe"),
            }
            assert listed["c-worker-001"]["version"] == "1.2.3"
            st1 = listed["c-state-001"]
            assert (st1["private_ip"], st1["version"], st1["why_not"]) == ("127.0.0.2", "postgresql-15.5", None)
            assert st1["last_seen_s"] < DOWN_AFTER_S
            assert healthy.paths
            assert set(healthy.paths) == {"/health"}
            # up (node-exporter answers) but PostgreSQL is not running: the reason is Patroni's
            st2 = listed["c-state-002"]
            assert st2["why_not"] == "patroni: PostgreSQL is not running (HTTP 503, state starting)", st2
            # never answered, never reported: down, with what was tried
            nat = listed["c-nat"]
            assert (nat["state"], nat["version"], nat["last_seen"], nat["last_seen_s"]) == ("down", "-", None, None)
            assert nat["why_not"].startswith(f"never answered: node-exporter :{dead_port}: unreachable"), nat
            for name in ("c-proxy-001", "c-worker-002"):
                assert listed[name]["state"] == "down"
                assert listed[name]["why_not"].startswith("no heartbeat on record"), listed[name]
            assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["c-worker-001"]
            # a pull (node token: every node has it) names itself: only the layout's proxies are taken at their word
            node = {"authorization": f"Bearer {(tmp_path / 'node_token').read_text().strip()}"}
            for claimed in ("c-worker-001", "c-state-001", "junk-1"):
                r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": claimed})
                assert (r.status_code, r.json()["code"]) == (403, "NOT_IN_LAYOUT"), claimed
            assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["c-worker-001"]
            r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": "c-proxy-001"})
            assert [u["name"] for u in r.json()] == ["c-worker-001"]
            pulled = await _until(http, lambda n: n["c-proxy-001"]["state"] == "ready")
            assert pulled["c-proxy-001"]["role"] == "proxy"
            assert "junk-1" not in {n["name"] for n in (await http.get("/control/v1/nodes")).json()}
            # a probed node has no mbworker to drain: refused, and nothing is written for it
            refused = await http.post("/control/v1/nodes/c-state-001/drain")
            assert refused.status_code == 409, refused.text
            assert "no mbworker to drain" in refused.text
            assert await redis.get("mbw:node:c-state-001:hold") is None
            assert await redis.get("mbw:node:c-state-001:drain") is None
            # `cluster status`'s table: a node never seen says so, with its reason
            table = {line.split()[1]: line for line in status_table(list(listed.values()))[1:]}
            assert table["c-nat"].split()[:4] == ["nat", "c-nat", "127.0.0.4", "-"], table["c-nat"]
            assert " never  never answered: node-exporter" in table["c-nat"], table["c-nat"]
            assert table["c-state-001"].split()[2:5] == ["127.0.0.2", "postgresql-15.5", "ready"], table

            # VictoriaMetrics' targets: every layout node's node-exporter, reporting or not; every worker's metrics
            targets = (await http.get("/control/v1/scrape-targets")).json()
            exporters = {g["labels"]["node"]: g["targets"][0] for g in targets if g["labels"]["kind"] == "node"}
            assert exporters == {n.name: f"{n.private_ip}:{n.exporter_port}" for n in nodes}, exporters
            metrics = {g["labels"]["node"]: g["targets"][0] for g in targets if g["labels"]["kind"] == "mbworker"}
            # the heartbeat's admin port where the worker reports, the layout's where it does not
            assert metrics == {"c-worker-001": "127.0.0.1:9301", "c-worker-002": "127.0.0.6:8001"}

            # state-001's node-exporter stops answering: up while it answered within 15 s (here 2), then down
            stop_exporter1.cancel()
            down = await _until(http, lambda n: n["c-state-001"]["state"] == "down")
            why = down["c-state-001"]["why_not"]
            assert why.startswith("no answer for "), why
            assert f"node-exporter :{exporter1.port}: unreachable" in why, why
            assert down["c-state-001"]["last_seen_s"] >= DOWN_AFTER_S  # (rounded to 0.1 s)

            # the worker stops beating: down once its last beat is older than that, with the reason
            beats.cancel_scope.cancel()
            down = await _until(http, lambda n: n["c-worker-001"]["state"] == "down")
            assert down["c-worker-001"]["why_not"].startswith("no heartbeat for "), down["c-worker-001"]
            assert (await http.get("/control/v1/upstreams")).json() == []

            # the provisioner rewrites the layout (the NAT node gone): the next read follows; a broken file is
            # ignored and the last good layout stays
            layout.write_text(layout_json(n for n in nodes if n.role != "nat"))
            await _until(http, lambda n: "c-nat" not in n)
            layout.write_text("{not json")
            with trio.fail_after(10):
                while True:  # the next read logs it (a log record is the event)
                    if any("is not JSON" in r.getMessage() for r in caplog.records):
                        break
                    await trio.sleep(0.05)
            assert "c-state-002" in {n["name"] for n in (await http.get("/control/v1/nodes")).json()}
        listeners.cancel_scope.cancel()


def test_the_layout_reads_what_the_provisioner_writes_and_refuses_anything_else(tmp_path: Path) -> None:
    nodes = (
        LayoutNode("c-nat", "nat", "10.0.0.2"),
        LayoutNode("c-state-001", "state", "10.0.0.11"),
        LayoutNode("c-system", "system", "10.0.0.3"),
        LayoutNode("c-worker-001", "worker", "10.0.1.1", 8081),
    )
    path = tmp_path / "targets.json"
    path.write_text(layout_json(reversed(nodes)))
    assert read_layout(path) == nodes  # sorted by role, then name
    with pytest.raises(LayoutError, match="cannot read the layout"):
        read_layout(tmp_path / "missing.json")
    bad: Any
    for bad in (
        {"targets": []},
        [{"targets": ["10.0.0.2:9100"], "labels": {"node": "x", "role": "king", "kind": "node"}}],
        [{"targets": ["10.0.0.2:9100"], "labels": {"node": "x", "kind": "node"}}],
        [{"targets": [], "labels": {"node": "x", "role": "nat", "kind": "node"}}],
        [{"targets": ["10.0.0.2:nine"], "labels": {"node": "x", "role": "nat", "kind": "node"}}],
        [{"targets": [":9100"], "labels": {"node": "x", "role": "nat", "kind": "node"}}],
    ):
        with pytest.raises(LayoutError):
            parse_layout(bad)
