"""Errors and limits of the Deno runtime, each with its cause, against real deno processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from mbworker.runtimes.errors import BootError, IdleTimeout, InvalidResponse, ResourceLimit, WorkerBusy, WorkerError
from tests.runtimes.test_deno_support import LogSink, call, call_json, deno_runtime, fed_by, inv, version, write_fn

PID = "Deno.serve(() => new Response(String(Deno.pid)));"


async def test_top_level_throw_is_a_boot_error_with_its_output(tmp_path: Path) -> None:
    logs = LogSink()
    fn = version(write_fn(tmp_path, 'throw new Error("config missing: FOO");'))
    async with deno_runtime(tmp_path, logs) as rt:
        with pytest.raises(BootError) as info:
            await call(rt, fn, "GET", "/fn")
        assert info.value.status == 503
        # callers get a short reason: no error text, stack, source line or path
        assert info.value.message == "Worker failed to boot: the function threw while loading (see its log)"
        assert "config missing: FOO" in info.value.output  # the deployer's detail
        assert any("config missing: FOO" in line for *_, line in logs.lines)  # and the function's log
        # while backing off, the next request fails fast with the same error instead of forking again
        with pytest.raises(BootError, match="threw while loading"):
            await rt.warm(fn)
        stats = rt.statistics()
        assert stats.boot_failures == 1
        assert stats.processes == 0


async def test_top_level_infinite_loop_is_killed_at_the_cpu_limit(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, "while (true) {}\nDeno.serve(() => new Response('x'));"), cpu_time_ms=300)
    async with deno_runtime(tmp_path) as rt:
        with trio.fail_after(60), pytest.raises(BootError) as info:
            await rt.warm(fn)  # the boot timeout (15 s) is not what ends it
    assert "more than 300 ms of CPU while booting" in info.value.message


async def test_a_function_that_registers_no_handler_is_reported_before_the_boot_timeout(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, 'console.log("I forgot Deno.serve");'), boot_timeout_s=60)
    async with deno_runtime(tmp_path) as rt:
        with trio.fail_after(30), pytest.raises(BootError) as info:
            await rt.warm(fn)
    assert "registered no handler" in info.value.message


async def test_work_spinning_after_the_response_is_blamed_not_the_next_request(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/leave-spinning") setTimeout(() => { while (true) {} }, 20);
          return new Response(String(Deno.pid));
        });
    """
    logs = LogSink()
    fn = version(write_fn(tmp_path, src), cpu_time_ms=300, max_processes=1)
    async with deno_runtime(tmp_path, logs) as rt:
        assert (await call(rt, fn, "GET", "/fn/leave-spinning"))[0] == 200
        with trio.fail_after(30):
            await rt.wait_stopped(fn)  # killed with nothing in flight, nobody's request failed
        assert rt.statistics().limit_kills == {"cpu": 1}
        status, _, _ = await call(rt, fn, "GET", "/fn")
        assert status == 200
    assert any("no request in flight" in line for *_, line in logs.lines)


async def test_remote_import_is_a_boot_error_that_says_why(tmp_path: Path) -> None:
    fn = version(
        write_fn(
            tmp_path,
            'import { serve } from "https://deno.land/std@0.168.0/http/server.ts";\nserve(() => new Response("x"));',
        )
    )
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(BootError) as info:
            await rt.warm(fn)
    assert "deno.land" in info.value.output
    assert "no network" in info.value.message


async def test_no_handler_within_boot_timeout(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, 'console.log("I forgot Deno.serve");'), boot_timeout_s=0.5)
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(BootError, match="did not register a handler"):
            await rt.warm(fn)


