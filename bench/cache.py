"""Result cache: hit ratio of moka TinyLFU vs an LRU of the same byte capacity, cost of a hit, and cache-hit
req/s through the front door vs the trio floor.

    .venv/bin/python bench/cache.py [--requests 300000] [--duration 3] [--rounds 5] [--connections 16] [--skip-http]

1. Hit ratio. One key trace, replayed against each cache with the same byte capacity (cache-aside: look up,
   insert on a miss): a Zipf(0.9) popularity over `--keys` keys with log-uniform sizes (512 B–16 KiB), plus
   scans — every 20 000 Zipf requests, a run of 5 000 never-repeated keys (a crawler, a bulk export). The
   reference is a plain LRU (OrderedDict, evicting the oldest until the bytes fit). Also shown: moka with its
   "lru" policy, and ResultCache itself (lookup + store), whose entries also weigh their headers, key and a
   fixed overhead — so it is compared with an LRU that weighs entries the same way.
2. Cost of a hit, µs per lookup: a plain LRU get on a prebuilt key (the reference: no policy, no key
   building), a raw moka get, and ResultCache.lookup + Hit.headers() on a request with five headers
   (Authorization included) and a two-pair query.
3. Through the front door (unless --skip-http): bench/floor_server.py, `serve_http` answering a canned response,
   and `serve_http` answering every request through `respond_through_cache` (all hits after the first). Same
   load generator (bench/_load.py), same connections; each server in its own process, driven in turn for
   `--rounds` rounds; medians of req/s and of server CPU per request.
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from moka_py import Moka  # noqa: E402

from mbworker.worker.cache import CacheSettings, FunctionCacheConfig, Hit, Miss, ResultCache  # noqa: E402

Headers = list[tuple[bytes, bytes]]


# -- 1. hit ratio -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    keys: list[int]
    sizes: dict[int, int]
    scan_requests: int


def make_trace(n_zipf: int, n_keys: int, seed: int = 1) -> Trace:
    rng = random.Random(seed)
    cum: list[float] = []
    total = 0.0
    for rank in range(n_keys):
        total += 1.0 / (rank + 1) ** 0.9
        cum.append(total)
    ids = list(range(n_keys))
    rng.shuffle(ids)  # popularity unrelated to key id
    popular = rng.choices(ids, cum_weights=cum, k=n_zipf)
    keys: list[int] = []
    next_scan_key = n_keys
    scan_requests = 0
    for start in range(0, n_zipf, 20_000):
        keys += popular[start : start + 20_000]
        if start + 20_000 < n_zipf:
            keys += range(next_scan_key, next_scan_key + 5_000)
            next_scan_key += 5_000
            scan_requests += 5_000
    lo, hi = math.log(512), math.log(16 * 1024)
    sizes = {k: int(math.exp(rng.uniform(lo, hi))) for k in range(next_scan_key)}
    return Trace(keys, sizes, scan_requests)


def replay_lru(trace: Trace, capacity: int, weigh: Callable[[int, int], int] | None = None) -> int:
    cache: OrderedDict[int, int] = OrderedDict()
    used = hits = 0
    for key in trace.keys:
        if key in cache:
            cache.move_to_end(key)
            hits += 1
            continue
        size = trace.sizes[key] if weigh is None else weigh(key, trace.sizes[key])
        if size > capacity:
            continue
        cache[key] = size
        used += size
        while used > capacity:
            _, evicted = cache.popitem(last=False)
            used -= evicted
    return hits


def replay_moka(trace: Trace, capacity: int, policy: str) -> int:
    sizes = trace.sizes
    cache: Moka[int, int] = Moka(capacity, policy=policy, weigher=lambda _k, v: v)  # type: ignore[arg-type]
    hits = 0
    for key in trace.keys:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.set(key, sizes[key])
    return hits


@dataclass
class Req:
    method: str = "GET"
    path: str = "/functions/v1/bench"
    query: str = ""
    headers: Headers = field(default_factory=list)


RC_PATH = "/functions/v1/bench"
RC_HEAD: Headers = [(b"content-type", b"application/octet-stream")]


def result_cache_weight(key: int, size: int) -> int:
    """The weight ResultCache gives this trace's entry: body + headers + key + its fixed overhead."""
    from mbworker.worker.cache.store import _ENTRY_OVERHEAD, _HEADER_OVERHEAD

    headers = sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in RC_HEAD)
    return _ENTRY_OVERHEAD + size + headers + len(RC_PATH) + len(f"k={key}")


