"""Real WebSocket clients (websockets' trio client) against RealtimeService behind a minimal upgrade door."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.trio.client import connect

from mbworker.realtime import RealtimeSettings
from mbworker.realtime.broker_memory import MemoryBroker, MemoryBus
from mbworker.realtime.errors import PresenceError
from mbworker.realtime.presence_memory import MemoryPresence, MemoryPresenceStore
from tests.realtime.helpers import ANON, make_jwt, phx_client, running_realtime

T = "realtime:room1"


def kind3(join_ref: str, ref: str, topic: str, event: str, payload: bytes, enc: int) -> bytes:
    head = bytes([3, len(join_ref), len(ref), len(topic), len(event), 0, enc])
    return head + join_ref.encode() + ref.encode() + topic.encode() + event.encode() + payload


async def closed_code(ws) -> int | None:  # type: ignore[no-untyped-def]
    with trio.fail_after(5):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


# --- connection -----------------------------------------------------------------------------------


async def test_handshake_variants() -> None:  # checklist 1, 2, 3
    async with running_realtime() as (_, port):
        async with phx_client(port, vsn="1.0.0", path="/any/prefix//websocket") as c:
            await c.send(None, "1", "phoenix", "heartbeat", {})
            assert await c.recv() == (None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}})
            assert c.ws.subprotocol is None
        # missing vsn → 1.0.0 (object frames)
        async with connect(f"ws://127.0.0.1:{port}/socket/websocket?apikey={ANON}") as ws:
            await ws.send(json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "7"}))
            with trio.fail_after(5):
                assert json.loads(await ws.recv())["ref"] == "7"
        for query, status in [(f"apikey={ANON}&vsn=9.9.9", 400), ("vsn=2.0.0", 401),
                              (f"apikey={make_jwt('authenticated')}&vsn=2.0.0", 401),
                              (f"apikey={make_jwt('anon', exp_in=None)}&vsn=2.0.0", 401)]:  # fmt: skip
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://127.0.0.1:{port}/realtime/v1/websocket?{query}"):
                    pass
            assert info.value.response.status_code == status
            assert "error" in json.loads(info.value.response.body)


async def test_idle_socket_is_closed() -> None:  # checklist 5 (with a short idle timeout)
    async with running_realtime(RealtimeSettings(idle_timeout=0.3)) as (_, port), phx_client(port) as c:
        assert await closed_code(c.ws) == 1000


async def test_close_all_drains_with_1012() -> None:
    async with running_realtime() as (svc, port), phx_client(port) as c:
        await c.join(T)
        assert svc.statistics().connections == 1
        await svc.close_all()
        assert await closed_code(c.ws) == 1012
        assert svc.statistics().connections == 0


# --- join / leave ---------------------------------------------------------------------------------


async def test_join_reply_presence_state_and_errors() -> None:  # checklist 6, 7, 8, 9
    async with running_realtime(RealtimeSettings(max_events_per_second=1000)) as (_, port), phx_client(port) as c:
        jr, rep = await c.join(T, {"presence": {"key": "k", "enabled": True}})
        assert rep == (jr, jr, T, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}})
        assert await c.recv() == (jr, None, T, "presence_state", {})
        _, rep = await c.join("realtime:")
        assert rep[4] == {"status": "error", "response": {"reason": "You must provide a topic name"}}
        _, rep = await c.join("realtime:x", access_token=make_jwt("authenticated", secret="x" * 40))
        assert rep[4] == {
            "status": "error",
            "response": {"reason": "JwtSignatureError: Failed to validate JWT signature"},
        }
        for n in range(99):
            _, rep = await c.join(f"realtime:c{n}")
            assert rep[4]["status"] == "ok"
        _, rep = await c.join("realtime:one-too-many")  # 101st
        assert rep[4] == {"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}}


async def test_rejoin_and_duplicate_join() -> None:  # checklist 7, 10
    async with running_realtime() as (svc, port), phx_client(port) as a, phx_client(port) as b:
        await b.join(T, {"presence": {"key": "b", "enabled": True}})
        await b.expect("presence_state")
        jr1, _ = await a.join(T, {"presence": {"key": "a", "enabled": True}})
        await a.expect("presence_state")
        await a.send(jr1, a.next_ref(), T, "presence", {"type": "presence", "event": "track", "payload": {"v": 1}})
        diff = await b.expect("presence_diff")
        assert (svc.statistics().joins, svc.statistics().presence_entries) == (2, 1)
        old_meta = diff[4]["joins"]["a"]["metas"][0]
        jr2 = a.next_ref()
        await a.send(jr2, jr2, T, "phx_join", {"config": {"presence": {"key": "a", "enabled": True}}})
        assert await a.expect("phx_close") == (jr1, jr1, T, "phx_close", {})
        assert (await a.expect("phx_reply"))[:2] == (jr2, jr2)
        assert await a.expect("presence_state") == (jr2, None, T, "presence_state", {})  # old presence dropped
        leave = await b.expect("presence_diff")
        assert leave[4] == {"joins": {}, "leaves": {"a": {"metas": [old_meta]}}}
        assert (svc.statistics().joins, svc.statistics().presence_entries) == (3, 0)  # the rejoin tracked nothing


async def test_leave_unmatched_and_stale() -> None:  # checklist 11, 12, 13
    async with running_realtime() as (_, port), phx_client(port) as a, phx_client(port) as b:
        await b.join(T, {"presence": {"key": "b", "enabled": True}})
        jr, _ = await a.join(T, {"presence": {"key": "a", "enabled": True}, "broadcast": {"self": True}})
        await a.send(jr, "50", T, "presence", {"type": "presence", "event": "track", "payload": {}})
        await b.expect("presence_diff")
        await a.send(None, "51", "realtime:nope", "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
        assert await a.expect("phx_reply", "realtime:nope") == (
            None, "51", "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}
        )  # fmt: skip
        await a.send("stale", "52", T, "broadcast", {"type": "broadcast", "event": "stale", "payload": {}})
        await a.send(None, "53", T, "broadcast", {"type": "broadcast", "event": "fresh", "payload": {}})
        got = await a.expect("broadcast")
        assert got[4]["event"] == "fresh"  # the stale one was dropped, the null join_ref accepted
        await a.send(jr, "54", T, "phx_leave", {})
        assert await a.expect("phx_reply") == (jr, "54", T, "phx_reply", {"status": "ok", "response": {}})
        assert await a.recv() == (jr, jr, T, "phx_close", {})
        leave = await b.expect("presence_diff")
        assert list(leave[4]["leaves"]) == ["a"]


# --- broadcast ------------------------------------------------------------------------------------


async def test_fanout_self_ack_and_v1_v2_interop() -> None:  # checklist 16-22
    async with running_realtime() as (svc, port):  # noqa: SIM117
        async with phx_client(port) as a, phx_client(port) as b, phx_client(port, "1.0.0") as c:
            ja, _ = await a.join(T, {"broadcast": {"ack": True}})
            jb, _ = await b.join(T, {"broadcast": {"self": True}})
            await c.join(T)
            await a.ws.send(kind3(ja, "9", T, "cur", b'{"x":1}', 1))
            assert await a.recv() == (ja, "9", T, "phx_reply", {"status": "ok", "response": {}})  # ack, no echo
            frame = await b.recv()
            assert frame == bytes([4, len(T), 3, 0, 1]) + T.encode() + b'cur{"x":1}'  # kind 4 to v2
            assert await c.recv() == (
                None,
                None,
                T,
                "broadcast",
                {"type": "broadcast", "event": "cur", "payload": {"x": 1}},
            )
            await b.ws.send(kind3(jb, "", T, "raw", b"\x00\x01", 0))  # empty ref, binary payload
            assert await b.recv() == bytes([4, len(T), 3, 0, 0]) + T.encode() + b"raw\x00\x01"  # self:true
            assert await a.recv() == bytes([4, len(T), 3, 0, 0]) + T.encode() + b"raw\x00\x01"
            await c.send(None, "3", T, "broadcast", {"type": "broadcast", "event": "txt", "payload": {"y": 2}})
            assert await a.recv() == (
                None,
                None,
                T,
                "broadcast",
                {"type": "broadcast", "event": "txt", "payload": {"y": 2}},
            )
            # c (v1) got no binary frame: its next frame is the reply to a heartbeat
            await c.send(None, "4", "phoenix", "heartbeat", {})
            assert await c.recv() == (None, "4", "phoenix", "phx_reply", {"status": "ok", "response": {}})
            assert not any(isinstance(f, bytes) for f in c.seen)
            assert svc.statistics().deliveries >= 5


async def test_oversized_payload_gets_error_reply() -> None:
    async with running_realtime(RealtimeSettings(max_payload_bytes=100)) as (_, port), phx_client(port) as a:
        ja, _ = await a.join(T)
        await a.ws.send(kind3(ja, "5", T, "big", b'"' + b"x" * 200 + b'"', 1))
        assert await a.recv() == (ja, "5", T, "phx_reply", {"status": "error", "response": "payload_size_exceeded"})


# --- presence -------------------------------------------------------------------------------------


async def test_presence_track_update_untrack_and_close() -> None:  # checklist 23-28
    async with running_realtime() as (_, port), phx_client(port) as a, phx_client(port) as b:
        ja, _ = await a.join(T, {"presence": {"key": "", "enabled": True}})
        await a.expect("presence_state")
        jb, _ = await b.join(T, {"presence": {"key": "", "enabled": True}})
        await b.expect("presence_state")
        await a.send(ja, "20", T, "presence", {"type": "presence", "event": "track", "payload": {"v": 1}})
        assert await a.recv() == (ja, "20", T, "phx_reply", {"status": "ok", "response": {}})
        diff_a = await a.expect("presence_diff")  # the tracker gets its own join
        diff_b = await b.expect("presence_diff")
        assert diff_a == diff_b
        ((key_a, entry),) = diff_a[4]["joins"].items()
        meta1 = entry["metas"][0]
        assert meta1["v"] == 1
        assert meta1["phx_ref"]
        await b.send(jb, "21", T, "presence", {"type": "presence", "event": "track", "payload": {"v": 9}})
        key_b = next(iter((await a.expect("presence_diff"))[4]["joins"]))
        assert key_a != key_b  # empty key → server-generated unique keys
        await a.send(ja, "22", T, "presence", {"type": "presence", "event": "track", "payload": {"v": 2}})
        upd = await b.expect("presence_diff")
        upd = await b.expect("presence_diff") if key_b in upd[4]["joins"] else upd
        new = upd[4]["joins"][key_a]["metas"][0]
        assert new["phx_ref_prev"] == meta1["phx_ref"]
        assert upd[4]["leaves"] == {key_a: {"metas": [meta1]}}
        await a.send(ja, "23", T, "presence", {"type": "presence", "event": "track", "payload": "nope"})
        err = await a.reply_to("23")
        assert err[4] == {"status": "error", "response": {"reason": "Presence track payload must be a map"}}


async def test_shared_key_and_socket_close_leave() -> None:  # checklist 25, 26
    async with running_realtime() as (_, port), phx_client(port) as watcher:
        _jw, _ = await watcher.join(T, {"presence": {"key": "w", "enabled": True}})
        await watcher.expect("presence_state")
        metas = []
        async with phx_client(port) as t1:
            async with phx_client(port) as t2:
                for n, c in enumerate((t1, t2)):
                    jr, _ = await c.join(T, {"presence": {"key": "same", "enabled": True}})
                    await c.send(jr, "30", T, "presence", {"type": "presence", "event": "track", "payload": {"tab": n}})
                    metas.append((await watcher.expect("presence_diff"))[4]["joins"]["same"]["metas"][0])
                rj = watcher.next_ref()  # rejoin: full state again, two metas under one key
                await watcher.send(rj, rj, T, "phx_join", {"config": {"presence": {"key": "w", "enabled": True}}})
                state = await watcher.expect("presence_state")
                assert state[0] == rj
                assert state[4]["same"]["metas"] == metas
            leave = await watcher.expect("presence_diff")  # t2 closed its socket
            assert leave[4] == {"joins": {}, "leaves": {"same": {"metas": [metas[1]]}}}


# --- limits and bad frames: only the offender is affected ------------------------------------------


async def test_event_rate_limit_system_message_only_offender() -> None:
    async with running_realtime(RealtimeSettings(max_events_per_second=5)) as (_, port):  # noqa: SIM117
        async with phx_client(port) as bad, phx_client(port) as good:
            jb, _ = await bad.join(T)
            jg, _ = await good.join(T, {"broadcast": {"self": True}})
            for n in range(10):
                await bad.send(jb, str(100 + n), T, "broadcast", {"type": "broadcast", "event": "f", "payload": {}})
            system = await bad.expect("system")
            assert system == (jb, None, T, "system", {
                "extension": "system", "status": "error", "message": "Too many messages per second", "channel": "room1"
            })  # fmt: skip
            assert await bad.recv() == (jb, jb, T, "phx_close", {})
            await good.send(jg, "7", T, "broadcast", {"type": "broadcast", "event": "still", "payload": {}})
            assert (await good.expect("broadcast"))[4]["event"] in ("f", "still")


async def test_presence_rate_limit() -> None:
    async with running_realtime(RealtimeSettings(presence_max_calls=2)) as (_, port), phx_client(port) as c:
        jr, _ = await c.join(T, {"presence": {"key": "k", "enabled": True}})
        for n in range(3):
            await c.send(jr, str(40 + n), T, "presence", {"type": "presence", "event": "track", "payload": {"n": n}})
        system = await c.expect("system")
        assert system[4]["message"] == "Client presence rate limit exceeded"
        assert (await c.expect("phx_close"))[1] == jr


@pytest.mark.parametrize(
    ("frame", "code"),
    [("not json", 1007), ('{"topic":"t"}', 1007), (b"\x00\x01\x02", 1003), ("x" * 3000, 1009)],
)
async def test_bad_frame_closes_only_that_connection(frame: str | bytes, code: int) -> None:
    async with running_realtime(RealtimeSettings(max_frame_bytes=2048)) as (_, port):  # noqa: SIM117
        async with phx_client(port) as bad, phx_client(port) as good:
            jg, _ = await good.join(T, {"broadcast": {"self": True}})
            await bad.ws.send(frame)
            assert await closed_code(bad.ws) == code
            await good.send(jg, "2", T, "broadcast", {"type": "broadcast", "event": "ok", "payload": {}})
            assert (await good.expect("broadcast"))[4]["event"] == "ok"


@pytest.mark.parametrize(
    "settings",
    [
        RealtimeSettings(max_queued_bytes=64 * 1024, max_events_per_second=1_000_000),  # queue overflow
        RealtimeSettings(max_queued_bytes=1 << 30, write_timeout=0.2, max_events_per_second=1_000_000),  # stall
    ],
    ids=["overflow", "write-stall"],
)
async def test_slow_consumer_is_disconnected_others_unaffected(settings: RealtimeSettings) -> None:
    async with running_realtime(settings) as (svc, port):
        # a raw client that completes the handshake, joins, and then never reads again
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(
            f"GET /realtime/v1/websocket?apikey={ANON}&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                head += await slow.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101")
        join = json.dumps(["1", "1", T, "phx_join", {"config": {}}]).encode()
        await slow.send_all(Frame(Opcode.TEXT, join).serialize(mask=True))
        with trio.fail_after(5):
            assert b"phx_reply" in await slow.receive_some(4096)  # joined; from now on it never reads
        async with phx_client(port) as fast:
            jf, _ = await fast.join(T, {"broadcast": {"self": True}})
            blob = json.dumps("x" * 32_000)
            with trio.fail_after(20):
                n = 0
                while svc.statistics().slow_consumer_disconnects == 0:
                    n += 1
                    await fast.send(jf, None, T, "broadcast", {"type": "broadcast", "event": "b", "payload": blob})
                    assert (await fast.expect("broadcast"))[4]["event"] == "b"  # the fast one keeps up
            assert n > 2
            with trio.fail_after(10):  # the slow socket was closed by the server: reading it reaches EOF
                try:
                    while await slow.receive_some(1 << 20):
                        pass
                except trio.BrokenResourceError:
                    pass
            await fast.send(jf, "99", T, "broadcast", {"type": "broadcast", "event": "after", "payload": {}})
            assert (await fast.expect("broadcast"))[4]["event"] == "after"
            assert svc.statistics().connections == 1
        await slow.aclose()


class FailingPresence(MemoryPresence):
    """A presence store whose track fails (e.g. Redis down): the channel crashes, the socket survives."""

    async def track(self, topic: str, member_id: str, key: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        raise PresenceError("store unavailable")


async def test_channel_crash_sends_phx_error_and_socket_survives() -> None:  # checklist 15
    async with running_realtime(presence=FailingPresence()) as (svc, port), phx_client(port) as c:
        jr, _ = await c.join(T, {"presence": {"key": "k", "enabled": True}})
        await c.send(jr, "60", T, "presence", {"type": "presence", "event": "track", "payload": {}})
        assert await c.expect("phx_error") == (jr, jr, T, "phx_error", {"reason": "channel_crash"})
        assert svc.statistics().channels == 0
        jr2, rep = await c.join(T)  # the client rejoins with a new join_ref
        assert rep[4]["status"] == "ok"
        assert jr2 != jr


async def test_unknown_events_get_error_replies_and_socket_stays() -> None:
    async with running_realtime() as (_, port), phx_client(port, "1.0.0") as c:
        jr, _ = await c.join(T)
        await c.send(jr, "70", T, "shout", {})
        assert await c.reply_to("70") == (None, "70", T, "phx_reply", {
            "status": "error", "response": {"reason": "unknown event 'shout'"}
        })  # fmt: skip
        await c.send(jr, "71", T, "presence", {"type": "presence", "event": "dance"})
        assert (await c.reply_to("71"))[4]["status"] == "error"
        await c.send(None, "72", "phoenix", "heartbeat", {})
        assert (await c.reply_to("72"))[4] == {"status": "ok", "response": {}}


async def test_two_nodes_share_broadcast_and_presence() -> None:  # checklist 29 (in-process cluster)
    bus, store = MemoryBus(), MemoryPresenceStore()
    async with (
        running_realtime(node_id="A", broker=MemoryBroker(bus), presence=MemoryPresence(store=store)) as (_, pa),
        running_realtime(node_id="B", broker=MemoryBroker(bus), presence=MemoryPresence(store=store)) as (_, pb),
        phx_client(pa) as a,
        phx_client(pb, "1.0.0") as b,
    ):
        ja, _ = await a.join(T, {"presence": {"key": "a", "enabled": True}})
        await a.expect("presence_state")
        await a.send(ja, "1", T, "presence", {"type": "presence", "event": "track", "payload": {"n": "A"}})
        meta = (await a.expect("presence_diff"))[4]["joins"]["a"]["metas"][0]
        jb, _ = await b.join(T, {"presence": {"key": "b", "enabled": True}})
        assert await b.expect("presence_state") == (None, None, T, "presence_state", {"a": {"metas": [meta]}})
        await a.ws.send(kind3(ja, "", T, "hi", b'{"from":"A"}', 1))
        got = await b.expect("broadcast")
        assert got[4] == {"type": "broadcast", "event": "hi", "payload": {"from": "A"}}
        await b.send(jb, "2", T, "broadcast", {"type": "broadcast", "event": "back", "payload": {}})
        assert (await a.expect("broadcast"))[4]["event"] == "back"
        await a.send(ja, "3", T, "phx_leave", {})
        leave = await b.expect("presence_diff")
        assert leave[4] == {"joins": {}, "leaves": {"a": {"metas": [meta]}}}


async def test_postgres_changes_join_reports_the_database_error_and_keeps_broadcast() -> None:
    bindings = [{"event": "*", "schema": "public", "table": "todos"},
                {"event": "INSERT", "schema": "public", "table": "notes", "filter": "id=eq.1"}]  # fmt: skip
    async with running_realtime() as (_, port), phx_client(port) as c:
        jr, rep = await c.join(T, {"postgres_changes": bindings, "broadcast": {"self": True}})
        assert rep[4]["status"] == "ok"
        echoed = rep[4]["response"]["postgres_changes"]
        assert [{k: v for k, v in e.items() if k != "id"} for e in echoed] == [
            {"event": "*", "schema": "public", "table": "todos", "filter": None},
            {"event": "INSERT", "schema": "public", "table": "notes", "filter": "id=eq.1"},
        ]
        assert all(isinstance(e["id"], int) for e in echoed)
        assert len({e["id"] for e in echoed}) == 2
        system = await c.expect("system")
        assert system[:3] == (jr, None, T)
        assert system[4]["extension"] == "postgres_changes"
        assert system[4]["status"] == "error"
        assert system[4]["channel"] == "room1"
        await c.send(jr, "9", T, "broadcast", {"type": "broadcast", "event": "still", "payload": {}})
        assert (await c.expect("broadcast"))[4]["event"] == "still"
        _, rep = await c.join("realtime:secret", {"private": True})
        assert rep[4]["response"] == {
            "reason": "Unauthorized: You do not have permissions to read from this Channel topic: secret"
        }