async def test_handler_throw_is_500_and_the_process_stays_up(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/boom") throw new TypeError("bad input");
          return new Response(String(Deno.pid));
        });
    """
    logs = LogSink()
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path, logs) as rt:
        pid = (await call(rt, fn, "GET", "/fn"))[2]
        with pytest.raises(WorkerError) as info:
            await call(rt, fn, "GET", "/fn/boom")
        assert (info.value.status, info.value.code) == (500, "WORKER_ERROR")
        assert "TypeError: bad input" in info.value.output
        assert (await call(rt, fn, "GET", "/fn"))[2] == pid
    assert any("bad input" in line for *_, line in logs.lines)


async def test_not_a_response_is_invalid_response(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, "Deno.serve(() => ({ status: 200 }) as unknown as Response);"))
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(InvalidResponse) as info:
            await call(rt, fn, "GET", "/fn")
    assert info.value.code == "INVALID_RESPONSE_STATUS_CODE"


async def test_deno_exit_mid_request_then_a_healthy_process(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/exit") Deno.exit(3);
          return new Response(String(Deno.pid));
        });
    """
    fn = version(write_fn(tmp_path, src), max_processes=1)
    async with deno_runtime(tmp_path) as rt:
        first = (await call(rt, fn, "GET", "/fn"))[2]
        with pytest.raises(WorkerError) as info:
            await call(rt, fn, "GET", "/fn/exit")
        assert info.value.status == 500
        second = (await call(rt, fn, "GET", "/fn"))[2]
        assert second != first
        assert rt.statistics().cold_starts == 2


async def test_busy_loop_is_killed_at_the_cpu_limit(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/spin") { while (true) {} }
          return new Response(String(Deno.pid));
        });
    """
    fn = version(write_fn(tmp_path, src), cpu_time_ms=300, max_processes=1)
    async with deno_runtime(tmp_path) as rt:
        with trio.fail_after(30), pytest.raises(ResourceLimit) as info:
            await call(rt, fn, "GET", "/fn/spin")
        assert (info.value.status, info.value.kind) == (546, "cpu")
        assert rt.statistics().limit_kills == {"cpu": 1}
        assert (await call(rt, fn, "GET", "/fn"))[0] == 200


async def test_memory_bomb_is_a_resource_limit(tmp_path: Path) -> None:
    src = """
        const hoard: unknown[] = [];
        Deno.serve(() => {
          while (true) hoard.push(new Array(100_000).fill({ x: Math.random() }));
        });
    """
    fn = version(write_fn(tmp_path, src), memory_mb=32, cpu_time_ms=60_000)
    async with deno_runtime(tmp_path) as rt:
        with trio.fail_after(60), pytest.raises(ResourceLimit) as info:
            await call(rt, fn, "GET", "/fn")
        assert (info.value.status, info.value.kind) == (546, "memory")
        assert rt.statistics().limit_kills == {"memory": 1}


async def test_slow_response_is_an_idle_timeout(tmp_path: Path) -> None:
    src = """
        Deno.serve(async (req) => {
          if (new URL(req.url).pathname === "/fn/slow") await new Promise((r) => setTimeout(r, 60_000));
          return new Response("fast");
        });
    """
    fn = version(write_fn(tmp_path, src), request_idle_timeout_s=0.3, max_processes=1)
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(IdleTimeout) as info:
            await call(rt, fn, "GET", "/fn/slow")
        assert (info.value.status, info.value.code) == (504, "IDLE_TIMEOUT")
        assert (await call(rt, fn, "GET", "/fn"))[2] == b"fast"  # the process was not harmed


async def test_no_free_process_within_queue_timeout_is_busy(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => new Response(req.body));  // the response ends when the request body does
    """
    fn = version(write_fn(tmp_path, src), max_processes=1, max_concurrency=1, queue_timeout_s=0.3)
    hold_send, hold_recv = trio.open_memory_channel[bytes](0)

    async with deno_runtime(tmp_path) as rt:
        await rt.warm(fn)
        async with rt.invoke(fn, inv("POST", "/fn", fed_by(hold_recv))) as first:
            with pytest.raises(WorkerBusy) as info:
                await call(rt, fn, "GET", "/fn")
            assert info.value.status == 503
            await hold_send.send(b"done")
            await hold_send.aclose()
            assert b"".join([c async for c in first.body]) == b"done"
        assert (await call(rt, fn, "POST", "/fn", b"again"))[2] == b"again"


async def test_wall_clock_retires_at_half(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, PID), wall_clock_s=1.0, max_processes=1)
    async with deno_runtime(tmp_path) as rt:
        first = await call_json(rt, fn, "GET", "/fn")
        with trio.fail_after(10):
            await rt.wait_stopped(fn)  # retired at 0.5 s, stopped once idle
        assert rt.statistics().processes == 0
        assert await call_json(rt, fn, "GET", "/fn") != first
