"""REST broadcast through the real front door: status codes, auth, private policy, binary bodies."""

from __future__ import annotations

import json

import httpx

from mbworker.realtime import PrivateChannelRule, RealtimeSettings
from tests.e2e.harness import serve_realtime_http
from tests.realtime.helpers import ANON, SECRET, make_jwt, phx_client

T = "realtime:room1"


async def test_rest_broadcast_statuses_and_delivery() -> None:
    settings = RealtimeSettings(private_channel_rules=[PrivateChannelRule(topic="user:{sub}")])
    async with serve_realtime_http(settings, SECRET) as (service, server):
        base = f"http://127.0.0.1:{server.port}"
        async with (
            phx_client(server.port) as v2,
            phx_client(server.port, "1.0.0") as v1,
            httpx.AsyncClient(base_url=base, timeout=5) as http,
        ):
            await v2.join(T)
            await v1.join(T)
            _jp, rep = await v2.join(
                "realtime:user:u1", {"private": True}, access_token=make_jwt("authenticated", sub="u1")
            )
            assert rep[4]["status"] == "ok"
            hdr = {"apikey": ANON}
            # single form, JSON: 202 and both sockets get it
            r = await http.post("/realtime/v1/api/broadcast/room1/events/hello", json={"a": 1}, headers=hdr)
            assert r.status_code == 202
            got2, got1 = await v2.expect("broadcast"), await v1.expect("broadcast")
            assert got2[4]["payload"] == got1[4]["payload"] == {"a": 1}
            assert got2[4]["meta"]["id"]
            # single form, octet-stream: kind 4 to v2 only
            r = await http.post("/realtime/v1/api/broadcast/room1/events/bin", content=b"\x00\x01",
                                headers={**hdr, "content-type": "application/octet-stream"})  # fmt: skip
            assert r.status_code == 202
            frame = await v2.recv()
            assert isinstance(frame, bytes)
            assert frame[0] == 4
            assert frame.endswith(b"\x00\x01")
            # batch form (apikey in the query, as realtime-js keeps the socket query)
            body = {"messages": [{"topic": "room1", "event": "b1", "payload": {"n": 1}},
                                 {"topic": "user:u1", "event": "denied", "payload": {}, "private": True}]}  # fmt: skip
            r = await http.post(f"/realtime/v1/api/broadcast?apikey={ANON}&vsn=2.0.0", json=body)
            assert r.status_code == 202
            assert (await v1.expect("broadcast"))[4]["event"] == "b1"  # v1 got no binary frame before it
            # private: allowed with the user's token, forbidden without
            user = {**hdr, "authorization": f"Bearer {make_jwt('authenticated', sub='u1')}"}
            r = await http.post("/realtime/v1/api/broadcast/user%3Au1/events/p?private=true", json={}, headers=user)
            assert r.status_code == 202
            assert (await v2.expect("broadcast", "realtime:user:u1"))[4]["event"] == "p"
            r = await http.post("/realtime/v1/api/broadcast/user%3Au1/events/p?private=true", json={}, headers=hdr)
            assert r.status_code == 403
            # errors
            r = await http.post("/realtime/v1/api/broadcast/room1/events/x", json={})
            assert r.status_code == 401
            assert "error" in r.json()
            r = await http.post("/realtime/v1/api/broadcast", content=b"{", headers=hdr)
            assert r.status_code == 400
            r = await http.get("/realtime/v1/api/broadcast", headers=hdr)
            assert r.status_code == 405
            r = await http.options("/realtime/v1/api/broadcast/room1/events/x")
            assert r.status_code == 204
            assert r.headers["access-control-allow-origin"] == "*"
            r = await http.post("/functions/v1/api/broadcast", json={}, headers=hdr)
            assert r.status_code == 404  # not realtime's path: handle_http returned False
        assert service.statistics().publications >= 4


async def test_rest_broadcast_refusals_as_supabase_answers_them() -> None:
    settings = RealtimeSettings(max_payload_bytes=1000)
    async with serve_realtime_http(settings, SECRET) as (_, server):
        base = f"http://127.0.0.1:{server.port}/realtime/v1/api/broadcast"
        hdr = {"apikey": ANON}
        async with httpx.AsyncClient(timeout=5) as http:

            async def status(path: str, content: bytes, ctype: str | None = "application/json") -> int:
                headers = {**hdr, "content-type": ctype} if ctype else hdr
                r = await http.post(base + path, content=content, headers=headers)
                assert "error" in r.json()
                return r.status_code

            assert await status("", b"messages=1", "application/x-www-form-urlencoded") == 415  # curl -d
            assert await status("/room1/events/e", b"hi", "text/plain") == 415
            assert await status("", b'{"messages": 1}') == 422
            assert await status("", b'{"messages": [{"event": "e"}]}') == 422
            big = json.dumps({"messages": [{"topic": "room1", "event": "e", "payload": "x" * 2000}]}).encode()
            assert await status("", big) == 422
            assert await status("/room1/events/e", json.dumps("x" * 2000).encode()) == 422
            assert await status("/room1/events/e", b"[" * 100_000 + b"]" * 100_000) == 400
            assert await status("", b"{") == 400
            assert await status("/secret/events/e?private=true", b"{}") == 403
            anon_no_exp = make_jwt("anon", exp_in=None)
            r = await http.post(base, json={"messages": []}, headers={"apikey": anon_no_exp})
            assert r.status_code == 401
            assert r.json()["error"] == "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
