"""Realtime across two `mbworker serve` processes sharing one real redis-server, with the stock realtime-js client.

Clients on different workers see each other's broadcasts and presence; a worker killed with SIGKILL leaves no
ghost: its users leave on the other worker once their presence expires (TTL shortened for the test).
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.e2e.node_driver import run_node_driver
from tests.realtime.helpers import ANON, SECRET
from tests.redis_server import redis_server_running
from tests.worker_process import RunningWorker, run_worker

ENV = {
    "MBWORKER_JWT_SECRET": SECRET,
    "MBWORKER_ADMIN_TOKEN": "cluster-admin",
    "MBWORKER_REALTIME__PRESENCE_TTL": "6",
    "MBWORKER_REALTIME__PRESENCE_REFRESH_INTERVAL": "2",
}


async def test_realtime_across_workers_and_a_killed_worker(tmp_path: Path) -> None:
    async with redis_server_running(tmp_path) as redis:
        env = {**ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            ws = {name: w.public_url.replace("http", "ws", 1) + "/realtime/v1" for name, w in (("A", a), ("B", b))}
            driver_env = {"RT_URL_A": ws["A"], "RT_URL_B": ws["B"], "RT_APIKEY": ANON}
            async with run_node_driver("cluster.mjs", driver_env) as driver:
                events = driver.events
                both = ["alice", "bob"]
                await events.wait(lambda e: e.get("on") == "alice" and e.get("presence") == both, 30)
                await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == both, 30)
                await driver.send(go=True)
                await events.wait(lambda e: e.get("on") == "bob" and e.get("broadcast") == {"from": "alice"}, 20)
                await events.wait(lambda e: e.get("on") == "alice" and e.get("broadcast") == {"from": "bob"}, 20)
                # self: false — nobody got their own message back
                assert not [e for e in events.lines if e.get("broadcast") == {"from": e.get("on")}]

                a.process.kill()  # SIGKILL: no drain, no untrack; only the presence TTL can clean up
                await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == ["bob"], 30)


async def test_events_per_key_are_limited_across_workers(tmp_path: Path) -> None:
    from websockets.trio.client import connect

    env_limit = {**ENV, "MBWORKER_REALTIME__MAX_EVENTS_PER_SECOND_PER_KEY": "5"}
    async with redis_server_running(tmp_path) as redis:
        env = {**env_limit, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:

            def url(w: RunningWorker) -> str:
                return w.public_url.replace("http", "ws", 1) + f"/realtime/v1/websocket?apikey={ANON}&vsn=2.0.0"

            join = '["1","1","realtime:room","phx_join",{"config":{"broadcast":{"ack":true}}}]'
            send = '["1","{ref}","realtime:room","broadcast",{{"type":"broadcast","event":"x","payload":{{}}}}]'
            async with connect(url(a)) as on_a, connect(url(b)) as on_b:
                for ws in (on_a, on_b):
                    await ws.send(join)
                    assert '"ok"' in await ws.recv()
                # The two joins and two events through worker A fit the key's budget of 5 per second...
                for ref in ("2", "3"):
                    await on_a.send(send.format(ref=ref))
                    assert '"ok"' in await on_a.recv()
                # ...and worker B draws on the same budget: a few more events and it is refused there.
                refused = False
                with trio.fail_after(10):
                    for ref in ("4", "5", "6", "7"):
                        await on_b.send(send.format(ref=ref))
                        if "Too many messages per second" in await on_b.recv():
                            refused = True
                            break
                assert refused
