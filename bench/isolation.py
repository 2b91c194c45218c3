"""Isolation: a light function's latency alone vs while a hog function burns CPU or memory next to it.

    .venv/bin/python bench/isolation.py [--seconds 4] [--clients 4] [--hogs 2]

Everything runs through one DenoRuntime (the daemon's runtime, no HTTP front door), as on a worker node:
- "light": `() => new Response("ok")`, one warm process, `--clients` trio tasks invoking it back to back.
- "cpu hog": `--hogs` tasks invoking a function that spins `while (true) {}` until the runtime kills it at its
  cpu_time_ms limit (500 ms); the next invoke boots a fresh process, so boot churn is part of the load.
- "memory hog": `--hogs` tasks invoking a function that allocates until V8's heap cap (memory_mb = 128) or the RSS
  watch kills it.
Reference: the light function alone. The figure is p99 latency under each hog / p99 alone (one run, loopback).
No cgroups: the processes share the machine's cores with the daemon, so the ratio is what the OS scheduler gives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.deno import DenoRuntime, DenoSettings, open_deno_runtime  # noqa: E402
from mbworker.runtimes.errors import FunctionRuntimeError  # noqa: E402
from mbworker.runtimes.limits import Limits  # noqa: E402

LIGHT = 'Deno.serve(() => new Response("ok"));\n'
CPU_HOG = "Deno.serve(() => { while (true) {} });\n"
MEM_HOG = "Deno.serve(() => { const keep = []; while (true) keep.push(new Array(1e5).fill(Math.random())); });\n"


def make_fn(work: Path, slug: str, source: str, **limits: object) -> FunctionVersion:
    bundle = work / slug
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "index.ts").write_text(source)
    return FunctionVersion(slug, 1, "deno", bundle, "index.ts", limits=Limits.model_validate(limits))


def invocation(slug: str) -> Invocation:
    return Invocation("GET", f"/{slug}", [(b"host", b"bench")], empty_body(), "bench")


async def light_load(rt: DenoRuntime, fn: FunctionVersion, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with rt.invoke(fn, invocation(fn.slug)) as result:
                async for _ in result.body:
                    pass
            latencies.append(time.perf_counter() - t0)

    async with trio.open_nursery() as n:
        for _ in range(clients):
            n.start_soon(client)
    return latencies


async def hog_load(rt: DenoRuntime, fn: FunctionVersion, tasks: int, stop: trio.Event, kills: list[int]) -> None:
    async def hog() -> None:
        while not stop.is_set():
            try:
                async with rt.invoke(fn, invocation(fn.slug)) as result:
                    async for _ in result.body:
                        pass
            except FunctionRuntimeError:
                kills[0] += 1  # expected: 546 cpu / memory; the next invoke boots a fresh process

    async with trio.open_nursery() as n:
        for _ in range(tasks):
            n.start_soon(hog)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


async def main(seconds: float, clients: int, hogs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mbw-isolation-") as tmp:
        work = Path(tmp)
        settings = DenoSettings(scratch_dir=work / "scratch")
        light = make_fn(work, "light", LIGHT, max_processes=1)
        cpu = make_fn(work, "cpuhog", CPU_HOG, cpu_time_ms=500, max_processes=hogs, max_concurrency=1)
        mem = make_fn(work, "memhog", MEM_HOG, memory_mb=128, cpu_time_ms=5000, max_processes=hogs, max_concurrency=1)
        rows: list[tuple[str, list[float], int]] = []
        async with open_deno_runtime(settings, on_log=lambda *a: None) as rt:
            await rt.warm(light)
            await light_load(rt, light, clients, min(1.0, seconds))  # warm-up, not measured
            rows.append(("light alone", await light_load(rt, light, clients, seconds), 0))
            for name, hog_fn in (("light + cpu hog", cpu), ("light + memory hog", mem)):
                stop = trio.Event()
                kills = [0]
                async with trio.open_nursery() as n:
                    n.start_soon(hog_load, rt, hog_fn, hogs, stop, kills)
                    await trio.sleep(0.5)  # let the hogs get going
                    lat = await light_load(rt, light, clients, seconds)
                    stop.set()
                    n.cancel_scope.cancel()
                rows.append((name, lat, kills[0]))
                await rt.retire(hog_fn)
    base = pct(rows[0][1], 0.99)
    print(f"cores: {os.cpu_count()}, light clients: {clients}, hog tasks: {hogs}, {seconds:.0f} s per scenario\n")
    print(f"{'scenario':<22}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'p99 ratio':>11}{'hog kills':>11}")
    for name, lat, kills in rows:
        p50 = statistics.median(lat) * 1000
        p99 = pct(lat, 0.99)
        print(f"{name:<22}{len(lat):>10}{p50:>10.2f}{p99:>10.2f}{p99 / base:>10.2f}x{kills:>11}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hogs", type=int, default=2)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.clients, args.hogs)
