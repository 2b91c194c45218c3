"""Two `mbworker serve` processes sharing one real redis-server behave as one: a deploy to either is served by both."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from mbworker.lib.redis import open_redis
from tests.daemon.fixtures import write_function
from tests.redis_server import redis_server_running
from tests.worker_process import run_worker

SECRET_ENV = {"MBWORKER_JWT_SECRET": "cluster-test-secret-0123456789abcdef", "MBWORKER_ADMIN_TOKEN": "cluster-admin"}


async def test_deploy_on_one_node_is_served_by_every_node(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with redis_server_running(tmp_path) as redis:
        env = {**SECRET_ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            assert a.admin_token == b.admin_token == "cluster-admin"
            fn = write_function(tmp_path / "src", "shared", "Deno.serve(() => new Response('from the cluster v1'))")
            out = await a.deploy(fn)
            assert b"shared v1" in out.stdout

            r = await http.get(f"{b.public_url}/functions/v1/shared", headers=b.auth())
            assert r.status_code == 200, r.text
            assert r.text == "from the cluster v1"

            # A redeploy through node B goes live on node A; versions come from one cluster-wide counter.
            (fn / "index.ts").write_text("Deno.serve(() => new Response('from the cluster v2'))")
            out = await b.deploy(fn)
            assert b"shared v2" in out.stdout
            await a.wait_for_output("shared: v2 is live")
            r = await http.get(f"{a.public_url}/functions/v1/shared", headers=a.auth())
            assert (r.text, r.headers["x-mbworker-version"]) == ("from the cluster v2", "2")

            await a.cli("functions", "delete", "shared", check=True)
            await b.wait_for_output("shared: removed")
            for node in (a, b):
                r = await http.get(f"{node.public_url}/functions/v1/shared", headers=node.auth())
                assert r.status_code == 404

        # A third node started later syncs what the cluster serves.
        fn2 = write_function(tmp_path / "src2", "late", "Deno.serve(() => new Response('late joiner'))")
        async with run_worker(tmp_path / "c", env=env) as c:
            await c.deploy(fn2)
        async with run_worker(tmp_path / "d", env=env) as d:
            r = await http.get(f"{d.public_url}/functions/v1/late", headers=d.auth())
            assert r.text == "late joiner"


async def test_function_rate_limit_holds_across_the_cluster(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with redis_server_running(tmp_path) as redis:
        env = {**SECRET_ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            fn = write_function(
                tmp_path / "src",
                "limited",
                "Deno.serve(() => new Response('ok'))",
                toml="[limits]\nrequests_per_second = 1\n",
            )
            await a.deploy(fn)
            await b.wait_for_output("limited: v1 is live")
            statuses: dict[str, list[int]] = {"a": [], "b": []}
            started = trio.current_time()
            for _ in range(10):
                for name, node in (("a", a), ("b", b)):
                    r = await http.get(f"{node.public_url}/functions/v1/limited", headers=node.auth())
                    statuses[name].append(r.status_code)
                    if r.status_code == 429:
                        assert r.json()["code"] == "RATE_LIMIT_EXCEEDED"
                        assert int(r.headers["retry-after"]) >= 1
            elapsed = trio.current_time() - started
            admitted = sum(s == 200 for s in statuses["a"] + statuses["b"])
            # One shared budget: 1 at once, then 1 more per second that passed — not 1 per node.
            assert 1 <= admitted <= 2 + int(elapsed)
            assert 429 in statuses["a"]
            assert 429 in statuses["b"]


async def test_l2_cache_shares_results_between_workers(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with redis_server_running(tmp_path) as redis:
        env = {**SECRET_ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            source = "let n = 0; Deno.serve(() => Response.json({ n: ++n, pid: Deno.pid }));"
            toml = '[cache]\nttl = "60s"\nl2 = true\n'
            await a.deploy(write_function(tmp_path / "src", "shared-cache", source, toml=toml))
            await b.wait_for_output("shared-cache: v1 is live")
            # The same key on both nodes (Authorization is part of the cache key), and the one Host a proxy in
            # front of them passes on (so is the URL's host: a response made for another is never shared).
            auth = {**a.auth(), "host": "api.example"}
            first = await http.get(f"{a.public_url}/functions/v1/shared-cache", headers=auth)
            assert first.headers["x-mbworker-cache"] == "MISS"
            # A writes to L2 after its client has the answer: wait for the write to reach Redis.
            async with open_redis(redis.url) as client:
                for _ in range(500):  # looked for every 20 ms, at most ~10 s
                    if [k async for k in client.scan_iter(match="mbw:l2:shared-cache:*")]:
                        break
                    await trio.sleep(0.02)
                else:
                    raise AssertionError("node A's result never reached the shared cache")
            # Node B never ran the function: the result comes from the shared second level.
            second = await http.get(f"{b.public_url}/functions/v1/shared-cache", headers=auth)
            assert second.headers["x-mbworker-cache"] == "HIT"
            assert second.json() == first.json()
            assert "age" in second.headers
            third = await http.get(f"{b.public_url}/functions/v1/shared-cache", headers=auth)
            assert (third.headers["x-mbworker-cache"], third.json()) == ("HIT", first.json())
