"""Slow request bodies must not hold a function's slots: 150 clients trickling bodies a byte at a time while a
normal request comes in (real `mbworker serve`, real Deno, real sockets)."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tests.daemon.fixtures import write_function
from tests.worker_process import run_worker

SINK = "Deno.serve(async (req) => new Response(`got ${(await req.text()).length}`));"
TRICKLERS = 150


async def test_trickling_bodies_do_not_starve_a_normal_request(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[http]\nbody_grace_s = 1.0\nbody_min_rate = 100\n")
    # Four slots in all, and a short queue: held slots would show as 503 WORKER_BUSY within 3 s.
    limits = "[limits]\nmax_processes = 1\nmax_concurrency = 4\nqueue_timeout_s = 3\n"
    async with (
        run_worker(tmp_path / "data", args=("--config", str(config))) as worker,
        httpx.AsyncClient(timeout=30) as http,
    ):
        await worker.deploy(write_function(tmp_path, "sink", SINK, toml=limits), "--no-verify-jwt")
        url = f"{worker.public_url}/functions/v1/sink"
        port = int(worker.public_url.rsplit(":", 1)[1])
        assert (await http.post(url, content=b"warm")).text == "got 4"
        statuses: list[int] = []
        trickling = trio.Semaphore(0)

        async def trickle() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"POST /functions/v1/sink HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nx")
                trickling.release()
                answer = b""
                with trio.fail_after(20):
                    while b"\r\n" not in answer:
                        with trio.move_on_after(0.5):  # pacing of the trickle (a byte each 0.5 s), not sync
                            answer += await stream.receive_some(4096)
                            continue
                        await stream.send_all(b"x")
                statuses.append(int(answer.split(b" ", 2)[1]))

        async with trio.open_nursery() as nursery:
            for _ in range(TRICKLERS):
                nursery.start_soon(trickle)
            for _ in range(TRICKLERS):
                await trickling.acquire()
            r = await http.post(url, content=b"y" * 1000)
            assert (r.status_code, r.text) == (200, "got 1000")
        assert statuses == [408] * TRICKLERS
