"""worker.metrics: the exposition parses, instruments and statistics sources show up, label sets stay bounded."""

from __future__ import annotations

import dataclasses
import logging

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mbworker.lib.http.server import HttpServer, HttpServerStatistics, serve_http
from mbworker.lib.http.types import ClientDisconnected, HttpRequest, Responder, WebSocketHandler
from mbworker.lib.redis import PubSubStatistics, RedisStatistics
from mbworker.lib.redis.client import RedisState
from mbworker.realtime.service import RealtimeStatistics
from mbworker.runtimes.api import RuntimeStatistics
from mbworker.runtimes.deno.runtime import DenoStatistics
from mbworker.runtimes.wasm.runtime import WasmStatistics
from mbworker.worker.cache.store import CacheStatistics
from mbworker.worker.metrics import (
    CACHE_STATS,
    HTTP_STATS,
    OVERFLOW,
    PUBSUB_STATS,
    REALTIME_STATS,
    REDIS_STATS,
    RUNTIME_STATS,
    UNMATCHED,
    Metrics,
    StatsSpec,
    serve_metrics,
)


def scrape(metrics: Metrics) -> dict[str, list[Sample]]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    for sample in samples.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def runtime_stats(**changes: object) -> RuntimeStatistics:
    base = RuntimeStatistics(
        versions=1, processes=2, busy=1, in_flight=3, cold_starts=4, boot_failures=0, limit_kills={"cpu": 2}
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_invocations_and_latency_change_after_calls() -> None:
    m = Metrics(process=False)
    m.observe_invocation("hello", 200, 0.02)
    before = scrape(m)
    assert value(before, "mbworker_invocations_total", function="hello", status="200") == 1
    m.observe_invocation("hello", 200, 0.02)
    m.observe_invocation("hello", 546, 3.0)
    after = scrape(m)
    assert value(after, "mbworker_invocations_total", function="hello", status="200") == 2
    assert value(after, "mbworker_invocations_total", function="hello", status="546") == 1
    assert value(after, "mbworker_request_duration_seconds_count", function="hello") == 3
    assert value(after, "mbworker_request_duration_seconds_bucket", function="hello", le="0.025") == 2
    assert value(after, "mbworker_request_duration_seconds_sum", function="hello") == pytest.approx(3.04)
    assert "mbworker_invocations_created" not in after  # *_created series are switched off


def test_latency_buckets_are_cumulative_and_inclusive() -> None:
    m = Metrics(process=False)
    for seconds in (0.005, 0.0051, 0.5, 1000.0):  # a value equal to a bound counts in that bucket (le)
        m.observe_invocation("hello", 200, seconds)
    s = scrape(m)
    assert value(s, "mbworker_request_duration_seconds_bucket", function="hello", le="0.005") == 1
    assert value(s, "mbworker_request_duration_seconds_bucket", function="hello", le="0.01") == 2
    assert value(s, "mbworker_request_duration_seconds_bucket", function="hello", le="0.5") == 3
    assert value(s, "mbworker_request_duration_seconds_bucket", function="hello", le="400.0") == 3
    assert value(s, "mbworker_request_duration_seconds_bucket", function="hello", le="+Inf") == 4
    assert value(s, "mbworker_request_duration_seconds_count", function="hello") == 4


def test_other_instruments() -> None:
    m = Metrics(node_id="node-a", version="1.2.3", process=False)
    m.rate_limited("realtime")
    m.rate_limited("realtime")
    m.set_draining()
    m.set_function_version("hello", 4)
    s = scrape(m)
    assert value(s, "mbworker_rate_limit_rejections_total", scope="realtime") == 2
    assert value(s, "mbworker_draining") == 1
    assert value(s, "mbworker_function_active_version", function="hello") == 4
    assert value(s, "mbworker_build_info", version="1.2.3", node="node-a") == 1


def test_statistics_sources_are_read_at_scrape_time() -> None:
    m = Metrics(process=False)
    current = {"deno": runtime_stats(), "wasm": runtime_stats(processes=0, limit_kills={})}
    remove_deno = m.add_statistics(RUNTIME_STATS, lambda: current["deno"], runtime="deno")
    m.add_statistics(RUNTIME_STATS, lambda: current["wasm"], runtime="wasm")
    s = scrape(m)
    assert value(s, "mbworker_runtime_processes", runtime="deno") == 2
    assert value(s, "mbworker_runtime_processes", runtime="wasm") == 0
    assert value(s, "mbworker_runtime_limit_kills_total", runtime="deno", kind="cpu") == 2
    assert value(s, "mbworker_runtime_compiles_total") is None  # not a field of RuntimeStatistics: skipped

    current["deno"] = runtime_stats(processes=5, busy=5, cold_starts=9, limit_kills={"cpu": 2, "memory": 1})
    current["wasm"] = WasmStatistics(1, 1, 1, 1, 1, 0, {}, compiles=3, cache_loads=2)
    s = scrape(m)
    assert value(s, "mbworker_runtime_processes", runtime="deno") == 5
    assert value(s, "mbworker_runtime_busy", runtime="deno") == 5
    assert value(s, "mbworker_runtime_cold_starts_total", runtime="deno") == 9
    assert value(s, "mbworker_runtime_limit_kills_total", runtime="deno", kind="memory") == 1
    assert value(s, "mbworker_runtime_compiles_total", runtime="wasm") == 3

    remove_deno()
    s = scrape(m)
    assert value(s, "mbworker_runtime_processes", runtime="deno") is None
    assert value(s, "mbworker_runtime_processes", runtime="wasm") == 1


def test_every_component_snapshot_maps() -> None:
    m = Metrics(process=False)
    cache = CacheStatistics(
        hits=5, misses=2, bypasses=1, coalesced=1, stores=2, not_stored={"too-large": 1},
        bypass_reasons={"method": 1}, evictions=3, expirations=0, entries=2, bytes=4096, capacity_bytes=1 << 20,
        flights=0,
    )  # fmt: skip
    realtime = RealtimeStatistics(
        connections=3, channels=4, topics=2, messages_in=10, publications=6, deliveries=12,
        slow_consumer_disconnects=1, rejected_handshakes=0, joins=5, presence_entries=2,
    )  # fmt: skip
    redis = RedisStatistics(
        state=RedisState.DEGRADED, connections=0, connects=2, reconnects=1, connect_failures=4, commands=100,
        response_errors=0, connection_errors=2, timeouts=1, inflight=0, address=None,
    )  # fmt: skip
    http = HttpServerStatistics(
        connections_open=2, connections_total=9, requests_served=20, websocket_handoffs=1, bad_requests=0,
        timeouts=0, draining=True, stalled_writes=3,
    )  # fmt: skip
    m.add_statistics(CACHE_STATS, lambda: cache)
    m.add_statistics(REALTIME_STATS, lambda: realtime)
    m.add_statistics(REDIS_STATS, lambda: redis)
    m.add_statistics(HTTP_STATS, lambda: http, listener="public")
    s = scrape(m)
    assert value(s, "mbworker_http_stalled_writes_total", listener="public") == 3
    assert value(s, "mbworker_cache_hits_total") == 5
    assert value(s, "mbworker_cache_bypasses_total", reason="method") == 1
    assert value(s, "mbworker_cache_not_stored_total", reason="too-large") == 1
    assert value(s, "mbworker_cache_bytes") == 4096
    assert value(s, "mbworker_websocket_connections") == 3
    assert value(s, "mbworker_realtime_messages_out_total") == 12
    assert value(s, "mbworker_realtime_slow_consumer_disconnects_total") == 1
    assert value(s, "mbworker_realtime_joins_total") == 5
    assert value(s, "mbworker_realtime_presence_entries") == 2
    assert value(s, "mbworker_redis_connected") == 0
    assert value(s, "mbworker_redis_reconnects_total") == 1
    assert value(s, "mbworker_http_open_connections", listener="public") == 2
    assert value(s, "mbworker_http_draining", listener="public") == 1


def test_spec_fields_exist_on_the_snapshot_types() -> None:
    """A renamed statistics field would silently drop a metric: every spec field must exist somewhere."""
    targets: list[tuple[StatsSpec, tuple[type, ...]]] = [
        (RUNTIME_STATS, (RuntimeStatistics, WasmStatistics, DenoStatistics)),
        (CACHE_STATS, (CacheStatistics,)),
        (REALTIME_STATS, (RealtimeStatistics,)),
        (REDIS_STATS, (RedisStatistics,)),
        (PUBSUB_STATS, (PubSubStatistics,)),
        (HTTP_STATS, (HttpServerStatistics,)),
    ]
    for spec, classes in targets:
        fields = {f.name for cls in classes for f in dataclasses.fields(cls)}
        missing = [stat.field for stat in spec.stats if stat.field not in fields]
        assert not missing, f"{spec.name}: {missing}"


def test_family_names_are_unique() -> None:
    m = Metrics(process=False)
    names = [x._name for x in vars(m).values() if isinstance(getattr(x, "_name", None), str)]
    for spec in (RUNTIME_STATS, CACHE_STATS, REALTIME_STATS, REDIS_STATS, PUBSUB_STATS, HTTP_STATS):
        names += [f"mbworker_{stat.name.removesuffix('_total')}" for stat in spec.stats]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_failing_source_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(process=False)

    def broken() -> RuntimeStatistics:
        raise RuntimeError("boom")

    m.add_statistics(RUNTIME_STATS, broken, runtime="deno")
    m.add_statistics(RUNTIME_STATS, runtime_stats, runtime="wasm")
    with caplog.at_level(logging.ERROR, logger="mbworker.metrics"):
        s = scrape(m)
        scrape(m)
    assert value(s, "mbworker_runtime_processes", runtime="wasm") == 2
    assert value(s, "mbworker_runtime_processes", runtime="deno") is None
    assert len([r for r in caplog.records if "boom" in (r.exc_text or "")]) == 1  # logged once, not per scrape


def test_sources_of_one_spec_share_label_names() -> None:
    m = Metrics(process=False)
    m.add_statistics(RUNTIME_STATS, runtime_stats, runtime="deno")
    with pytest.raises(ValueError, match="label names"):
        m.add_statistics(RUNTIME_STATS, runtime_stats, pool="x")


def test_label_sets_stay_bounded() -> None:
    m = Metrics(process=False, max_functions=2)
    for slug in ("a", "b", "c", "d"):
        m.observe_invocation(slug, 200, 0.01)
    m.observe_invocation(UNMATCHED, 404, 0.001)
    s = scrape(m)
    functions = {x.labels["function"] for x in s["mbworker_invocations_total"]}
    assert functions == {"a", "b", OVERFLOW, UNMATCHED}
    assert value(s, "mbworker_invocations_total", function=OVERFLOW, status="200") == 2


def test_forget_function_drops_its_series() -> None:
    m = Metrics(process=False)
    m.observe_invocation("gone", 200, 0.01)
    m.observe_invocation("gone", 500, 0.01)
    m.set_function_version("gone", 2)
    m.observe_invocation("kept", 200, 0.01)
    m.forget_function("gone")
    s = scrape(m)
    assert {x.labels["function"] for x in s["mbworker_invocations_total"]} == {"kept"}
    assert value(s, "mbworker_request_duration_seconds_count", function="gone") is None
    assert value(s, "mbworker_function_active_version", function="gone") is None
    m.observe_invocation("gone", 200, 0.01)  # redeployed under the same name: counts from zero again
    assert value(scrape(m), "mbworker_invocations_total", function="gone", status="200") == 1


def test_openmetrics_and_process_metrics() -> None:
    m = Metrics()
    m.observe_invocation("hello", 200, 0.01)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    plain, _ = m.render()
    assert b"process_resident_memory_bytes" in plain
    assert b"python_info" in plain


def test_registries_are_private() -> None:
    from prometheus_client import REGISTRY

    a, b = Metrics(process=False), Metrics(process=False)
    a.observe_invocation("only-a", 200, 0.01)
    assert value(scrape(b), "mbworker_invocations_total", function="only-a") is None
    assert REGISTRY.get_sample_value("mbworker_invocations_total", {"function": "only-a", "status": "200"}) is None


class MetricsApp:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        await serve_metrics(request, responder, self.metrics)

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None


async def test_serve_metrics_over_http() -> None:
    m = Metrics()
    m.add_statistics(RUNTIME_STATS, runtime_stats, runtime="deno")
    m.observe_invocation("hello", 200, 0.01)
    async with trio.open_nursery() as nursery:
        server: HttpServer = await nursery.start(serve_http, MetricsApp(m), "127.0.0.1", 0)

        def get(accept: str | None) -> httpx.Response:
            headers = {"accept": accept} if accept else {}
            with httpx.Client(trust_env=False) as client:
                return client.get(f"http://127.0.0.1:{server.port}/metrics", headers=headers)

        plain = await trio.to_thread.run_sync(get, None)
        m.observe_invocation("hello", 200, 0.01)
        again = await trio.to_thread.run_sync(get, "application/openmetrics-text; version=1.0.0")
        nursery.cancel_scope.cancel()
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(plain.text)}
    assert families["mbworker_runtime_processes"].samples[0].value == 2
    assert families["mbworker_invocations"].samples[0].value == 1
    assert again.headers["content-type"].startswith("application/openmetrics-text")
    assert 'mbworker_invocations_total{function="hello",status="200"} 2.0' in again.text


