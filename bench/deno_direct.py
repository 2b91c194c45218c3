"""Deno runtime: a function served by `Deno.serve` directly vs through DenoRuntime.invoke (frames, no HTTP).

    .venv/bin/python bench/deno_direct.py [--seconds 5] [--clients 16] [--cold 5]

Same function everywhere: `() => new Response("ok")`.

- Reference, "Deno.serve direct": one `deno run` process serving HTTP on a loopback port, driven by wrk (or
  bench/_load.py's Python client when wrk is missing) over keep-alive connections.
- "runtime.invoke": one warm process (max_processes=1) driven from this Python process by `--clients` trio
  tasks calling `DenoRuntime.invoke` back to back (no HTTP front door). Also reports this Python process's CPU
  per request: the daemon-side cost of forwarding one request (framing, pipes, trio), the figure DESIGN.md
  budgets at ~50–65 µs.
- Cold start: the first invoke of a never-run version (spawn, bootstrap, import, first response) vs a bare
  `deno run` of the direct server from spawn to its first HTTP response with an empty DENO_DIR. A version's
  DENO_DIR starts as a copy of the runtime's template, where the bootstrap was compiled when the runtime opened.

Ratios are from one run on one machine; absolute numbers drift, ratios hold better.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import trio  # noqa: E402
from _load import LoadResult, cpu_seconds, free_port, run_load  # noqa: E402

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime  # noqa: E402
from mbworker.runtimes.limits import Limits  # noqa: E402

FUNCTION = 'Deno.serve(() => new Response("ok"));\n'
DIRECT = 'Deno.serve({ hostname: "127.0.0.1", port: Number(Deno.args[0]), onListen() {} }, () => new Response("ok"));\n'


def deno_bin() -> str:
    return DenoSettings.model_validate({}).deno_bin


def spawn_direct(work: Path, port: int, deno_dir: Path) -> subprocess.Popen[bytes]:
    env = {"DENO_DIR": str(deno_dir), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    return subprocess.Popen(
        [deno_bin(), "run", "--no-remote", "--allow-net", str(work / "direct.ts"), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )


def first_response(port: int, deadline: float) -> None:
    """Poll until the server answers one GET (bench only: nothing to wait on but the socket)."""
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.0005)
    raise TimeoutError("direct server did not answer")


def bench_direct(work: Path, seconds: float, clients: int) -> tuple[LoadResult, float]:
    port = free_port()
    proc = spawn_direct(work, port, work / "deno-direct")
    try:
        first_response(port, time.perf_counter() + 10)
        cpu0 = cpu_seconds(proc.pid)
        res = run_load("127.0.0.1", port, duration=seconds, connections=clients)
        cpu_per_req = (cpu_seconds(proc.pid) - cpu0) / max(1, res.requests)
    finally:
        proc.kill()
        proc.wait()
    return res, cpu_per_req


def time_cold_direct(work: Path, i: int, timeout: float) -> float:
    """Seconds from spawning a bare `deno run` of work/direct.ts (fresh DENO_DIR work/deno-cold-<i>) to its first
    HTTP response; TimeoutError after `timeout` s. The process is killed either way."""
    port = free_port()
    t0 = time.perf_counter()
    proc = spawn_direct(work, port, work / f"deno-cold-{i}")
    try:
        first_response(port, t0 + timeout)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def fn_version(work: Path, version: int) -> FunctionVersion:
    return FunctionVersion(
        "bench",
        version,
        "deno",
        work / "fn",
        "index.ts",
        env={"SUPABASE_URL": "http://localhost"},
        limits=Limits(max_processes=1, max_concurrency=256),
    )


async def bench_invoke(work: Path, seconds: float, clients: int, cold_rounds: int) -> dict[str, float]:
    settings = DenoSettings(deno_bin=deno_bin(), scratch_dir=work / "scratch")
    async with open_deno_runtime(settings, on_log=lambda *a: None) as rt:
        # cold starts: a never-run version each round (its own DENO_DIR, seeded from the runtime's template)
        cold = []
        for i in range(cold_rounds):
            fn = fn_version(work, 100 + i)
            t0 = time.perf_counter()
            async with rt.invoke(fn, Invocation("GET", "/bench", [], empty_body(), "c")) as r:
                assert [c async for c in r.body] == [b"ok"]
            cold.append(time.perf_counter() - t0)
            await rt.retire(fn)

        fn = fn_version(work, 1)
        await rt.warm(fn)
        pid = next(p.pid for pool in rt._pools.values() for p in pool.processes)
        latencies: list[float] = []
        stop_at = trio.current_time() + seconds

        async def client() -> None:
            while trio.current_time() < stop_at:
                t0 = time.perf_counter()
                async with rt.invoke(fn, Invocation("GET", "/bench", [], empty_body(), "r")) as r:
                    async for _ in r.body:
                        pass
                latencies.append(time.perf_counter() - t0)

        py0, deno0, t0 = time.process_time(), cpu_seconds(pid), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
        elapsed = time.perf_counter() - t0
        py_cpu, deno_cpu = time.process_time() - py0, cpu_seconds(pid) - deno0

        seq: list[float] = []  # one client: the added latency of one request
        for _ in range(2000):
            t1 = time.perf_counter()
            async with rt.invoke(fn, Invocation("GET", "/bench", [], empty_body(), "s")) as r:
                async for _ in r.body:
                    pass
            seq.append(time.perf_counter() - t1)
    latencies.sort()
    seq.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1e3,
        "p99_ms": latencies[int(n * 0.99)] * 1e3,
        "py_us": py_cpu / n * 1e6,
        "deno_us": deno_cpu / n * 1e6,
        "seq_p50_ms": seq[len(seq) // 2] * 1e3,
        "cold_ms": statistics.median(cold) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cold", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbw-bench-") as tmp:
        work = Path(tmp)
        (work / "fn").mkdir()
        (work / "fn" / "index.ts").write_text(FUNCTION)
        (work / "direct.ts").write_text(DIRECT)
        direct, direct_cpu = bench_direct(work, args.seconds, args.clients)
        cold_bare = statistics.median(time_cold_direct(work, i, 10) for i in range(args.cold)) * 1e3
        inv = trio.run(bench_invoke, work, args.seconds, args.clients, args.cold)

    d = direct
    print(f"Deno runtime bench — {os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:g} s, tool={d.tool}")
    print(f"{'':28}{'Deno.serve direct':>20}{'runtime.invoke':>18}{'ratio':>9}")
    rows = [
        ("req/s", d.rps, inv["rps"]),
        ("p50 latency (ms)", d.p50_ms, inv["p50_ms"]),
        ("p99 latency (ms)", d.p99_ms, inv["p99_ms"]),
        ("deno CPU / request (µs)", direct_cpu * 1e6, inv["deno_us"]),
        ("cold start, median (ms)", cold_bare, inv["cold_ms"]),
    ]
    for name, a, b in rows:
        print(f"{name:28}{a:>20.2f}{b:>18.2f}{b / a:>8.2f}x")
    print(f"{'Python CPU / request (µs)':28}{'-':>20}{inv['py_us']:>18.1f}   (daemon side of invoke)")
    print(f"{'1 client, p50 (ms)':28}{'-':>20}{inv['seq_p50_ms']:>18.3f}")


if __name__ == "__main__":
    main()
