"""The control plane of a real local cluster (`mbworker up`: redis-server, two real workers, the control plane):
a deploy through it is live on both workers when the command returns, a bad one leaves the previous version on
both; `cluster status` shows both workers; a revoked session is refused by both workers' JWT gates and its
realtime channel is ended."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jwt
import trio

from mbworker import __version__
from tests.daemon.fixtures import write_function
from tests.provision.local_cluster import run_cli, write_local_spec
from tests.realtime.helpers import phx_client


async def _cli(*args: str, timeout: float = 180) -> tuple[int, str]:
    """`mbworker <args>` with a PATH that holds no venv: the commands must find their own interpreter."""
    return await run_cli(*args, env={"PATH": "/usr/bin:/bin"}, timeout=timeout)


async def test_deploy_and_revoke_through_the_control_plane_of_a_two_worker_cluster(tmp_path: Path) -> None:
    spec = write_local_spec(tmp_path)
    code, up = await _cli("up", "-c", str(spec), "--workers", "2")
    try:
        assert code == 0, up
        ports = [int(p) for p in re.findall(r"worker-\d: http://127\.0\.0\.1:(\d+) ", up)]
        assert len(ports) == 2, up
        secrets = json.loads((tmp_path / ".mbcluster-demo" / "secrets.json").read_text())
        anon = jwt.encode({"role": "anon", "exp": 4102444800}, secrets["jwt_secret"], algorithm="HS256")

        # Both workers and the gateway report to the control plane (the first beats may follow `up` by a moment).
        with trio.fail_after(30):
            while True:
                code, out = await _cli("cluster", "status", "-c", str(spec), "-o", "json")
                assert code == 0, out
                nodes = json.loads(out)
                if sum(n["ready"] for n in nodes) == 3:
                    break
                await trio.sleep(0.2)
        assert [(n["role"], n["name"], n["version"], n["state"]) for n in nodes] == [
            ("proxy", "demo-gateway", __version__, "ready"),
            *[("worker", f"demo-worker-{i:03d}", __version__, "ready") for i in (1, 2)],
        ]
        nodes = [n for n in nodes if n["role"] == "worker"]
        assert sorted(n["port"] for n in nodes) == sorted(ports)

        fn = write_function(tmp_path / "src", "hello", "Deno.serve(() => new Response('v1'))")
        code, out = await _cli("deploy", str(fn), "--cluster", str(spec))
        assert code == 0, out
        assert "hello v1" in out
        assert "live on 2/2 workers" in out
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:

            async def answers(port: int, token: str = anon) -> tuple[int, str]:
                r = await http.get(
                    f"http://127.0.0.1:{port}/functions/v1/hello", headers={"authorization": f"Bearer {token}"}
                )
                return r.status_code, r.text

            # live everywhere when the command returned: no waiting here
            assert [await answers(p) for p in ports] == [(200, "v1"), (200, "v1")]

            # A version that cannot boot is refused and the previous one keeps serving everywhere.
            (fn / "index.ts").write_text("throw new Error('broken on purpose')")
            code, out = await _cli("deploy", str(fn), "--cluster", str(spec))
            assert code == 1, out
            assert "broken on purpose" in out
            assert [await answers(p) for p in ports] == [(200, "v1"), (200, "v1")]
            code, out = await _cli("functions", "list", "--cluster", str(spec))
            assert code == 0, out
            assert re.search(r"hello\s+1\s+ACTIVE", out), out

            # v2, then a rollback and the logs, cluster-wide; each command returns once both workers agree
            (fn / "index.ts").write_text("Deno.serve(() => { console.log('served v2'); return new Response('v2'); })")
            code, out = await _cli("deploy", str(fn), "--cluster", str(spec))
            assert (code, "hello v2" in out, "live on 2/2 workers" in out) == (0, True, True), out
            assert [await answers(p) for p in ports] == [(200, "v2"), (200, "v2")]
            code, out = await _cli("functions", "logs", "hello", "--cluster", str(spec), "--json")
            assert code == 0, out
            lines = [json.loads(line) for line in out.splitlines()]
            # (worker 1 also kept the broken version's boot error: it staged it)
            assert {line["node"] for line in lines if line["msg"] == "served v2"} == {
                f"demo-worker-{i:03d}" for i in (1, 2)
            }
            code, out = await _cli("functions", "rollback", "hello", "--cluster", str(spec))
            assert code == 0, out
            assert "now serving v1 on 2/2 workers" in out
            assert [await answers(p) for p in ports] == [(200, "v1"), (200, "v1")]

            # Revoking a session: both JWT gates refuse its tokens, its realtime channel ends.
            user = jwt.encode(
                {"role": "authenticated", "session_id": "sess-42", "exp": 4102444800}, secrets["jwt_secret"], "HS256"
            )
            other = jwt.encode(
                {"role": "authenticated", "session_id": "sess-7", "exp": 4102444800}, secrets["jwt_secret"], "HS256"
            )
            assert [await answers(p, user) for p in ports] == [(200, "v1"), (200, "v1")]
            async with phx_client(ports[1], apikey=anon) as phx:
                _, reply = await phx.join("realtime:room", access_token=user)
                assert reply[4]["status"] == "ok"
                code, out = await _cli("cluster", "sessions", "revoke", "sess-42", "-c", str(spec))
                assert code == 0, out
                # within 1 s of the command's return, on every worker
                with trio.fail_after(1):
                    system = await phx.expect("system", "realtime:room")
                    await phx.expect("phx_close", "realtime:room")
                    for port in ports:
                        while True:  # polled: the gate has no event to wait on from here
                            if (await answers(port, user))[0] == 401:
                                break
                            await trio.sleep(0.02)
                assert system[4]["message"] == "InvalidJWTToken: Session has been revoked"
            for port in ports:
                r = await http.get(
                    f"http://127.0.0.1:{port}/functions/v1/hello", headers={"authorization": f"Bearer {user}"}
                )
                assert r.json()["code"] == "UNAUTHORIZED_SESSION_REVOKED"
                assert await answers(port, other) == (200, "v1")

        code, out = await _cli("cluster", "audit", "-c", str(spec))
        assert code == 0, out
        assert "POST /control/v1/sessions/revoke" in out
        assert "POST /control/v1/functions/hello/deploy" in out
    finally:
        code, down = await _cli("down", "-c", str(spec))
    assert code == 0, down
