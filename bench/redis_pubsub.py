"""Redis publish and receive rates: our trio client (worker.redis) vs redis-py's sync client through threads.

    .venv/bin/python bench/redis_pubsub.py [--duration 2] [--batch 1000] [--tasks 100] [--payload 64]

Starts its own redis-server on a free loopback port (no persistence, no pub/sub output-buffer limit), then
runs each scenario for `--duration` seconds, one after the other, in this process:

- publish, pipelined: batches of `--batch` PUBLISH per round trip (ours: `execute_many`; redis-py: a
  pipeline executed in `trio.to_thread.run_sync`).
- publish, concurrent callers: `--tasks` trio tasks each awaiting one PUBLISH at a time (ours: pipelined
  automatically over the pool; redis-py: one `to_thread` call per publish).
- publish, one caller: a single task, one PUBLISH per await.
- receive: `redis-benchmark` (C) publishes to one channel as fast as it can while we subscribe and count
  what reaches the owner (ours: `receive_batch()` on the bounded event queue; redis-py: `get_message` per
  `to_thread` call).

CPU/op is this process's CPU time (all threads) over the operations done, so it includes the client's
Python work but not redis-server's. `redis-benchmark` alone (PUBLISH, -P batch) is printed as the ceiling.
Everything is bounded: each scenario stops after `--duration` s (plus a few seconds of setup at most).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from _load import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redispy  # noqa: E402

from mbworker.lib.redis import PubSubMessage, open_pubsub, open_redis  # noqa: E402

CHANNEL = "bench"


@dataclass(frozen=True)
class Rate:
    ops: int
    seconds: float
    cpu: float
    published: int | None = None
    """For receive runs: PUBLISH calls the server executed during the window (to show keeping pace)."""

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.ops * 1e6 if self.ops else float("nan")


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--client-output-buffer-limit",
            "pubsub 0 0 0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(10).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


async def timed(duration: float, body: Callable[[Callable[[], bool]], Awaitable[int]]) -> Rate:
    """Run `body(keep_going)` until `duration` passes; it returns the operations it completed."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + duration
    ops = await body(lambda: time.perf_counter() < deadline)
    return Rate(ops, time.perf_counter() - t0, time.process_time() - cpu0)


# -- publish scenarios ----------------------------------------------------------------------------------------


async def ours_publish(url: str, mode: str, args: argparse.Namespace, payload: bytes) -> Rate:
    async with open_redis(url) as r:
        await r.ping()
        if mode == "pipelined":
            batch = [("PUBLISH", CHANNEL, payload)] * args.batch

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    await r.execute_many(batch)
                    n += len(batch)
                return n

        elif mode == "concurrent":

            async def body(go: Callable[[], bool]) -> int:
                counts = [0] * args.tasks

                async def worker(i: int) -> None:
                    while go():
                        await r.publish(CHANNEL, payload)
                        counts[i] += 1

                async with trio.open_nursery() as nursery:
                    for i in range(args.tasks):
                        nursery.start_soon(worker, i)
                return sum(counts)

        else:

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    await r.publish(CHANNEL, payload)
                    n += 1
                return n

        return await timed(args.duration, body)


async def redispy_publish(port: int, mode: str, args: argparse.Namespace, payload: bytes) -> Rate:
    pool = redispy.ConnectionPool(host="127.0.0.1", port=port, max_connections=args.tasks + 4)
    client = redispy.Redis(connection_pool=pool)
    try:
        await trio.to_thread.run_sync(client.ping)
        if mode == "pipelined":

            def send_batch() -> None:
                pipe = client.pipeline(transaction=False)
                for _ in range(args.batch):
                    pipe.publish(CHANNEL, payload)
                pipe.execute()

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    await trio.to_thread.run_sync(send_batch)
                    n += args.batch
                return n

        elif mode == "concurrent":

            async def body(go: Callable[[], bool]) -> int:
                counts = [0] * args.tasks

                async def worker(i: int) -> None:
                    while go():
                        await trio.to_thread.run_sync(client.publish, CHANNEL, payload)
                        counts[i] += 1

                async with trio.open_nursery() as nursery:
                    for i in range(args.tasks):
                        nursery.start_soon(worker, i)
                return sum(counts)

        else:

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    await trio.to_thread.run_sync(client.publish, CHANNEL, payload)
                    n += 1
                return n

        return await timed(args.duration, body)
    finally:
        client.close()
        pool.disconnect()


# -- receive scenarios ----------------------------------------------------------------------------------------


