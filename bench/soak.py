"""Soak: minutes of mixed load on a two-node local cluster, a Redis restart in the middle, leaks and failures.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 5] [--rt-pairs 4] [--deploy-every 30]

Loopback only, temp dirs, free ports; stops by itself (hard limit: the run + 5 minutes) and reaps everything
it started. The cluster: one real redis-server (tests/redis_server.py: no persistence) and two `mbworker serve`
daemons on it (bench/functions.py's Daemon), node A and node B, as in bench/cluster_latency.py.

Deployed through node A's admin API (node B gets them through Redis): the examples `hello` (Deno, JWT gate on)
and `wasm-hello` (Wasm, JWT gate on), `cached` (Deno, `[cache] ttl = "60s"`, 20 query variants) and `soakfn`
(Deno, redeployed and rolled back during the run). Then, all at once, for `--minutes`:

- function requests: for each of those four and each node, one sequential client paced at `--rate` requests/s
  (so at most 8 requests in flight and 8 × rate per second), each checked (status and body);
- realtime: `--rt-pairs` pairs of sockets (websockets, Phoenix vsn 2.0.0), one on each node, looping sessions:
  both join a fresh topic (presence key, broadcast ack), each tracks and the other must see it (presence
  across nodes), each broadcasts and the other must receive it (broadcast across nodes), one untracks and the
  other must see it leave, both leave, close;
- every `--deploy-every` s, alternately, a deploy of a new `soakfn` or a rollback, through the admin API of
  node A, B, B, A, A, ... (each node deploys and rolls back); then both nodes must serve the expected body
  (convergence);
- in the middle, a Redis restart: stop redis-server, wait `--redis-down` s, start it again on the same port,
  empty. "The Redis window" is from the stop until `--window-grace` s after it answers again. A failure whose
  interval touches the window is counted apart; any other failure is a bug, printed when it happens with
  its status and body.

The report: each node's RSS, open FDs, Deno processes (its own, found by its data dir: tests/processes.py) and
their RSS, and Redis keys, side by side after warm-up (start) and after the load (end); Deno processes left
after the daemons stopped; then per kind of request and node: count, failed inside / outside the Redis
window, p50 / p99 latency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _load import cpu_seconds, open_fds, rss_bytes  # noqa: E402
from functions import Daemon  # noqa: E402
from websockets.trio.client import ClientConnection, connect  # noqa: E402

from mbworker.lib.redis import open_redis  # noqa: E402
from mbworker.worker.deploy_local import build_bundles  # noqa: E402
from tests.processes import deno_processes  # noqa: E402
from tests.redis_server import RedisServer, start_redis_server  # noqa: E402

SECRET = "soak-secret-soak-secret-soak-secret-soak"
ADMIN_TOKEN = "soak-admin"
EXAMPLES = ROOT / "examples" / "functions"
REQUEST_TIMEOUT = 10.0
RT_STEP_TIMEOUT = 10.0
CONVERGE_TIMEOUT = 30.0
CACHED_VARIANTS = 20
VERSION_DIR = re.compile(r"/scratch/deno/([a-z0-9_-]+-[0-9]+)-[0-9a-f]+/")
PEAK_EVERY = 5.0
"""Seconds between samples of the nodes' RSS, FDs and Deno processes during the load (for the peak column)."""
SETTLE = 2.0
"""Seconds between the end of the load and the end snapshot (sockets closing, untracks arriving)."""


# ------------------------------------------------------------------------------------------- recording


@dataclass
class Failure:
    start: float
    end: float
    kind: str
    node: str
    detail: str


