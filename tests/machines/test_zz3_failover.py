"""Must-hold 4 on the shared machines cluster: losing a state machine is survived without anyone's help.

1. The machine holding the Redis master (asked of the Sentinels, inside the cluster) is shut down. The Sentinels
   promote a replica, and within 30 s of the shutdown every worker serves a deployed function again (asked of each
   worker on its private address, from the cluster's namespace) and two realtime-js clients on different workers
   (wss through the proxy) get each other's broadcasts again; no worker is restarted. Through the proxy,
   functions keep answering meanwhile: every worker's /ready fails while Redis is away, and HAProxy sends to
   them as backups (checked on /ready/local); the longest time without an answer is bounded by
   `PROXY_GAP_BOUND` (measured twice: 0 failed requests, 0.4-0.6 s, which is the probes' own pace).
2. Postgres stays or becomes writable through a surviving state node's HAProxy (5000) within 30 s of shutting
   down the Patroni leader (the same machine when it holds both; else a second round).
Each machine shut down is powered on again and the test waits until it has rejoined (Redis replica with its link
up, Patroni member running, every etcd member healthy), so the cluster is left as it was found. The gaps measured
are printed (docs/benchmarks.md records them).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import trio

from mbworker.provision import desired as d
from mbworker.provision.nodeops import STATE_HEALTH_SCRIPT
from tests.e2e.node_driver import run_node_driver

from .conftest import Cluster, deploy_function
from .test_serving import _sh, _wait_serving, _workers_stats

pytestmark = pytest.mark.slow

#: The must-hold's bound, from the start of the shutdown.
FAILOVER_BOUND = 30.0
#: The longest time without an answer through the proxy during the failover (without backups: ~11 s).
PROXY_GAP_BOUND = 5.0
PROBE = "Deno.serve(() => Response.json({ failover: true }));\n"
FUNCTION = "failover-probe"


@dataclass
class Probes:
    """Function requests every ~0.3 s from a thread per target, to each worker's private address (from the
    namespace) and through the proxy's public address (as a client on the internet): (when, target, ok)."""

    cluster: Cluster
    urls: dict[str, str]
    seen: list[tuple[float, str, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, target: str) -> None:
        ca = str(self.cluster.state_dir / "ca.pem")
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", "--cacert", ca, self.urls[target]]
        while not self.stop.is_set():
            done = self.cluster.in_ns(*argv)
            self.seen.append((time.monotonic(), target, done.stdout.strip() == "200"))
            self.stop.wait(0.3)

    def outage(self, target: str, since: float) -> tuple[int, float]:
        """`target`'s failed answers from `since` on, and the longest time without an answer: between two
        answered requests (the first one counted from `since`)."""
        answers = [(t, ok) for t, w, ok in self.seen if w == target and t >= since]
        last, longest = since, 0.0
        for t, ok in answers:
            if ok:
                longest, last = max(longest, t - last), t
        return sum(not ok for _, ok in answers), longest

    def back_after(self, since: float) -> dict[str, float]:
        """Per target: seconds from `since` until its answers were all 200 again (0 when none failed)."""
        out: dict[str, float] = {}
        for worker in self.urls:
            answers = [(t, ok) for t, w, ok in self.seen if w == worker and t >= since]
            last_bad = max((i for i, (_, ok) in enumerate(answers) if not ok), default=-1)
            assert last_bad + 1 < len(answers), f"{worker} not serving again: {answers[-5:]}"
            out[worker] = 0.0 if last_bad < 0 else answers[last_bad + 1][0] - since
        return out


@contextmanager
def probing(cluster: Cluster, public: str) -> Iterator[Probes]:
    port = cluster.spec.daemon.port
    urls = {
        w: f"http://{cluster.server(w)['private_ip']}:{port}/functions/v1/{FUNCTION}" for w in cluster.names("worker")
    }
    urls["proxy"] = f"https://{public}/functions/v1/{FUNCTION}"
    probes = Probes(cluster, urls)
    threads = [threading.Thread(target=probes.run, args=(target,), daemon=True) for target in urls]
    for thread in threads:
        thread.start()
    try:
        yield probes
    finally:
        probes.stop.set()
        for thread in threads:
            thread.join(timeout=30)


def _backups_answered(cluster: Cluster, proxy: str) -> int:
    """2xx answers HAProxy got from the workers as backups (sent to only while no worker passes /ready)."""
    return sum(int(row["hrsp_2xx"] or 0) for row in _workers_stats(cluster, proxy, backups=True).values())


def _upstream_changes(cluster: Cluster, proxy: str, since: float) -> list[str]:
    """The upstream lists the proxy applied since `since` (epoch seconds): none while the control plane answers
    503 (its Redis away) or the same list."""
    out = _sh(cluster, proxy, f"journalctl -u mbgateway-pull --since @{since:.0f} -o cat --no-pager")
    return [line for line in out.splitlines() if line.startswith("upstreams now")]


def _state_by_ip(cluster: Cluster) -> dict[str, str]:
    return {str(cluster.server(n)["private_ip"]): n for n in cluster.names("state")}


def _redis_master(cluster: Cluster, ask: str) -> str:
    """The Redis master's state machine, as the Sentinel on `ask` (a running state machine) sees it."""
    secrets = json.loads((cluster.state_dir / "secrets.json").read_text())
    ip = cluster.server(ask)["private_ip"]
    script = f"REDISCLI_AUTH='{secrets['sentinel_password']}' redis-cli -h {ip} -p {d.SENTINEL_PORT} "
    answer = _sh(cluster, ask, script + f"sentinel get-master-addr-by-name {d.SENTINEL_SERVICE}").split()
    return _state_by_ip(cluster)[answer[0]]


def _patroni_leader(cluster: Cluster, ask: str) -> str | None:
    ip = cluster.server(ask)["private_ip"]
    out = _sh(cluster, ask, f"curl -fsS -m 5 http://{ip}:8008/cluster")
    members = json.loads(out).get("members", []) if out.startswith("{") else []
    return next((str(m["name"]) for m in members if m["role"] == "leader" and m["state"] == "running"), None)


def _write(cluster: Cluster, via: str, value: str) -> bool:
    """One INSERT through `via`'s HAProxy on 5000 (the read-write entry point); True when it committed."""
    secrets = json.loads((cluster.state_dir / "secrets.json").read_text())
    ip = cluster.server(via)["private_ip"]
    pg = f"PGPASSWORD='{secrets['postgres_password']}' PGCONNECT_TIMEOUT=3 psql -X -q -t -A -U postgres -h {ip} -p 5000"
    sql = f"create table if not exists failover_t(v text); insert into failover_t values ('{value}')"
    out = _sh(cluster, via, f'{pg} -v ON_ERROR_STOP=1 -c "{sql}" && echo committed', timeout=20)
    return "committed" in out.split()  # psql's notices (stderr) may follow it


def _wait_rejoined(cluster: Cluster, name: str, timeout: float = 300.0) -> float:
    """Power `name` on again and wait until it is a healthy member again; seconds it took."""
    started = time.monotonic()
    cluster.provider.start_machine(name)
    secrets = json.loads((cluster.state_dir / "secrets.json").read_text())
    replica = (
        f"REDISCLI_AUTH='{secrets['redis_password']}' redis-cli -h 127.0.0.1 info replication "
        "| grep -q '^master_link_status:up'"
    )
    deadline = started + timeout
    while True:
        try:
            done = cluster.provider.exec(name, ["sh", "-c", f"{STATE_HEALTH_SCRIPT}\n{replica}"], timeout=60)
            why = done.stderr.strip() or f"exit {done.returncode}"
            if done.returncode == 0:
                return time.monotonic() - started
        except Exception as exc:  # still booting: exec has no machine to enter yet
            why = str(exc)
        assert time.monotonic() < deadline, f"{name} did not rejoin within {timeout:.0f}s: {why}"
        time.sleep(2)


async def _wait_probes_ok(probes: Probes, timeout: float) -> None:
    """Until every target answered 200 at least twice in a row."""
    with trio.fail_after(timeout):
        while True:
            last = {w: [ok for _, x, ok in probes.seen if x == w][-2:] for w in probes.urls}
            if all(v == [True, True] for v in last.values()):
                return
            await trio.sleep(0.3)


async def test_losing_a_state_machine_is_survived_by_workers_and_postgres(cluster: Cluster) -> None:
    proxy = cluster.names("proxy")[0]
    states = cluster.names("state")
    public = await trio.to_thread.run_sync(_wait_serving, cluster, proxy)
    await trio.to_thread.run_sync(deploy_function, cluster, FUNCTION, PROBE)
    master = await trio.to_thread.run_sync(_redis_master, cluster, states[-1])
    leader = await trio.to_thread.run_sync(_patroni_leader, cluster, states[-1])
    assert leader is not None
    survivor = next(s for s in states if s not in (master, leader))

    anon = cluster.anon_key()
    env = {
        "RT_URL_A": f"wss://{public}/realtime/v1",
        "RT_URL_B": f"wss://{public}/realtime/v1",
        "RT_APIKEY": anon,
        "RT_CLIENTS": "a1:A,b1:B",
        "NODE_EXTRA_CA_CERTS": str(cluster.state_dir / "ca.pem"),
    }
    report: dict[str, object] = {"redis_master": master, "patroni_leader": leader}
    with probing(cluster, public) as probes:
        await _wait_probes_ok(probes, 120)
        async with run_node_driver("cluster_faults.mjs", env) as driver:
            events = driver.events
            await events.wait_presence(["a1", "b1"], ["a1", "b1"], 60)
            # leastconn put the two WebSockets on different workers: what one says reaches the other through Redis
            stats = await trio.to_thread.run_sync(_workers_stats, cluster, proxy)
            assert sorted(int(row["scur"]) for row in stats.values()) == [1, 1], stats

            rounds: list[tuple[int, float]] = []

            async def broadcast_rounds() -> None:
                for k in range(10_000):
                    rounds.append((k, time.monotonic()))
                    await driver.send(send=f"a{k}", **{"from": "a1"})
                    await driver.send(send=f"b{k}", **{"from": "b1"})
                    await trio.sleep(0.5)

            def delivered(k: int) -> bool:
                got = {(e["on"], e["broadcast"]["id"]) for e in events.lines if "broadcast" in e}
                return ("b1", f"a{k}") in got and ("a1", f"b{k}") in got

            async with trio.open_nursery() as nursery:
                nursery.start_soon(broadcast_rounds)
                await events.wait(events.got("b1", "a0"), 20)
                await events.wait(events.got("a1", "b0"), 20)

                # 1. the Redis master's machine goes down (with the Patroni leader, when it holds both)
                backups_before = await trio.to_thread.run_sync(_backups_answered, cluster, proxy)
                wall0 = time.time()
                t0 = time.monotonic()
                await trio.to_thread.run_sync(cluster.provider.stop_machine, master)
                report["shutdown_seconds"] = round(time.monotonic() - t0, 1)
                pg_back: float | None = None
                if master == leader:
                    while not await trio.to_thread.run_sync(_write, cluster, survivor, "during-redis-failover"):
                        assert time.monotonic() - t0 < FAILOVER_BOUND, "Postgres not writable again in time"
                        await trio.sleep(0.5)
                    pg_back = time.monotonic() - t0

                # realtime is back when a round sent after the shutdown crossed both ways (and the next ones do)
                def crossed() -> list[int]:
                    return [k for k, t in rounds if t >= t0 and delivered(k)]

                await events.wait(lambda _: bool(crossed()), max(1.0, t0 + FAILOVER_BOUND - time.monotonic()))
                rt_back = time.monotonic() - t0
                first = crossed()[0]
                await _wait_probes_ok(probes, max(1.0, t0 + FAILOVER_BOUND - time.monotonic()))
                later = first + 3
                await events.wait(events.got("b1", f"a{later}"), 10)
                await events.wait(events.got("a1", f"b{later}"), 10)
                nursery.cancel_scope.cancel()
            functions_back = probes.back_after(t0)
            failed, gap = probes.outage("proxy", t0)
            backups = await trio.to_thread.run_sync(_backups_answered, cluster, proxy) - backups_before
            changes = await trio.to_thread.run_sync(_upstream_changes, cluster, proxy, wall0)
            promoted = await trio.to_thread.run_sync(_redis_master, cluster, survivor)
            assert promoted != master
            report |= {
                "redis_promoted": promoted,
                "functions_back_s": {w: round(v, 1) for w, v in functions_back.items()},
                "proxy_failed_requests": failed,
                "proxy_longest_gap_s": round(gap, 1),
                "proxy_answered_by_backups": backups,
                "proxy_upstream_changes": changes,
                "realtime_back_s": round(rt_back, 1),
                "postgres_back_s": None if pg_back is None else round(pg_back, 1),
            }
            print("failover:", json.dumps(report))
            assert max(functions_back.values()) <= FAILOVER_BOUND, report
            assert gap <= PROXY_GAP_BOUND, report
            assert rt_back <= FAILOVER_BOUND, report
        report["rejoin_s"] = {master: round(await trio.to_thread.run_sync(_wait_rejoined, cluster, master), 1)}

    # 2. the Patroni leader's machine goes down, when it was not the one above
    if master != leader:
        t0 = time.monotonic()
        await trio.to_thread.run_sync(cluster.provider.stop_machine, leader)
        survivor = next(s for s in states if s != leader)
        while not await trio.to_thread.run_sync(_write, cluster, survivor, "after-leader-loss"):
            assert time.monotonic() - t0 < FAILOVER_BOUND, "Postgres not writable again in time"
            await trio.sleep(0.5)
        report["postgres_back_s"] = round(time.monotonic() - t0, 1)
        report["rejoin_s"][leader] = round(await trio.to_thread.run_sync(_wait_rejoined, cluster, leader), 1)  # type: ignore[index]
    new_leader = await trio.to_thread.run_sync(_patroni_leader, cluster, states[0])
    assert new_leader is not None
    assert new_leader != leader
    print("failover:", json.dumps(report))
