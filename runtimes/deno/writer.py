"""`NonBlockingWriter` and `PassFlusher`: the two tricks the daemon's writes to a Deno child rest on.

- `NonBlockingWriter` owns the outgoing bytes of ONE non-blocking fd (a child's frame channel). A frame is written
  at once with a plain `os.write` when nothing is queued (no task switch, no checkpoint: `send_all` under a lock
  cost two checkpoints per frame, a large share of a forwarded request); what the fd has no room for is queued and
  written, in order, by the writer's `drain` task. Frames therefore stay whole and ordered without a lock.
- `PassFlusher` (a trio Instrument, one per trio run) writes what writers queued with `send_batched` during one
  scheduler pass just before trio polls for I/O: the request heads of every task that ran in that pass reach the
  child in one `write` (and one read on its side) instead of one each.

Who owns what: the `DenoProcess` (process.py) owns its writer and runs `drain` in its nursery; the flusher only
holds a writer until the end of the pass and never writes once the writer is `close`d (the fd number may name
another file by then).
"""

from __future__ import annotations

import os

import trio

from mbworker.runtimes.deno.broadcast import Broadcast

WRITE_HIGH = 1 << 20
"""Bytes queued above which `wait_room` makes writers wait (request bodies faster than the child reads)."""


class NonBlockingWriter:
    """Ordered, whole writes to one non-blocking fd without a lock (see the module docstring)."""

    __slots__ = ("_buf", "_drained", "_fd", "_wake", "broken", "high")

    def __init__(self, fd: int = -1, *, high: int = WRITE_HIGH) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._wake = trio.Event()
        self._drained = Broadcast()
        self.broken = False
        """The fd failed (EPIPE, reset) or the writer was closed: nothing more is written."""
        self.high = high

    @property
    def fd(self) -> int:
        return self._fd

    def attach(self, fd: int) -> None:
        """The fd to write to (a writer may be made before its channel connects; sends fail until then)."""
        self._fd = fd

    @property
    def queued(self) -> int:
        return len(self._buf)

    def send_now(self, data: bytes) -> bool:
        """Write `data` at once if nothing is queued and the fd has room; queue the rest for `drain`.

        False: the writer is broken or not attached (nothing was queued)."""
        if self.broken or self._fd < 0:
            return False
        if self._buf:
            self._buf += data
            return True
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE / ECONNRESET: the other end is gone
            self.broken = True
            return False
        if n < len(data):
            self._buf += data[n:]
            self._wake.set()
        return True

    def send_batched(self, data: bytes) -> bool:
        """Queue `data` for the end of this scheduler pass (`PassFlusher`). Order is kept: `send_now` appends
        while anything is queued. False: broken or not attached."""
        if self.broken or self._fd < 0:
            return False
        if not self._buf:
            pass_flusher().add(self)
        self._buf += data
        return True

    def flush(self) -> None:
        """Write what is queued now, without waiting; what the fd has no room for is left to `drain`. Never
        raises (the pass flusher calls this)."""
        if not self._buf or self.broken:
            return
        try:
            n = os.write(self._fd, self._buf)
        except BlockingIOError:
            n = 0
        except OSError:
            self._fail()
            return
        del self._buf[:n]
        if self._buf:
            self._wake.set()
        else:
            self._drained.notify()

    async def wait_room(self) -> None:
        """Backpressure: wait while more than `high` bytes are queued."""
        while len(self._buf) > self.high and not self.broken:
            await self._drained.wait()

    async def drain(self) -> None:
        """Runs as long as the fd lives: writes what `send_now` could not and what `send_batched` queued."""
        while not self.broken:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._buf and not self.broken:
                fd = self._fd
                try:
                    n = os.write(fd, self._buf)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                except OSError:
                    self._fail()
                    break
                del self._buf[:n]
                if self._buf:
                    await trio.lowlevel.wait_writable(fd)
            self._drained.notify()

    def close(self) -> None:
        """No write after this may use the fd number: call it before the fd is closed."""
        self._fail()
        self._fd = -1

    def _fail(self) -> None:
        self.broken = True
        self._buf.clear()
        self._wake.set()
        self._drained.notify()


class PassFlusher(trio.abc.Instrument):
    """Flushes, just before trio polls for I/O, every writer that queued bytes during the scheduler pass: one
    syscall per writer per pass and no task switch to a writer task. One per trio run (`pass_flusher`), installed
    on first use; with nothing queued a pass costs it one method call."""

    def __init__(self) -> None:
        self._queued: list[NonBlockingWriter] = []

    def add(self, writer: NonBlockingWriter) -> None:
        self._queued.append(writer)

    def before_io_wait(self, timeout: float) -> None:
        queued = self._queued
        if queued:
            self._queued = []
            for writer in queued:
                writer.flush()


_FLUSHER: trio.lowlevel.RunVar[PassFlusher] = trio.lowlevel.RunVar("mbworker_deno_pass_flusher")


def pass_flusher() -> PassFlusher:
    """This trio run's flusher (installed as an instrument on first use)."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = PassFlusher()
        trio.lowlevel.add_instrument(flusher)
        _FLUSHER.set(flusher)
        return flusher
