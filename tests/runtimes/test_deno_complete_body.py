"""`InvocationResult.complete_body` from the Deno runtime: set for a body that came in one frame, else None."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbworker.runtimes.errors import WorkerError
from tests.runtimes.test_deno_support import deno_runtime, inv, version, write_fn

ROUTES = """
    Deno.serve((req) => {
      const path = new URL(req.url).pathname;
      if (path === "/fn/small") return new Response("hello", { headers: { "content-type": "text/plain" } });
      if (path === "/fn/empty") return new Response(null, { status: 204 });
      if (path === "/fn/big") return new Response(new Uint8Array(200_000).fill(7));
      // a stream whose first chunk is not ready when the handler returns: the head goes out alone
      let n = 0;
      return new Response(new ReadableStream({
        async pull(c) {
          await new Promise((r) => setTimeout(r, 20));
          if (n++ < 2) c.enqueue(new TextEncoder().encode(`part${n};`)); else c.close();
        },
      }));
    });
"""


async def test_one_frame_bodies_are_complete_and_streams_are_not(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, ROUTES))
    async with deno_runtime(tmp_path) as rt:
        async with rt.invoke(fn, inv("GET", "/fn/small")) as res:
            assert res.status == 200
            assert res.complete_body == b"hello"
            assert [c async for c in res.body] == [b"hello"]  # the iterator yields the same bytes
        async with rt.invoke(fn, inv("GET", "/fn/empty")) as res:
            assert (res.status, res.complete_body) == (204, b"")
            assert [c async for c in res.body] == []
        async with rt.invoke(fn, inv("POST", "/fn/small", b"ignored")) as res:
            assert res.complete_body == b"hello"
        async with rt.invoke(fn, inv("GET", "/fn/big")) as res:  # over the 64 KiB a head frame carries
            body = b"".join([c async for c in res.body])
            assert body == b"\x07" * 200_000
            # one chunk whose end frame arrived with the head may be complete; never a different body
            assert res.complete_body in (None, body)
        async with rt.invoke(fn, inv("GET", "/fn/stream")) as res:
            assert res.complete_body is None
            assert b"".join([c async for c in res.body]) == b"part1;part2;"


async def test_a_complete_body_over_the_cap_is_left_to_the_stream(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, ROUTES), max_response_bytes=3)
    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("GET", "/fn/small")) as res:
        assert res.complete_body is None
        with pytest.raises(WorkerError, match="exceeded"):
            [c async for c in res.body]
