"""The control plane's API without machines: a real redis-server, the workers' real heartbeat reporter with
made-up node state, and `serve_control` on a free port."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from mbworker.control import registry as registry_module
from mbworker.control.errors import ControlError
from mbworker.control.serve import ControlHandle, serve_control
from mbworker.control.settings import ControlSettings
from mbworker.control.token import load_or_create_token
from mbworker.lib.redis import open_redis
from mbworker.lib.revocation import open_redis_revocations
from mbworker.worker.cluster.heartbeat import NodeIdentity, NodeLoad, NodeState, serve_heartbeat
from tests.redis_server import RedisServer


@asynccontextmanager
async def control_plane(
    redis: RedisServer, tmp_path: Path, **settings_: Any
) -> AsyncIterator[tuple[ControlHandle, httpx.AsyncClient]]:
    """`serve_control` on a free port (tokens in `tmp_path`, more `ControlSettings` in `settings_`) and an HTTP
    client holding the control token."""
    settings = ControlSettings(
        redis_url=redis.url,
        port=0,
        token_file=tmp_path / "control_token",
        node_token_file=tmp_path / "node_token",
        admin_token="worker-admin-token",
        **settings_,
    )
    async with trio.open_nursery() as nursery:
        handle: ControlHandle = await nursery.start(serve_control, settings)
        token = (tmp_path / "control_token").read_text().strip()
        headers = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=handle.url, headers=headers, timeout=10, trust_env=False) as http:
            yield handle, http
        nursery.cancel_scope.cancel()


def _state(*, ready: bool = True, functions: dict[str, int] | None = None) -> NodeState:
    return NodeState(ready, None if ready else "booting", False, NodeLoad(10, 2, 3), functions or {})


async def _wait_nodes(http: httpx.AsyncClient, count: int) -> list[dict[str, object]]:
    with trio.fail_after(10):
        while True:
            nodes = (await http.get("/control/v1/nodes")).json()
            if len(nodes) >= count:
                return list(nodes)
            await trio.sleep(0.05)


async def test_every_call_needs_the_control_token_and_a_refusal_says_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with control_plane(redis_server, tmp_path) as (_, http):
        assert oct((tmp_path / "control_token").stat().st_mode & 0o777) == "0o600"
        for headers in (
            {"authorization": ""},
            {"authorization": "Bearer wrong"},
            {"authorization": "worker-admin-token"},
        ):
            for method, path in (("GET", "/control/v1/nodes"), ("POST", "/control/v1/sessions/revoke")):
                r = await http.request(method, path, headers=headers)
                assert (r.status_code, r.content) == (401, b"")
        # the workers' admin token is not a control token
        r = await http.get("/control/v1/nodes", headers={"authorization": "Bearer worker-admin-token"})
        assert r.status_code == 401
        # the node token reads upstreams and scrape targets, nothing else
        node = {"authorization": f"Bearer {(tmp_path / 'node_token').read_text().strip()}"}
        assert (await http.get("/control/v1/upstreams", headers=node)).status_code == 200
        assert (await http.get("/control/v1/scrape-targets", headers=node)).status_code == 200
        for method, path in (("GET", "/control/v1/nodes"), ("POST", "/control/v1/sessions/revoke")):
            r = await http.request(method, path, headers=node)
            assert (r.status_code, r.content) == (401, b"")
        assert (await http.get("/control/v1/nope")).status_code == 404
        assert (await http.delete("/control/v1/nodes")).status_code == 405


def test_the_token_file_is_created_private_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "control_token"
    token = load_or_create_token(path)
    assert len(token) == 64
    assert load_or_create_token(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(ControlError, match="readable by others"):
        load_or_create_token(path)


async def test_nodes_report_by_heartbeat_and_a_silent_node_is_down(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        control_plane(redis_server, tmp_path) as (_, http),
        open_redis(redis_server.url) as redis,
        trio.open_nursery() as nursery,
    ):
        w1 = NodeIdentity("worker", "w1", "10.0.1.5", 8000, 8001, "1.2.3")
        nursery.start_soon(partial(serve_heartbeat, redis, w1, lambda: _state(functions={"hello": 2}), lambda: None))
        nodes = await _wait_nodes(http, 1)
        assert nodes[0]["role"] == "worker"
        assert nodes[0]["name"] == "w1"
        assert nodes[0]["private_ip"] == "10.0.1.5"
        assert nodes[0]["version"] == "1.2.3"
        assert nodes[0]["state"] == "ready"
        assert nodes[0]["functions"] == {"hello": 2}
        assert nodes[0]["load"] == {"requests_per_s": 0.0, "websockets": 2, "deno_processes": 3}
        # A node whose last beat is older than 15 s is down (written as it would have been 20 s ago).
        sent_at = time.time() - 20
        old = {**nodes[0], "name": "w2", "sent_at": sent_at, "ready": True, "admin_port": 8001}
        await redis.set("mbw:node:w2", json.dumps(old))
        await redis.zadd("mbw:nodes", {"w2": sent_at})
        nodes = await _wait_nodes(http, 2)
        by_name = {n["name"]: n for n in nodes}
        assert by_name["w2"]["state"] == "down"
        assert by_name["w2"]["ready"] is False
        assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["w1"]
        # A proxy's pull of its upstreams (node token) is its heartbeat: it is listed, and never an upstream.
        node = {"authorization": f"Bearer {(tmp_path / 'node_token').read_text().strip()}"}
        proxy = {**node, "x-mbworker-node": "px-1", "x-mbworker-version": "1.2.3"}
        r = await http.get("/control/v1/upstreams", headers=proxy)
        assert [u["name"] for u in r.json()] == ["w1"]
        by_name = {n["name"]: n for n in await _wait_nodes(http, 3)}
        assert (by_name["px-1"]["role"], by_name["px-1"]["private_ip"], by_name["px-1"]["state"]) == (
            "proxy",
            "127.0.0.1",
            "ready",
        )
        r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": "bad name/"})
        assert r.status_code == 400
        # every node holds the node token: a pull naming a worker does not turn it into a proxy (out of the
        # upstreams), and without a layout new names stop at a bound instead of swelling every registry read
        r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": "w1"})
        assert (r.status_code, r.json()["code"]) == (409, "NAME_TAKEN")
        assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["w1"]
        monkeypatch.setattr(registry_module, "MAX_REPORTED", len(await _wait_nodes(http, 3)) + 1)
        assert (await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": "px-2"})).status_code == 200
        r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": "junk-1"})
        assert (r.status_code, r.json()["code"]) == (409, "TOO_MANY")
        assert (await http.get("/control/v1/upstreams", headers=proxy)).status_code == 200  # known names still beat
        nursery.cancel_scope.cancel()


async def test_a_drained_node_leaves_the_upstreams_before_it_drains(redis_server: RedisServer, tmp_path: Path) -> None:
    async with control_plane(redis_server, tmp_path) as (_, http), open_redis(redis_server.url) as redis:
        drained = {"w1": trio.Event(), "w2": trio.Event()}
        async with trio.open_nursery() as nursery:
            for name, ready in (("w1", True), ("w2", True), ("w3", False)):
                ident = NodeIdentity("worker", name, "127.0.0.1", 9000, 9001, "1")
                on_drain = drained[name].set if name in drained else (lambda: None)
                nursery.start_soon(partial(serve_heartbeat, redis, ident, partial(_state, ready=ready), on_drain))
            await _wait_nodes(http, 3)
            upstreams = (await http.get("/control/v1/upstreams")).json()
            assert upstreams == [
                {"name": "w1", "address": "127.0.0.1:9000"},
                {"name": "w2", "address": "127.0.0.1:9000"},
            ]
            targets = (await http.get("/control/v1/scrape-targets")).json()
            assert {"127.0.0.1:9001"} == {t for g in targets if g["labels"]["kind"] == "mbworker" for t in g["targets"]}

            r = await http.post("/control/v1/nodes/w1/drain")
            assert r.status_code == 202
            # out of the upstreams at once, before the node has even heard of the drain
            assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["w2"]
            with trio.fail_after(10):
                await drained["w1"].wait()
            assert not drained["w2"].is_set()
            assert (await http.post("/control/v1/nodes/nobody/drain")).status_code == 404
            # the drain holds (a restarted node comes back cordoned) until it is cancelled, however long that takes
            assert await redis.get("mbw:node:w1:drain") is not None
            assert await redis.execute_many([("TTL", "mbw:node:w1:drain")]) == [-1]
            r = await http.delete("/control/v1/nodes/w1/drain")
            assert r.status_code == 200
            assert r.json()["drain_asked"] is False
            assert await redis.get("mbw:node:w1:drain") is None
            assert [u["name"] for u in (await http.get("/control/v1/upstreams")).json()] == ["w1", "w2"]
            assert (await http.delete("/control/v1/nodes/nobody/drain")).status_code == 404
            # a node gone for over an hour (its record expired; scaled in) takes its drain and hold with it
            await redis.zadd("mbw:nodes", {"gone-1": time.time() - 7200})
            await redis.set("mbw:node:gone-1:drain", "1")
            await redis.set("mbw:node:gone-1:hold", "1")
            assert "gone-1" not in {n["name"] for n in (await http.get("/control/v1/nodes")).json()}
            assert await redis.get("mbw:node:gone-1:drain") is None
            assert await redis.get("mbw:node:gone-1:hold") is None
            nursery.cancel_scope.cancel()
        audit = (await http.get("/control/v1/audit")).json()
        assert [(a["token"], a["action"], a["status"]) for a in audit] == [
            ("control", "POST /control/v1/nodes/w1/drain", 202),
            ("control", "POST /control/v1/nodes/nobody/drain", 404),
            ("control", "DELETE /control/v1/nodes/w1/drain", 200),
            ("control", "DELETE /control/v1/nodes/nobody/drain", 404),
        ]


async def test_a_revoked_session_reaches_every_node_and_bad_input_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with (
        control_plane(redis_server, tmp_path) as (_, http),
        open_redis(redis_server.url) as redis,
        open_redis_revocations(redis) as node_list,
    ):
        heard = trio.Event()

        async def listener(session_id: str) -> None:
            if session_id == "sess-1":
                heard.set()

        node_list.add_listener(listener)
        r = await http.post("/control/v1/sessions/revoke", json={"session_id": "sess-1"})
        assert r.status_code == 200, r.text
        assert r.json()["revoked_until"] > time.time() + 3000  # the longest token lifetime by default
        with trio.fail_after(5):
            await heard.wait()
        assert node_list.is_revoked("sess-1")
        assert not node_list.is_revoked("sess-2")
        listed = (await http.get("/control/v1/sessions/revoked")).json()
        assert [e["session_id"] for e in listed] == ["sess-1"]
        for body in ({}, {"session_id": ""}, {"session_id": "x y"}, {"session_id": "s", "until": 1}, [1]):
            r = await http.post("/control/v1/sessions/revoke", json=body)
            assert r.status_code == 400, body
            assert r.json()["code"] == "BAD_REQUEST"
        # NaN and Infinity are not JSON (Python's parser takes them); a revocation must end on a printable date
        for raw in (b"{not json", b'{"session_id": "s", "until": NaN}', b'{"session_id": "s", "until": Infinity}',
                    b'{"session_id": "s", "until": 1e300}'):  # fmt: skip
            r = await http.post("/control/v1/sessions/revoke", content=raw)
            assert r.status_code == 400, raw
        assert [e["session_id"] for e in (await http.get("/control/v1/sessions/revoked")).json()] == ["sess-1"]
        # a node that starts later loads what was revoked before it
        async with open_redis_revocations(redis) as late:
            assert late.is_revoked("sess-1")
        audit = (await http.get("/control/v1/audit?limit=1")).json()
        assert audit[0]["action"] == "POST /control/v1/sessions/revoke"
        assert audit[0]["status"] == 400


async def test_losing_redis_answers_503_with_the_reason_and_recovers(redis_server: RedisServer, tmp_path: Path) -> None:
    async with control_plane(redis_server, tmp_path) as (_, http):
        assert (await http.get("/control/v1/nodes")).status_code == 200
        await redis_server.stop()
        r = await http.get("/control/v1/nodes")
        assert r.status_code == 503
        assert r.json()["code"] == "REDIS_UNAVAILABLE"
        assert "Redis" in r.json()["message"]
        r = await http.post("/control/v1/sessions/revoke", json={"session_id": "s1"})
        assert r.status_code == 503
        await redis_server.start()
        with trio.fail_after(20):  # the client reconnects by itself: poll until it has
            while True:
                if (await http.get("/control/v1/nodes")).status_code == 200:
                    break
                await trio.sleep(0.1)
        r = await http.get("/control/v1/functions")
        assert (r.status_code, r.json()["code"]) == (503, "NO_READY_WORKERS")


async def test_a_node_that_starts_draining_beats_at_once_and_leaves_the_upstreams(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A drain that did not come through the control plane (SIGTERM at a machine's shutdown) is reported by the
    next beat at once, not an interval later: the beat interval here is an hour, so only the wake-up can say it."""
    draining = trio.Event()

    def state() -> NodeState:
        return NodeState(not draining.is_set(), "draining" if draining.is_set() else None, draining.is_set(),
                         NodeLoad(0, 0, 0), {})  # fmt: skip

    async def started() -> None:
        await draining.wait()

    async with (
        control_plane(redis_server, tmp_path) as (_, http),
        open_redis(redis_server.url) as redis,
        trio.open_nursery() as nursery,
    ):
        w1 = NodeIdentity("worker", "w1", "10.0.1.5", 8000, 8001, "1")
        beat = partial(serve_heartbeat, redis, w1, state, lambda: None, drain_started=started, interval=3600)
        nursery.start_soon(beat)
        assert (await _wait_nodes(http, 1))[0]["state"] == "ready"
        draining.set()
        with trio.fail_after(10):
            while True:
                if (await http.get("/control/v1/nodes")).json()[0]["state"] == "draining":
                    break
                await trio.sleep(0.05)
        assert (await http.get("/control/v1/upstreams")).json() == []
        nursery.cancel_scope.cancel()
