"""HTTP front door vs the trio floor: req/s, latency and server CPU per request, side by side.

    .venv/bin/python bench/front_door.py [--duration 5] [--connections 16] [--tool auto|wrk|python]

Runs, one after the other and each in its own process: bench/floor_server.py (accept, read, canned response,
no parsing: the floor of any trio server) and `serve_http` with an app answering 'hello'. Each is warmed up,
then driven by the same load generator (bench/_load.py: wrk if installed, else a Python client) on loopback.
CPU per request is the server process's utime+stime delta over the run divided by the responses served.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _load import LoadResult, cpu_seconds, run_load  # noqa: E402


def _serve_front_door(port: int) -> None:
    """The subprocess side: serve_http with a trivial app."""
    sys.path.insert(0, str(ROOT))
    import trio

    from mbworker.lib.http.server import serve_http
    from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler

    class Hello:
        async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
            await responder.send(200, [(b"content-type", b"text/plain")], b"hello")

        def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
            return None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_http, Hello(), "127.0.0.1", port)
            print(f"READY {server.port}", flush=True)

    trio.run(main)


class _Server:
    """A server subprocess; `port` once it printed READY. Terminated by `close`."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"{name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.runs: list[tuple[LoadResult, float]] = []

    def measure(self, args: argparse.Namespace) -> None:
        before = cpu_seconds(self.proc.pid)
        result = run_load("127.0.0.1", self.port, duration=args.duration, connections=args.connections, tool=args.tool)
        cpu = cpu_seconds(self.proc.pid) - before
        self.runs.append((result, cpu / max(1, result.requests) * 1e6))

    def median(self) -> tuple[LoadResult, float]:
        """The run with the median CPU per request."""
        return sorted(self.runs, key=lambda run: run[1])[len(self.runs) // 2]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of measured load per round and server")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median round is reported")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--serve-front-door", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_front_door is not None:
        _serve_front_door(args.serve_front_door)
        return

    py = sys.executable
    servers: list[_Server] = []
    try:
        servers.append(_Server("trio floor (no parsing)", [py, str(HERE / "floor_server.py"), "--port", "0"]))
        servers.append(_Server("serve_http (httptools)", [py, __file__, "--serve-front-door", "0"]))
        for server in servers:  # warm-up
            run_load("127.0.0.1", server.port, duration=1.0, connections=args.connections, tool=args.tool)
        # Alternate so that noise from the rest of the machine hits both alike.
        for _ in range(args.rounds):
            for server in servers:
                server.measure(args)
    finally:
        for server in servers:
            server.close()
    floor_cpu = servers[0].median()[1]
    tool = servers[0].runs[0][0].tool
    print(
        f"load: {tool}, {args.connections} keep-alive connections, loopback; {args.rounds} alternating rounds of"
        f" {args.duration:g} s per server, median round (by CPU/request) shown"
    )
    print(f"{'server':<26} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} {'× floor':>8} {'errors':>7}")
    for server in servers:
        res, cpu_us = server.median()
        print(
            f"{server.name:<26} {res.rps:>9.0f} {res.p50_ms:>8.2f} {res.p99_ms:>8.2f} {cpu_us:>11.1f}"
            f" {cpu_us / floor_cpu:>8.2f} {res.errors:>7}"
        )
    print(
        "CPU µs/request of every round:",
        "; ".join(f"{s.name.split()[0]}: " + " ".join(f"{cpu:.1f}" for _, cpu in s.runs) for s in servers),
    )


if __name__ == "__main__":
    main()