async def test_render_async_matches_render() -> None:
    m = Metrics(process=False)
    m.add_statistics(RUNTIME_STATS, runtime_stats, runtime="deno")
    m.observe_invocation("hello", 200, 0.01)
    assert (await m.render_async())[0] == m.render()[0]


class FakeResponder:
    """Just enough of a Responder for observe_request (its bytes are not the point here)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self._started = True
        self.sent.append(status)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._started = True
        self.sent.append(status)

    async def write(self, chunk: bytes) -> None:
        raise ClientDisconnected

    async def end(self) -> None:
        pass


async def test_observe_request_counts_what_was_sent() -> None:
    m = Metrics(process=False)
    inner = FakeResponder()
    with m.observe_request("hello", inner) as responder:
        await responder.send(201, [])
    assert inner.sent == [201]
    with pytest.raises(RuntimeError), m.observe_request("hello", FakeResponder()):
        raise RuntimeError("escaped")  # the server will answer 500
    with m.observe_request("hello", FakeResponder()) as responder:
        await responder.start(200, [])
        with pytest.raises(ClientDisconnected):
            await responder.write(b"x")  # streamed, then the client left: the status on the wire counts
    with pytest.raises(ClientDisconnected), m.observe_request("hello", FakeResponder()):
        raise ClientDisconnected
    with trio.move_on_after(0):
        with m.observe_request("hello", FakeResponder()):
            await trio.sleep_forever()  # cancelled before any answer
    s = scrape(m)
    assert value(s, "mbworker_invocations_total", function="hello", status="201") == 1
    assert value(s, "mbworker_invocations_total", function="hello", status="500") == 1
    assert value(s, "mbworker_invocations_total", function="hello", status="200") == 1
    assert value(s, "mbworker_invocations_total", function="hello", status="499") == 2
    assert value(s, "mbworker_request_duration_seconds_count", function="hello") == 5