def start_publisher(port: int, args: argparse.Namespace, payload: bytes) -> subprocess.Popen[bytes]:
    """redis-benchmark publishing to CHANNEL until killed (its -n is far beyond what a run can reach)."""
    return subprocess.Popen(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "1",
            "-P",
            "200",
            "-n",
            "2000000000",
            "-q",
            "PUBLISH",
            CHANNEL,
            payload.decode(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def publish_calls(port: int) -> int:
    def read() -> int:
        client = redispy.Redis(host="127.0.0.1", port=port)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return int(stats.get("cmdstat_publish", {}).get("calls", 0))

    return await trio.to_thread.run_sync(read)


async def timed_receive(port: int, duration: float, body: Callable[[Callable[[], bool]], Awaitable[int]]) -> Rate:
    before = await publish_calls(port)
    rate = await timed(duration, body)
    return Rate(rate.ops, rate.seconds, rate.cpu, await publish_calls(port) - before)


async def ours_receive(url: str, port: int, args: argparse.Namespace, payload: bytes) -> Rate:
    async with open_pubsub(url, buffer=8192) as ps:
        await ps.subscribe(CHANNEL)
        publisher = start_publisher(port, args, payload)
        try:
            with trio.fail_after(10):
                await ps.messages.receive()  # the first message: the publisher is running

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    for event in await ps.messages.receive_batch():
                        n += isinstance(event, PubSubMessage)
                return n

            return await timed_receive(port, args.duration, body)
        finally:
            stop(publisher)


async def redispy_receive(port: int, args: argparse.Namespace, payload: bytes) -> Rate:
    client = redispy.Redis(host="127.0.0.1", port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    try:
        await trio.to_thread.run_sync(pubsub.subscribe, CHANNEL)
        publisher = start_publisher(port, args, payload)
        try:

            async def body(go: Callable[[], bool]) -> int:
                n = 0
                while go():
                    message = await trio.to_thread.run_sync(pubsub.get_message, True, 1.0)
                    if message is not None:
                        n += 1
                return n

            return await timed_receive(port, args.duration, body)
        finally:
            stop(publisher)
    finally:
        pubsub.close()
        client.close()


def redis_benchmark_publish(port: int, args: argparse.Namespace, payload: bytes) -> float:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "1",
            "-P",
            str(args.batch),
            "-n",
            str(args.batch * 500),
            "--csv",
            "PUBLISH",
            CHANNEL,
            payload.decode(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1].split(",")[1].strip('"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per scenario")
    parser.add_argument("--batch", type=int, default=1000, help="PUBLISH per pipelined round trip")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent publishing tasks")
    parser.add_argument("--payload", type=int, default=64, help="message bytes")
    args = parser.parse_args()
    payload = b"x" * args.payload

    with tempfile.TemporaryDirectory() as tmp:
        server, port = start_redis(Path(tmp))
        url = f"redis://127.0.0.1:{port}"
        try:
            rows: list[tuple[str, Rate, Rate]] = []

            async def run() -> None:
                for mode, label in (
                    ("pipelined", f"publish, pipelined x{args.batch}"),
                    ("concurrent", f"publish, {args.tasks} concurrent tasks"),
                    ("single", "publish, one task, await each"),
                ):
                    ours = await ours_publish(url, mode, args, payload)
                    theirs = await redispy_publish(port, mode, args, payload)
                    rows.append((label, ours, theirs))
                ours = await ours_receive(url, port, args, payload)
                theirs = await redispy_receive(port, args, payload)
                rows.append(("receive (redis-benchmark publishing)", ours, theirs))

            trio.run(run)
            ceiling = redis_benchmark_publish(port, args, payload)
        finally:
            server.terminate()
            server.wait(10)

    cpus = os.cpu_count()
    print(
        f"\nRedis client: worker.redis (trio + hiredis) vs redis-py {redispy.__version__} sync via "
        f"trio.to_thread; redis-server on loopback, {args.payload}-byte messages, {args.duration:.0f} s each, "
        f"{cpus} CPUs\n"
    )
    header = (
        f"{'scenario':40} {'ours ops/s':>12} {'redis-py ops/s':>15} {'ratio':>8}"
        f" {'ours CPU/op':>12} {'redis-py CPU/op':>16}"
    )
    print(header)
    print("-" * len(header))
    for label, ours, theirs in rows:
        ratio = ours.per_second / theirs.per_second if theirs.per_second else float("inf")
        print(
            f"{label:40} {ours.per_second:12,.0f} {theirs.per_second:15,.0f} {ratio:7.1f}x "
            f"{ours.cpu_us:9.1f} µs {theirs.cpu_us:13.1f} µs"
        )
    for label, ours, theirs in rows:
        if ours.published:
            assert theirs.published
            print(
                f"\n{label}: published in the window: {ours.published / ours.seconds:,.0f}/s while ours received "
                f"{ours.ops / ours.published:.0%} of them; {theirs.published / theirs.seconds:,.0f}/s while "
                f"redis-py received {theirs.ops / theirs.published:.0%} (the rest queued in Redis)"
            )
    print(f"\nceiling: redis-benchmark PUBLISH -P {args.batch} -c 1: {ceiling:,.0f} publishes/s")


if __name__ == "__main__":
    main()
