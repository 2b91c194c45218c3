"""EventQueue: bounded, ordered, batches, backpressure, close (trio only, no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mbworker.lib.redis import EventQueue


async def test_order_batches_and_nowait() -> None:
    q: EventQueue[int] = EventQueue(10)
    with pytest.raises(trio.WouldBlock):
        q.receive_nowait()
    for i in range(5):
        assert q.put_nowait(i)
    assert await q.receive() == 0
    assert await q.receive_batch(max_items=2) == [1, 2]
    assert await q.receive_batch() == [3, 4]
    assert len(q) == 0


async def test_full_queue_blocks_the_producer_until_the_consumer_takes() -> None:
    q: EventQueue[int] = EventQueue(2)
    assert q.put_nowait(1)
    assert q.put_nowait(2)
    assert not q.put_nowait(3)
    done = trio.Event()

    async def producer() -> None:
        await q.put(3)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert await q.receive() == 1
    assert done.is_set()
    assert await q.receive_batch() == [2, 3]


async def test_consumer_waits_then_close_ends_iteration() -> None:
    q: EventQueue[str] = EventQueue(4)
    seen: list[str] = []

    async def consumer() -> None:
        async for item in q:
            seen.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        q.put_nowait("a")
        q.put_nowait("b")
        q.close()
    assert seen == ["a", "b"]
    with pytest.raises(trio.EndOfChannel):
        await q.receive_batch()
    with pytest.raises(trio.ClosedResourceError):
        q.put_nowait("late")
