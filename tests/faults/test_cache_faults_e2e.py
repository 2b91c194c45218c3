"""Identical concurrent GETs to a function whose answers are not cacheable run side by side (real Deno)."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tests.daemon.fixtures import write_function
from tests.worker_process import RunningWorker

# Each request waits until four are inside the function at once (or gives up after 8 s): it answers "together"
# only if no request was held back behind another.
BARRIER = """let inside = 0;
Deno.serve(async () => {
  inside++;
  const until = Date.now() + 8000;
  while (inside < 4 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  return new Response(inside >= 4 ? "together" : "alone");
});"""


async def test_uncacheable_identical_gets_do_not_wait_for_each_other(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    limits = "[limits]\nmax_processes = 1\n"  # one process: the four share the counter
    await worker.deploy(write_function(tmp_path, "barrier", BARRIER, toml=limits), "--no-verify-jwt")
    url = f"{worker.public_url}/functions/v1/barrier"
    answers: list[tuple[str, str]] = []

    async def get() -> None:
        r = await http.get(url)
        answers.append((r.text, r.headers["x-mbworker-cache"]))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(get)
    assert answers == [("together", "BYPASS")] * 4
