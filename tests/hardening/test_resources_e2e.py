"""Per-function process caps, and storms that only CPU/memory limits can stop, in a real `mbworker serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_binary
from tests.daemon.fixtures import write_function
from tests.hardening.deno_probe import DENO
from tests.processes import deno_processes
from tests.worker_process import run_worker

HELD = """
Deno.serve((req) => {
  if (new URL(req.url).searchParams.get("hold") === null) return new Response("free");
  // answer the head and one chunk at once, then hold the only slot until the test creates $TMPDIR/release
  const release = `${Deno.env.get("TMPDIR")}/release`;
  const body = new ReadableStream({
    start(c) { c.enqueue(new TextEncoder().encode("holding\\n")); },
    async pull(c) {
      while (true) {
        try { await Deno.stat(release); break; } catch { await new Promise((r) => setTimeout(r, 20)); }
      }
      c.enqueue(new TextEncoder().encode("released\\n"));
      c.close();
    },
  });
  return new Response(body);
});
"""

STORM = """
Deno.serve(async (req) => {
  const what = new URL(req.url).searchParams.get("do");
  if (what === "microtasks") { const spin = () => Promise.resolve().then(spin); spin(); }
  if (what === "timers") {
    for (let i = 0; i < 10000; i++) setInterval(() => { for (let j = 0; j < 10000; j++); }, 0);
  }
  if (what === "promises") { const keep = []; while (true) keep.push(new Promise(() => {}), { pad: new Array(64) }); }
  if (what === "fork") { new Deno.Command(Deno.execPath(), { args: ["eval", "1"] }).spawn(); }
  if (what !== null) await new Promise((resolve) => setTimeout(resolve, 60000));
  return new Response("calm");
});
"""


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        yield client


async def test_process_cap_and_storms(tmp_path: Path, http: httpx.AsyncClient) -> None:
    require_binary("deno", DENO)
    data = (tmp_path / "data").resolve()
    async with run_worker(data) as worker:
        capped = "[limits]\nmax_processes = 1\nmax_concurrency = 1\nqueue_timeout_s = 0.5\n"
        await worker.deploy(write_function(tmp_path, "capped", HELD, toml=capped))
        stormy = "[limits]\ncpu_time_ms = 400\nmemory_mb = 64\nrequest_idle_timeout_s = 30\nmax_processes = 2\n"
        await worker.deploy(write_function(tmp_path, "storm", STORM, toml=stormy))
        url = f"{worker.public_url}/functions/v1/capped"

        async with http.stream("GET", url, params={"hold": "1"}, headers=worker.auth()) as held:
            assert held.status_code == 200
            chunks = held.aiter_raw()
            first = await anext(chunks)
            assert first == b"holding\n"  # the only slot of the only process is taken now
            r = await http.get(url, headers=worker.auth())
            assert r.status_code == 503
            assert r.json()["code"] == "WORKER_BUSY"
            capped_procs = [a for a in deno_processes(data).values() if any("/capped/" in x for x in a)]
            assert len(capped_procs) == 1  # the cap held: no second process was started for the waiting request
            (tmp,) = (data / "scratch" / "deno").glob("run-*/capped-*/tmp/p*")  # the one process's own temp dir
            (tmp / "release").write_text("")
            rest = b"".join([chunk async for chunk in chunks])
            assert rest == b"released\n"
        r = await http.get(url, headers=worker.auth())  # the slot is free again
        assert r.text == "free"

        storm = f"{worker.public_url}/functions/v1/storm"
        for what in ("microtasks", "timers", "promises"):
            r = await http.get(storm, params={"do": what}, headers=worker.auth())
            assert r.status_code == 546, (what, r.text)
            assert r.json()["code"] == "WORKER_LIMIT"
            r = await http.get(storm, headers=worker.auth())
            assert r.text == "calm"  # a fresh process serves the next request
        r = await http.get(storm, params={"do": "fork"}, headers=worker.auth())
        assert r.status_code == 500  # the spawn throws NotCapable: a handler error, no child process
        assert "storm" not in " ".join(" ".join(a) for a in deno_processes(data).values() if "eval" in a)
