"""WasmRuntime against real wasmtime: WAGI round trips, the error contract, limits, isolation, the module cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body
from mbworker.runtimes.errors import BootError, InvalidResponse, ResourceLimit, VersionRetired, WorkerError
from mbworker.runtimes.limits import Limits
from mbworker.runtimes.wasm import ModuleRejected, WasmRuntime, WasmSettings, compile_module, open_wasm_runtime
from tests.runtimes import wasm_modules as wm

REPO = Path(__file__).resolve().parents[2]


def version(tmp_path: Path, wat: str, *, slug: str = "fn", v: int = 1, **limits: object) -> FunctionVersion:
    bundle = tmp_path / f"{slug}-{v}"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "fn.wat").write_text(wat)
    return FunctionVersion(
        slug=slug,
        version=v,
        runtime="wasm",
        bundle_dir=bundle,
        entrypoint="fn.wat",
        env={"GREETING": "hello", "REQUEST_METHOD": "overridden"},
        limits=Limits(**limits),
    )


async def body_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def request(target: str = "/fn", *, method: str = "GET", body: tuple[bytes, ...] = (), **kw: object) -> Invocation:
    headers = kw.pop("headers", [(b"host", b"example.test:8443")])
    return Invocation(
        method=method,
        target=target,
        headers=headers,  # type: ignore[arg-type]
        body=body_of(*body) if body else empty_body(),
        request_id="req-1",
    )


async def call(
    rt: WasmRuntime, fn: FunctionVersion, inv: Invocation | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    async with rt.invoke(fn, inv or request()) as result:
        body = b"".join([chunk async for chunk in result.body])
        return result.status, dict(result.headers), body


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[WasmRuntime]:
    async with open_wasm_runtime(WasmSettings(cache_dir=tmp_path / "cache")) as rt:
        yield rt


async def test_echo_round_trip_env_argv_body(tmp_path: Path) -> None:
    logs: list[tuple[str, str, str, str]] = []
    settings = WasmSettings(cache_dir=tmp_path / "cache")
    async with open_wasm_runtime(
        settings, on_log=lambda fn, eid, stream, line: logs.append((fn.key, eid, stream, line))
    ) as rt:
        fn = version(tmp_path, wm.DUMP)
        inv = request(
            "/fn/items/42?a=1&b=x%20y&flag",
            method="POST",
            body=(b"hello ", b"wasm"),
            headers=[
                (b"host", b"example.test:8443"),
                (b"content-type", b"application/json"),
                (b"x-multi", b"one"),
                (b"x-multi", b"two"),
                (b"x-forwarded-for", b"203.0.113.9, 10.0.0.1"),
            ],
        )
        inv.url = "https://example.test:8443/functions/v1/fn/items/42?a=1&b=x%20y&flag"
        status, headers, body = await call(rt, fn, inv)
    assert status == 201
    assert headers[b"content-type"] == b"text/plain"
    text, _, stdin = body.partition(b"body:")
    assert stdin == b"hello wasm"
    lines = text.decode().splitlines()
    env = dict(line[4:].split("=", 1) for line in lines if line.startswith("env:"))
    argv = [line[4:] for line in lines if line.startswith("arg:")]
    assert env["REQUEST_METHOD"] == "POST"  # CGI variables override function env
    assert env["GREETING"] == "hello"
    assert env["SCRIPT_NAME"] == "/functions/v1/fn"
    assert env["PATH_INFO"] == "/items/42"
    assert env["PATH_TRANSLATED"] == "/items/42"
    assert env["QUERY_STRING"] == "a=1&b=x%20y&flag"
    assert env["CONTENT_TYPE"] == "application/json"
    assert env["CONTENT_LENGTH"] == "10"
    assert env["SERVER_NAME"] == "example.test"
    assert env["SERVER_PORT"] == "8443"
    assert env["SERVER_SOFTWARE"] == "WAGI/1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["REMOTE_ADDR"] == "203.0.113.9"
    assert env["X_MATCHED_ROUTE"] == "/functions/v1/fn/..."
    assert env["X_FULL_URL"] == inv.url
    assert env["HTTP_X_MULTI"] == "one, two"
    assert env["HTTP_HOST"] == "example.test:8443"
    assert "PATH" not in env  # nothing inherited from the host
    assert "HOME" not in env
    assert argv == ["/functions/v1/fn/items/42", "a=1", "b=x y", "flag="]
    assert logs == [
        ("fn@1", "req-1", "stderr", "log: one"),
        ("fn@1", "req-1", "stderr", "log: two"),
        ("fn@1", "req-1", "stderr", ""),
    ]


@pytest.mark.parametrize(
    ("output", "status", "headers"),
    [
        (b"Location: /elsewhere\n\n", 302, {b"location": b"/elsewhere"}),
        (b"Status: 301 Moved\r\nLocation: /x\r\n\r\n", 301, {b"location": b"/x"}),
        (b"Status: 404 Not Found\nContent-Type: text/plain\nX-Extra: yes\n\nnope", 404, {b"x-extra": b"yes"}),
    ],
)
async def test_cgi_status_and_location(
    runtime: WasmRuntime, tmp_path: Path, output: bytes, status: int, headers: dict[bytes, bytes]
) -> None:
    got_status, got_headers, _ = await call(runtime, version(tmp_path, wm.printing(output)))
    assert got_status == status
    for name, value in headers.items():
        assert got_headers[name] == value
    assert b"status" not in got_headers


async def test_proc_exit_zero_is_success(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.printing(b"Content-Type: text/plain\n\nbye", exit_code=0))
    assert await call(runtime, fn) == (200, {b"content-type": b"text/plain"}, b"bye")


async def test_nonzero_exit_is_worker_error(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.printing(b"Content-Type: text/plain\n\nbye", exit_code=3))
    with pytest.raises(WorkerError, match="exit status 3"):
        await call(runtime, fn)


@pytest.mark.parametrize("output", [b"", b"no headers at all", b"Bad Header Line\n\nbody", b"X-Only: 1\n\nbody"])
async def test_malformed_output_is_worker_error(runtime: WasmRuntime, tmp_path: Path, output: bytes) -> None:
    with pytest.raises(WorkerError, match="malformed CGI output") as info:
        await call(runtime, version(tmp_path, wm.printing(output)))
    assert info.value.status == 500


async def test_status_out_of_range_is_invalid_response(runtime: WasmRuntime, tmp_path: Path) -> None:
    with pytest.raises(InvalidResponse):
        await call(runtime, version(tmp_path, wm.printing(b"Status: 700\nContent-Type: text/plain\n\n")))


async def test_trap_is_worker_error(runtime: WasmRuntime, tmp_path: Path) -> None:
    with pytest.raises(WorkerError, match="trapped") as info:
        await call(runtime, version(tmp_path, wm.TRAP))
    assert info.value.status == 500
    assert not isinstance(info.value, ResourceLimit)


async def test_infinite_loop_hits_cpu_limit_while_others_proceed(runtime: WasmRuntime, tmp_path: Path) -> None:
    looping = version(tmp_path, wm.INFINITE_LOOP, slug="loop", cpu_time_ms=800)
    echo = version(tmp_path, wm.COUNTER, slug="counter")
    await runtime.warm(echo)
    await runtime.warm(looping)
    outcome: list[BaseException] = []
    loop_started = trio.Event()

    async def run_loop() -> None:
        loop_started.set()
        try:
            await call(runtime, looping)
        except ResourceLimit as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_loop)
        await loop_started.wait()
        await trio.testing.wait_all_tasks_blocked()  # the loop task now waits for its thread
        assert runtime.statistics().processes == 1
        for _ in range(5):
            assert (await call(runtime, echo))[2] == b"1 1"
        assert not outcome  # served while the loop still ran
    assert len(outcome) == 1
    exc = outcome[0]
    assert isinstance(exc, ResourceLimit)
    assert (exc.status, exc.kind) == (546, "cpu")
    assert runtime.statistics().limit_kills == {"cpu": 1}


async def test_memory_grow_past_limit_then_trap_is_546(runtime: WasmRuntime, tmp_path: Path) -> None:
    with pytest.raises(ResourceLimit) as info:
        await call(runtime, version(tmp_path, wm.GROW_UNTIL_TRAP, memory_mb=16))
    assert info.value.kind == "memory"


async def test_failed_grow_is_visible_to_the_module(runtime: WasmRuntime, tmp_path: Path) -> None:
    small = version(tmp_path, wm.GROW_AND_REPORT, slug="small", memory_mb=16)
    large = version(tmp_path, wm.GROW_AND_REPORT, slug="large", memory_mb=128)
    assert (await call(runtime, small))[2] == b"grow failed"
    assert (await call(runtime, large))[2] == b"grew ok"


async def test_fuel_exhaustion_is_546(runtime: WasmRuntime, tmp_path: Path) -> None:
    with pytest.raises(ResourceLimit) as info:
        await call(runtime, version(tmp_path, wm.INFINITE_LOOP, fuel=100_000))
    assert info.value.kind == "fuel"


async def test_fuel_is_enough_for_small_work(runtime: WasmRuntime, tmp_path: Path) -> None:
    assert (await call(runtime, version(tmp_path, wm.COUNTER, fuel=100_000)))[0] == 200


async def test_foreign_import_is_boot_error(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.FOREIGN_IMPORT)
    with pytest.raises(BootError, match="env::magic") as info:
        await runtime.warm(fn)
    assert info.value.status == 503
    with pytest.raises(BootError):
        await call(runtime, fn)
    assert runtime.statistics().boot_failures == 1  # the failure is remembered, not retried per request


async def test_missing_entrypoint_file_is_boot_error(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.TRAP)
    (fn.bundle_dir / "fn.wat").unlink()
    with pytest.raises(BootError, match="Cannot read"):
        await runtime.warm(fn)


@pytest.mark.parametrize(
    ("source", "is_wat", "reason"),
    [
        (b"(module", True, "invalid WAT"),
        (b"\x00asm\x01\x00\x00\x00\xff\xff", False, "invalid Wasm"),
        (b"not wasm at all", False, "invalid Wasm"),
        (wm.NO_START.encode(), True, "_start"),
    ],
)
def test_compile_module_rejects(source: bytes, is_wat: bool, reason: str) -> None:
    with pytest.raises(ModuleRejected, match=reason) as info:
        compile_module(source, is_wat)
    assert 400 <= info.value.status < 500


def test_compile_module_returns_wasm() -> None:
    wasm = compile_module(wm.COUNTER.encode(), True)
    assert wasm.startswith(b"\x00asm")
    assert compile_module(wasm, False) == wasm


async def test_output_over_limit_is_500_with_message(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.WRITE_FOREVER, max_response_bytes=1000, cpu_time_ms=300)
    with pytest.raises(WorkerError, match="exceeds the limit of 1000 bytes") as info:
        await call(runtime, fn)
    assert info.value.status == 500


async def test_body_over_limit_after_parse(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.printing(b"Content-Type: text/plain\n\n" + b"x" * 2000), max_response_bytes=1000)
    with pytest.raises(WorkerError, match="exceeds the limit"):
        await call(runtime, fn)


async def test_requests_are_isolated(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.COUNTER)
    results: list[bytes] = []

    async def one() -> None:
        results.append((await call(runtime, fn))[2])

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    results.append((await call(runtime, fn))[2])
    assert results == [b"1 1"] * 9


async def test_sleep_is_refused_not_blocking(runtime: WasmRuntime, tmp_path: Path) -> None:
    assert (await call(runtime, version(tmp_path, wm.SLEEP)))[2] == b"52"  # ENOSYS


async def test_compiled_module_cache_is_reused_across_runtimes(tmp_path: Path) -> None:
    settings = WasmSettings(cache_dir=tmp_path / "cache")
    fn = version(tmp_path, wm.COUNTER)
    async with open_wasm_runtime(settings) as rt:
        await rt.warm(fn)
        stats = rt.statistics()
        assert (stats.compiles, stats.cache_loads, stats.versions) == (1, 0, 1)
    assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 1
    async with open_wasm_runtime(settings) as rt:
        assert (await call(rt, fn))[2] == b"1 1"
        stats = rt.statistics()
        assert (stats.compiles, stats.cache_loads) == (0, 1)


async def test_corrupt_cache_file_is_recompiled(tmp_path: Path) -> None:
    settings = WasmSettings(cache_dir=tmp_path / "cache")
    fn = version(tmp_path, wm.COUNTER)
    async with open_wasm_runtime(settings) as rt:
        await rt.warm(fn)
    (cached,) = (tmp_path / "cache").glob("*.cwasm")
    cached.write_bytes(b"garbage")
    async with open_wasm_runtime(settings) as rt:
        assert (await call(rt, fn))[2] == b"1 1"
        assert rt.statistics().compiles == 1


async def test_retire_forgets_the_version(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.COUNTER)
    await runtime.warm(fn)
    assert runtime.statistics().versions == 1
    await runtime.retire(fn)
    assert runtime.statistics().versions == 0
    assert (await call(runtime, fn))[2] == b"1 1"  # boots again (from the disk cache)
    assert runtime.statistics().cache_loads == 1


def test_clean_interpreter_exit() -> None:
    """Regression: wasmtime-py's output callbacks register a Python finalizer that a wasmtime thread runs after the
    Store is gone; at interpreter exit that made Rust abort with "panic in a function that cannot unwind"."""
    script = textwrap.dedent(
        """
        from mbworker.runtimes.wasm.sandbox import CallLimits, Sandbox
        from tests.runtimes import wasm_modules as wm

        sandbox = Sandbox(cache_dir=None, fuel_metering=True, epoch_tick_ms=10, max_table_elements=1000)
        prepared = sandbox.prepare(wm.DUMP.encode(), is_wat=True)
        limits = CallLimits(16 << 20, 100, None, 1 << 20, 1 << 16)
        for _ in range(1000):
            assert sandbox.call(prepared, env=[], argv=["/"], stdin=b"x", limits=limits).failure is None
        prepared.close()
        sandbox.close()
        print("done")  # and exit at once, while wasmtime may still be dropping the last Stores
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "panic" not in proc.stderr


