"""Hostile input to realtime (issue 16): deeply nested JSON, a refused upgrade with pipelined bytes, presence
poisoning. Real WebSocket clients against the service behind the minimal upgrade door (tests/realtime/helpers)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from mbworker.realtime import RealtimeSettings
from tests.realtime.helpers import make_jwt, phx_client, running_realtime
from tests.realtime.test_connection import T, closed_code, kind3


async def test_deeply_nested_json_closes_1007_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    deep_payload = json.dumps(["1", "2", T, "broadcast", {"type": "broadcast", "event": "e", "payload": 0}])
    deep_payload = deep_payload.replace("0}]", "[" * 50_000 + "]" * 50_000 + "}]")
    async with running_realtime() as (_, port):
        for frame in (deep, deep_payload, kind3("1", "2", T, "e", b"[" * 50_000 + b"]" * 50_000, 1)):
            async with phx_client(port) as c:
                await c.join(T)
                await c.ws.send(frame)
                assert await closed_code(c.ws) == 1007
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_bad_apikey_with_pipelined_bytes_gets_a_clean_401() -> None:
    async with running_realtime() as (_, port):
        for key in ("bad", make_jwt("anon", exp_in=None)):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            request = (
                f"GET /realtime/v1/websocket?apikey={key}&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            # a masked text frame, then bytes that are no frame at all, all in one write with the request
            await stream.send_all(request.encode() + b"\x81\x85\x00\x00\x00\x00hello" + b"GET / HTTP/1.1\r\n\r\n")
            response = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    response += chunk
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401 ")
            assert json.loads(body)["error"].startswith(("MalformedJWT: ", "InvalidJWTToken: Fields `role` and `exp`"))
            await stream.aclose()


async def test_presence_is_bounded_per_track_and_per_channel() -> None:
    settings = RealtimeSettings(presence_max_meta_bytes=1000, presence_max_entries=3, presence_max_state_bytes=2600,
                                presence_max_calls=100)  # fmt: skip

    def track(meta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "presence", "event": "track", "payload": meta}

    async with running_realtime(settings) as (_, port), phx_client(port) as a, phx_client(port) as b:
        async with phx_client(port) as c, phx_client(port) as d:
            joins = {}
            for key, cl in zip("abcd", (a, b, c, d), strict=True):
                joins[key], _ = await cl.join(T, {"presence": {"key": key}, "broadcast": {"self": True}})
            await a.send(joins["a"], "10", T, "presence", track({"x": "a" * 1200}))  # one track too big
            assert (await a.reply_to("10"))[4] == {
                "status": "error",
                "response": {"reason": "Track message size exceeded"},
            }
            for n, (key, cl) in enumerate(zip("abc", (a, b, c), strict=True)):
                await cl.send(joins[key], str(20 + n), T, "presence", track({"x": key * 800}))
                assert (await cl.reply_to(str(20 + n)))[4]["status"] == "ok"
            await a.send(joins["a"], "30", T, "presence", track({"x": "A" * 800}))  # an update replaces its own
            assert (await a.reply_to("30"))[4]["status"] == "ok"
            await d.send(joins["d"], "31", T, "presence", track({"x": "d"}))  # a 4th entry
            assert (await d.reply_to("31"))[4]["response"] == {"reason": "Too many presence entries on this channel"}
            await c.send(joins["c"], "32", T, "presence", {"type": "presence", "event": "untrack"})
            await c.reply_to("32")
            await d.send(joins["d"], "33", T, "presence", track({"x": "d" * 990}))  # room for an entry, not its bytes
            assert (await d.reply_to("33"))[4]["response"] == {"reason": "Presence state of this channel is too large"}
            await d.send(joins["d"], "34", T, "broadcast", {"type": "broadcast", "event": "alive", "payload": {}})
            assert (await d.expect("broadcast"))[4]["event"] == "alive"  # refused tracks leave the channel joined
        async with phx_client(port) as e:  # a joiner gets the (bounded) state
            await e.join(T, {"presence": {"key": "e"}})
            state = (await e.expect("presence_state"))[4]
            assert sorted(state) == ["a", "b"]
            assert state["a"]["metas"][0]["x"] == "A" * 800
