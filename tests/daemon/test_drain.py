"""worker.drain: one state, started by anyone, finished by its owner; an admin asker is told before the node goes."""

from __future__ import annotations

import trio
import trio.testing

from mbworker.worker.drain import Drain, DrainState


async def test_start_is_idempotent_and_wakes_waiters() -> None:
    drain = Drain()
    woken: list[bool] = []

    async def waiter() -> None:
        await drain.wait_started()
        woken.append(drain.draining)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert (drain.state, woken) == (DrainState.SERVING, [])
        drain.start()
        drain.start()
    assert (drain.state, woken) == (DrainState.DRAINING, [True])
    assert drain.started.is_set()


async def test_admin_request_reports_drained_only_after_finish() -> None:
    drain = Drain()
    assert drain.request() is False  # started, public work not finished yet
    assert drain.state is DrainState.DRAINING
    drain.finish()
    told = trio.Event()

    async def owner() -> None:
        await drain.wait_told(timeout=30)  # lingers for the asker
        told.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        await trio.testing.wait_all_tasks_blocked()
        assert not told.is_set()
        assert drain.request() is True  # the asker reads drained: true
    assert told.is_set()


async def test_without_an_admin_asker_the_owner_does_not_linger() -> None:
    drain = Drain()
    drain.start()  # a signal, not the admin API
    drain.finish()
    with trio.fail_after(1):
        await drain.wait_told(timeout=30)
    assert drain.state is DrainState.DRAINED


async def test_an_asker_that_never_returns_is_waited_for_at_most_the_timeout() -> None:
    drain = Drain()
    drain.request()
    drain.finish()
    with trio.move_on_after(5) as scope:
        await drain.wait_told(timeout=0.05)
    assert not scope.cancelled_caught  # wait_told gave up on its own