async def test_calls_leave_no_python_finalizers(runtime: WasmRuntime, tmp_path: Path) -> None:
    """The deterministic half of the exit regression: nothing of ours is left for wasmtime to call back into."""
    from wasmtime._wasi import CUSTOM_OUTPUTS

    from mbworker.runtimes.wasm import sandbox

    await call(runtime, version(tmp_path, wm.DUMP))
    assert not CUSTOM_OUTPUTS.handles
    assert not sandbox._CONTROLS


async def test_cancelled_request_stops_its_thread(tmp_path: Path) -> None:
    async with open_wasm_runtime(WasmSettings(threads=1)) as rt:
        looping = version(tmp_path, wm.INFINITE_LOOP, slug="loop", cpu_time_ms=600_000, request_idle_timeout_s=600)
        counter = version(tmp_path, wm.COUNTER, slug="counter", queue_timeout_s=30)
        await rt.warm(looping)
        await rt.warm(counter)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, rt, looping)
            await trio.testing.wait_all_tasks_blocked()
            assert rt.statistics().processes == 1
            nursery.cancel_scope.cancel()
        # One thread only: this call gets it once the cancelled loop has really stopped (else WorkerBusy in 30 s).
        assert (await call(rt, counter))[2] == b"1 1"
        assert rt.statistics().processes == 0


