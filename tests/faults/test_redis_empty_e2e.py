"""Two real workers on a real redis-server that restarts empty: both keep answering (never a 404) and the
cluster's store holds the function again, from the nodes' own copies."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.redis_server import redis_server_running
from tests.worker_process import RunningWorker, run_worker

ENV = {"MBWORKER_ADMIN_TOKEN": "cluster-admin"}


async def test_redis_restarting_empty_never_takes_a_function_down(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    async with (
        redis_server_running(tmp_path) as redis,
        httpx.AsyncClient(timeout=30, trust_env=False) as http,
    ):
        env = {**ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            await a.deploy(write_function(tmp_path / "src", "hello", "Deno.serve(() => new Response('hi'))"))
            for w in (a, b):
                r = await http.get(f"{w.public_url}/functions/v1/hello", headers=w.auth())
                if r.status_code != 200:  # B switches to what A activated
                    await w.wait_for_output("hello: v1 is live", 20)
            statuses: dict[int, int] = {}
            stop = trio.Event()

            async def traffic(w: RunningWorker) -> None:
                """Requests back to back on `w` until told to stop; counts the statuses seen."""
                while not stop.is_set():
                    r = await http.get(f"{w.public_url}/functions/v1/hello", headers=w.auth())
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

            resyncs = [len([line for line in w.output if "functions restored from this node" in line]) for w in (a, b)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(traffic, a)
                nursery.start_soon(traffic, b)
                await redis.stop()
                await redis.start()  # same port, no persistence: empty
                for w, before in zip((a, b), resyncs, strict=True):
                    await w.wait_for_output("functions restored from this node", 30, count=before + 1)
                for w in (a, b):
                    listing = (await w.cli("functions", "list", "-o", "json", check=True)).stdout.decode()
                    assert [(d["slug"], d["version"], d["status"]) for d in json.loads(listing)] == [
                        ("hello", 1, "ACTIVE")
                    ], listing
                # Still served after the cluster converged.
                for w in (a, b):
                    r = await http.get(f"{w.public_url}/functions/v1/hello", headers=w.auth())
                    assert (r.status_code, r.text) == (200, "hi")
                stop.set()
            assert set(statuses) == {200}, statuses
