"""The temp-dir limit (runtimes/deno/tmpquota.py): what its accounting costs and how far a writer gets past it.

    .venv/bin/python bench/tmp_quota.py [--processes 8] [--seconds 5]

Everything runs through one DenoRuntime, as on a worker node:
- cost: `--processes` warm idle processes (one per version), then the quota thread's own CPU time over
  `--seconds` (from /proc/self/task/<tid>/stat), per process per second and per measure; plus one measure timed
  alone on a real process's dir (walk only, and walk + the /proc/<pid>/fd scan).
- overrun: a function with `tmp_mb = 16` writing 1 MiB chunks as fast as it can (`Deno.writeSync`, no pause), then
  paced at ~50 MB/s: how long from the request to its 546, and how much the dir held when measured over (the
  function's log line).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.deno import DenoRuntime, DenoSettings, open_deno_runtime  # noqa: E402
from mbworker.runtimes.deno.tmpquota import usage  # noqa: E402
from mbworker.runtimes.errors import ResourceLimit  # noqa: E402
from mbworker.runtimes.limits import Limits  # noqa: E402

IDLE = 'Deno.serve(() => new Response("ok"));\n'
FAST = """
Deno.serve(() => {
  const f = Deno.openSync(`${Deno.env.get("TMPDIR")}/big`, { write: true, create: true });
  const chunk = new Uint8Array(1 << 20).fill(7);
  for (let i = 0; i < 1024; i++) f.writeSync(chunk);
  return new Response("wrote 1 GiB");
});
"""
PACED = """
Deno.serve(async () => {
  const f = await Deno.open(`${Deno.env.get("TMPDIR")}/big`, { write: true, create: true });
  const chunk = new Uint8Array(256 * 1024).fill(7);
  for (let i = 0; i < 1024; i++) { await f.write(chunk); await new Promise((r) => setTimeout(r, 5)); }
  return new Response("wrote 256 MiB");
});
"""


def make_fn(work: Path, slug: str, source: str, version: int = 1, **limits: object) -> FunctionVersion:
    bundle = work / slug
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "index.ts").write_text(source)
    return FunctionVersion(slug, version, "deno", bundle, "index.ts", limits=Limits.model_validate(limits))


async def call(rt: DenoRuntime, fn: FunctionVersion) -> int:
    try:
        async with rt.invoke(fn, Invocation("GET", f"/{fn.slug}", [], empty_body(), "bench")) as result:
            async for _ in result.body:
                pass
            return result.status
    except ResourceLimit as exc:
        return exc.status


def thread_cpu_ms(name: str) -> float:
    tid = next(t.native_id for t in threading.enumerate() if t.name == name)
    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def main(processes: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        lines: list[str] = []
        settings = DenoSettings(scratch_dir=work / "scratch")
        async with open_deno_runtime(settings, on_log=lambda fn, e, s, line: lines.append(line)) as rt:
            idle = [make_fn(work, "idle", IDLE, version=v + 1) for v in range(processes)]
            for fn in idle:
                assert await call(rt, fn) == 200
            quota = rt._shared.tmp_quota
            procs = [p for pool in rt._pools.values() for p in pool.processes]
            measures0, cpu0 = quota.measures, thread_cpu_ms("mbworker-tmp-quota")
            await trio.sleep(seconds)
            measures, cpu = quota.measures - measures0, thread_cpu_ms("mbworker-tmp-quota") - cpu0
            print(f"quota thread, {len(procs)} idle processes, {seconds:g} s: {cpu:.0f} ms CPU, {measures} measures")
            print(f"  {cpu / len(procs) / seconds:.2f} ms CPU per process per second, {cpu / measures * 1000:.0f} µs "
                  "per measure (thread CPU / measures)")  # fmt: skip
            p = procs[0]
            for label, pid in (("walk", 0), ("walk + fd scan", p.pid)):
                n = 2000
                t0 = time.perf_counter()
                for _ in range(n):
                    usage(str(p.tmp), pid)
                print(f"  one measure alone, {label}: {(time.perf_counter() - t0) / n * 1e6:.0f} µs (wall)")

            for slug, source in (("fast", FAST), ("paced", PACED)):
                fn = make_fn(work, slug, source, tmp_mb=16, cpu_time_ms=60_000)
                await rt.warm(fn)  # boot outside the measure
                lines.clear()
                t0 = time.perf_counter()
                status = await call(rt, fn)
                took = time.perf_counter() - t0
                used = next((m.group(1) for m in map(re.compile(r"uses ([\d.]+) MiB").search, lines) if m), "?")
                print(f"{slug} writer, tmp_mb = 16: {status} after {took * 1000:.0f} ms "
                      f"measured at {used} MiB")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    trio.run(main, args.processes, args.seconds)
