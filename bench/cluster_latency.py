"""Cluster: cross-worker broadcast latency through Redis, and the Redis client's rates against redis-benchmark.

One run, loopback only, bounded (~45 s), kills its children. A fresh redis-server on a free port, then:

1. Redis client rates on that server (reusing bench/redis_pubsub.py's scenarios, `--rate-seconds` each): our
   pipelined PUBLISH rate (`execute_many`, batches of 1000) against `redis-benchmark PUBLISH -P 1000 -c 1`
   (redis-benchmark runs any command, PUBLISH included), and our pub/sub receive rate while redis-benchmark
   publishes as fast as it can (what it published in the window is the reference).
2. Two real `mbworker serve` processes with MBWORKER_REDIS_URL on that Redis. One Node load generator
   (bench/node/cluster-latency-client.mjs, `ws`, raw Phoenix vsn 2.0.0 frames) opens `--subscribers` sockets,
   alternately on worker A and worker B, all joined to one topic, plus one publisher on A that broadcasts
   `--rate` messages/s for `--seconds` (~100-byte payload carrying its send time). Latency = receive time -
   send time on the load generator's one clock (so it includes the client's own event loop, as the issue's
   prototype figure did). Deliveries on A are same-node (local fan-out); deliveries on B crossed Redis.
   The first `--warmup` messages are not counted. CPU of each process over the send phase from /proc.

    .venv/bin/python bench/cluster_latency.py [--subscribers 1000] [--rate 50] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "bench" / "node"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import redis_pubsub  # noqa: E402
from _load import cpu_seconds  # noqa: E402
from functions import Daemon  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret"
TARGET_P99_MS = 30.0
WALL_LIMIT = 100.0
"""Hard stop for the whole run (SIGALRM): children are killed on the way out."""


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output from the load generator in {timeout:.0f}s")
    line = proc.stdout.readline().decode()
    if not line:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"load generator exited: {err[-2000:]}")
    return line


def redis_rates(url: str, port: int, seconds: float) -> dict[str, float]:
    args = argparse.Namespace(duration=seconds, batch=1000, tasks=100)
    payload = b"x" * 100
    out: dict[str, float] = {}

    async def run() -> None:
        pub = await redis_pubsub.ours_publish(url, "pipelined", args, payload)
        out["ours_publish"], out["ours_publish_cpu_us"] = pub.per_second, pub.cpu_us
        rec = await redis_pubsub.ours_receive(url, port, args, payload)
        out["ours_receive"], out["ours_receive_cpu_us"] = rec.per_second, rec.cpu_us
        out["bench_published"] = (rec.published or 0) / rec.seconds

    trio.run(run)
    out["bench_publish"] = redis_pubsub.redis_benchmark_publish(port, args, payload)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="broadcasts per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time")
    parser.add_argument("--warmup", type=int, default=50, help="first messages not counted")
    parser.add_argument("--rate-seconds", type=float, default=2.0, help="seconds per Redis client scenario")
    args = parser.parse_args()
    if not (NODE_DIR / "node_modules" / "ws").exists():
        subprocess.run(["npm", "ci", "--silent"], cwd=NODE_DIR, check=True, timeout=120)

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"bench exceeded {WALL_LIMIT:.0f}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(WALL_LIMIT))
    started = time.monotonic()
    children: list[subprocess.Popen[Any]] = []  # redis-server, then the load generators
    workers: list[Daemon] = []
    with tempfile.TemporaryDirectory() as tmpdir:  # removed only once everything using it has stopped
        tmp = Path(tmpdir)
        try:
            server, redis_port = redis_pubsub.start_redis(tmp)
            children.append(server)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            rates = redis_rates(redis_url, redis_port, args.rate_seconds)

            for name in ("a", "b"):
                settings = {
                    "MBWORKER_REDIS_URL": redis_url,
                    "MBWORKER_JWT_SECRET": SECRET,
                    "MBWORKER_ADMIN_TOKEN": "bench-admin",
                    "MBWORKER_NODE_ID": name,
                    "MBWORKER_LOG_LEVEL": "warning",
                }
                workers.append(Daemon(tmp / name, tmp / f"{name}.log", settings))
            a, b = workers
            ws = "ws://127.0.0.1:{}/realtime/v1/websocket?apikey=" + a.anon_key + "&vsn=2.0.0"
            messages = round(args.rate * args.seconds)
            half = args.subscribers // 2
            clients = {}
            for side, port, n, rate in (("A", a.port, args.subscribers - half, args.rate), ("B", b.port, half, 0)):
                argv = [ws.format(port), str(n), str(messages), str(rate), str(args.warmup), "60"]
                clients[side] = subprocess.Popen(
                    ["node", str(NODE_DIR / "cluster-latency-client.mjs"), *argv],
                    cwd=NODE_DIR,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                children.append(clients[side])
            for client in clients.values():
                assert read_line(client, 60).strip() == "READY"
            pids = {"worker A": a.proc.pid, "worker B": b.proc.pid, "redis-server": server.pid}
            pids |= {f"client {side}": c.pid for side, c in clients.items()}
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            t0 = time.monotonic()
            for side in ("B", "A"):  # the publisher (in A's client) last
                stdin = clients[side].stdin
                assert stdin is not None
                stdin.write(b"GO\n")
                stdin.flush()
            result = {side: json.loads(read_line(c, args.seconds + 30)) for side, c in clients.items()}
            for r in result.values():  # sparse {bin: count} → dense lists
                for key in ("hist", "first"):
                    dense = [0] * r["bins"]
                    for i, n in r[key].items():
                        dense[int(i)] = n
                    r[key] = dense
            wall = time.monotonic() - t0
            cpu = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()}
        finally:
            signal.alarm(0)
            for client in reversed(children[1:]):
                redis_pubsub.stop(client)
            for worker in reversed(workers):
                worker.stop()
            if children:
                redis_pubsub.stop(children[0])
    report(args, result, rates, cpu, time.monotonic() - started)


def percentiles(hist: list[int], bin_ms: float) -> tuple[int, float, float, float]:
    """count, p50, p99, max (upper edges of the 0.1 ms bins) of a latency histogram."""
    total = sum(hist)
    if not total:
        return 0, float("nan"), float("nan"), float("nan")
    out, running, wanted = [], 0, [0.5 * total, 0.99 * total]
    for i, n in enumerate(hist):
        running += n
        while wanted and running >= wanted[0]:
            out.append((i + 1) * bin_ms)
            wanted.pop(0)
    top = max(i for i, n in enumerate(hist) if n)
    return total, out[0], out[1], (top + 1) * bin_ms


def report(
    args: argparse.Namespace, result: dict[str, Any], rates: dict[str, float], cpu: dict[str, float], total: float
) -> None:
    a, b = result["A"], result["B"]
    deliveries = a["received"] + b["received"]
    per_second = deliveries / a["send_seconds"]
    bin_ms = a["bin_ms"]
    print(
        f"\nCluster latency: {args.subscribers} subscribers (half on worker A, half on B), 1 publisher on A, "
        f"{round(args.rate * args.seconds)} broadcasts at {args.rate:g}/s ({per_second:,.0f} deliveries/s), "
        f"first {args.warmup} not counted; {os.cpu_count()} CPUs; run took {total:.0f} s\n"
    )
    header = f"{'deliveries':32} {'received/expected':>20} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    merged = [x + y for x, y in zip(a["hist"], b["hist"], strict=True)]
    rows = (
        ("same node (A, local)", a["hist"], f"{a['received']:,}/{a['expected']:,}"),
        ("cross node (B, via Redis)", b["hist"], f"{b['received']:,}/{b['expected']:,}"),
        ("all", merged, f"{deliveries:,}/{a['expected'] + b['expected']:,}"),
        ("first arrival per message, A", a["first"], ""),
        ("first arrival per message, B", b["first"], ""),
    )
    p99_cross = float("nan")
    for label, hist, got in rows:
        count, p50, p99, top = percentiles(hist, bin_ms)
        got = got or f"{count:,} msgs"
        print(f"{label:32} {got:>20} {p50:8.1f} {p99:8.1f} {top:8.1f}")
        if label.startswith("cross"):
            p99_cross = p99
    verdict = "meets" if p99_cross <= TARGET_P99_MS else "MISSES"
    print(f"\ncross-node p99 {p99_cross:.1f} ms {verdict} the target (≤ {TARGET_P99_MS:g} ms)")
    print("CPU over the send phase (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))

    print("\nRedis client (worker.redis) vs redis-benchmark on the same redis-server, 100-byte messages:\n")
    header = f"{'scenario':52} {'ours /s':>12} {'redis-benchmark /s':>19} {'ratio':>7} {'ours CPU/op':>12}"
    print(header)
    print("-" * len(header))
    print(
        f"{'PUBLISH pipelined x1000 (execute_many vs -P 1000 -c 1)':52} {rates['ours_publish']:12,.0f} "
        f"{rates['bench_publish']:19,.0f} {rates['ours_publish'] / rates['bench_publish']:6.2f}x "
        f"{rates['ours_publish_cpu_us']:9.1f} µs"
    )
    print(
        f"{'receive (redis-benchmark publishing -P 200 -c 1)':52} {rates['ours_receive']:12,.0f} "
        f"{rates['bench_published']:19,.0f} {rates['ours_receive'] / rates['bench_published']:6.2f}x "
        f"{rates['ours_receive_cpu_us']:9.1f} µs"
    )


if __name__ == "__main__":
    main()