async def test_initial_memory_over_the_cap_fails_to_boot(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.module("", memory_pages=512), memory_mb=16)  # 32 MiB initial memory
    with pytest.raises(BootError, match="instantiate"):
        await runtime.warm(fn)


async def test_start_section_loop_fails_to_boot_at_the_deadline(runtime: WasmRuntime, tmp_path: Path) -> None:
    looping_start = '(module (func $init (loop $l (br $l))) (start $init) (func (export "_start")))'
    with pytest.raises(BootError, match="instantiate"):
        await runtime.warm(version(tmp_path, looping_start, cpu_time_ms=50))


async def test_retire_waits_for_a_cancelled_call_still_in_its_thread(tmp_path: Path) -> None:
    async with open_wasm_runtime(WasmSettings(threads=1)) as rt:
        looping = version(tmp_path, wm.INFINITE_LOOP, slug="loop", cpu_time_ms=600_000, request_idle_timeout_s=600)
        counter = version(tmp_path, wm.COUNTER, slug="counter", queue_timeout_s=30)
        await rt.warm(looping)
        prepared = rt._versions[looping.key].prepared
        assert prepared is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, rt, looping)
            await trio.testing.wait_all_tasks_blocked()
            await rt.retire(looping)
            prepared.pre.ptr()  # still open: its call is running
            nursery.cancel_scope.cancel()
        assert (await call(rt, counter))[2] == b"1 1"  # the only thread is free again: the loop has ended
        with pytest.raises(ValueError, match="closed"):
            prepared.pre.ptr()


