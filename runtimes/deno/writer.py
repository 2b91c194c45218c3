"""`NonBlockingWriter`: ordered, whole frames to a Deno child's channel without a lock or a checkpoint.

It owns the outgoing bytes of ONE non-blocking fd (a child's frame channel), on the two primitives of
`mbworker.lib.nonblocking`: a frame is written at once with `write_some` when nothing is queued (no task switch,
no checkpoint: `send_all` under a lock cost two checkpoints per frame, a large share of a forwarded request);
what the fd has no room for is queued and written, in order, by the writer's `drain` task. `send_batched` queues
for the end-of-pass flusher instead: the request heads of every task that ran in one scheduler pass reach the
child in one `write` (and one read on its side) instead of one each.

Who owns what: the `DenoProcess` (process.py) owns its writer and runs `drain` in its nursery; the flusher only
holds a writer until the end of the pass and never writes once the writer is `close`d (the fd number may name
another file by then).
"""

from __future__ import annotations

import trio

from mbworker.lib.nonblocking import pass_flusher, write_some
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
            n = write_some(self._fd, data)
        except OSError:  # EPIPE / ECONNRESET: the other end is gone
            self.broken = True
            return False
        if n < len(data):
            self._buf += data[n:]
            self._wake.set()
        return True

    def send_batched(self, data: bytes) -> bool:
        """Queue `data` for the end of this scheduler pass (`lib.nonblocking.pass_flusher`). Order is kept:
        `send_now` appends while anything is queued. False: broken or not attached."""
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
            n = write_some(self._fd, self._buf)
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
                    n = write_some(fd, self._buf)
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
