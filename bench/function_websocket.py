"""Function WebSockets (`Deno.upgradeWebSocket`): an echo function through `mbworker serve` vs the same handler
under `Deno.serve` in one `deno run` process (the reference: Deno serving the socket itself).

    .venv/bin/python bench/function_websocket.py [--seconds 3] [--rounds 3] [--burst 2000] [--size 32]

Loopback only, temp dirs, free ports; stops by itself (~1 minute with the defaults). The same client for both
(websockets' sync client, in this process), one connection each, alternating rounds:
- round trips: send one text message, wait for its echo, again, for `--seconds`;
- burst: send `--burst` messages without waiting, then read the echoes (messages/s end to end).
CPU per message: the server's utime+stime over the round (for mbworker, the daemon and its Deno child apart) ÷
messages echoed. The Python client is the same on both sides and may be the bound for the reference: read the CPU
columns first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import functions  # noqa: E402
from _load import free_port  # noqa: E402
from deno_direct import spawn_direct  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

ECHO = (
    "(req) => { const { socket, response } = Deno.upgradeWebSocket(req);"
    " socket.onmessage = (e) => socket.send(e.data); return response; }"
)
FUNCTION = f"Deno.serve({ECHO});\n"
DIRECT = f'Deno.serve({{ hostname: "127.0.0.1", port: Number(Deno.args[0]), onListen() {{}} }}, {ECHO});\n'


@dataclass
class Target:
    name: str
    url: str
    server_pids: Callable[[], Sequence[int]]
    side_pids: Callable[[], Sequence[int]] = lambda: ()
    rounds: list[tuple[float, float, float, float]] = field(default_factory=list)
    """(round trips/s, burst messages/s, server CPU µs per message, side CPU µs per message)"""

    def measure(self, seconds: float, burst: int, payload: str) -> None:
        with connect(self.url, max_size=None, compression=None, open_timeout=30) as ws:
            ws.send(payload)
            ws.recv(timeout=30)  # warm: the function's process is up
            cpu0, side0 = functions.total_cpu(self.server_pids()), functions.total_cpu(self.side_pids())
            trips, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                ws.send(payload)
                ws.recv(timeout=30)
                trips += 1
            rtt_rate = trips / (time.perf_counter() - t0)
            t1 = time.perf_counter()
            _burst(ws, burst, payload)
            burst_rate = burst / (time.perf_counter() - t1)
            n = trips + burst
            cpu = (functions.total_cpu(self.server_pids()) - cpu0) / n * 1e6
            side = (functions.total_cpu(self.side_pids()) - side0) / n * 1e6
        self.rounds.append((rtt_rate, burst_rate, cpu, side))

    def med(self, k: int) -> float:
        return statistics.median(r[k] for r in self.rounds)


def _burst(ws: ClientConnection, count: int, payload: str) -> None:
    for _ in range(count):
        ws.send(payload)
    for _ in range(count):
        ws.recv(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32, help="bytes per text message")
    args = ap.parse_args()
    payload = "x" * args.size
    loads = [functions.loadavg()]
    with tempfile.TemporaryDirectory(prefix="mbw-bench-ws-") as tmp:
        work = Path(tmp)
        fn = work / "echo"
        fn.mkdir()
        (fn / "index.ts").write_text(FUNCTION)
        (fn / "function.toml").write_text(functions.ONE_PROCESS)
        (work / "direct.ts").write_text(DIRECT)
        daemon = functions.Daemon(work / "data", work / "daemon.log")
        direct = None
        try:
            daemon.cli("deploy", str(fn), "--no-verify-jwt")
            port = free_port()
            direct = spawn_direct(work, port, work / "deno-direct")
            targets = [
                Target("Deno.serve direct", f"ws://127.0.0.1:{port}/", lambda: [direct.pid] if direct else []),
                Target(
                    "mbworker function",
                    f"ws://127.0.0.1:{daemon.port}/functions/v1/echo",
                    lambda: [daemon.proc.pid],
                    daemon.deno_pids,
                ),
            ]
            _wait_direct(targets[0].url)
            for i in range(args.rounds):
                for t in targets if i % 2 == 0 else reversed(targets):
                    t.measure(args.seconds, args.burst, payload)
                loads.append(functions.loadavg())
        finally:
            if direct is not None:
                direct.kill()
                direct.wait(timeout=10)
            daemon.stop()
    ref = targets[0]
    print(
        f"function WebSockets: one connection, {args.size}-byte text messages, {args.rounds} alternating rounds "
        f"(round trips for {args.seconds:g} s, then a burst of {args.burst}); load by round: {' | '.join(loads)}"
    )
    print(
        f"{'target':<20} {'round trips/s':>14} {'burst msg/s':>12} {'server CPU µs/msg':>18} {'deno child µs/msg':>18}"
        f" {'× direct trips':>15} {'× direct burst':>15} {'× direct CPU':>13}"
    )
    for t in targets:
        side = f"{t.med(3):18.1f}" if t.rounds and t is not ref else f"{'-':>18}"
        total_cpu = t.med(2) + (t.med(3) if t is not ref else 0.0)
        print(
            f"{t.name:<20} {t.med(0):14.0f} {t.med(1):12.0f} {t.med(2):18.1f} {side}"
            f" {t.med(0) / ref.med(0):15.2f} {t.med(1) / ref.med(1):15.2f} {total_cpu / ref.med(2):13.2f}"
        )
    print("  (mbworker's CPU ratio counts the daemon and its Deno child together against Deno direct's one process)")


def _wait_direct(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(url, open_timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    main()
