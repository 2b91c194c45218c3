"""Writes that never wait: `write_some` and the end-of-pass flusher (`pass_flusher`).

Two hot-path tricks, measured to pay (docs/benchmarks.md), named here once:

- `write_some(fd, data)`: one non-blocking `os.write`; how many bytes the kernel took (0 when it would block).
  trio's `send_all` costs at least two scheduler checkpoints per call; when the kernel takes everything at once
  (almost always: a response, a frame) there is nothing to wait for. Whatever it does not take, the caller keeps
  and writes, in order, before any later bytes (waiting for writability in a task of its own).
- `pass_flusher().add(item)`: `item.flush()` runs once trio has run every ready task and is about to poll for I/O.
  Bytes queued by many tasks during one pass leave in one write per destination instead of one write each, and
  the peer is woken once per pass (on loopback a write also runs the reader's side of TCP).

The flusher is one per trio run (a `RunVar`), installed as an instrument on first use; with nothing queued a
pass costs it one method call. Who owns what: each `item` owns its bytes and its fd; the flusher only holds, for
the rest of the pass, the items that asked to be flushed.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import trio

__all__ = ["Flushable", "PassFlusher", "pass_flusher", "write_some"]

log = logging.getLogger("mbworker.nonblocking")


def write_some(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write what the kernel takes now from `data` to non-blocking `fd`: the count, 0 when it would block.

    Raises `OSError` when the fd is broken (EPIPE, ECONNRESET, or EBADF for a closed socket whose `fileno()` is
    -1, never another file's descriptor). Never yields to trio: no checkpoint, no cancellation."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what is queued, without waiting. Must not raise: a broken destination is noticed by its owner."""
        ...


class PassFlusher(trio.abc.Instrument):
    """Calls `flush()` of every item `add`ed during one scheduler pass, just before trio polls for I/O."""

    def __init__(self) -> None:
        self._queued: list[Flushable] = []

    def add(self, item: Flushable) -> None:
        """Flush `item` at the end of this pass. Add an item once per pass (when its queue goes from empty to
        non-empty); adding it twice flushes it twice, which is harmless."""
        self._queued.append(item)

    def before_io_wait(self, timeout: float) -> None:
        self.flush_all()

    def flush_all(self) -> None:
        """Flush everything queued now (the end of a pass; also for an owner about to go away)."""
        queued = self._queued
        if queued:
            self._queued = []
            for item in queued:
                try:
                    item.flush()
                except Exception:  # an instrument that raises is removed by trio: keep flushing the others
                    log.exception("end-of-pass flush failed")


_FLUSHER: trio.lowlevel.RunVar[PassFlusher] = trio.lowlevel.RunVar("mbworker_pass_flusher")


def pass_flusher() -> PassFlusher:
    """This trio run's flusher, installed on first use."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = PassFlusher()
        trio.lowlevel.add_instrument(flusher)
        _FLUSHER.set(flusher)
        return flusher