@dataclass
class Recorder:
    """Every outcome, by (kind, node); failures with their interval so they can be placed against the window."""

    t0: float
    latencies: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    failures: list[Failure] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every operation, to tell how many overlapped Redis being away."""
    redis_away: tuple[float, float] | None = None
    """(stopped, answering again), in seconds since t0."""
    window: tuple[float, float] | None = None
    """(stop, answering again + grace), in seconds since t0, once the restart happened."""
    window_open: float | None = None
    """Seconds since t0 at which Redis was stopped, while the window is open (its end is not known yet)."""

    def now(self) -> float:
        return trio.current_time() - self.t0

    def ok(self, kind: str, node: str, start: float, end: float) -> None:
        self.counts[kind, node] += 1
        self.spans.append((start, end))
        self.latencies[kind, node].append(end - start)

    def fail(self, kind: str, node: str, start: float, end: float, detail: str) -> None:
        self.counts[kind, node] += 1
        self.spans.append((start, end))
        failure = Failure(start, end, kind, node, detail)
        self.failures.append(failure)
        if not self.maybe_in_window(failure):
            print(f"FAIL outside the Redis window, t={start:.1f}-{end:.1f}s, {kind} on node {node}: {detail}")

    def maybe_in_window(self, f: Failure) -> bool:
        """Inside the window, or possibly so (the window is open and its end not known yet)."""
        if self.window_open is not None and f.end >= self.window_open:
            return True
        return self.in_window(f)

    def in_window(self, f: Failure) -> bool:
        return self.window is not None and f.end >= self.window[0] and f.start <= self.window[1]


def describe(response: httpx.Response) -> str:
    return f"status {response.status_code}, body {response.text[:300]!r}"


# ------------------------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    name: str
    daemon: Daemon
    log_path: Path
    exited_early: int | None = None
    """The daemon's exit status if it was no longer running when the soak stopped it."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.admin_port}"

    def log_lines(self) -> list[str]:
        return (self.log_path.read_text(errors="replace")).splitlines()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.daemon.port}/realtime/v1/websocket?apikey={self.daemon.anon_key}&vsn=2.0.0"


@dataclass(frozen=True)
class Snapshot:
    rss: dict[str, int]
    fds: dict[str, int]
    deno: dict[str, int]
    deno_rss: dict[str, int]
    cpu: dict[str, float]
    """CPU seconds each daemon has used since it started (its own process, not its Deno children)."""
    log_problems: dict[str, int]
    """Lines of each daemon's log (warning level and up) that say ERROR or Traceback."""
    redis_keys: int
    redis_rss: int
    versions: dict[str, str]
    """Each node's Deno processes by function version (`slug-N ×count`), read from their command lines."""
    client_cpu: float
    """CPU seconds this process (the load: HTTP and realtime clients, deploys) has used."""
    load: float
    """The host's 1-minute load average (the machine may be shared: latencies depend on it)."""


def _or_gone(read: Callable[[int], Any], pid: int) -> Any:
    """`read(pid)`, or -1 when the process is gone (a daemon that died shows as -1, and the run still reports)."""
    try:
        return read(pid)
    except (OSError, IndexError, ValueError):
        return -1


async def snapshot(nodes: list[Node], redis: RedisServer) -> Snapshot:
    rss, fds, deno, deno_rss, cpu, problems, versions = {}, {}, {}, {}, {}, {}, {}
    for n in nodes:
        pid = n.daemon.proc.pid
        rss[n.name] = _or_gone(rss_bytes, pid)
        fds[n.name] = _or_gone(open_fds, pid)
        kids = deno_processes(n.daemon.data_dir)
        deno[n.name] = len(kids)
        deno_rss[n.name] = sum(max(0, _or_gone(rss_bytes, p)) for p in kids)
        versions[n.name] = by_version(kids.values())
        cpu[n.name] = _or_gone(cpu_seconds, pid)
        problems[n.name] = sum(1 for line in n.log_lines() if "ERROR" in line or "Traceback" in line)
    keys = -1
    with trio.move_on_after(10):
        async with open_redis(redis.url) as client:
            keys = int(await client.execute("DBSIZE"))
    redis_rss = _or_gone(rss_bytes, redis.process.pid) if redis.process else -1
    client_cpu = cpu_seconds(os.getpid())
    return Snapshot(rss, fds, deno, deno_rss, cpu, problems, keys, redis_rss, versions, client_cpu, os.getloadavg()[0])


