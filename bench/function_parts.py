"""Where the daemon's CPU per function request goes: the front door's layers, added one at a time, in-process.

    .venv/bin/python bench/function_parts.py [--seconds 3] [--rounds 2] [--clients 16]

No HTTP (bench/functions.py measures the whole daemon; bench/front_door.py the HTTP server alone): one warm Deno
process (max_processes=1) serving `new Response("hello")`, driven by `--clients` trio tasks in this process.
Each row adds one layer of what `mbworker serve` does per request and reports this process's CPU per request
(Python plus its syscalls: the framed pipe to Deno), the Deno child's, and req/s, medians over `--rounds`
alternating rounds:

    runtime.invoke     DenoRuntime.invoke alone, the request's own headers only (the DESIGN.md 50–65 µs budget)
    + front door       FunctionsFrontDoor.handle: routing, forwarded headers, Invocation, response shaping
    + result cache     ResultCache lookup, flight (hit-for-miss after the first response), record
    + metrics          observe_request (counter, histogram, status recorder)
    + JWT gate         verify_jwt on (HS256, memoized)

The request the front door sees carries host, user-agent and an x-forwarded-for/proto/host set, as through HTTP.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import jwt  # noqa: E402
import trio  # noqa: E402
from _load import cpu_seconds  # noqa: E402

from mbworker.lib.http.types import EmptyBody, HttpRequest  # noqa: E402
from mbworker.lib.jwt import JwtVerifier  # noqa: E402
from mbworker.runtimes.api import FunctionVersion, Headers, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime  # noqa: E402
from mbworker.runtimes.limits import Limits  # noqa: E402
from mbworker.worker.cache import CacheSettings, ResultCache  # noqa: E402
from mbworker.worker.functions import ActiveFunction, FunctionsFrontDoor, FunctionTable  # noqa: E402
from mbworker.worker.jwt_gate import JwtGate  # noqa: E402
from mbworker.worker.metrics import Metrics  # noqa: E402

FUNCTION = 'Deno.serve(() => new Response("hello", { headers: { "content-type": "text/plain" } }));\n'
SECRET = "bench-secret-" + "x" * 32


class _Sink:
    """A Responder that drops everything (the HTTP server's cost is measured elsewhere)."""

    started = False

    async def send(self, status: int, headers: Headers, body: bytes = b"") -> None:
        return None

    async def start(self, status: int, headers: Headers) -> None:
        return None

    async def write(self, chunk: bytes) -> None:
        return None

    async def end(self) -> None:
        return None


def _request(authorization: bytes | None) -> HttpRequest:
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk")]
    if authorization:
        headers.append((b"authorization", authorization))
    return HttpRequest(
        method="GET",
        target="/functions/v1/hello",
        path="/functions/v1/hello",
        query="",
        headers=headers,
        body=EmptyBody(),
        client=("127.0.0.1", 50000),
    )


async def _run(args: argparse.Namespace, work: Path) -> dict[str, list[tuple[float, float, float]]]:
    fn = FunctionVersion(
        "hello", 1, "deno", work / "fn", "index.ts", limits=Limits(max_processes=1, max_concurrency=256)
    )
    token = jwt.encode({"role": "anon", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    authorization = b"Bearer " + token.encode()
    async with open_deno_runtime(DenoSettings(scratch_dir=work / "scratch"), on_log=lambda *a: None) as rt:
        await rt.warm(fn)
        pid = next(p.pid for pool in rt._pools.values() for p in pool.processes)
        runtimes = {"deno": rt}
        open_table, gated_table = FunctionTable(), FunctionTable()
        open_table.set(ActiveFunction(fn, verify_jwt=False))
        gated_table.set(ActiveFunction(fn, verify_jwt=True))
        gate = JwtGate(JwtVerifier(SECRET))

        def cache() -> ResultCache:
            return ResultCache(CacheSettings())

        doors: dict[str, FunctionsFrontDoor | None] = {
            "runtime.invoke": None,
            "+ front door": FunctionsFrontDoor(open_table, runtimes, gate),
            "+ result cache": FunctionsFrontDoor(open_table, runtimes, gate, cache()),
            "+ metrics": FunctionsFrontDoor(open_table, runtimes, gate, cache(), Metrics(process=False)),
            "+ JWT gate": FunctionsFrontDoor(gated_table, runtimes, gate, cache(), Metrics(process=False)),
        }
        out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in doors}
        for _ in range(args.rounds):
            for name, door in doors.items():
                auth = authorization if name == "+ JWT gate" else None
                served = 0
                stop_at = trio.current_time() + args.seconds

                async def client(
                    door: FunctionsFrontDoor | None = door, auth: bytes | None = auth, stop_at: float = stop_at
                ) -> None:
                    nonlocal served
                    while trio.current_time() < stop_at:
                        if door is None:
                            inv = Invocation("GET", "/hello", [(b"host", b"x")], empty_body(), "r")
                            async with rt.invoke(fn, inv) as result:
                                async for _ in result.body:
                                    pass
                        else:
                            await door.handle(_request(auth), _Sink())
                        served += 1

                py0, deno0, t0 = time.process_time(), cpu_seconds(pid), time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(args.clients):
                        nursery.start_soon(client)
                elapsed = time.perf_counter() - t0
                n = max(1, served)
                out[name].append(
                    ((time.process_time() - py0) / n * 1e6, (cpu_seconds(pid) - deno0) / n * 1e6, n / elapsed)
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbw-bench-parts-") as tmp:
        work = Path(tmp)
        (work / "fn").mkdir()
        (work / "fn" / "index.ts").write_text(FUNCTION)
        out = trio.run(_run, args, work)
    base = statistics.median(r[0] for r in out["runtime.invoke"])
    print(f"front-door layers, in-process (no HTTP), {args.clients} clients, {args.rounds} rounds × {args.seconds:g} s")
    print(f"{'layers':<18} {'py µs/req':>10} {'× invoke':>9} {'deno µs/req':>12} {'req/s':>8}   py µs/req by round")
    for name, rows in out.items():
        py = statistics.median(r[0] for r in rows)
        print(
            f"{name:<18} {py:10.1f} {py / base:9.2f} {statistics.median(r[1] for r in rows):12.1f}"
            f" {statistics.median(r[2] for r in rows):8.0f}   " + " ".join(f"{r[0]:.1f}" for r in rows)
        )


if __name__ == "__main__":
    main()
