"""CallThreads: results, exceptions and the done hook, without wasmtime."""

from __future__ import annotations

import operator
import threading
from functools import partial

import pytest
import trio
import trio.testing

from mbworker.runtimes.wasm.threads import open_call_threads


async def test_result_exception_and_done_hook() -> None:
    done: list[str] = []
    async with open_call_threads(2) as threads:
        name = await threads.run(
            lambda: threading.current_thread().name, on_done=lambda: done.append("a"), on_abandon=lambda: None
        )
        assert name.startswith("mbworker-wasm-")

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await threads.run(fail, on_done=lambda: done.append("b"), on_abandon=lambda: None)
    assert done == ["a", "b"]


async def test_cancel_abandons_then_reports_done() -> None:
    release = threading.Event()
    events: list[str] = []
    finished = trio.Event()

    def on_done() -> None:
        events.append("done")
        finished.set()

    async with open_call_threads(1) as threads:
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                await threads.run(
                    lambda: release.wait(10), on_done=on_done, on_abandon=lambda: events.append("abandon")
                )

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert events == ["abandon"]  # the caller left without waiting for the thread
        release.set()
        with trio.fail_after(10):
            await finished.wait()
    assert events == ["abandon", "done"]


async def test_sync_wait_returns_a_quick_result_and_its_exception() -> None:
    done: list[str] = []
    async with open_call_threads(1) as threads:
        assert await threads.run(lambda: 7, on_done=lambda: done.append("a"), on_abandon=lambda: None, sync_wait_s=5)

        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await threads.run(fail, on_done=lambda: done.append("b"), on_abandon=lambda: None, sync_wait_s=5)
        # The sync pipe holds no stale byte: a later slow call still goes through the collector correctly.
        release = threading.Event()

        def slow() -> str:
            release.wait(10)
            return "late"

        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def caller() -> None:
                results.append(
                    await threads.run(
                        slow, on_done=lambda: done.append("c"), on_abandon=lambda: None, sync_wait_s=0.001
                    )
                )

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()  # the wait ran out: the loop runs while `slow` does
            assert results == []
            release.set()
        assert results == ["late"]
    assert done == ["a", "b", "c"]


async def test_sync_wait_and_async_calls_interleave() -> None:
    """Alternating quick synchronous waits with calls that outlast theirs: each result reaches its own caller."""
    async with open_call_threads(2) as threads:
        for i in range(60):
            wait = 0.005 if i % 2 else 0.0
            value = await threads.run(
                partial(operator.mul, i, i), on_done=lambda: None, on_abandon=lambda: None, sync_wait_s=wait
            )
            assert value == i * i
