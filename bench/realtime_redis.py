"""Realtime across nodes: broadcasts from node A to node B through Redis (`RedisBroker`) vs the in-process memory
bus (`MemoryBroker` sharing a `MemoryBus`, the reference: no network, no serialization).

One run, loopback only, bounded: a fresh redis-server on a free port; both nodes live in this process (one trio
loop), each with its own broker (Redis: its own pub/sub connection) on one shared `RedisClient`. Node B has a
handler subscribed to each topic; node A publishes `--messages` envelopes with a `--payload`-byte JSON payload,
from 1 task (each publish awaited: latency-bound) and from `--publishers` concurrent tasks on as many topics
(the client pipelines them). Measured: cross-node publications/s received on B, this process's CPU µs per
publication (both nodes' Python work; redis-server's CPU is reported separately), and for the 1-task run the
publish → B-handler latency p50/p99. Local fan-out to B's sockets costs the same for both brokers (see
bench/realtime_fanout.py), so it is left out.

    .venv/bin/python bench/realtime_redis.py [--messages 20000] [--publishers 16] [--payload 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from _load import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mbworker.lib.redis import open_redis  # noqa: E402
from mbworker.realtime.broker import Broker, Envelope, broker_key  # noqa: E402
from mbworker.realtime.broker_memory import MemoryBroker, MemoryBus  # noqa: E402
from mbworker.realtime.broker_redis import RedisBroker  # noqa: E402
from tests.redis_server import redis_server_running  # noqa: E402

TIME_LIMIT = 60.0


@dataclass
class Result:
    count: int
    seconds: float
    cpu: float
    server_cpu: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


class Receiver:
    def __init__(self, expected: int, sent_at: dict[str, float] | None) -> None:
        self.expected = expected
        self.count = 0
        self.sent_at = sent_at
        self.latencies: list[float] = []
        self.done = trio.Event()

    def handle_publication(self, key: str, envelope: Envelope) -> None:
        self.count += 1
        if self.sent_at is not None:
            self.latencies.append(time.perf_counter() - self.sent_at[envelope.event])
        if self.count >= self.expected:
            self.done.set()


class Nobody:
    def handle_publication(self, key: str, envelope: Envelope) -> None:
        pass


async def run_case(
    make: Callable[[str], Broker], nursery: trio.Nursery, args: argparse.Namespace, tasks: int, server_pid: int | None
) -> Result:
    payload = b'{"x":"' + b"a" * max(0, args.payload - 8) + b'"}'
    keys = [broker_key(f"realtime:bench{i}", False) for i in range(tasks)]
    per_task = args.messages // tasks
    sent_at: dict[str, float] | None = {} if tasks == 1 else None
    a, b = make("A"), make("B")
    a.bind(Nobody())
    receiver = Receiver(per_task * tasks, sent_at)
    b.bind(receiver)
    for broker in (a, b):
        if isinstance(broker, RedisBroker):
            await nursery.start(broker.serve)
            await broker.wait_connected(10)
    for key in keys:
        await b.subscribe(key)

    async def publish(key: str) -> None:
        for i in range(per_task):
            event = f"{key}:{i}"
            if sent_at is not None:
                sent_at[event] = time.perf_counter()
            await a.publish(key, Envelope(key[7:], False, event, payload, True, False, "A", sender="c1"))

    cpu0, srv0, t0 = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0, time.perf_counter()
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as publishers:
            for key in keys:
                publishers.start_soon(publish, key)
        await receiver.done.wait()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    server_cpu = (cpu_seconds(server_pid) - srv0) if server_pid else 0.0
    for key in keys:
        await b.unsubscribe(key)
    return Result(receiver.count, seconds, cpu, server_cpu, receiver.latencies)


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, Result, Result]] = []
    with tempfile.TemporaryDirectory(prefix="mbw-bench-") as tmp:
        async with (
            redis_server_running(Path(tmp)) as server,
            open_redis(server.url) as redis,
            trio.open_nursery() as nursery,
        ):
            assert server.process is not None
            pid = server.process.pid
            bus = MemoryBus()
            for tasks in (1, args.publishers):
                mem = await run_case(lambda _node: MemoryBroker(bus), nursery, args, tasks, None)

                def make(node: str, n: int = tasks) -> Broker:
                    return RedisBroker(redis, redis.settings, node_id=f"{node}{n}")

                red = await run_case(make, nursery, args, tasks, pid)
                rows.append((f"{tasks} publisher task{'s' if tasks > 1 else ''}", red, mem))
            nursery.cancel_scope.cancel()
    print(f"cross-node broadcasts A → B, {args.messages} messages of ~{args.payload} B payload, one run, loopback")
    head = f"{'case':<22}{'Redis msg/s':>13}{'memory msg/s':>14}{'ratio':>8}"
    head += f"{'Redis CPU µs/msg':>18}{'redis-server µs/msg':>21}{'p50 ms':>8}{'p99 ms':>8}"
    print(head)
    for name, red, mem in rows:
        line = f"{name:<22}{red.rate:>13,.0f}{mem.rate:>14,.0f}{red.rate / mem.rate:>8.3f}"
        line += f"{red.cpu / red.count * 1e6:>18.1f}{red.server_cpu / red.count * 1e6:>21.1f}"
        line += f"{red.pct(0.5):>8.2f}{red.pct(0.99):>8.2f}"
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=16)
    parser.add_argument("--payload", type=int, default=100)
    trio.run(main, parser.parse_args())