def replay_result_cache(trace: Trace, capacity: int) -> int:
    cache = ResultCache(CacheSettings(capacity_bytes=capacity, max_entry_bytes=64 * 1024))
    config = FunctionCacheConfig(ttl=3600)
    bodies = {size: b"x" * size for size in set(trace.sizes.values())}
    head = RC_HEAD
    hits = 0
    for key in trace.keys:
        got = cache.lookup(Req(path=RC_PATH, query=f"k={key}"), slug="bench", version=1, config=config)
        if isinstance(got, Hit):
            hits += 1
        elif isinstance(got, Miss):
            cache.store(got, 200, head, bodies[trace.sizes[key]])
    return hits


def hit_ratio_table(args: argparse.Namespace) -> None:
    trace = make_trace(args.requests, args.keys)
    total_bytes = sum(trace.sizes[k] for k in range(args.keys))
    capacity = args.capacity_mb * 1024 * 1024
    print(
        f"1. hit ratio: {len(trace.keys):,} requests = {args.requests:,} Zipf(0.9) over {args.keys:,} keys "
        f"({total_bytes / 2**20:.0f} MiB) + {trace.scan_requests:,} scan requests; capacity {args.capacity_mb} MiB"
    )
    rows: list[tuple[str, Callable[[], int]]] = [
        ("LRU (OrderedDict, bytes)", lambda: replay_lru(trace, capacity)),
        ("moka lru (bytes)", lambda: replay_moka(trace, capacity, "lru")),
        ("moka tiny_lfu (bytes)", lambda: replay_moka(trace, capacity, "tiny_lfu")),
        ("LRU, ResultCache's weights", lambda: replay_lru(trace, capacity, result_cache_weight)),
        ("ResultCache (tiny_lfu)", lambda: replay_result_cache(trace, capacity)),
    ]
    n_all = len(trace.keys)
    n_zipf = n_all - trace.scan_requests
    print(f"   {'cache':<26} {'hit ratio':>10} {'of non-scan':>12} {'vs LRU':>10} {'s':>6}")
    reference: float | None = None
    for name, run in rows:
        t0 = time.perf_counter()
        hits = run()
        took = time.perf_counter() - t0
        ratio = hits / n_all
        if reference is None or name.startswith("LRU"):  # each block compares with the LRU above it
            reference = ratio
        delta = (ratio - reference) * 100
        print(f"   {name:<26} {ratio:>10.1%} {hits / n_zipf:>12.1%} {delta:>+9.1f}pt {took:>6.1f}")


# -- 2. cost of a hit ---------------------------------------------------------------------------------------


