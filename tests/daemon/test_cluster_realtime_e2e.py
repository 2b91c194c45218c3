"""Realtime across two `mbworker serve` processes sharing one real redis-server, with the stock realtime-js client.

Clients on different workers see each other's broadcasts and presence; a worker killed with SIGKILL leaves no
ghost: its users leave on the other worker once their presence expires (TTL shortened for the test).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import trio

from tests.conftest import require_binary
from tests.e2e.harness import E2E_DIR, ensure_node_modules
from tests.realtime.helpers import ANON, SECRET
from tests.redis_server import redis_server_running
from tests.worker_process import run_worker

ENV = {
    "MBWORKER_JWT_SECRET": SECRET,
    "MBWORKER_ADMIN_TOKEN": "cluster-admin",
    "MBWORKER_REALTIME__PRESENCE_TTL": "6",
    "MBWORKER_REALTIME__PRESENCE_REFRESH_INTERVAL": "2",
}


class Events:
    """JSON lines from the node driver, with waits for the first line matching a predicate."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.lines.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Any, timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                await self._changed.wait()


async def test_realtime_across_workers_and_a_killed_worker(tmp_path: Path) -> None:
    node = require_binary("node")
    ensure_node_modules(node)
    async with redis_server_running(tmp_path) as redis:
        env = {**ENV, "MBWORKER_REDIS_URL": redis.url}
        async with run_worker(tmp_path / "a", env=env) as a, run_worker(tmp_path / "b", env=env) as b:
            ws = lambda w: w.public_url.replace("http", "ws", 1) + "/realtime/v1"  # noqa: E731
            driver = await trio.lowlevel.open_process(
                [node, str(E2E_DIR / "cluster.mjs")],
                cwd=E2E_DIR,
                env={**os.environ, "RT_URL_A": ws(a), "RT_URL_B": ws(b), "RT_APIKEY": ANON},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            events = Events()

            async def pump() -> None:
                assert driver.stdout is not None
                buffer = b""
                async for chunk in driver.stdout:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        events.add(json.loads(line))

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump)
                    both = ["alice", "bob"]
                    await events.wait(lambda e: e.get("on") == "alice" and e.get("presence") == both, 30)
                    await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == both, 30)
                    assert driver.stdin is not None
                    await driver.stdin.send_all(b"go\n")
                    await events.wait(lambda e: e.get("on") == "bob" and e.get("broadcast") == {"from": "alice"}, 20)
                    await events.wait(lambda e: e.get("on") == "alice" and e.get("broadcast") == {"from": "bob"}, 20)
                    # self: false — nobody got their own message back
                    assert not [e for e in events.lines if e.get("broadcast") == {"from": e.get("on")}]

                    a.process.kill()  # SIGKILL: no drain, no untrack; only the presence TTL can clean up
                    await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == ["bob"], 30)
                    nursery.cancel_scope.cancel()
            finally:
                driver.kill()
                with trio.move_on_after(10):
                    await driver.wait()
