"""Wasm runtime, in-process: per-request cost through WasmRuntime.invoke vs a bare wasmtime-py loop.

    .venv/bin/python bench/wasm.py [--requests 2000] [--clients 8] [--rounds 5]

The end-to-end figure of issue 3 (through a real `mbworker serve`, HTTP and all) is bench/wasm_e2e.py; this one
splits the cost of the runtime itself.

Same WAGI module everywhere (a hello module: reads its environment size, writes a CGI response).

- Reference, "bare loop": a plain Python loop on the trio-free main thread doing what any wasmtime-py host must do
  per request: a fresh Store, a WasiConfig (the same CGI env and argv, stdout captured with `stdout_custom`),
  instantiate through an InstancePre, call `_start`, close the Store. Same engine flags (epoch + fuel).
- "Sandbox.call loop": our own per-call code (straight on the C API, runtimes/wasm/capi.py: stdin from bytes, a
  shadowed `fd_write` for output capture, the epoch kill switch, bounded buffers, the pooling allocator as the
  runtime configures it) in the same plain loop: the part of the difference that is not trio + threads.
- WasmRuntime.invoke with `threads` = 1, 2, 4: one client (sequential: the added per-call cost) and `--clients`
  concurrent clients (throughput; shows whether more threads help on this machine).
- Also: compiling the module vs loading it from the serialized cache (what `warm` pays on a cold/warm disk).

Ratios are from one run on one machine; absolute numbers drift, ratios hold better.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
import wasmtime  # noqa: E402

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.wasm import (  # noqa: E402
    WasmSettings,
    cgi,
    open_wasm_runtime,
)
from mbworker.runtimes.wasm.sandbox import CallLimits, Sandbox  # noqa: E402

HELLO = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\\n\\nhello from wasm\\n")
  (func (export "_start")
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 42))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
"""

HEADERS = [
    (b"host", b"worker.test"),
    (b"user-agent", b"bench/1"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"203.0.113.9"),
]


def bare_loop(n: int, wat: str = HELLO, headers: list[tuple[bytes, bytes]] = HEADERS) -> tuple[float, float]:
    """Wall and CPU seconds for `n` bare calls of `wat` with the CGI env/argv of a GET /hello with `headers`."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module(engine, wasmtime.wat2wasm(wat))
    pre = linker.instantiate_pre(module)
    request = cgi.build_request(method="GET", target="/hello", headers=headers, body_length=0, url="", function_env={})
    outputs: list[bytes] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1000)
        store.set_fuel(10**12)
        wasi = wasmtime.WasiConfig()
        wasi.env = request.env
        wasi.argv = request.argv
        wasi.stdout_custom = outputs.append
        store.set_wasi(wasi)
        instance = pre.instantiate(store)
        start_fn = instance.exports(store)["_start"]
        assert isinstance(start_fn, wasmtime.Func)
        start_fn(store)
        store.close()
        cgi.parse_response(outputs.pop())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    pre.close()
    module.close()
    linker.close()
    engine.close()
    time.sleep(0.2)  # let wasmtime drop the last stdout streams (their finalizers call into Python)
    return elapsed, cpu


def sandbox_loop(bundle: Path, n: int) -> tuple[float, float]:
    """Our per-call code (runtimes.wasm.sandbox.Sandbox.call) in a plain loop: no trio, no thread hand-off."""
    sandbox = Sandbox(cache_dir=None, fuel_metering=True, epoch_tick_ms=10, max_table_elements=200_000, pool_slots=8)
    prepared = sandbox.prepare((bundle / "hello.wat").read_bytes(), is_wat=True)
    request = cgi.build_request(method="GET", target="/hello", headers=HEADERS, body_length=0, url="", function_env={})
    limits = CallLimits(256 << 20, 202, None, 64 << 20, 64 << 10)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        outcome = sandbox.call(prepared, env=request.env, argv=request.argv, stdin=b"", limits=limits)
        cgi.parse_response(outcome.stdout)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    prepared.close()
    sandbox.close()
    return elapsed, cpu


async def through_runtime(bundle: Path, n: int, *, threads: int, clients: int) -> tuple[float, float]:
    fn = FunctionVersion(slug="hello", version=1, runtime="wasm", bundle_dir=bundle, entrypoint="hello.wat")
    async with open_wasm_runtime(WasmSettings(threads=threads)) as rt:
        await rt.warm(fn)
        remaining = n

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                inv = Invocation(method="GET", target="/hello", headers=HEADERS, body=empty_body(), request_id="r")
                async with rt.invoke(fn, inv) as result:
                    assert result.status == 200
                    async for _ in result.body:
                        pass

        start, cpu_start = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
        return time.perf_counter() - start, time.process_time() - cpu_start


def compile_vs_cache(bundle: Path) -> tuple[float, float]:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    wasm = (ROOT / "examples" / "functions" / "wasm-echo" / "echo.wat").read_text()
    binary = wasmtime.wat2wasm(wasm)
    t0 = time.perf_counter()
    module = wasmtime.Module(engine, binary)
    t1 = time.perf_counter()
    path = bundle / "echo.cwasm"
    path.write_bytes(module.serialize())
    t2 = time.perf_counter()
    loaded = wasmtime.Module.deserialize_file(engine, str(path))
    t3 = time.perf_counter()
    loaded.close()
    module.close()
    engine.close()
    return t1 - t0, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.requests

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp)
        (bundle / "hello.wat").write_text(HELLO)
        bare_loop(min(200, n))  # warm-up
        configs: list[tuple[str, int | str, int]] = [("bare wasmtime-py loop", "-", 1), ("Sandbox.call loop", "-", 1)]
        configs += [("WasmRuntime.invoke", t, c) for t in (1, 2, 4) for c in (1, args.clients)]
        best: dict[int, tuple[float, float]] = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: other load on the machine only adds time
            for i, (_name, threads, clients) in enumerate(configs):
                if _name == "Sandbox.call loop":
                    timing = sandbox_loop(bundle, n)
                elif isinstance(threads, str):
                    timing = bare_loop(n)
                else:
                    timing = trio.run(lambda t=threads, c=clients: through_runtime(bundle, n, threads=t, clients=c))
                old = best.get(i, (float("inf"), float("inf")))
                best[i] = (min(old[0], timing[0]), min(old[1], timing[1]))
        rows = [(*config, best[i]) for i, config in enumerate(configs)]
        compile_s, load_s = compile_vs_cache(bundle)

    bare_wall, bare_cpu = rows[0][3]
    print(
        f"{n} requests per row, best of {args.rounds} interleaved rounds; module: WAGI hello (fresh Store per request)"
    )
    print("CPU = process CPU time (all threads) per request: less sensitive than wall time to other load\n")
    header = f"{'path':<24} {'threads':>7} {'clients':>7} {'req/s':>7} {'µs/req':>7} {'× bare':>7}"
    print(f"{header} {'CPU µs/req':>10} {'× bare':>7}")
    for name, threads, clients, (wall, cpu) in rows:
        print(
            f"{name:<24} {threads!s:>7} {clients:>7} {n / wall:>7.0f} {wall / n * 1e6:>7.0f} {wall / bare_wall:>7.2f} "
            f"{cpu / n * 1e6:>10.0f} {cpu / bare_cpu:>7.2f}"
        )
    print(
        f"\nexamples/functions/wasm-echo: compile {compile_s * 1000:.1f} ms, load from the serialized cache "
        f"{load_s * 1000:.2f} ms ({compile_s / load_s:.0f}× cheaper)"
    )


if __name__ == "__main__":
    main()
