"""`cluster drain` then `cluster undrain` of a real `mbworker serve` (one real redis-server, the real control plane):
the drained worker exits with the status that has the service manager start it again (75; mbworker.service's
Restart=on-failure), comes back cordoned — serving its port, not ready, out of the upstreams — and, once the drain
is lifted, exits 75 again to start afresh on the cluster's release, then serves. (Before: it exited 0, nothing
started it again, and `undrain` said it would be back.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from mbworker.worker.daemon import CORDON_EXIT_STATUS
from tests.control.test_api import control_plane
from tests.redis_server import RedisServer
from tests.worker_process import run_worker

ENV = {"MBWORKER_JWT_SECRET": "cordon-test-secret-0123456789abcdef", "MBWORKER_ADMIN_TOKEN": "cordon-admin"}


async def _until(
    http: httpx.AsyncClient, holds: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30
) -> dict[str, Any]:
    """The control plane's view of w1 once `holds(view)` (the heartbeat beats every second)."""
    with trio.fail_after(timeout):
        while True:
            nodes = {n["name"]: n for n in (await http.get("/control/v1/nodes")).json()}
            if "w1" in nodes and holds(nodes["w1"]):
                return dict(nodes["w1"])
            await trio.sleep(0.1)
    raise AssertionError(what)


async def test_a_drained_worker_comes_back_cordoned_and_undrain_brings_it_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {**ENV, "MBWORKER_REDIS_URL": redis_server.url, "MBWORKER_NODE_ID": "w1"}
    async with (
        control_plane(redis_server, tmp_path / "control") as (_, control),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        async with run_worker(tmp_path / "w1", env=env) as first:
            await _until(control, lambda n: n["state"] == "ready", "w1 never reported ready")
            assert (await control.post("/control/v1/nodes/w1/drain")).status_code == 202
            with trio.fail_after(60):
                status = await first.process.wait()
            assert status == CORDON_EXIT_STATUS

        # what systemd does after that exit: start it again
        async with run_worker(tmp_path / "w1", env=env) as again:
            view = await _until(control, lambda n: "cordoned" in str(n["why_not"]), "w1 never said it is cordoned")
            assert (view["ready"], view["state"]) == (False, "cordoned")
            assert [u["name"] for u in (await control.get("/control/v1/upstreams")).json()] == []
            ready = await http.get(f"{again.public_url}/ready/local")
            assert ready.status_code == 503
            assert "cluster undrain" in ready.text

            # undrain: it starts afresh (systemd converges it to the cluster's release first) and serves
            assert (await control.delete("/control/v1/nodes/w1/drain")).status_code == 200
            with trio.fail_after(60):
                assert await again.process.wait() == CORDON_EXIT_STATUS

        async with run_worker(tmp_path / "w1", env=env) as back:
            await _until(control, lambda n: n["state"] == "ready", "undrain did not bring w1 back")
            assert [u["name"] for u in (await control.get("/control/v1/upstreams")).json()] == ["w1"]
            assert (await http.get(f"{back.public_url}/ready/local")).status_code == 200
        assert back.process.returncode == 0  # a SIGTERM (systemctl stop) drains and exits 0: it stays down