async def test_a_version_retired_while_it_compiles_is_not_prepared_again(tmp_path: Path) -> None:
    """A request whose version is retired while it waits for its compile gets VersionRetired (for the caller to
    run it on the live version), and the runtime keeps nothing of that version."""
    async with open_wasm_runtime(WasmSettings(threads=1)) as rt:
        looping = version(tmp_path, wm.INFINITE_LOOP, slug="loop", cpu_time_ms=600_000, request_idle_timeout_s=600)
        counter = version(tmp_path, wm.COUNTER, slug="counter", queue_timeout_s=30)
        await rt.warm(looping)
        sent_back: list[VersionRetired] = []

        async def late() -> None:
            try:
                await call(rt, counter)
            except VersionRetired as exc:
                sent_back.append(exc)

        async with trio.open_nursery() as waiting, trio.open_nursery() as busy:
            busy.start_soon(call, rt, looping)  # holds the only thread
            await trio.testing.wait_all_tasks_blocked()
            waiting.start_soon(late)
            await trio.testing.wait_all_tasks_blocked()  # its compile waits for the thread
            await rt.retire(counter)
            busy.cancel_scope.cancel()
        assert len(sent_back) == 1
        assert rt.statistics().versions == 1  # the loop's only
        assert rt.statistics().cold_starts == 2  # the loop's and the one compile of `counter`, not a second


