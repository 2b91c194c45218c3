"""Issue 3's speed target end to end: a WAGI hello through a REAL `mbworker serve` vs a bare wasmtime-py loop.

    .venv/bin/python bench/wasm_e2e.py [--duration 3] [--rounds 3] [--connections 16] [--calls 3000] [--tool auto]

What it does (loopback only, temp data dir, free ports; stops by itself, ~40 s with the defaults):
1. Starts `mbworker serve` as a subprocess (as a user would) and deploys examples/functions/wasm-hello through the
   CLI with `--no-verify-jwt` (the JWT gate is issue 2's cost, not the sandbox's).
2. In alternating rounds (background load hits all alike), drives the daemon with bench/_load.py (wrk if installed)
   at `/functions/v1/wasm-hello` and at the "front door" (below), and runs the bare loop in this process. CPU per
   request = the daemon's utime+stime delta over a round (all its threads: trio and wasm calls) ÷ responses.
3. Reports medians over the rounds.

- Bare loop (the reference): the same hello.wat, the same engine flags (epoch interruption + fuel) and what any
  wasmtime-py host must do per request: a fresh `Store`, a `WasiConfig` with the CGI env/argv of a request like
  the load's, stdout captured with `stdout_custom`, instantiate through an `InstancePre`, call `_start`, close the
  Store, parse the CGI output. One thread, no server. CPU = process time per call.
- Front door: the same daemon answering `/functions/v1/<unknown slug>` (404 NOT_FOUND, a small JSON body). That
  request pays what every function request pays before a runtime is involved (HTTP parsing, routing, the
  function-table lookup, the metrics observation, writing a response of similar size) and runs no function. Not
  `/health`: that skips the functions router and the metrics, so it would credit their cost to the sandbox.
  What a 404 does NOT pay (Invocation, forwarded headers, response shaping) is counted against the wasm path.

`--pin CPU` runs both sides on one CPU (wrk then gets the other): the bare loop's wasmtime-py output callback hops
to a tokio thread ~10 times per call, and on this VM a hop to an idle CPU costs far more than one on the same CPU
(~365 vs ~170 µs per call measured on an idle machine), so the unpinned reference swings with the other load on
the machine. Pinned, both sides pay same-CPU hand-offs only: the stricter, steadier comparison.

Target (issue 3): end-to-end cost ≤ 1.3× the bare loop plus the front door, i.e.
    (daemon CPU per wasm hello − daemon CPU per front-door request) / bare-loop CPU per call ≤ 1.3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _load import LoadResult, cpu_seconds, run_load  # noqa: E402
from functions import Daemon, get  # noqa: E402
from wasm import bare_loop  # noqa: E402

EXAMPLE = ROOT / "examples" / "functions" / "wasm-hello"
SLUG = "wasm-hello"
TARGET = 1.3


def measure(daemon: Daemon, path: str, args: argparse.Namespace, *, count_all: bool) -> tuple[LoadResult, float, float]:
    """One load run: (result, responses/s, daemon CPU µs per response). `count_all`: non-2xx count as served."""
    cpu0 = cpu_seconds(daemon.proc.pid)
    res = run_load("127.0.0.1", daemon.port, duration=args.duration, connections=args.connections, path=path,
                   tool=args.tool)  # fmt: skip
    served = res.requests + (res.errors if count_all else 0)
    if not count_all and res.errors:
        raise RuntimeError(f"{res.errors} failed requests to {path}")
    return res, served / res.seconds, (cpu_seconds(daemon.proc.pid) - cpu0) / max(1, served) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of load per target and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--calls", type=int, default=3000, help="bare-loop calls per round")
    ap.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument(
        "--pin",
        type=int,
        default=None,
        metavar="CPU",
        help="pin the daemon (all its threads) and this process (the bare loop and wasmtime's threads) to one CPU",
    )
    ap.add_argument(
        "--sync-wait-us",
        type=int,
        default=None,
        metavar="US",
        help="run the daemon with the opt-in synchronous wait (MBWORKER_WASM_SYNC_WAIT_US); default: its default, 0",
    )
    args = ap.parse_args()

    wat = (EXAMPLE / "hello.wat").read_text()
    with tempfile.TemporaryDirectory(prefix="mbw-bench-wasm-") as tmp:
        work = Path(tmp)
        bundle = work / SLUG
        shutil.copytree(EXAMPLE, bundle)
        if args.pin is not None:
            os.sched_setaffinity(0, {args.pin})  # before wasmtime starts its threads here: they inherit it
        settings = {} if args.sync_wait_us is None else {"MBWORKER_WASM_SYNC_WAIT_US": str(args.sync_wait_us)}
        daemon = Daemon(work / "data", work / "daemon.log", settings)
        try:
            if args.pin is not None:
                for tid in os.listdir(f"/proc/{daemon.proc.pid}/task"):
                    os.sched_setaffinity(int(tid), {args.pin})  # threads started later inherit it
            daemon.cli("deploy", str(bundle), "--no-verify-jwt")
            wasm_path, door_path = f"/functions/v1/{SLUG}", "/functions/v1/no-such-function"
            reply = get(daemon.port, wasm_path)
            if not reply.startswith(b"HTTP/1.1 200") or b"Hello from Wasm!" not in reply:
                raise RuntimeError(f"unexpected answer from {wasm_path}: {reply[:300]!r}")
            if not get(daemon.port, door_path).startswith(b"HTTP/1.1 404"):
                raise RuntimeError(f"{door_path} did not answer 404")
            # The bare loop gets the CGI env/argv of a request like wrk's (Host only; the daemon adds its own).
            headers = [(b"host", f"127.0.0.1:{daemon.port}".encode())]
            bare_loop(300, wat, headers)  # warm-up, like the load warm-ups below
            measure(daemon, wasm_path, argparse.Namespace(**{**vars(args), "duration": 1.0}), count_all=False)
            measure(daemon, door_path, argparse.Namespace(**{**vars(args), "duration": 1.0}), count_all=True)
            rows: dict[str, list[tuple[float, float]]] = {"bare": [], "door": [], "wasm": []}
            loads: dict[str, list[LoadResult]] = {"door": [], "wasm": []}
            for _ in range(args.rounds):
                res, rps, cpu = measure(daemon, door_path, args, count_all=True)
                rows["door"].append((rps, cpu))
                loads["door"].append(res)
                res, rps, cpu = measure(daemon, wasm_path, args, count_all=False)
                rows["wasm"].append((rps, cpu))
                loads["wasm"].append(res)
                wall, cpu_s = bare_loop(args.calls, wat, headers)
                rows["bare"].append((args.calls / wall, cpu_s / args.calls * 1e6))
        finally:
            daemon.stop()

    def med(key: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[key])

    bare, door, wasm = med("bare", 1), med("door", 1), med("wasm", 1)
    ratio = (wasm - door) / bare
    tool = loads["wasm"][0].tool
    print(
        f"Wasm hello end to end — {os.cpu_count()} CPUs, load: {tool}, {args.connections} keep-alive connections, GET,"
        f" loopback; {args.rounds} alternating rounds × {args.duration:g} s (bare loop: {args.calls} calls), medians"
    )
    pinned = f"; daemon and bare loop pinned to CPU {args.pin}" if args.pin is not None else ""
    if args.sync_wait_us is not None:
        pinned += f"; daemon with wasm_sync_wait_us={args.sync_wait_us}"
    print(f"CPU µs/req: the daemon process (all threads) per response; bare loop: this process per call{pinned}\n")
    print(f"{'path':<44} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>11} {'× bare':>7}")
    for name, key in (("bare wasmtime-py loop (reference)", "bare"), ("front door (404, unknown slug)", "door"),
                      ("mbworker wasm hello", "wasm")):  # fmt: skip
        lat = loads.get(key)
        p50 = statistics.median(r.p50_ms for r in lat) if lat else float("nan")
        p99 = statistics.median(r.p99_ms for r in lat) if lat else float("nan")
        print(f"{name:<44} {med(key, 0):8.0f} {p50:7.2f} {p99:7.2f} {med(key, 1):11.1f} {med(key, 1) / bare:7.2f}")
    print(f"{'bare + front door':<44} {'':>8} {'':>7} {'':>7} {bare + door:11.1f} {(bare + door) / bare:7.2f}")
    verdict = "met" if ratio <= TARGET else "MISS"
    print(f"\n(mbworker wasm − front door) / bare = ({wasm:.1f} − {door:.1f}) / {bare:.1f} = {ratio:.2f}×"
          f"  → {verdict} (target ≤ {TARGET}×)")  # fmt: skip
    print(f"mbworker wasm / (bare + front door) = {wasm / (bare + door):.2f}×")
    for key in ("bare", "door", "wasm"):
        print(f"  {key} by round: req/s " + " ".join(f"{r[0]:.0f}" for r in rows[key]) + "; CPU µs/req "
              + " ".join(f"{r[1]:.1f}" for r in rows[key]))  # fmt: skip


if __name__ == "__main__":
    main()
