"""A drain asked of the control plane: every proxy has pulled (and so applied) upstreams without the node before
the node hears of the drain, so no proxy sends it a request once it stops accepting (scale-in under load)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio

from mbworker.lib.redis import open_redis
from mbworker.worker.cluster.heartbeat import NodeIdentity, serve_heartbeat
from tests.control.test_api import _state, _wait_nodes, control_plane
from tests.redis_server import RedisServer


async def test_every_proxy_pulled_upstreams_without_the_node_before_it_drains(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with control_plane(redis_server, tmp_path) as (_, http), open_redis(redis_server.url) as redis:
        told = trio.Event()
        pulls: list[tuple[str, float, list[str]]] = []
        async with trio.open_nursery() as nursery:
            for name in ("w1", "w2"):
                ident = NodeIdentity("worker", name, "127.0.0.1", 9000, 9001, "1")
                nursery.start_soon(
                    partial(serve_heartbeat, redis, ident, _state, told.set if name == "w1" else (lambda: None))
                )
            node = {"authorization": f"Bearer {(tmp_path / 'node_token').read_text().strip()}"}

            async def proxy(name: str) -> None:  # slower than the node's beat: the drain must wait for it
                while True:
                    r = await http.get("/control/v1/upstreams", headers={**node, "x-mbworker-node": name})
                    pulls.append((name, trio.current_time(), sorted(u["name"] for u in r.json())))
                    await trio.sleep(1.5)

            for name in ("px-1", "px-2"):
                nursery.start_soon(proxy, name)
            await _wait_nodes(http, 4)
            r = await http.post("/control/v1/nodes/w1/drain")
            assert r.status_code == 202
            with trio.fail_after(10):
                await told.wait()
            heard_at = trio.current_time()
            nursery.cancel_scope.cancel()
    # each proxy pulled upstreams without the node twice (so the first was applied) before the node was told
    for name in ("px-1", "px-2"):
        without = [t for p, t, names in pulls if p == name and names == ["w2"] and t < heard_at]
        assert len(without) >= 2, pulls
