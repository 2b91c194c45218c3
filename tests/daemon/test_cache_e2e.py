"""The L1 result cache through the real daemon: HIT/MISS/BYPASS, redeploys and purges never serve stale versions."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.daemon.fixtures import write_function
from tests.worker_process import RunningWorker

COUNTER = """
let n = 0;
Deno.serve(() => { n += 1; return Response.json({ n, v: VERSION }); });
"""


async def test_cache_hits_misses_and_purges(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    fn = write_function(tmp_path, "cached", "const VERSION = 1;" + COUNTER, toml='[cache]\nttl = "60s"\n')
    await worker.deploy(fn)
    url = f"{worker.public_url}/functions/v1/cached"
    auth = worker.auth()

    first = await http.get(url, headers=auth)
    assert (first.headers["x-mbworker-cache"], first.json()) == ("MISS", {"n": 1, "v": 1})
    second = await http.get(url, headers=auth)
    assert (second.headers["x-mbworker-cache"], second.json()) == ("HIT", {"n": 1, "v": 1})
    assert "age" in second.headers
    other_user = await http.get(url, headers=worker.auth(worker.service_role_key))  # Authorization is in the key
    assert other_user.headers["x-mbworker-cache"] == "MISS"
    revalidated = await http.get(url, headers={**auth, "cache-control": "no-cache"})
    assert revalidated.headers["x-mbworker-cache"] != "HIT"
    posted = await http.post(url, headers=auth)
    assert posted.headers["x-mbworker-cache"] == "BYPASS"

    (fn / "index.ts").write_text("const VERSION = 2;" + COUNTER)
    await worker.deploy(fn)
    after_deploy = await http.get(url, headers=auth)
    assert after_deploy.json()["v"] == 2
    assert after_deploy.headers["x-mbworker-cache"] == "MISS"
    assert (await http.get(url, headers=auth)).headers["x-mbworker-cache"] == "HIT"

    await worker.cli("functions", "rollback", "cached", check=True)
    rolled_back = await http.get(url, headers=auth)
    assert (rolled_back.json()["v"], rolled_back.headers["x-mbworker-cache"]) == (1, "MISS")

    await worker.cli("cache", "purge", "cached", check=True)
    assert (await http.get(url, headers=auth)).headers["x-mbworker-cache"] == "MISS"


async def test_concurrent_identical_misses_run_once(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    source = """let n = 0;
    Deno.serve(async () => { n += 1; await new Promise((r) => setTimeout(r, 300));
      return new Response(String(n), { headers: { 'cache-control': 'max-age=30' } }); });"""
    await worker.deploy(write_function(tmp_path, "flight", source))
    url = f"{worker.public_url}/functions/v1/flight"
    import trio

    bodies: list[str] = []

    async def get() -> None:
        bodies.append((await http.get(url, headers=worker.auth())).text)

    # A version coalesces once it has answered something storable (worker/cache/store.py): this is that answer.
    assert (await http.get(f"{url}?warm", headers=worker.auth())).text == "1"
    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(get)
    assert bodies == ["2"] * 30
