"""RedisPresence beyond the contract: realtime nodes sharing one real redis-server (websocket clients), a dead
node's users leaving through another node's sweeper, a Redis restart (resync), concurrent sweepers."""

from __future__ import annotations

from typing import Any

import trio

from mbworker.lib.redis import RedisClient
from mbworker.realtime import RealtimeSettings
from mbworker.realtime.presence import PresenceDiff
from mbworker.realtime.presence_redis import RedisPresence, open_redis_presence
from tests.realtime.helpers import Phx, phx_client, redis_node
from tests.redis_server import RedisServer

T = "realtime:room"
KEY = "public|" + T


class Model:
    """A client's presence state as realtime-js keeps it: presence_state, then diffs applied by phx_ref."""

    def __init__(self) -> None:
        self.state: dict[str, list[dict[str, Any]]] = {}

    def apply(self, event: str, payload: dict[str, Any]) -> None:
        if event == "presence_state":
            self.state = {k: list(v["metas"]) for k, v in payload.items()}
            return
        for key, entry in payload["leaves"].items():
            refs = {m["phx_ref"] for m in entry["metas"]}
            kept = [m for m in self.state.get(key, []) if m["phx_ref"] not in refs]
            if kept:
                self.state[key] = kept
            else:
                self.state.pop(key, None)
        for key, entry in payload["joins"].items():
            refs = {m["phx_ref"] for m in entry["metas"]}
            self.state[key] = [m for m in self.state.get(key, []) if m["phx_ref"] not in refs] + entry["metas"]

    def payloads(self) -> dict[str, list[Any]]:
        return {k: sorted(m.get("n", 0) for m in v) for k, v in self.state.items()}


async def follow(client: Phx, model: Model, want: dict[str, list[Any]], timeout: float = 10) -> None:
    """Apply the client's presence frames to `model` until it shows `want` (key → sorted `n` values)."""
    with trio.fail_after(timeout):
        while model.payloads() != want:
            msg = await client.recv(timeout)
            if isinstance(msg, tuple) and msg[3] in ("presence_state", "presence_diff"):
                model.apply(msg[3], msg[4])


async def track(client: Phx, join_ref: str, n: int) -> None:
    await client.send(join_ref, None, T, "presence", {"type": "presence", "event": "track", "payload": {"n": n}})


async def test_presence_is_shared_across_nodes(redis: RedisClient) -> None:
    async with (
        redis_node(redis, "A") as (_, port_a, _, _),
        redis_node(redis, "B") as (_, port_b, _, _),
        phx_client(port_a) as a,
        phx_client(port_b, "1.0.0") as b,
    ):
        seen_a, seen_b = Model(), Model()
        ja, _ = await a.join(T, {"presence": {"key": "alice"}})
        await track(a, ja, 1)
        await follow(a, seen_a, {"alice": [1]})
        jb, _ = await b.join(T, {"presence": {"key": "bob"}})
        await follow(b, seen_b, {"alice": [1]})  # presence_state on B holds A's member
        await track(b, jb, 2)
        await follow(a, seen_a, {"alice": [1], "bob": [2]})  # diff delivered on A
        await follow(b, seen_b, {"alice": [1], "bob": [2]})
        await a.send(ja, "9", T, "phx_leave", {})
        await follow(b, seen_b, {"bob": [2]})  # leave delivered on B


async def test_dead_node_entries_expire_and_leave_on_other_nodes(redis: RedisClient) -> None:
    """Node A tracks a member, then dies (its presence stops: no refresh, no cleanup). Node B's upkeep sweeps
    A's entry after the TTL and B's clients get the leave diff."""
    settings = RealtimeSettings(presence_ttl=1.0, presence_refresh_interval=0.1)
    async with redis_node(redis, "B", settings) as (_, port_b, _, presence_b), phx_client(port_b) as b:
        seen = Model()
        jb, _ = await b.join(T, {"presence": {"key": "bob"}})
        await track(b, jb, 2)
        await follow(b, seen, {"bob": [2]})
        with trio.CancelScope() as node_a:
            async with open_redis_presence(redis, redis.settings, node_id="A", ttl=1.0) as presence_a:
                presence_a.bind(_Ignore())
                await presence_a.track(KEY, "a-member", "alice", {"n": 1})
                await follow(b, seen, {"alice": [1], "bob": [2]})
                node_a.cancel()  # A dies here: no untrack, nobody refreshes "a-member" again
        await follow(b, seen, {"bob": [2]}, timeout=10)  # B's sweeper published A's leave; B's own member stays
        assert presence_b.statistics().swept >= 1
        assert await presence_b.list(KEY) == {"bob": seen.state["bob"]}


class _Ignore:
    def handle_presence_diff(self, topic: str, diff: PresenceDiff) -> None:
        pass