@dataclass
class Peaks:
    """The highest RSS, open FDs and Deno process count each node reached, sampled during the load."""

    rss: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deno: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def sample_peaks(nodes: list[Node], peaks: Peaks, stop: trio.Event) -> None:
    while not stop.is_set():
        for n in nodes:
            pid = n.daemon.proc.pid
            peaks.rss[n.name] = max(peaks.rss[n.name], _or_gone(rss_bytes, pid))
            peaks.fds[n.name] = max(peaks.fds[n.name], _or_gone(open_fds, pid))
            peaks.deno[n.name] = max(peaks.deno[n.name], len(deno_processes(n.daemon.data_dir)))
        with trio.move_on_after(PEAK_EVERY):
            await stop.wait()


def by_version(argvs: Iterable[list[str]]) -> str:
    """`hello-1 ×1, soakfn-3 ×2`: a Deno process's import map lives in `scratch/deno/<slug>-<version>-<hash>/`."""
    found = Counter(m.group(1) if (m := VERSION_DIR.search(" ".join(argv))) else "?" for argv in argvs)
    return ", ".join(f"{k} ×{v}" for k, v in sorted(found.items())) or "none"


def write_functions(work: Path) -> dict[str, Path]:
    """The soak's own functions (the examples are deployed from the repo as they are)."""
    cached = work / "fns" / "cached"
    cached.mkdir(parents=True)
    (cached / "index.ts").write_text(
        'Deno.serve((req) => new Response("cached " + new URL(req.url).search + " " + Date.now()));\n'
    )
    (cached / "function.toml").write_text('verify_jwt = false\n[cache]\nttl = "60s"\n')
    return {"hello": EXAMPLES / "hello", "wasm-hello": EXAMPLES / "wasm-hello", "cached": cached}


def soakfn_source(work: Path, marker: str) -> Path:
    folder = work / "fns" / marker / "soakfn"
    folder.mkdir(parents=True)
    (folder / "index.ts").write_text(f'Deno.serve(() => new Response("{marker}"));\n')
    (folder / "function.toml").write_text("verify_jwt = false\n")
    return folder


async def deploy(http: httpx.AsyncClient, node: Node, path: Path) -> dict[str, Any]:
    """Pack `path` (as `mbworker deploy` does) and POST it to `node`'s admin API; the deployment JSON."""
    (bundle,) = await trio.to_thread.run_sync(lambda: build_bundles(path))
    response = await http.post(
        f"{node.admin_url}/admin/v1/functions/{bundle.slug}/deploy",
        content=bundle.data,
        headers={"content-type": "application/octet-stream", "x-mbworker-sha256": bundle.sha256},
        timeout=60,
    )
    if response.status_code != 201:
        raise RuntimeError(f"deploy of {bundle.slug} on node {node.name}: {describe(response)}")
    result: dict[str, Any] = response.json()
    return result


async def wait_served(http: httpx.AsyncClient, nodes: list[Node], path: str, want: Callable[[httpx.Response], bool],
                      headers: dict[str, str], timeout: float) -> None:  # fmt: skip
    """Poll `path` on every node until each answers as `want` says (bounded by `timeout`)."""
    with trio.fail_after(timeout):
        for node in nodes:
            while True:
                try:
                    if want(await http.get(node.url + path, headers=headers, timeout=REQUEST_TIMEOUT)):
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)  # polling a remote process's state; bounded by the fail_after above


# ------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Kind:
    name: str
    path: Callable[[int], str]
    check: Callable[[httpx.Response], bool]
    auth: bool


