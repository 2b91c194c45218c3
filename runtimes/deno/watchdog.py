"""The limits of one Deno process as a pure decision: samples in, verdicts out (process.py does the sampling).

- memory: V8's heap cap is a flag (spawn.py); here, an RSS watch at 1.5 × memory_mb + 128 MiB (off-heap).
- CPU, counted whether or not a request is in flight (utime+stime of the process):
  - while booting: the process's whole CPU; over `cpu_time_ms` the boot is killed (a top-level infinite loop).
  - per request: CPU used since the request started; over `cpu_time_ms` the process is killed and every request
    in flight on it fails with 546 (CPU is per process: concurrent requests are all charged with it).
  - with no request in flight: `background_ms`, the CPU used since the process was last quiet (a sample where it
    used under `QUIET` of the wall time and its JS thread was asleep). Work left spinning after a response (a
    Worker, a timer) is blamed here: past `RETIRE_BACKGROUND` of the budget the process is retired, so no new
    request lands on it, and past the budget it is killed. The next innocent request is never the one charged.
- wall clock: retired (no new requests) at half, killed at full.

`Watchdog` holds no I/O and no clock: tests feed it samples. Owned by the `DenoProcess` it watches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from mbworker.runtimes.limits import Limits

QUIET = 0.05
"""A sample interval in which the process used less CPU than this share of the wall time ends background work."""
RETIRE_BACKGROUND = 0.25
"""Share of `cpu_time_ms` used with no request in flight after which the process takes no new requests."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_proc(pid: int) -> tuple[float, int, bool] | None:
    """(CPU ms, RSS bytes, runnable) of `pid`, or None if it is gone. Runnable: its main thread (the JS thread) is
    running or waiting for a core, not sleeping.

    procfs reads never block on disk, so this runs on the trio thread (a worker thread would cost more than it).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu_ms = (int(fields[11]) + int(fields[12])) * 1000.0 / _CLK_TCK
    rss = int(statm.split()[1]) * _PAGE
    return cpu_ms, rss, fields[0] == b"R"


class Charged(Protocol):
    """What the watchdog needs of a request: where its CPU count started (set at the first sample after it)."""

    cpu_start: float | None


@dataclass(frozen=True, slots=True)
class Kill:
    cause: str
    """"cpu" | "memory" | "wall_clock" (the 546 kind)."""
    message: str
    """For the function's log."""


@dataclass(frozen=True, slots=True)
class Retire:
    reason: str


Verdict = Kill | Retire | None


class Watchdog:
    """Samples of one process in, `Kill` / `Retire` / None out (see the module docstring)."""

    def __init__(self, limits: Limits, started_at: float) -> None:
        self.limits = limits
        self.rss_cap = int((limits.memory_mb * 1.5 + 128) * 1024 * 1024)
        self.wall_half = started_at + limits.wall_clock_s / 2
        self.wall_end = started_at + limits.wall_clock_s
        self.busy_interval = min(0.1, max(0.01, limits.cpu_time_ms / 1000 / 5))
        """How often to sample while CPU may be charged (booting, requests in flight, background work)."""
        self.cpu_ms = 0.0
        self.background_ms = 0.0
        self._last: tuple[float, float] | None = None  # (time, cpu_ms) of the previous sample
        self._retired = False

    def sample(
        self,
        now: float,
        cpu_ms: float,
        rss: int,
        requests: Iterable[Charged],
        *,
        booting: bool = False,
        runnable: bool = False,
        served: bool = False,
    ) -> Verdict:
        """One sample. `runnable`: the process was running or waiting for a core (a starved spinner uses little
        CPU per interval on a loaded machine, but is not quiet). `served`: a request ran on it at some point since
        the previous sample (its CPU in the interval is the requests', even if none is in flight right now)."""
        lim = self.limits
        last = self._last
        self._last = (now, cpu_ms)
        self.cpu_ms = cpu_ms
        if rss > self.rss_cap:
            return Kill("memory", f"RSS {rss >> 20} MiB over the {self.rss_cap >> 20} MiB cap")
        if booting:
            if cpu_ms > lim.cpu_time_ms:
                return Kill("cpu", f"CPU time over {lim.cpu_time_ms} ms while booting")
            return None
        in_flight = False
        for r in requests:
            in_flight = True
            if r.cpu_start is None:
                r.cpu_start = cpu_ms
            elif cpu_ms - r.cpu_start > lim.cpu_time_ms:
                return Kill("cpu", f"CPU time over {lim.cpu_time_ms} ms in a request")
        if not in_flight and not served and last is not None:
            used = cpu_ms - last[1]
            if used < QUIET * (now - last[0]) * 1000 and not runnable:
                self.background_ms = 0.0
            else:
                self.background_ms += used
            if self.background_ms > lim.cpu_time_ms:
                what = "with no request in flight (work left running after a response)"
                return Kill("cpu", f"CPU time over {lim.cpu_time_ms} ms {what}")
            if self.background_ms > RETIRE_BACKGROUND * lim.cpu_time_ms and not self._retired:
                self._retired = True
                return Retire("cpu_background")
        if now >= self.wall_end:
            return Kill("wall_clock", "wall clock time limit reached")
        if now >= self.wall_half and not self._retired:
            self._retired = True
            return Retire("wall_clock")
        return None

    @property
    def background(self) -> bool:
        """CPU is being used with no request in flight: keep sampling at `busy_interval`."""
        return self.background_ms > 0