async def test_redis_restart_resyncs_presence(redis_server: RedisServer, redis: RedisClient) -> None:
    """Redis restarts empty: each node restores its own members; a change made during the outage reaches the
    other node afterwards; new joins see the whole cluster again."""
    async with (
        redis_node(redis, "A") as (_, port_a, _, presence_a),
        redis_node(redis, "B") as (_, port_b, _, presence_b),
        phx_client(port_a) as a,
        phx_client(port_b) as b,
    ):
        seen_a, seen_b = Model(), Model()
        ja, _ = await a.join(T, {"presence": {"key": "alice"}})
        jb, _ = await b.join(T, {"presence": {"key": "bob"}})
        await track(a, ja, 1)
        await track(b, jb, 2)
        await follow(a, seen_a, {"alice": [1], "bob": [2]})
        await follow(b, seen_b, {"alice": [1], "bob": [2]})

        await redis_server.stop()
        await track(a, ja, 3)  # during the outage: A's own clients hear it at once
        await follow(a, seen_a, {"alice": [3], "bob": [2]})
        await redis_server.start()

        assert presence_a.statistics().local_fallbacks == 1
        await follow(b, seen_b, {"alice": [3], "bob": [2]})  # B hears the change once A resynced
        async with phx_client(port_b) as c:
            await c.join(T, {"presence": {"enabled": True}})
            # presence_state comes from Redis, diffs follow: c converges on both nodes' members
            await follow(c, Model(), {"alice": [3], "bob": [2]})
        assert await presence_a.list(KEY) == await presence_b.list(KEY)
        assert [m["n"] for ms in (await presence_b.list(KEY)).values() for m in ms] == [3, 2]
        assert presence_a.statistics().restored >= 1
        assert presence_b.statistics().restored >= 1


class Sink:
    def __init__(self) -> None:
        self.diffs: list[PresenceDiff] = []
        self.changed = trio.Event()

    def handle_presence_diff(self, topic: str, diff: PresenceDiff) -> None:
        self.diffs.append(diff)
        self.changed.set()

    async def wait_count(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self.diffs) < n:
                self.changed = trio.Event()
                await self.changed.wait()


async def test_concurrent_sweepers_publish_one_leave(redis: RedisClient) -> None:
    now = [100.0]
    sinks = [Sink(), Sink()]
    async with trio.open_nursery() as nursery:
        nodes = []
        for name, sink in zip(("A", "B"), sinks, strict=True):
            node = RedisPresence(redis, redis.settings, node_id=name, ttl=10, clock=lambda: now[0])
            node.bind(sink)
            await nursery.start(node.serve)
            await node.subscribe(KEY)
            nodes.append(node)
        meta = await nodes[0].track(KEY, "m", "alice", {})
        assert meta is not None
        now[0] += 11
        async with trio.open_nursery() as sweepers:
            for node in nodes * 3:
                sweepers.start_soon(node.sweep)
        await nodes[1].track(KEY, "m2", "bob", {})  # a marker for "every diff is in"
        for sink in sinks:
            await sink.wait_count(3)
            assert sink.diffs[1] == PresenceDiff(leaves={"alice": [meta]})
            assert list(sink.diffs[2].joins) == ["bob"]
        assert sum(n.statistics().swept for n in nodes) == 1
        nursery.cancel_scope.cancel()


async def test_entries_lost_by_redis_come_back_and_replacements_carry_the_leave(redis: RedisClient) -> None:
    """Redis loses everything (a restart without persistence, here FLUSHALL on a live connection): a refresh
    restores the node's own entry, and an update whose old entry is gone still tells the others it left."""
    sinks = [Sink(), Sink()]
    async with trio.open_nursery() as nursery:
        a, b = (RedisPresence(redis, redis.settings, node_id=name) for name in ("A", "B"))
        for node, sink in zip((a, b), sinks, strict=True):
            node.bind(sink)
            await nursery.start(node.serve)
            await node.subscribe(KEY)
        first = await a.track(KEY, "m", "alice", {"n": 1})
        assert first is not None
        await sinks[1].wait_count(1)
        await redis.execute("FLUSHALL")
        assert await b.list(KEY) == {}
        await a.refresh(KEY, ["m"])  # the upkeep's refresh finds the entry missing and adds it again
        assert await b.list(KEY) == {"alice": [first]}
        assert a.statistics().restored == 1
        await redis.execute("FLUSHALL")
        second = await a.track(KEY, "m", "alice", {"n": 2})  # Redis has no old entry: it publishes a join only
        assert second is not None
        await sinks[1].wait_count(3)
        assert sinks[1].diffs[2] == PresenceDiff(joins={"alice": [second]}, leaves={"alice": [first]})
        nursery.cancel_scope.cancel()