async def test_slow_version_is_not_waited_for_synchronously(tmp_path: Path) -> None:
    """With the opt-in synchronous wait: a call that uses more than half of it in CPU makes the next calls of
    that version let the loop run meanwhile; a quick version keeps the synchronous wait."""
    from mbworker.runtimes.wasm.runtime import ASYNC_STREAK

    busy = wm.module(
        """(local $i i32)
        (loop $l
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 20000000))))
        (drop (call $write (i32.const 1) (i32.const 512) (i32.const 26)))""",
        data='  (data (i32.const 512) "Content-Type: text/plain\\n\\n")',
    )
    slow, quick = version(tmp_path, busy, slug="slow"), version(tmp_path, wm.printing(b"Content-Type: a/b\n\nok"))
    async with open_wasm_runtime(WasmSettings(cache_dir=tmp_path / "cache", sync_wait_us=5000)) as runtime:
        assert (await call(runtime, slow))[0] == 200
        assert (await call(runtime, quick))[0] == 200
        assert runtime._versions[slow.key].async_calls == ASYNC_STREAK
        assert runtime._versions[quick.key].async_calls == 0


async def test_calls_are_not_waited_for_synchronously_by_default(runtime: WasmRuntime, tmp_path: Path) -> None:
    """The event loop never blocks on a call unless the operator opts in (WasmSettings.sync_wait_us)."""
    assert WasmSettings().sync_wait_us == 0
    quick = version(tmp_path, wm.printing(b"Content-Type: a/b\n\nok"))
    assert (await call(runtime, quick))[0] == 200
    assert runtime._sync_wait_s == 0
