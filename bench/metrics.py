"""Metrics: the hot-path cost of `Metrics.observe_invocation`, and the cost of one scrape.

    .venv/bin/python bench/metrics.py [--calls 200000] [--functions 200]

1. Per call, µs: the reference is prometheus_client used the plain way (`counter.labels(fn, status).inc()` and
   `histogram.labels(fn).observe(s)` on every call), and the same with the labeled children cached per function
   (what `Metrics` did before `RequestInstruments`); `Metrics.observe_invocation` counts in plain numbers (a dict
   increment and a bisect). A bare dict increment is the floor (what any counting costs in CPython).
2. Per scrape, ms: `Metrics.render()` with `--functions` functions × 3 statuses, each runtime/cache/realtime/
   redis/http statistics source registered, against `generate_latest` of prometheus_client instruments holding
   the same invocation counts and histograms alone.
Loopback-free and bounded: a fixed number of calls, best of 5 runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402

from mbworker.runtimes.api import RuntimeStatistics  # noqa: E402
from mbworker.worker.metrics import (  # noqa: E402
    CACHE_STATS,
    HTTP_STATS,
    LATENCY_BUCKETS,
    REALTIME_STATS,
    REDIS_STATS,
    RUNTIME_STATS,
    Metrics,
)


def best_of(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _NullResponder:
    started = False


def per_call(calls: int) -> list[tuple[str, float]]:
    slugs = [f"fn{i}" for i in range(20)]
    statuses = (200, 200, 200, 404, 546)
    plan = [(slugs[i % 20], statuses[i % 5], 0.001 * (i % 50)) for i in range(calls)]

    registry = CollectorRegistry()
    counter = Counter("ref_invocations", "ref", ["function", "status"], registry=registry)
    histogram = Histogram("ref_duration_seconds", "ref", ["function"], buckets=LATENCY_BUCKETS, registry=registry)

    def reference() -> None:
        for fn, status, s in plan:
            counter.labels(fn, str(status)).inc()
            histogram.labels(fn).observe(s)

    children: dict[str, tuple[Histogram, dict[int, Counter]]] = {}

    def cached_children() -> None:
        for fn, status, s in plan:
            entry = children.get(fn)
            if entry is None:
                entry = children[fn] = (histogram.labels(fn), {})
            child = entry[1].get(status)
            if child is None:
                child = entry[1][status] = counter.labels(fn, str(status))
            child.inc()
            entry[0].observe(s)

    metrics = Metrics(process=False)
    observe = metrics.observe_invocation

    def ours() -> None:
        for fn, status, s in plan:
            observe(fn, status, s)

    responder = _NullResponder()
    observe_request = metrics.observe_request

    def ours_wrapped() -> None:
        for fn, _status, _s in plan:
            with observe_request(fn, responder):  # type: ignore[arg-type]
                pass

    counts: dict[tuple[str, int], int] = {}

    def floor() -> None:
        for fn, status, _s in plan:
            key = (fn, status)
            counts[key] = counts.get(key, 0) + 1

    return [
        ("prometheus_client .labels() per call (reference)", best_of(5, reference) / calls * 1e6),
        ("prometheus_client, labeled children cached", best_of(5, cached_children) / calls * 1e6),
        ("Metrics.observe_invocation (plain numbers)", best_of(5, ours) / calls * 1e6),
        ("Metrics.observe_request (with-block + status recorder)", best_of(5, ours_wrapped) / calls * 1e6),
        ("bare dict increment (floor)", best_of(5, floor) / calls * 1e6),
    ]


def per_scrape(functions: int) -> list[tuple[str, float]]:
    metrics = Metrics()
    instruments_only = CollectorRegistry()
    counter = Counter("mbworker_invocations", "ref", ["function", "status"], registry=instruments_only)
    histogram = Histogram(
        "mbworker_request_duration_seconds", "ref", ["function"], buckets=LATENCY_BUCKETS, registry=instruments_only
    )
    for i in range(functions):
        for status in (200, 500, 546):
            metrics.observe_invocation(f"fn{i}", status, 0.01)
            counter.labels(f"fn{i}", str(status)).inc()
            histogram.labels(f"fn{i}").observe(0.01)
    stats = RuntimeStatistics(3, 12, 4, 9, 100, 2, {"cpu": 3, "memory": 1})
    metrics.add_statistics(RUNTIME_STATS, lambda: stats, runtime="deno")
    metrics.add_statistics(RUNTIME_STATS, lambda: stats, runtime="wasm")
    empty = type("Empty", (), {})()
    for spec in (CACHE_STATS, REALTIME_STATS, REDIS_STATS):
        metrics.add_statistics(spec, lambda: empty)
    metrics.add_statistics(HTTP_STATS, lambda: empty, listener="public")
    body, _ = metrics.render()
    return [
        (f"generate_latest, invocation instruments only ({functions} fns) (reference)",
         best_of(5, lambda: generate_latest(instruments_only)) * 1e3),
        (f"Metrics.render(), everything ({len(body) // 1024} KiB)", best_of(5, lambda: metrics.render()) * 1e3),
    ]  # fmt: skip


def table(title: str, unit: str, rows: list[tuple[str, float]]) -> None:
    ref = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print(f"{'':<{width}}  {unit:>9}  {'× ref':>7}")
    for name, v in rows:
        print(f"{name:<{width}}  {v:>9.3f}  {v / ref:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--functions", type=int, default=200)
    args = parser.parse_args()
    table("1. hot path: one function request counted (counter + histogram)", "µs/call", per_call(args.calls))
    table("2. one scrape of /metrics", "ms", per_scrape(args.functions))


if __name__ == "__main__":
    main()
