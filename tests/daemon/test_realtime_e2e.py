"""Realtime through the real daemon: the stock @supabase/realtime-js client against `mbworker serve`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from tests.e2e.test_realtime_js import run_node
from tests.realtime.helpers import ANON, SECRET, make_jwt
from tests.worker_process import run_worker


async def test_realtime_js_against_the_daemon(tmp_path: Path) -> None:
    async with run_worker(tmp_path / "data", env={"MBWORKER_JWT_SECRET": SECRET}) as worker:
        env = {
            **os.environ,
            "RT_URL": worker.public_url.replace("http", "ws", 1) + "/realtime/v1",
            "RT_APIKEY": ANON,
            "RT_TOKEN": make_jwt("authenticated", sub="u1"),
            "RT_TOKEN2": make_jwt("authenticated", sub="u1", exp_in=7200),
            "RT_BAD_TOKEN": make_jwt("authenticated", sub="u1", secret="wrong-secret-wrong-secret-wrong-secret"),
            "RT_SHORT_TOKEN": make_jwt("authenticated", sub="u1", exp_in=5),
        }
        r = await run_node("conformance.mjs", env)
    assert all(v == {"status": "SUBSCRIBED", "error": None} for v in r["subscribe"].values())
    for state in (r["presenceA"], r["presenceB"]):
        assert set(state) == {"alice", "bob"}
    events = {k: [m["event"] for m in v] for k, v in r["got"].items()}
    assert "cursor" in events["a"]  # self: true
    assert "from-v1" not in events["b"]  # self: false
    assert r["httpSend"] == {"success": True}  # REST broadcast on the worker's public port


async def _read_until_closed(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


async def test_drain_closes_websockets_with_1012(tmp_path: Path) -> None:
    async with run_worker(tmp_path / "data", env={"MBWORKER_JWT_SECRET": SECRET}) as worker:
        url = worker.public_url.replace("http", "ws", 1) + f"/realtime/v1/websocket?apikey={ANON}&vsn=2.0.0"
        async with connect(url) as ws:
            await ws.send('["1","1","realtime:room","phx_join",{"config":{}}]')
            reply = await ws.recv()
            assert '"ok"' in reply
            worker.process.send_signal(15)
            with trio.fail_after(20), pytest.raises(ConnectionClosed) as closed:
                await _read_until_closed(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012
        with trio.fail_after(40):
            assert await worker.process.wait() == 0  # the one SIGTERM drained it and it exited cleanly
