"""The Redis client's own cost per command, without the network: the command surface, packing and the reply's
decoding, with the connection's round trip answered at once in the same process.

    .venv/bin/python bench/redis_commands.py [--calls 200000] [--repeat 5]

What the socket benches (redis_pubsub.py, realtime_redis.py, cluster_latency.py) measure on top of this is the
kernel, redis-server and trio's scheduling, which swing with the host's load; this part is the client's Python
alone (CPU time of this process, best of `--repeat`), so it is what a change to the command layer moves.
Cases: typed commands on the client (`publish`, `get`, `set` with options, `zrangebyscore` with scores: a reply
converter), raw `execute`, and a pipeline of 1000 `publish` (queue and execute).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mbworker.lib.redis import RedisClient, parse_redis_url  # noqa: E402

PIPELINE = 1000


def client_answering(reply: Any) -> RedisClient:
    """A client whose round trip answers every command with `reply` at once (no connection, no nursery)."""
    client = RedisClient(parse_redis_url("redis://127.0.0.1:1/0"), nursery=None)  # type: ignore[arg-type]

    async def roundtrip(packed: bytes, n: int) -> list[Any]:
        return [reply] * n

    client._roundtrip = roundtrip  # type: ignore[method-assign]
    return client


async def per_call(calls: int, call: Callable[[], Awaitable[Any]]) -> float:
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main(args: argparse.Namespace) -> None:
    ints, bulk, ok = client_answering(1), client_answering(b"value"), client_answering(b"OK")
    scored = client_answering([b"a", b"1.5", b"b", b"2"])

    async def pipeline() -> None:
        async with ints.pipeline() as p:
            for _ in range(PIPELINE):
                p.publish("channel", b"m")
            await p.execute()

    cases: list[tuple[str, int, Callable[[], Awaitable[Any]]]] = [
        ("publish(channel, message)", args.calls, lambda: ints.publish("channel", b"message")),
        ("get(key)", args.calls, lambda: bulk.get("key")),
        ("set(key, value, px=, nx=True)", args.calls, lambda: ok.set("key", b"value", px=1500, nx=True)),
        ("zrangebyscore(..., withscores)", args.calls, lambda: scored.zrangebyscore("z", 0, 10, withscores=True)),
        ("execute('PUBLISH', ...)", args.calls, lambda: ints.execute("PUBLISH", "channel", b"message")),
        (f"pipeline of {PIPELINE} publish, per command", max(1, args.calls // PIPELINE), pipeline),
    ]
    print(f"Redis client CPU per command, round trip answered in-process, best of {args.repeat}")
    print(f"{'case':<40} {'µs/command':>11}")
    for name, calls, call in cases:
        best = min([await per_call(calls, call) for _ in range(args.repeat)])
        if name.startswith("pipeline"):
            best /= PIPELINE
        print(f"{name:<40} {best:>11.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    trio.run(main, parser.parse_args())