def function_kinds(current_soakfn: Callable[[], set[str]]) -> list[Kind]:
    def hello_ok(r: httpx.Response) -> bool:
        return r.status_code == 200 and r.json() == {"message": "Hello world!"}

    def wasm_ok(r: httpx.Response) -> bool:
        return r.status_code == 200 and r.json() == {"message": "Hello from Wasm!"}

    def cached_ok(r: httpx.Response) -> bool:
        return r.status_code == 200 and r.text.startswith("cached ")

    def soakfn_ok(r: httpx.Response) -> bool:
        # During a switch either version may answer; any version this run deployed is fine, nothing else is.
        return r.status_code == 200 and r.text in current_soakfn()

    return [
        Kind("Deno hello (JWT)", lambda i: "/functions/v1/hello", hello_ok, True),
        Kind("Wasm hello (JWT)", lambda i: "/functions/v1/wasm-hello", wasm_ok, True),
        Kind("cached GET", lambda i: f"/functions/v1/cached?k={i % CACHED_VARIANTS}", cached_ok, False),
        Kind("soakfn (deploys)", lambda i: "/functions/v1/soakfn", soakfn_ok, False),
    ]


async def request_loop(http: httpx.AsyncClient, rec: Recorder, kind: Kind, node: Node, rate: float,
                       stop: trio.Event) -> None:  # fmt: skip
    """One request at a time, paced at `rate`/s (slower if the server is slower): bounded in flight and rate."""
    headers = {"authorization": f"Bearer {node.daemon.anon_key}"} if kind.auth else {}
    period = 1.0 / rate
    next_at = trio.current_time()
    i = 0
    while not stop.is_set():
        start = rec.now()
        try:
            response = await http.get(node.url + kind.path(i), headers=headers, timeout=REQUEST_TIMEOUT)
            good = kind.check(response)
            detail = describe(response)
        except (httpx.HTTPError, ValueError) as exc:
            good, detail = False, f"{type(exc).__name__}: {exc}"
        end = rec.now()
        if good:
            rec.ok(kind.name, node.name, start, end)
        else:
            rec.fail(kind.name, node.name, start, end, f"GET {kind.path(i)}: {detail}")
        i += 1
        next_at += period
        await trio.sleep_until(max(next_at, trio.current_time()))


