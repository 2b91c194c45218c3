"""Broadcast fan-out: mbworker realtime (real front door + RealtimeService) vs a Node `ws` relay server.

One run, loopback only, bounded: each server runs in its own process; the same Node load generator
(bench/node/fanout-client.mjs) opens N subscribers + 1 publisher, then publishes M messages of ~100-byte
payload; every subscriber receives every message. Measured per server: deliveries/s, server CPU µs per
delivery (from /proc/<pid>/stat), and idle RSS per connection (RSS after N joined minus RSS before, / N).

    .venv/bin/python bench/realtime_fanout.py [--subscribers 1000] [--messages 200] [--payload 100]
    .venv/bin/python bench/realtime_fanout.py --breakdown   # what an idle connection holds (tracemalloc)

Needs node and `npm ci` in bench/node (done automatically when node_modules is missing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from _load import cpu_seconds, free_port, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "bench" / "node"
SECRET = "bench-secret-bench-secret-bench-secret"


_BREAKDOWN_GROUPS = (
    ("/lib/http/", "front door (lib/http)"),
    ("/realtime/", "realtime: client, channel, transport, task frames"),
    ("websockets", "websockets"),
    ("trio", "trio: task, cancel scopes, socket, epoll"),
    ("attrs generated", "trio: task, cancel scopes, socket, epoll"),
    ("contextlib", "trio: task, cancel scopes, socket, epoll"),
)


def _memory_state() -> tuple[object, dict[str, int]]:
    import gc
    import tracemalloc
    from collections import Counter

    gc.collect()
    return tracemalloc.take_snapshot(), Counter(type(o).__name__ for o in gc.get_objects())


def _breakdown(before: tuple[object, dict[str, int]], n: int) -> dict[str, object]:
    """Bytes per connection by the file that allocated them, and gc-tracked objects per connection by type."""
    import tracemalloc

    snap0, types0 = before
    snap1, types1 = _memory_state()
    assert isinstance(snap0, tracemalloc.Snapshot)
    assert isinstance(snap1, tracemalloc.Snapshot)
    groups: dict[str, float] = {}
    for stat in snap1.compare_to(snap0, "filename"):
        name = stat.traceback[0].filename
        group = next((g for key, g in _BREAKDOWN_GROUPS if key in name), "other (uuid, json, socket module)")
        groups[group] = groups.get(group, 0) + stat.size_diff / n
    objects = {t: (types1[t] - types0.get(t, 0)) / n for t in types1}
    return {
        "bytes": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "objects": {t: c for t, c in sorted(objects.items(), key=lambda kv: -kv[1]) if c >= 0.9},
    }


def serve_mbworker(port: int, breakdown: int = 0) -> None:
    """Child mode: the real HTTP front door with realtime as its app (limits opened up for the bench).

    With `breakdown` (the expected connection count), tracemalloc runs and a `SNAPSHOT` line on stdin prints
    the per-connection breakdown as one JSON line."""
    import trio

    sys.path.insert(0, str(ROOT))
    from mbworker.lib.http.server import serve_http
    from mbworker.lib.http.settings import HttpSettings
    from mbworker.realtime import RealtimeSettings, open_realtime

    class App:
        def __init__(self, service: Any) -> None:
            self.service = service

        def websocket_handler(self, request):  # type: ignore[no-untyped-def]
            return self.service.websocket_handler(request)

        async def handle_http(self, request, responder):  # type: ignore[no-untyped-def]
            if not await self.service.handle_http(request, responder):
                await responder.send(404, [])

    async def main() -> None:
        settings = RealtimeSettings(max_events_per_second=1_000_000)
        async with open_realtime(settings, jwt_secret=SECRET, node_id="bench") as service:  # noqa: SIM117
            async with trio.open_nursery() as nursery:
                http = HttpSettings(max_connections=20_000)
                await nursery.start(partial(serve_http, App(service), "127.0.0.1", port, settings=http))
                if breakdown:
                    import tracemalloc

                    tracemalloc.start()
                    before = _memory_state()
                print("LISTENING", flush=True)
                if breakdown:
                    await trio.to_thread.run_sync(sys.stdin.readline)
                    print(json.dumps(_breakdown(before, breakdown)), flush=True)

    trio.run(main)


def anon_key() -> str:
    import jwt

    return jwt.encode({"role": "anon", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def run_one(name: str, server_cmd: list[str], url: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    server = subprocess.Popen(server_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    client = None
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "LISTENING":
            raise RuntimeError(f"{name} server did not start")
        rss0 = rss_bytes(server.pid)
        client = subprocess.Popen(
            ["node", str(NODE_DIR / "fanout-client.mjs"), url, mode, str(args.subscribers), str(args.messages),
             str(args.payload)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=NODE_DIR,
        )  # fmt: skip
        assert client.stdout is not None
        assert client.stdin is not None
        if client.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{name}: load generator failed")
        time.sleep(0.5)  # let the server settle before sampling idle memory
        rss1 = rss_bytes(server.pid)
        if args.breakdown:
            assert server.stdin is not None
            server.stdin.write("SNAPSHOT\n")
            server.stdin.flush()
            return {"breakdown": json.loads(server.stdout.readline())}
        cpu0 = cpu_seconds(server.pid)
        client.stdin.write("GO\n")
        client.stdin.flush()
        line = client.stdout.readline()
        cpu1 = cpu_seconds(server.pid)
        client.wait(timeout=30)
        result = json.loads(line)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    deliveries = result["deliveries"]
    return {
        "deliveries_per_s": deliveries / result["seconds"],
        "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
        "idle_kb_per_conn": (rss1 - rss0) / (args.subscribers + 1) / 1024,
        "frame_bytes": result["frame_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--breakdown", action="store_true", help="only mbworker, idle memory by origin (slow)")
    parser.add_argument("--serve-mbworker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mbworker:
        serve_mbworker(args.serve_mbworker, args.subscribers + 1 if args.breakdown else 0)
        return
    if not (NODE_DIR / "node_modules" / "ws").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    p1, p2 = free_port(), free_port()
    key = anon_key()
    child = [sys.executable, __file__, "--serve-mbworker", str(p1), "--subscribers", str(args.subscribers)]
    mb = run_one(
        "mbworker",
        child + (["--breakdown"] if args.breakdown else []),
        f"ws://127.0.0.1:{p1}/realtime/v1/websocket?apikey={key}&vsn=2.0.0",
        "phoenix",
        args,
    )
    if args.breakdown:
        n = args.subscribers + 1
        print(f"idle memory per joined connection, {n} connections (tracemalloc on; RSS inflated by it):")
        for group, size in mb["breakdown"]["bytes"].items():
            print(f"{size:>10,.0f} B  {group}")
        print(f"{sum(mb['breakdown']['bytes'].values()):>10,.0f} B  total (tracemalloc)")
        print("gc-tracked objects per connection:")
        print("  " + ", ".join(f"{t} {c:.0f}" for t, c in mb["breakdown"]["objects"].items()))
        return
    ref = run_one("node ws", ["node", str(NODE_DIR / "ws-fanout-server.mjs"), str(p2)], f"ws://127.0.0.1:{p2}/",
                  "raw", args)  # fmt: skip
    print(f"fan-out: {args.subscribers} subscribers x {args.messages} messages, {args.payload}-byte payload "
          f"(frame {mb['frame_bytes']:.0f} B), loopback, one run")  # fmt: skip
    print(f"{'metric':<28}{'mbworker':>12}{'node ws':>12}{'ratio':>10}")
    rows = [
        ("deliveries/s", "deliveries_per_s", "{:,.0f}"),
        ("server CPU us/delivery", "cpu_us_per_delivery", "{:.2f}"),
        ("idle RSS KB/connection", "idle_kb_per_conn", "{:.1f}"),
    ]
    for label, k, fmt in rows:
        ratio = mb[k] / ref[k] if ref[k] else float("nan")
        print(f"{label:<28}{fmt.format(mb[k]):>12}{fmt.format(ref[k]):>12}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
