"""CallThreads: results, exceptions and the done hook, without wasmtime."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from runtimes.wasm.threads import open_call_threads


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
