"""`LogBudget`: how much of a function's stdout/stderr reaches its log, per function version, as token buckets.

A function printing in a loop (200k `console.log` lines in 8 s) must not fill the daemon's log or slow the other
functions: lines beyond the budget are dropped where they are read, before they are decoded or formatted
(counting them costs one `bytes.count` per read), and a note says how many were dropped once lines flow again.
The child's pipe is still read at full speed, so the function itself is not blocked by its own flood.

Owned by the `VersionPool` of the version (pool.py), shared by its processes; pure (the caller passes the clock).
"""

from __future__ import annotations

from dataclasses import dataclass

LINES_PER_S = 200.0
"""Sustained log lines per second per function version."""
LINE_BURST = 2000.0
BYTES_PER_S = 256.0 * 1024
"""Sustained log bytes per second per function version."""
BYTE_BURST = 2.0 * 1024 * 1024


@dataclass(slots=True)
class LogDrops:
    """Lines and bytes dropped by every budget of a runtime (its metric; outlives the versions)."""

    lines: int = 0
    bytes: int = 0


class LogBudget:
    """Two token buckets (lines and bytes); `admit` takes from both or drops the line and counts it."""

    __slots__ = ("_bytes", "_lines", "_t", "byte_burst", "bytes_per_s", "dropped_bytes", "dropped_lines", "line_burst",
                 "lines_per_s", "pending_note", "total")  # fmt: skip

    def __init__(
        self,
        *,
        lines_per_s: float = LINES_PER_S,
        line_burst: float = LINE_BURST,
        bytes_per_s: float = BYTES_PER_S,
        byte_burst: float = BYTE_BURST,
        total: LogDrops | None = None,
    ) -> None:
        self.total = total if total is not None else LogDrops()
        self.lines_per_s = lines_per_s
        self.line_burst = line_burst
        self.bytes_per_s = bytes_per_s
        self.byte_burst = byte_burst
        self._lines = line_burst
        self._bytes = byte_burst
        self._t: float | None = None
        self.dropped_lines = 0
        """Lines dropped since the version started (the runtime's metric sums these)."""
        self.dropped_bytes = 0
        self.pending_note = 0
        """Lines dropped since the last note in the log."""

    def _refill(self, now: float) -> None:
        if self._t is not None:
            dt = max(0.0, now - self._t)
            self._lines = min(self.line_burst, self._lines + dt * self.lines_per_s)
            self._bytes = min(self.byte_burst, self._bytes + dt * self.bytes_per_s)
        self._t = now

    def admit(self, nbytes: int, now: float) -> bool:
        """One line of `nbytes`: True to log it, False if it is dropped (counted)."""
        self._refill(now)
        if self._lines >= 1 and self._bytes >= nbytes:
            self._lines -= 1
            self._bytes -= nbytes
            return True
        self.drop(1, nbytes)
        return False

    def exhausted(self, now: float) -> bool:
        """No line would be admitted now: the reader may drop a whole read without splitting it."""
        self._refill(now)
        return self._lines < 1 or self._bytes < 1

    def drop(self, lines: int, nbytes: int) -> None:
        self.dropped_lines += lines
        self.dropped_bytes += nbytes
        self.pending_note += lines
        self.total.lines += lines
        self.total.bytes += nbytes

    def take_note(self) -> int:
        """Lines dropped since the last note (then zero): the caller logs one line saying so."""
        n = self.pending_note
        self.pending_note = 0
        return n
