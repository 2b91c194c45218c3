"""The Broker contract, run against every implementation in tests/realtime/contract.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio

from mbworker.realtime.broker import Broker, Envelope, broker_key
from tests.realtime.contract import BROKERS


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, Envelope]] = []
        self.event = trio.Event()

    def handle_publication(self, key: str, envelope: Envelope) -> None:
        self.got.append((key, envelope))
        self.event.set()

    async def wait_count(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self.got) < n:
                self.event = trio.Event()
                await self.event.wait()


@pytest.fixture(params=sorted(BROKERS))
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Broker]]:
    async with BROKERS[request.param]() as make:
        yield make


@pytest.fixture
def broker(make_broker: Callable[[], Broker]) -> Broker:
    return make_broker()


def env(n: int, *, data: bytes = b"{}", is_json: bool = True) -> Envelope:
    return Envelope("realtime:r", False, f"e{n}", data, is_json, False, "node-a", sender="c1", meta={"id": str(n)})


async def test_publish_reaches_subscribed_handler_in_order(broker: Broker) -> None:
    sink = Sink()
    broker.bind(sink)
    key = broker_key("realtime:r", False)
    await broker.subscribe(key)
    for n in range(20):
        await broker.publish(key, env(n))
    await sink.wait_count(20)
    assert [e.event for _, e in sink.got] == [f"e{n}" for n in range(20)]
    first = sink.got[0][1]
    assert (first.origin_node, first.sender, first.meta) == ("node-a", "c1", {"id": "0"})  # self:false needs these


async def test_unsubscribed_and_other_topics_are_not_delivered(broker: Broker) -> None:
    sink = Sink()
    broker.bind(sink)
    pub, priv = broker_key("realtime:r", False), broker_key("realtime:r", True)
    assert pub != priv  # public and private channels of one name are separate
    await broker.subscribe(pub)
    await broker.publish(priv, env(1))
    await broker.publish(pub, env(2))
    await sink.wait_count(1)
    await broker.unsubscribe(pub)
    await broker.publish(pub, env(3))
    await broker.subscribe(pub)
    await broker.publish(pub, env(4))
    await sink.wait_count(2)
    assert [e.event for _, e in sink.got] == ["e2", "e4"]


async def test_binary_payload_survives(broker: Broker) -> None:
    sink = Sink()
    broker.bind(sink)
    key = broker_key("realtime:r", False)
    await broker.subscribe(key)
    await broker.publish(key, env(1, data=b"\x00\xff", is_json=False))
    await sink.wait_count(1)
    assert sink.got[0][1].data == b"\x00\xff"
    assert sink.got[0][1].is_json is False


def test_envelope_wire_roundtrip() -> None:
    e = env(7, data=b"\x01")
    back = Envelope.from_wire(e.to_wire())
    assert back.to_wire() == e.to_wire()


async def test_cross_node_delivery(make_broker: Callable[[], Broker]) -> None:
    a, b, c = make_broker(), make_broker(), make_broker()
    sinks = [Sink(), Sink(), Sink()]
    for node, sink in zip((a, b, c), sinks, strict=True):
        node.bind(sink)
    key = broker_key("realtime:r", False)
    await a.subscribe(key)
    await b.subscribe(key)  # c never subscribes
    await a.publish(key, env(1))
    await c.publish(key, env(2))  # publishing needs no subscription
    await sinks[0].wait_count(2)
    await sinks[1].wait_count(2)
    assert [e.event for _, e in sinks[1].got] == ["e1", "e2"]
    assert sinks[1].got[0][1].origin_node == "node-a"
    assert sinks[2].got == []