def _best_us(run: Callable[[int], None], n: int, repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def hit_cost_table(n: int) -> None:
    req = Req(
        path="/functions/v1/hello/items",
        query="limit=10&offset=20",
        headers=[
            (b"host", b"worker-1:8080"),
            (b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.c2lnbmF0dXJl"),
            (b"apikey", b"eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.c2lnbmF0dXJl"),
            (b"accept", b"application/json"),
            (b"user-agent", b"bench"),
        ],
    )
    body = b"x" * 1000
    key = ("hello", 1, req.path, req.query, (), b"0123456789abcdef")

    lru: OrderedDict[tuple[object, ...], bytes] = OrderedDict({key: body})

    def plain_lru(count: int) -> None:
        for _ in range(count):
            value = lru.get(key)
            if value is not None:
                lru.move_to_end(key)

    moka: Moka[tuple[object, ...], bytes] = Moka(1 << 20)
    moka.set(key, body)

    def raw_moka(count: int) -> None:
        for _ in range(count):
            moka.get(key)

    cache = ResultCache(CacheSettings())
    config = FunctionCacheConfig()
    miss = cache.lookup(req, slug="hello", version=1, config=config)
    assert isinstance(miss, Miss)
    cache.store(miss, 200, [(b"content-type", b"text/plain"), (b"cache-control", b"max-age=3600")], body)

    def result_cache(count: int) -> None:
        for _ in range(count):
            hit = cache.lookup(req, slug="hello", version=1, config=config)
            assert isinstance(hit, Hit)
            hit.headers()

    rows = [
        ("plain LRU get (prebuilt key)", plain_lru),
        ("moka get (prebuilt key)", raw_moka),
        ("ResultCache.lookup + headers", result_cache),
    ]
    print(f"\n2. cost of a hit, best of 5 × {n:,} lookups")
    print(f"   {'lookup':<30} {'µs/op':>8} {'× LRU':>7}")
    reference: float | None = None
    for name, run in rows:
        us = _best_us(run, n)
        reference = us if reference is None else reference
        print(f"   {name:<30} {us:>8.2f} {us / reference:>7.1f}")


# -- 3. through the front door ------------------------------------------------------------------------------


def _serve(port: int, cached: bool) -> None:
    """Subprocess side: serve_http answering 'hello' through the result cache (all hits after the first), or
    directly (the same front door with no cache: shows what the cache itself adds)."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import trio

    from mbworker.lib.http.server import serve_http
    from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
    from mbworker.runtimes.api import InvocationResult
    from mbworker.worker.cache import respond_through_cache

    cache = ResultCache(CacheSettings())
    config = FunctionCacheConfig()
    head = [(b"content-type", b"text/plain"), (b"cache-control", b"max-age=3600"), (b"content-length", b"5")]

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"

    @asynccontextmanager
    async def invoke() -> AsyncIterator[InvocationResult]:
        yield InvocationResult(200, list(head), body())

    class App:
        async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
            if cached:
                await respond_through_cache(
                    cache, request, responder, invoke, slug="hello", version=1, config=config, timeout=5.0
                )
            else:
                await responder.send(200, [(b"content-type", b"text/plain")], b"hello")

        def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
            return None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_http, App(), "127.0.0.1", port)
            print(f"READY {server.port}", flush=True)

    trio.run(main)


def http_table(args: argparse.Namespace) -> None:
    """All servers start at once (idle ones cost nothing); each round drives each in turn; medians reported,
    because other work on the machine moves single runs a lot."""
    from _load import cpu_seconds, run_load

    py = sys.executable
    servers = [
        ("trio floor (no parsing)", [py, str(HERE / "floor_server.py"), "--port", "0"]),
        ("serve_http, no cache", [py, __file__, "--serve", "plain"]),
        ("serve_http + cache hit", [py, __file__, "--serve", "cached"]),
    ]
    procs: list[subprocess.Popen[str]] = []
    rps: list[list[float]] = [[] for _ in servers]
    cpu: list[list[float]] = [[] for _ in servers]
    p99: list[list[float]] = [[] for _ in servers]
    errors = [0 for _ in servers]
    tool = ""
    try:
        ports: list[int] = []
        for name, cmd in servers:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT)})
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"{name} did not start: {line!r}")
            ports.append(int(line.split()[1]))
        for port in ports:  # warm-up
            run_load("127.0.0.1", port, duration=1.0, connections=args.connections, tool=args.tool)
        for _ in range(args.rounds):
            for i, (proc, port) in enumerate(zip(procs, ports, strict=True)):
                before = cpu_seconds(proc.pid)
                res = run_load("127.0.0.1", port, duration=args.duration, connections=args.connections, tool=args.tool)
                cpu[i].append((cpu_seconds(proc.pid) - before) / max(1, res.requests) * 1e6)
                rps[i].append(res.rps)
                p99[i].append(res.p99_ms)
                errors[i] += res.errors
                tool = res.tool
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    floor_rps, floor_cpu = median(rps[0]), median(cpu[0])
    print(
        f"\n3. through the front door: {tool}, {args.connections} keep-alive connections, GET /, "
        f"{args.rounds} rounds × {args.duration:g} s per server, medians, loopback"
    )
    print(
        f"   {'server':<26} {'req/s':>8} {'× floor':>8} {'p99 ms':>7} {'CPU µs/req':>11}"
        f" {'floor CPU / CPU':>16} {'errors':>7}"
    )
    for i, (name, _) in enumerate(servers):
        r, c = median(rps[i]), median(cpu[i])
        print(
            f"   {name:<26} {r:>8.0f} {r / floor_rps:>8.2f} {median(p99[i]):>7.2f} {c:>11.1f}"
            f" {floor_cpu / c:>16.2f} {errors[i]:>7}"
        )
    for i, (name, _) in enumerate(servers):
        print(f"   {name} req/s by round: " + " ".join(f"{x:.0f}" for x in rps[i]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300_000, help="Zipf requests in the trace (plus scans)")
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--capacity-mb", type=int, default=8)
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of measured load per server and round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", choices=("plain", "cached"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(0, cached=args.serve == "cached")
        return
    hit_ratio_table(args)
    hit_cost_table(args.lookups)
    if not args.skip_http:
        http_table(args)


if __name__ == "__main__":
    main()
