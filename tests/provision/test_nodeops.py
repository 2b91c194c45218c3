"""Scale-in's drain through the control plane, against a stand-in of its two routes (no node is reached)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mbworker.control.endpoint import control_token, write_endpoint
from mbworker.provision.errors import DrainError
from mbworker.provision.nodeops import ControlDrainOps, NodeRef, drain_through_control

from .conftest import FakeNodeOps

URL = "https://control.test"


def control(states: list[str], *, drain_status: int = 202) -> tuple[httpx.Client, list[str]]:
    """A control plane that accepts the drain and then reports the node in each of `states` in turn."""
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok"
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return httpx.Response(drain_status, json={"name": "w2", "draining": True, "left_upstreams": True})
        state = states.pop(0) if len(states) > 1 else states[0]
        nodes = [{"name": "w1", "state": "ready"}] + ([{"name": "w2", "state": state}] if state != "gone" else [])
        return httpx.Response(200, content=json.dumps(nodes))

    return httpx.Client(transport=httpx.MockTransport(handle)), calls


def test_the_drain_is_asked_of_the_control_plane_and_waited_for_until_the_node_is_down() -> None:
    http, calls = control(["draining", "draining", "down"])
    drain_through_control(http, URL, "tok", "w2", timeout=10, poll=0)
    assert calls == ["POST /control/v1/nodes/w2/drain"] + ["GET /control/v1/nodes"] * 3


def test_a_node_started_again_cordoned_is_drained() -> None:
    """systemd starts a node the control plane drained again; it reports `cordoned` (idle): safe to delete."""
    http, calls = control(["draining", "cordoned"])
    drain_through_control(http, URL, "tok", "w2", timeout=10, poll=0)
    assert calls == ["POST /control/v1/nodes/w2/drain"] + ["GET /control/v1/nodes"] * 2


def test_a_node_the_control_plane_forgot_is_drained() -> None:
    http, calls = control(["gone"])
    drain_through_control(http, URL, "tok", "w2", timeout=10, poll=0)
    assert calls[-1] == "GET /control/v1/nodes"


def test_a_node_the_control_plane_never_knew_needs_no_drain() -> None:
    http, calls = control(["gone"], drain_status=404)
    drain_through_control(http, URL, "tok", "w2", timeout=10, poll=0)
    assert calls == ["POST /control/v1/nodes/w2/drain"]


def test_a_refused_drain_or_one_that_does_not_end_is_a_drain_error() -> None:
    http, _ = control(["draining"], drain_status=401)
    with pytest.raises(DrainError, match="refused the drain with HTTP 401"):
        drain_through_control(http, URL, "tok", "w2", timeout=10, poll=0)
    http, _ = control(["draining"])
    with pytest.raises(DrainError, match="still draining after 0s"):
        drain_through_control(http, URL, "tok", "w2", timeout=0, poll=0)


def test_an_unreachable_control_plane_is_a_drain_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(DrainError, match="ConnectError"):
        drain_through_control(httpx.Client(transport=httpx.MockTransport(refuse)), URL, "tok", "w2", timeout=5)


def test_scale_in_drains_through_the_control_plane_once_the_cluster_has_one(tmp_path: Path) -> None:
    inner = FakeNodeOps()
    node = NodeRef("w2", "worker", "10.0.1.129", None)
    ops = ControlDrainOps(inner, tmp_path, poll_interval=0)
    ops.drain(node, timeout=5)  # no control plane recorded: the node's own admin drain
    assert [n.name for n in inner.drained] == ["w2"]

    token = control_token(tmp_path)
    write_endpoint(tmp_path, URL)
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {token}"
        calls.append(f"{request.method} {request.url}")
        return httpx.Response(202 if request.method == "POST" else 200, json=[] if request.method == "GET" else {})

    ops = ControlDrainOps(inner, tmp_path, poll_interval=0, transport=httpx.MockTransport(handle))
    ops.drain(node, timeout=5)
    assert calls == [f"POST {URL}/control/v1/nodes/w2/drain", f"GET {URL}/control/v1/nodes"]
    assert [n.name for n in inner.drained] == ["w2"]  # not reached again