class Phx:
    """One realtime socket speaking Phoenix vsn 2.0.0 frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ref = 0

    async def push(self, join_ref: str | None, topic: str, event: str, payload: Any) -> str:
        self.ref += 1
        await self.ws.send(json.dumps([join_ref, str(self.ref), topic, event, payload]))
        return str(self.ref)

    async def until(self, match: Callable[[list[Any]], bool], what: str) -> list[Any]:
        """Skip frames until one matches (bounded by RT_STEP_TIMEOUT)."""
        with trio.move_on_after(RT_STEP_TIMEOUT):
            while True:
                frame = json.loads(await self.ws.recv())
                if match(frame):
                    return list(frame)
        raise TimeoutError(f"no {what} within {RT_STEP_TIMEOUT:g}s")

    async def reply(self, ref: str, what: str) -> None:
        frame = await self.until(lambda f: f[3] == "phx_reply" and f[1] == ref, f"reply to {what}")
        if frame[4].get("status") != "ok":
            raise RuntimeError(f"{what} answered {frame[4]!r}")


class Recorded(Exception):
    """A session step failed and was recorded; the session ends."""


async def rt_step(rec: Recorder, kind: str, node: str, step: Awaitable[None]) -> None:
    start = rec.now()
    try:
        await step
    except Exception as exc:
        rec.fail(kind, node, start, rec.now(), f"{type(exc).__name__}: {exc}")
        raise Recorded from exc
    rec.ok(kind, node, start, rec.now())


@dataclass
class Side:
    """One socket of a session: its node, its presence key, its join ref."""

    phx: Phx
    node: Node
    key: str
    join_ref: str = ""


async def rt_join(me: Side, topic: str) -> None:
    config = {"broadcast": {"ack": True, "self": False}, "presence": {"key": me.key}}
    me.join_ref = await me.phx.push(None, topic, "phx_join", {"config": config})
    await me.phx.reply(me.join_ref, "phx_join")


async def rt_track(me: Side, other: Side, topic: str) -> None:
    payload = {"type": "presence", "event": "track", "payload": {"user": me.key}}
    ref = await me.phx.push(me.join_ref, topic, "presence", payload)
    await other.phx.until(lambda f: f[3] == "presence_diff" and me.key in f[4].get("joins", {}), "presence join")
    await me.phx.reply(ref, "track")


async def rt_broadcast(me: Side, other: Side, topic: str) -> None:
    tag = f"{topic}/{me.key}"
    payload = {"type": "broadcast", "event": "ping", "payload": {"tag": tag}}
    ref = await me.phx.push(me.join_ref, topic, "broadcast", payload)
    await other.phx.until(lambda f: f[3] == "broadcast" and f[4].get("payload", {}).get("tag") == tag, "broadcast")
    await me.phx.reply(ref, "broadcast")


async def rt_untrack(me: Side, other: Side, topic: str) -> None:
    ref = await me.phx.push(me.join_ref, topic, "presence", {"type": "presence", "event": "untrack"})
    await other.phx.until(lambda f: f[3] == "presence_diff" and me.key in f[4].get("leaves", {}), "presence leave")
    await me.phx.reply(ref, "untrack")


async def rt_leave(me: Side, topic: str) -> None:
    await me.phx.reply(await me.phx.push(me.join_ref, topic, "phx_leave", {}), "phx_leave")


async def rt_session(rec: Recorder, a: Node, b: Node, topic: str) -> None:
    """One session of a pair: join both, presence both ways, broadcast both ways, untrack, leave, close."""
    async with (
        connect(a.ws_url, open_timeout=RT_STEP_TIMEOUT, ping_interval=None) as wa,
        connect(b.ws_url, open_timeout=RT_STEP_TIMEOUT, ping_interval=None) as wb,
    ):
        sa, sb = Side(Phx(wa), a, "alice"), Side(Phx(wb), b, "bob")
        pairs = ((sa, sb), (sb, sa))
        for me, _ in pairs:
            await rt_step(rec, "rt join", me.node.name, rt_join(me, topic))
        for me, other in pairs:
            await rt_step(rec, "rt presence seen across", other.node.name, rt_track(me, other, topic))
        for me, other in pairs:
            await rt_step(rec, "rt broadcast across", other.node.name, rt_broadcast(me, other, topic))
        await rt_step(rec, "rt untrack seen across", b.name, rt_untrack(sa, sb, topic))
        for me, _ in pairs:
            await rt_step(rec, "rt leave", me.node.name, rt_leave(me, topic))


async def rt_pair(rec: Recorder, a: Node, b: Node, pair: int, stop: trio.Event) -> None:
    """Sessions back to back (a short pause between), each on a fresh topic; sides swap every session."""
    session = 0
    while not stop.is_set():
        start = rec.now()
        first, second = (a, b) if session % 2 == 0 else (b, a)
        try:
            await rt_session(rec, first, second, f"realtime:soak-{pair}-{session}")
        except Recorded:
            pass
        except Exception as exc:  # connecting or closing (a failing step was recorded by rt_step)
            rec.fail("rt connect/close", first.name, start, rec.now(), f"{type(exc).__name__}: {exc}")
        session += 1
        await trio.sleep(0.5)  # pacing between sessions: a bounded rate, not synchronisation


@dataclass
class SoakFn:
    """What `soakfn` may answer: the markers of versions this run deployed, by version number."""

    markers: dict[int, str] = field(default_factory=dict)

    def allowed(self) -> set[str]:
        return set(self.markers.values())


def serves(marker: str | None, response: httpx.Response) -> bool:
    return response.status_code == 200 and response.text == marker


async def deploy_loop(http: httpx.AsyncClient, rec: Recorder, work: Path, nodes: list[Node], soak: SoakFn,
                      every: float, stop: trio.Event) -> None:  # fmt: skip
    """Every `every` s (first at every/2): deploy a new soakfn, or roll back, alternating nodes; then converge."""
    n = 0
    next_at = trio.current_time() + every / 2
    while True:
        with trio.move_on_at(next_at):
            await stop.wait()
        if stop.is_set():
            return
        next_at += every
        node = nodes[(n + n // 2) % 2]  # deploy on A, roll back on B, deploy on B, roll back on A, ...
        kind = "deploy" if n % 2 == 0 else "rollback"
        start = rec.now()
        try:
            if kind == "deploy":
                marker = f"soak v{n // 2 + 2}"
                dep = await deploy(http, node, soakfn_source(work, marker))
                soak.markers[int(dep["version"])] = marker
            else:
                response = await http.post(f"{node.admin_url}/admin/v1/functions/soakfn/rollback", json={}, timeout=60)
                if response.status_code != 200:
                    raise RuntimeError(f"rollback: {describe(response)}")
                dep = response.json()
        except Exception as exc:  # whatever went wrong is recorded, and the soak goes on
            rec.fail(kind, node.name, start, rec.now(), f"{type(exc).__name__}: {exc}")
            n += 1
            continue
        rec.ok(kind, node.name, start, rec.now())
        want = soak.markers.get(int(dep["version"]))
        start = rec.now()
        try:
            await wait_served(http, nodes, "/functions/v1/soakfn", partial(serves, want), {}, CONVERGE_TIMEOUT)
            rec.ok(f"{kind}: both nodes serve it", "A+B", start, rec.now())
        except trio.TooSlowError:
            rec.fail(f"{kind}: both nodes serve it", "A+B", start, rec.now(),
                     f"v{dep['version']} ({want!r}) not served by both within {CONVERGE_TIMEOUT:g}s")  # fmt: skip
        n += 1


async def redis_restart(rec: Recorder, redis: RedisServer, at: float, down: float, grace: float) -> None:
    await trio.sleep_until(rec.t0 + at)
    rec.window_open = rec.now()
    print(f"t={rec.now():.1f}s: stopping redis-server")
    await redis.stop()
    await trio.sleep(down)  # the outage itself: how long Redis stays away
    await redis.start()  # same port, no persistence: empty
    up = rec.now()
    print(f"t={up:.1f}s: redis-server answers again (empty); window ends at t={up + grace:.1f}s")
    rec.window = (rec.window_open, up + grace)
    rec.redis_away = (rec.window_open, up)
    rec.window_open = None


# ------------------------------------------------------------------------------------------- run and report


async def soak(args: argparse.Namespace, work: Path) -> None:
    redis = await start_redis_server(work)
    nodes: list[Node] = []
    try:
        settings = {
            "MBWORKER_REDIS_URL": redis.url,
            "MBWORKER_JWT_SECRET": SECRET,
            "MBWORKER_ADMIN_TOKEN": ADMIN_TOKEN,
            "MBWORKER_LOG_LEVEL": "warning",
        }
        for name in ("A", "B"):
            env = {**settings, "MBWORKER_NODE_ID": f"soak-{name.lower()}"}
            daemon = await trio.to_thread.run_sync(lambda n=name, e=env: Daemon(work / n, work / f"{n}.log", e))
            nodes.append(Node(name, daemon, work / f"{name}.log"))
        await run(args, work, nodes, redis)
    finally:
        for node in nodes:
            node.exited_early = node.daemon.proc.poll()
        with trio.CancelScope(shield=True):
            for node in nodes:
                await trio.to_thread.run_sync(node.daemon.stop)
            await redis.stop()
    for node in nodes:
        if node.exited_early is not None:
            print(f"NODE {node.name} EXITED DURING THE RUN with status {node.exited_early}")
    left = {n.name: len(deno_processes(n.daemon.data_dir)) for n in nodes}
    print("Deno processes left after the daemons stopped: " + ", ".join(f"node {k} {v}" for k, v in left.items()))
    for node in nodes:
        problems = [line for line in node.log_lines() if "ERROR" in line or "Traceback" in line]
        if problems:
            print(f"node {node.name}'s log: {len(problems)} ERROR/Traceback lines, the first 10:")
            for line in problems[:10]:
                print(f"  {line[:300]}")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        for name, source in [(f"node-{n.name}.log", n.log_path) for n in nodes] + [("redis-server.log", redis.log)]:
            shutil.copy(source, args.logs / name)
        print(f"logs copied to {args.logs}")


async def run(args: argparse.Namespace, work: Path, nodes: list[Node], redis: RedisServer) -> None:
    a, b = nodes
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    auth = {"authorization": f"Bearer {a.daemon.anon_key}"}
    admin_auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        httpx.AsyncClient(trust_env=False, limits=limits, headers=admin_auth) as admin,
        httpx.AsyncClient(trust_env=False, limits=limits) as http,
    ):
        print("deploying hello, wasm-hello, cached, soakfn through node A's admin API")
        for path in write_functions(work).values():
            await deploy(admin, a, path)
        soak_fn = SoakFn()
        dep = await deploy(admin, a, soakfn_source(work, "soak v1"))
        soak_fn.markers[int(dep["version"])] = "soak v1"
        kinds = function_kinds(soak_fn.allowed)
        for kind in kinds:  # both nodes serve everything before the clock starts (B learns through Redis)
            await wait_served(http, nodes, kind.path(0), kind.check, auth, 60)

        t0 = trio.current_time()
        rec = Recorder(t0)
        start_snap = await snapshot(nodes, redis)
        stop = trio.Event()
        peaks = Peaks()
        seconds = args.minutes * 60
        print(f"load for {seconds:.0f}s; Redis restart at t={seconds / 2:.0f}s")
        with trio.fail_after(seconds + 120):
            async with trio.open_nursery() as nursery:
                for kind in kinds:
                    for node in nodes:
                        nursery.start_soon(request_loop, http, rec, kind, node, args.rate, stop)
                for pair in range(args.rt_pairs):
                    nursery.start_soon(rt_pair, rec, a, b, pair, stop)
                nursery.start_soon(deploy_loop, admin, rec, work, nodes, soak_fn, args.deploy_every, stop)
                nursery.start_soon(redis_restart, rec, redis, seconds / 2, args.redis_down, args.window_grace)
                nursery.start_soon(sample_peaks, nodes, peaks, stop)
                await trio.sleep_until(t0 + seconds)
                stop.set()
        elapsed = rec.now()
        await trio.sleep(SETTLE)  # let closing sockets and untracks land before the end snapshot
        end_snap = await snapshot(nodes, redis)
    report(args, rec, elapsed, start_snap, end_snap, peaks)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def report(
    args: argparse.Namespace, rec: Recorder, elapsed: float, start: Snapshot, end: Snapshot, peaks: Peaks
) -> None:
    mb = 1024 * 1024
    print(
        f"\nSoak: {args.minutes:g} min on 2 nodes + 1 redis-server, {os.cpu_count()} CPUs; function requests"
        f" {args.rate:g}/s per kind per node; {args.rt_pairs} realtime pairs; deploy/rollback every"
        f" {args.deploy_every:g}s; Redis down {args.redis_down:g}s"
    )
    if rec.window:
        w0, w1 = rec.window
        print(f"Redis window: t={w0:.1f}s to t={w1:.1f}s (from the stop to answering again + {args.window_grace:g}s)")
    if rec.redis_away:
        r0, r1 = rec.redis_away
        during = sum(1 for s0, s1 in rec.spans if s1 >= r0 and s0 <= r1)
        print(f"operations in flight while redis-server was away (t={r0:.1f}s to t={r1:.1f}s): {during}")
    print(f"\n{'':34} {'start':>10} {'end':>10} {f'peak (every {PEAK_EVERY:g} s)':>20}")
    rows: list[tuple[str, ...]] = []
    for name in start.rss:
        rows += [
            (
                f"node {name} RSS (MB)",
                f"{start.rss[name] / mb:.1f}",
                f"{end.rss[name] / mb:.1f}",
                f"{peaks.rss[name] / mb:.1f}",
            ),
            (f"node {name} open FDs", f"{start.fds[name]}", f"{end.fds[name]}", f"{peaks.fds[name]}"),
            (f"node {name} Deno processes", f"{start.deno[name]}", f"{end.deno[name]}", f"{peaks.deno[name]}"),
            (f"node {name} Deno RSS total (MB)", f"{start.deno_rss[name] / mb:.1f}", f"{end.deno_rss[name] / mb:.1f}"),
            (f"node {name} CPU used (s)", f"{start.cpu[name]:.1f}", f"{end.cpu[name]:.1f}"),
            (f"node {name} log ERROR/Traceback lines", f"{start.log_problems[name]}", f"{end.log_problems[name]}"),
        ]
    rows += [
        ("Redis keys", f"{start.redis_keys}", f"{end.redis_keys}"),
        ("redis-server RSS (MB)", f"{start.redis_rss / mb:.1f}", f"{end.redis_rss / mb:.1f}"),
        ("soak client CPU used (s)", f"{start.client_cpu:.1f}", f"{end.client_cpu:.1f}"),
        ("host load average (1 min)", f"{start.load:.1f}", f"{end.load:.1f}"),
    ]
    for label, *values in rows:
        print(f"{label:34} " + " ".join(f"{v:>{w}}" for v, w in zip(values, (10, 10, 20), strict=False)))

    for name in start.rss:
        print(f"node {name} Deno processes by version: start {start.versions[name]}; end {end.versions[name]}")

    inside: dict[tuple[str, str], int] = defaultdict(int)
    outside: dict[tuple[str, str], int] = defaultdict(int)
    for f in rec.failures:
        (inside if rec.in_window(f) else outside)[f.kind, f.node] += 1
    header = f"{'kind':32} {'node':>4} {'requests':>9} {'failed in window':>17} {'failed outside':>15}"
    header += f" {'p50 ms':>8} {'p99 ms':>8}"
    print(f"\n{header}\n{'-' * len(header)}")
    for key in sorted(rec.counts):
        kind, node = key
        lat = rec.latencies[key]
        print(f"{kind:32} {node:>4} {rec.counts[key]:9d} {inside[key]:17d} {outside[key]:15d}"
              f" {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f}")  # fmt: skip
    total = sum(rec.counts.values())
    n_in, n_out = sum(inside.values()), sum(outside.values())
    print(f"{'all':32} {'':>4} {total:9d} {n_in:17d} {n_out:15d}   over {elapsed:.0f}s")
    if n_in:
        print("\nfailures inside the Redis window (first 10):")
        for f in [f for f in rec.failures if rec.in_window(f)][:10]:
            print(f"  t={f.start:.1f}-{f.end:.1f}s {f.kind} on {f.node}: {f.detail}")
    if n_out:
        print(f"\nFAILURES OUTSIDE THE REDIS WINDOW ({n_out}, first 20):")
        for f in [f for f in rec.failures if not rec.in_window(f)][:20]:
            print(f"  t={f.start:.1f}-{f.end:.1f}s {f.kind} on {f.node}: {f.detail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5.0, help="requests/s per function kind per node")
    ap.add_argument("--rt-pairs", type=int, default=4, help="realtime socket pairs (one socket on each node)")
    ap.add_argument("--deploy-every", type=float, default=30.0, help="seconds between deploys/rollbacks")
    ap.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays stopped")
    ap.add_argument("--window-grace", type=float, default=20.0, help="seconds after Redis is back still in the window")
    ap.add_argument("--logs", type=Path, help="copy the daemons' and redis-server's logs here before cleaning up")
    args = ap.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mbw-soak-") as tmp:

        async def bounded() -> None:
            with trio.fail_after(args.minutes * 60 + 300):  # setup, load and teardown together
                await soak(args, Path(tmp))

        trio.run(bounded)
    print(f"run took {time.monotonic() - started:.0f}s; temp dir removed")


if __name__ == "__main__":
    main()
