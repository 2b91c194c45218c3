"""A fixed set of long-lived threads that run Wasm calls for trio tasks.

Why not `trio.to_thread.run_sync`: with a real call behind it, its per-call bookkeeping measured ~85 µs more CPU
than a queue hand-off to a waiting thread (docs/benchmarks.md, Wasm runtime), a fifth of a small request.

Ownership: `open_call_threads` starts the threads and joins them on exit. The queue is bounded by the caller: it
must hold one of `size` slots per submitted call (WasmRuntime's CapacityLimiter), so there is always an idle thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class CallThreads:
    """`size` threads waiting on one queue. Use `run` from trio tasks."""

    def __init__(self, size: int, token: trio.lowlevel.TrioToken) -> None:
        self.size = size
        self._token = token
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"mbworker-wasm-{i}", daemon=True) for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, deliver = job
            result = outcome.capture(fn)
            try:
                self._token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                return  # trio is gone; nobody is waiting

    async def run(self, fn: Callable[[], T], *, on_done: Callable[[], None], on_abandon: Callable[[], None]) -> T:
        """Run `fn` in a thread and return its result (or raise its exception).

        `on_done()` runs on the trio thread once `fn` has returned, also when the caller was cancelled meanwhile;
        it must not raise. If the caller is cancelled, `on_abandon()` runs at once (it should make `fn` stop
        soon) and `Cancelled` propagates without waiting for the thread.
        """
        task = trio.lowlevel.current_task()
        waiting = True

        def deliver(result: outcome.Outcome[T]) -> None:
            on_done()
            if waiting:
                trio.lowlevel.reschedule(task, result)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            nonlocal waiting
            waiting = False
            on_abandon()
            return trio.lowlevel.Abort.SUCCEEDED

        self._queue.put((fn, deliver))
        value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    def _stop_and_join(self, timeout: float) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)


@asynccontextmanager
async def open_call_threads(size: int, *, join_timeout: float = 10.0) -> AsyncIterator[CallThreads]:
    """Start `size` call threads; on exit, stop them once idle and join them (the caller drains calls first)."""
    threads = CallThreads(size, trio.lowlevel.current_trio_token())
    try:
        yield threads
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(threads._stop_and_join, join_timeout)
