"""A fixed set of long-lived threads that run Wasm calls for trio tasks.

Why not `trio.to_thread.run_sync`: with a real call behind it, its per-call bookkeeping measured ~85 µs more CPU
than a queue hand-off to a waiting thread (docs/benchmarks.md, Wasm runtime), a fifth of a small request.

Short calls: the caller may first wait for the thread synchronously, bounded (`run(..., sync_wait_s=)`): the
trio thread then sits in `poll` without the GIL, the call thread runs uncontended, and the result needs no trip
through trio's scheduler. Under load this measured far cheaper than letting the trio thread go on serving
other connections meanwhile: every GIL hand-over between the busy trio thread and a call thread costs context
switches (~26 futex calls per request were counted with strace), and their cost dwarfs the call.

Why not `TrioToken.run_sync_soon` to hand results back: it wakes trio through a socket `send`, which releases the
GIL, so under load each finished call queues for the GIL once more behind the busy trio thread, and every result
costs a wake-up of its own. Here finished calls go to a deque; the first one of a batch signals an eventfd through
a libc `write` that keeps the GIL (a few µs), and one trio task hands out everything that finished meanwhile.

Ownership: `open_call_threads` starts the threads and the collector task, and joins the threads on exit (then
closes the eventfd and pipes). Work is bounded by the caller: it must hold one of `size` slots per submitted call
(WasmRuntime's CapacityLimiter), so there is always an idle thread, and a thread has at most one job queued.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import select
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

# libc's write/read called with the GIL held (PyDLL): eventfd I/O never blocks (EFD_NONBLOCK) and takes µs.
_LIBC = ctypes.PyDLL(None)
_write = _LIBC.write
_write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_read = _LIBC.read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_read.restype = ctypes.c_ssize_t
_ONE = ctypes.c_uint64(1)


_sched_getcpu = _LIBC.sched_getcpu
_sched_getcpu.argtypes = []
_sched_getcpu.restype = ctypes.c_int


class _Job:
    """One call handed to a thread. Exactly one side takes `claim`'s token (list.pop is atomic under the GIL):
    the thread when it finishes first (then it writes one byte to the sync pipe, which the caller reads), or the
    caller when its synchronous wait ran out (then the thread delivers through the collector)."""

    __slots__ = ("claim", "deliver", "fn", "result", "worker")

    def __init__(self, fn: Callable[[], Any], worker: _Worker) -> None:
        self.fn = fn
        self.worker = worker
        self.claim = [True]
        self.result: outcome.Outcome[Any] | None = None
        self.deliver: Callable[[outcome.Outcome[Any]], None] | None = None  # set before the caller claims


class _Worker:
    """One call thread: its job pipe (one byte per job in `jobs`), its OS thread id and its current CPU mask."""

    __slots__ = ("cpus", "job_r", "job_w", "jobs", "thread", "tid")

    def __init__(self, thread: threading.Thread, cpus: frozenset[int]) -> None:
        self.thread = thread
        self.jobs: collections.deque[_Job | None] = collections.deque()
        self.job_r, self.job_w = os.pipe2(os.O_CLOEXEC)
        self.tid = 0  # set by the thread itself once it runs; placing it waits until then
        self.cpus = cpus


class CallThreads:
    """`size` threads, each with its own job pipe. Use `run` from trio tasks.

    The trio thread keeps the idle workers: `run` takes one and hands it back when it sees the call's end, before
    `on_done` (which releases the caller's slot), so a caller holding a slot always finds an idle worker.
    """

    def __init__(self, size: int) -> None:
        # A sync completion is one byte on a pipe: pipe writes wake their reader as a "sync" wake-up, which the
        # scheduler prefers to serve on the writer's CPU when the writer is about to block (a lock or queue
        # wake-up, a futex, went to the other CPU: measured ~25 µs more CPU per call on the 2-vCPU bench VM).
        self._sync_r, self._sync_w = os.pipe2(os.O_CLOEXEC)
        self._sync_poll = select.poll()
        self._sync_poll.register(self._sync_r, select.POLLIN)
        self._finished: collections.deque[tuple[Callable[[outcome.Outcome[Any]], None], outcome.Outcome[Any]]] = (
            collections.deque()
        )
        # Set by the thread that signals a batch, cleared by the collector before it drains: a result appended
        # while it is set is drained by that pass (append happens before the check; clear before the drain).
        self._signalled = False
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._all_cpus = frozenset(os.sched_getaffinity(0))
        self._workers: list[_Worker] = []
        cpus = sorted(self._all_cpus)
        for i in range(size):
            # Spread over the CPUs from the start (each thread pins itself first thing), so that a short call
            # usually finds an idle thread already on the trio thread's CPU: no re-pinning, a warm cache.
            thread = threading.Thread(target=self._work, args=(i,), name=f"mbworker-wasm-{i}", daemon=True)
            self._workers.append(_Worker(thread, frozenset((cpus[i % len(cpus)],))))
        self._idle = list(self._workers)
        for worker in self._workers:
            worker.thread.start()

    def _work(self, index: int) -> None:
        worker = self._workers[index]
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, worker.cpus)
        worker.tid = threading.get_native_id()
        while True:
            os.read(worker.job_r, 1)
            job = worker.jobs.popleft()
            if job is None:
                return
            job.result = outcome.capture(job.fn)
            try:
                job.claim.pop()
            except IndexError:  # the caller stopped waiting synchronously: hand the result to the collector
                assert job.deliver is not None
                self._finished.append((job.deliver, job.result))
                if not self._signalled:
                    self._signalled = True
                    _write(self._eventfd, ctypes.byref(_ONE), 8)
            else:
                _write(self._sync_w, ctypes.byref(_ONE), 1)

    async def _collect(self) -> None:
        """Hand finished calls back to their tasks, a batch per wake-up. Runs for the threads' lifetime."""
        counter = ctypes.c_uint64()
        while True:
            await trio.lowlevel.wait_readable(self._eventfd)
            _read(self._eventfd, ctypes.byref(counter), 8)
            self._signalled = False
            finished = self._finished
            while finished:
                deliver, result = finished.popleft()
                deliver(result)

    def _take_idle(self, cpus: frozenset[int]) -> _Worker:
        """An idle worker, preferably one already on `cpus`."""
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):
            if idle[i].cpus == cpus:
                return idle.pop(i)
        return idle.pop()

    def _place(self, worker: _Worker, cpus: frozenset[int]) -> None:
        """Restrict `worker` to `cpus` (a syscall only when that changes)."""
        if worker.cpus != cpus and worker.tid:
            try:
                os.sched_setaffinity(worker.tid, cpus)
            except OSError:  # e.g. the CPU left our cpuset meanwhile: run anywhere we may
                cpus = self._all_cpus
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(worker.tid, cpus)
            worker.cpus = cpus

    async def run(
        self,
        fn: Callable[[], T],
        *,
        on_done: Callable[[], None],
        on_abandon: Callable[[], None],
        sync_wait_s: float = 0.0,
    ) -> T:
        """Run `fn` in a thread and return its result (or raise its exception). The caller must hold one of
        the `size` slots it opened the threads with (there is then an idle thread).

        `on_done()` runs on the trio thread once `fn` has returned, also when the caller was cancelled meanwhile;
        it must not raise. If the caller is cancelled, `on_abandon()` runs at once (it should make `fn` stop
        soon) and `Cancelled` propagates without waiting for the thread.

        `sync_wait_s` > 0: first wait for the thread up to that long *blocking the trio thread* (with the GIL
        released, so the call thread runs uncontended), and return at once if it finished: for short calls this
        saves the thread and trio from handing the GIL back and forth, and the result from a trip through the
        collector. The thread is then placed on the CPU the trio thread runs on: trio sleeps meanwhile, and the
        hand-offs stay on one CPU (waking a thread on the other CPU measured ~35 % more CPU per request through
        the daemon on the 2-vCPU bench VM). Past the wait, the call goes on as usual (cancellable, the loop
        runs). Calls without a wait run on any CPU. The caller bounds the cost of waiting.
        """
        cpus = self._all_cpus
        if sync_wait_s > 0:
            cpu = _sched_getcpu()
            if cpu in self._all_cpus:
                cpus = frozenset((cpu,))
        worker = self._take_idle(cpus)
        self._place(worker, cpus)
        job = _Job(fn, worker)
        worker.jobs.append(job)
        _write(worker.job_w, ctypes.byref(_ONE), 1)
        if sync_wait_s > 0:
            try:
                ready = self._sync_poll.poll(sync_wait_s * 1000)
            except BaseException:  # e.g. KeyboardInterrupt: nobody will wait, but on_done must still run once
                self._give_up(job, on_done)
                raise
            if ready:
                result: T = self._sync_result(job, on_done)
                return result
            self._place(worker, self._all_cpus)  # a long call: let it use another CPU than trio's

        task = trio.lowlevel.current_task()
        waiting = True

        def deliver(result: outcome.Outcome[T]) -> None:
            self._idle.append(worker)
            on_done()
            if waiting:
                trio.lowlevel.reschedule(task, result)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            nonlocal waiting
            waiting = False
            on_abandon()
            return trio.lowlevel.Abort.SUCCEEDED

        job.deliver = deliver
        try:
            job.claim.pop()
        except IndexError:  # the thread finished meanwhile and is about to write the sync byte: microseconds
            finished: T = self._sync_result(job, on_done)
            return finished
        value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    def _give_up(self, job: _Job, on_done: Callable[[], None]) -> None:
        def deliver(_result: outcome.Outcome[Any]) -> None:
            self._idle.append(job.worker)
            on_done()

        job.deliver = deliver
        try:
            job.claim.pop()
        except IndexError:  # finished: its byte must not be left for the next synchronous wait
            os.read(self._sync_r, 1)
            deliver(outcome.Value(None))

    def _sync_result(self, job: _Job, on_done: Callable[[], None]) -> Any:
        os.read(self._sync_r, 1)  # the byte of this job: only the trio thread waits here, one job at a time
        self._idle.append(job.worker)
        on_done()
        assert job.result is not None
        return job.result.unwrap()

    def _stop_and_join(self, timeout: float) -> bool:
        for worker in self._workers:
            worker.jobs.append(None)
            _write(worker.job_w, ctypes.byref(_ONE), 1)
        for worker in self._workers:
            worker.thread.join(timeout)
        return not any(worker.thread.is_alive() for worker in self._workers)


@asynccontextmanager
async def open_call_threads(size: int, *, join_timeout: float = 10.0) -> AsyncIterator[CallThreads]:
    """Start `size` call threads and their collector; on exit, stop them once idle and join them (the caller drains
    calls first: results that finish after exit are not delivered)."""
    threads = CallThreads(size)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def collector() -> None:
        # A system task, not a nursery child: exceptions from the body then reach the caller unwrapped.
        try:
            with scope:
                await threads._collect()
        finally:
            stopped.set()

    trio.lowlevel.spawn_system_task(collector, name="mbworker-wasm-collector")
    try:
        yield threads
    finally:
        scope.cancel()
        with trio.CancelScope(shield=True):
            joined = await trio.to_thread.run_sync(threads._stop_and_join, join_timeout)
            await stopped.wait()
        if joined:  # else a thread may still use them: leave the fds open rather than let them be reused under it
            trio.lowlevel.notify_closing(threads._eventfd)
            for fd in (threads._eventfd, threads._sync_r, threads._sync_w):
                os.close(fd)
            for worker in threads._workers:
                os.close(worker.job_r)
                os.close(worker.job_w)
