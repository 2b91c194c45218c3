"""The size limit of each Deno process's own temp dir (`Limits.tmp_mb`), enforced by accounting.

Why accounting, not the kernel: a per-process tmpfs or loop mount needs privileges the daemon does not have (it
runs as its own user with no capabilities), and a quota on the data dir's filesystem would be the operator's to
set up. So one thread measures every live process's temp dir, and the process's owner kills the process when it
is over (546 `disk`). The limit can be overshot by what the function writes between two measures
(`INTERVAL`); a killed process's dir is removed with it, so an overshoot never outlives the process.

What counts (`usage`): every entry under the dir, files and dirs alike, at its allocated size (st_blocks: a
sparse file costs what it holds) but at least `MIN_ENTRY` (so millions of empty files cannot exhaust the
filesystem's inodes for free); and files the process still holds open after deleting them (found through
/proc/<pid>/fd, every `FD_EVERY` measures: they take disk space until closed, though no walk sees them).

Who owns what: the runtime owns one `TmpQuota` (its thread, started and joined by `open_tmp_quota`); a
`DenoProcess` registers its dir after the spawn and unregisters it when reaped. The thread only reads; what it
finds over a limit it hands to the trio thread (the `on_over` callback, run there), and it forgets that dir.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

INTERVAL = 0.05
"""Seconds between two measures of every dir."""
FD_EVERY = 10
"""Open-but-deleted files are looked for every this many measures (listing a process's fds costs more than a
walk of a small dir)."""
MIN_ENTRY = 4096
"""What each file or dir counts at least (one block, and one inode)."""
_DELETED = " (deleted)"


def usage(path: str, pid: int = 0) -> int:
    """Bytes the temp dir `path` uses (see the module docstring); with `pid`, plus the deleted files under it that
    the process holds open. Blocking (a walk): call it from a thread. A dir that vanished counts 0."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += max(st.st_blocks * 512, MIN_ENTRY)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    if pid:
        total += _deleted_open(path, pid)
    return total


def _deleted_open(path: str, pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    prefix = path.rstrip("/") + "/"
    total = 0
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
            if target.startswith(prefix) and target.endswith(_DELETED):
                total += max(os.stat(f"{fd_dir}/{name}").st_blocks * 512, MIN_ENTRY)
        except OSError:
            continue
    return total


OnOver = Callable[[int], None]
"""on_over(bytes_used): called once, on the trio thread, when a dir is found over its limit."""


@dataclass(slots=True)
class _Watched:
    path: str
    pid: int
    limit: int
    on_over: OnOver


def _guarded(on_over: OnOver, used: int) -> None:
    """A callback run by `run_sync_soon` must not raise: trio would end the whole run."""
    try:
        on_over(used)
    except Exception:
        log.exception("temp dir limit callback failed")


class TmpQuota:
    """Measures registered temp dirs from one thread (`open_tmp_quota` runs it). `watch`/`unwatch` are called
    from the trio thread; they only touch a dict under a lock."""

    def __init__(self, token: trio.lowlevel.TrioToken, interval: float = INTERVAL) -> None:
        self._token = token
        self._interval = interval
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}
        self._stop = threading.Event()
        self.measures = 0
        """Dirs measured so far (observability and tests)."""

    def watch(self, key: int, path: str, pid: int, limit_bytes: int, on_over: OnOver) -> None:
        with self._lock:
            self._watched[key] = _Watched(path, pid, limit_bytes, on_over)

    def unwatch(self, key: int) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def run(self) -> None:
        """The thread's loop, until `stop()`."""
        rounds = 0
        while not self._stop.wait(self._interval):
            rounds += 1
            with self._lock:
                watched = list(self._watched.items())
            for key, w in watched:
                try:
                    used = usage(w.path, w.pid if rounds % FD_EVERY == 0 else 0)
                except Exception:  # a surprise must not end the thread: every other dir would go unmeasured
                    log.exception("measuring %s failed", w.path)
                    continue
                self.measures += 1
                if used > w.limit:
                    self.unwatch(key)
                    try:
                        self._token.run_sync_soon(_guarded, w.on_over, used)
                    except trio.RunFinishedError:
                        return

    def stop(self) -> None:
        self._stop.set()


@asynccontextmanager
async def open_tmp_quota(interval: float = INTERVAL) -> AsyncIterator[TmpQuota]:
    """A running `TmpQuota`; its thread is stopped and joined (from a worker thread) on the way out."""
    quota = TmpQuota(trio.lowlevel.current_trio_token(), interval)
    thread = threading.Thread(target=quota.run, name="mbworker-tmp-quota", daemon=True)
    thread.start()
    try:
        yield quota
    finally:
        quota.stop()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, 5)
