"""The real @supabase/realtime-js (Node 20 + `ws`) against realtime behind the real HTTP front door."""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from mbworker.lib.jwt import JwtVerifier, parse_jwks
from mbworker.realtime import PrivateChannelRule, RealtimeSettings
from tests.conftest import require_binary
from tests.e2e.harness import E2E_DIR, ensure_node_modules, serve_realtime_http
from tests.lib_jwt.keys import SigningKey
from tests.realtime.helpers import ANON, SECRET, make_jwt


async def run_node(script: str, env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    node = require_binary("node")
    ensure_node_modules(node)
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [node, str(E2E_DIR / script)], cwd=E2E_DIR, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    lines = proc.stdout.decode().strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert result["errors"] == [], result["errors"]
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return result


async def test_realtime_js_conformance() -> None:
    import os

    async with serve_realtime_http(RealtimeSettings(), SECRET) as (service, server):
        env = {
            **os.environ,
            "RT_URL": f"ws://127.0.0.1:{server.port}/realtime/v1",
            "RT_APIKEY": ANON,
            "RT_TOKEN": make_jwt("authenticated", sub="u1"),
            "RT_TOKEN2": make_jwt("authenticated", sub="u1", exp_in=7200),
            "RT_BAD_TOKEN": make_jwt("authenticated", sub="u1", secret="wrong-secret-wrong-secret-wrong-secret"),
            "RT_SHORT_TOKEN": make_jwt("authenticated", sub="u1", exp_in=5),
        }
        r = await run_node("conformance.mjs", env)
        stats = service.statistics()
    # connection + join (checklist 1, 6) for v2 and v1 on one topic
    assert r["vsn"] == {"a": "2.0.0", "b": "1.0.0"}
    assert all(v == {"status": "SUBSCRIBED", "error": None} for v in r["subscribe"].values())
    # presence across v1/v2 (23, 26): both see both keys, metas carry presence_ref
    for state in (r["presenceA"], r["presenceB"]):
        assert set(state) == {"alice", "bob"}
        assert state["alice"][0]["user"] == "alice"
        assert state["alice"][0]["presence_ref"]
    assert r["presenceA"]["alice"][0]["presence_ref"] == r["presenceB"]["alice"][0]["presence_ref"]
    assert r["trackA"] == r["trackB"] == r["untrackB"] == "ok"
    assert {"key": "bob", "n": 1} in r["leavesA"]  # untrack → leave diff (25)
    assert r["syncs"]["a"] >= 2
    got = r["got"]
    events = {k: [m["event"] for m in v] for k, v in got.items()}
    # self:true echoes (18); self:false excludes the sender (17); ack → ok (19)
    assert r["sendA"] == "ok"
    assert "cursor" in events["a"]
    assert "from-v1" not in events["b"]
    assert events["c"][:2] == ["cursor", "from-v1"]
    cursor = next(m for m in got["b"] if m["event"] == "cursor")
    assert cursor["payload"] == {"x": 1, "from": "a"}  # kind-3 JSON in → JSON object to a v1 socket (21)
    # binary payloads: kind 4 to v2 sockets, never to v1 (20, 22)
    binary = [m["payload"] for m in got["c"] if m["event"] == "bin"]
    assert binary == [{"binary": [0, 1, 2, 255]}]
    assert "bin" not in events["b"]
    # REST: httpSend 202 (32) and the batch fallback (33)
    assert r["httpSend"] == {"success": True}
    rest = next(m for m in got["b"] if m["event"] == "rest")
    assert rest["payload"] == {"z": 3}
    assert rest["meta"]["id"]
    assert r["restFallback"] == "ok"
    assert "batch" in events["b"]
    # tokens (30, 31)
    assert r["afterGoodRefresh"] == {"state": "joined", "send": "ok"}
    assert r["afterBadRefresh"]["state"] == "closed"
    assert r["afterBadRefresh"]["system"][0]["status"] == "error"
    assert r["afterBadRefresh"]["system"][0]["channel"] == "tok"
    assert r["expired"]["state"] == "closed"
    assert r["expired"]["system"][0]["message"] == "Token has expired"
    # private channels are denied by default (8)
    assert r["privateJoin"]["status"] == "CHANNEL_ERROR"
    assert "permissions" in r["privateJoin"]["error"]
    assert r["removedA"] == 0
    assert stats.deliveries > 0


async def test_realtime_js_what_differed_from_supabase() -> None:
    """A postgres_changes channel, the error texts, an ES256 user token from the JWKS, presence poisoning."""
    import os

    es = SigningKey("ES256", "project-key-1")
    verifier = JwtVerifier(SECRET, jwks=parse_jwks({"keys": [es.jwk]}))
    settings = RealtimeSettings(private_channel_rules=[PrivateChannelRule(topic="user:{sub}:*")])
    async with serve_realtime_http(settings, SECRET, verifier=verifier) as (_, server):
        env = {
            **os.environ,
            "RT_URL": f"ws://127.0.0.1:{server.port}/realtime/v1",
            "RT_APIKEY": ANON,
            "RT_MALFORMED_TOKEN": "not-a-jwt",
            "RT_NO_EXP_TOKEN": make_jwt("authenticated", exp_in=None),
            "RT_ES256_TOKEN": es.sign({"role": "authenticated", "sub": "u1", "exp": int(time.time()) + 3600}),
        }
        r = await run_node("parity.mjs", env)
    ok = {"status": "SUBSCRIBED", "error": None}
    assert r["pgSubscribe"] == ok  # realtime-js accepted the echoed bindings
    assert r["pgBindingIds"] == ["number", "number"]
    assert [(s["extension"], s["status"], s["channel"]) for s in r["pgSystem"]] == [
        ("postgres_changes", "error", "todos")
    ]
    assert (r["pgSend"], r["pgGot"], r["pgTrack"]) == ("ok", [{"n": 1}], "ok")
    assert r["privateJoin"] == {
        "status": "CHANNEL_ERROR",
        "error": "Unauthorized: You do not have permissions to read from this Channel topic: secret",
    }
    assert r["malformed"] == {"status": "CHANNEL_ERROR", "error": "MalformedJWT: The token provided is not a valid JWT"}
    assert r["noExp"] == {
        "status": "CHANNEL_ERROR",
        "error": "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
    }
    assert r["es256Join"] == ok
    assert (r["bigTrack"], r["smallTrack"]) == ("error", "ok")
    assert r["joiner"] == ok
    assert r["joinerState"] == ["p1"]
    assert r["joinerConnected"] is True
