"""The Presence contract, run against every implementation in tests/realtime/contract.py (MockClock time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from mbworker.realtime.presence import Presence, PresenceDiff
from tests.realtime.contract import PRESENCES, clock_for

TTL = 60.0
T = "public|realtime:r"


class Sink:
    def __init__(self) -> None:
        self.diffs: list[tuple[str, PresenceDiff]] = []
        self.event = trio.Event()

    def handle_presence_diff(self, topic: str, diff: PresenceDiff) -> None:
        self.diffs.append((topic, diff))
        self.event.set()

    async def wait_count(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self.diffs) < n:
                self.event = trio.Event()
                await self.event.wait()


@pytest.fixture
def autojump_clock(request: pytest.FixtureRequest) -> trio.testing.MockClock:
    """pytest-trio's fixture, per implementation: real-I/O ones get a fast clock, not an autojumping one."""
    return clock_for(request.node.callspec.params["make_presence"])


@pytest.fixture(params=sorted(PRESENCES))
async def make_presence(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Presence]]:
    async with PRESENCES[request.param](TTL, trio.current_time) as make:
        yield make


async def node(make_presence: Callable[[], Presence]) -> tuple[Presence, Sink]:
    p = make_presence()
    sink = Sink()
    p.bind(sink)
    await p.subscribe(T)
    return p, sink


@pytest.fixture
async def presence(make_presence: Callable[[], Presence]) -> tuple[Presence, Sink]:
    return await node(make_presence)


async def test_track_publishes_join_and_lists(presence: tuple[Presence, Sink]) -> None:
    p, sink = presence
    stored = await p.track(T, "m1", "alice", {"n": 1})
    assert stored is not None
    assert stored is not None
    assert stored["phx_ref"]
    await sink.wait_count(1)
    assert sink.diffs[0] == (T, PresenceDiff(joins={"alice": [stored]}))
    assert await p.list(T) == {"alice": [stored]}


async def test_update_carries_phx_ref_prev_and_leaves_old_meta(presence: tuple[Presence, Sink]) -> None:
    p, sink = presence
    first = await p.track(T, "m1", "alice", {"n": 1})
    assert first is not None
    second = await p.track(T, "m1", "alice", {"n": 2})
    assert second is not None
    assert first is not None
    assert second is not None
    assert second["phx_ref_prev"] == first["phx_ref"] != second["phx_ref"]
    await sink.wait_count(2)
    assert sink.diffs[1][1] == PresenceDiff(joins={"alice": [second]}, leaves={"alice": [first]})
    assert await p.track(T, "m1", "alice", {"n": 2}) is None  # unchanged: no diff


async def test_two_members_one_key_and_untrack_removes_only_one(presence: tuple[Presence, Sink]) -> None:
    p, sink = presence
    a = await p.track(T, "m1", "alice", {"tab": 1})
    assert a is not None
    b = await p.track(T, "m2", "alice", {"tab": 2})
    assert b is not None
    assert await p.list(T) == {"alice": [a, b]}
    await p.untrack(T, "m1")
    await sink.wait_count(3)
    assert sink.diffs[2][1] == PresenceDiff(leaves={"alice": [a]})
    assert await p.list(T) == {"alice": [b]}
    await p.untrack(T, "nobody")  # no-op


async def test_entries_expire_unless_refreshed(
    presence: tuple[Presence, Sink], autojump_clock: trio.testing.MockClock
) -> None:
    # the clock must be a test argument for pytest-trio to run the test on it
    p, sink = presence
    kept = await p.track(T, "m1", "alice", {})
    assert kept is not None
    gone = await p.track(T, "m2", "bob", {})
    assert gone is not None
    await trio.sleep(TTL * 0.6)
    await p.refresh(T, ["m1"])
    await trio.sleep(TTL * 0.6)
    assert await p.list(T) == {"alice": [kept]}
    await p.sweep()
    await sink.wait_count(3)
    assert sink.diffs[2][1] == PresenceDiff(leaves={"bob": [gone]})


async def test_unsubscribed_topics_get_no_diffs(presence: tuple[Presence, Sink]) -> None:
    p, sink = presence
    await p.track("public|realtime:other", "m1", "x", {})
    await p.unsubscribe(T)
    await p.track(T, "m2", "y", {})
    await trio.testing.wait_all_tasks_blocked()
    assert sink.diffs == []


async def test_cross_node_state_diffs_and_dead_node_expiry(
    make_presence: Callable[[], Presence], autojump_clock: trio.testing.MockClock
) -> None:
    """Checklist 29: a track on node A is seen on node B; a dead node's entries expire with leave diffs."""
    (a, sink_a), (b, sink_b) = await node(make_presence), await node(make_presence)
    meta_a = await a.track(T, "a1", "alice", {"on": "A"})
    assert meta_a is not None
    await sink_b.wait_count(1)
    assert sink_b.diffs[0][1] == PresenceDiff(joins={"alice": [meta_a]})
    meta_b = await b.track(T, "b1", "bob", {"on": "B"})
    assert meta_b is not None
    assert await b.list(T) == await a.list(T) == {"alice": [meta_a], "bob": [meta_b]}
    # node A dies: it stops refreshing. B keeps refreshing its own members and sweeps.
    for _ in range(3):
        await trio.sleep(TTL / 2)
        await b.refresh(T, ["b1"])
        await b.sweep()
    await sink_b.wait_count(3)
    assert sink_b.diffs[2][1] == PresenceDiff(leaves={"alice": [meta_a]})
    assert await b.list(T) == {"bob": [meta_b]}
    await sink_a.wait_count(3)  # every subscribed node hears it (through Redis: maybe a little later than B)
    assert sink_a.diffs[-1][1] == PresenceDiff(leaves={"alice": [meta_a]})
