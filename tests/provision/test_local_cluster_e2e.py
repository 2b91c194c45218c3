"""`mbworker up` with the REAL daemon: redis-server, two `mbworker serve` workers and the gateway on this machine.

A function deployed to one worker answers through the gateway from both; two stock realtime-js clients that
the gateway sends to different workers see each other's presence and broadcasts; `mbworker down` leaves no
process behind.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import jwt

from tests.daemon.fixtures import write_function
from tests.e2e.node_driver import run_node_driver
from tests.provision.local_cluster import run_cli, write_local_spec


async def test_up_serves_functions_and_realtime_across_workers_then_down(tmp_path: Path) -> None:
    spec = write_local_spec(tmp_path)
    code, up = await run_cli("up", "-c", str(spec), "--workers", "2")
    try:
        assert code == 0, up
        gateway = re.search(r"gateway: (http://127\.0\.0\.1:\d+)", up)
        admin = re.search(r"worker-1: http://127\.0\.0\.1:\d+ \(admin :(\d+)\)", up)
        assert gateway, up
        assert admin, up
        secrets = json.loads((tmp_path / ".mbcluster-demo" / "secrets.json").read_text())
        anon = jwt.encode({"role": "anon", "exp": int(time.time()) + 3600}, secrets["jwt_secret"], algorithm="HS256")

        fn = write_function(tmp_path / "src", "via-gateway", "Deno.serve(() => new Response('through the gateway'))")
        env = {
            "MBWORKER_ADMIN_URL": f"http://127.0.0.1:{admin.group(1)}",
            "MBWORKER_ADMIN_TOKEN": secrets["admin_token"],
            "PATH": "/usr/bin:/bin",
        }
        code, deployed = await run_cli("deploy", str(fn), env=env)
        assert code == 0, deployed
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            for _ in range(6):  # the gateway takes turns: both workers answer
                r = await http.get(
                    f"{gateway.group(1)}/functions/v1/via-gateway", headers={"authorization": f"Bearer {anon}"}
                )
                assert (r.status_code, r.text) == (200, "through the gateway")

        ws = gateway.group(1).replace("http", "ws", 1) + "/realtime/v1"
        async with run_node_driver("cluster.mjs", {"RT_URL_A": ws, "RT_URL_B": ws, "RT_APIKEY": anon}) as driver:
            events = driver.events
            both = ["alice", "bob"]
            await events.wait(lambda e: e.get("on") == "alice" and e.get("presence") == both, 30)
            await events.wait(lambda e: e.get("on") == "bob" and e.get("presence") == both, 30)
            await driver.send(go=True)
            await events.wait(lambda e: e.get("on") == "bob" and e.get("broadcast") == {"from": "alice"}, 20)
            await events.wait(lambda e: e.get("on") == "alice" and e.get("broadcast") == {"from": "bob"}, 20)
    finally:
        code, down = await run_cli("down", "-c", str(spec))
    assert code == 0, down
    records = json.loads((tmp_path / ".mbcluster-demo" / "local" / "processes.json").read_text())
    assert records == {}
