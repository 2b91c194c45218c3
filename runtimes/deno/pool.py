"""The warm processes of ONE function version: pick, boot, wait for capacity, back off, retire.

Ownership: a `VersionPool` owns its `DenoProcess` objects and its scratch directory; the processes' `serve()`
tasks run in the runtime's nursery (`Shared.nursery`). The runtime (runtime.py) owns the pools.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.deno import spare
from mbworker.runtimes.deno.broadcast import Broadcast
from mbworker.runtimes.deno.importmap import write_import_map
from mbworker.runtimes.deno.loglimit import LogBudget, LogDrops
from mbworker.runtimes.deno.permissions import NetPolicy
from mbworker.runtimes.deno.process import DenoProcess, OnLog
from mbworker.runtimes.deno.spare import SpareDirs
from mbworker.runtimes.deno.spawn import Spawner, VersionPaths
from mbworker.runtimes.deno.tmpquota import TmpQuota
from mbworker.runtimes.errors import BootError, VersionRetired, WorkerBusy

_LIMIT_KINDS = ("cpu", "memory", "wall_clock", "disk")


@dataclass(slots=True)
class Counters:
    cold_starts: int = 0
    boot_failures: int = 0
    limit_kills: Counter[str] = field(default_factory=Counter)
    log_drops: LogDrops = field(default_factory=LogDrops)


@dataclass(slots=True)
class Shared:
    """What every pool of one runtime uses. Owned by the runtime."""

    nursery: trio.Nursery
    spawner: Spawner
    deno_bin: str
    bootstrap: Path
    scratch_dir: Path
    deno_dir: Path
    """The template DENO_DIR, where the bootstrap is compiled: each version's own is a copy (see
    `open_deno_runtime`)."""
    spares: SpareDirs
    """A version dir (with its copy of the template) made ahead of the next cold start."""
    socket_dir: Path
    """Short-path dir for node:http unix sockets (sun_path is 108 bytes; scratch paths can be long)."""
    stop_grace_s: float
    on_log: OnLog
    tmp_quota: TmpQuota
    """Measures every process's temp dir (tmpquota.py)."""
    counters: Counters
    process_seq: int = 0
    net: NetPolicy | None = None
    """The operator's network policy (None: private ranges denied, nothing else)."""


def _rename(src: Path, dest: Path) -> bool:
    """Move a spare version dir into place; on failure remove it (the caller makes one). Blocking."""
    try:
        os.rename(src, dest)
    except OSError:
        shutil.rmtree(src, ignore_errors=True)
        return False
    return True


class VersionPool:
    def __init__(self, fn: FunctionVersion, shared: Shared, *, warm_up: bool = False) -> None:
        """`warm_up`: the runtime's throwaway pool that compiles the bootstrap into `shared.deno_dir` (its
        DENO_DIR is that template itself, and its boot is nobody's cold start)."""
        self.fn = fn
        self._shared = shared
        self._warm_up = warm_up
        self.processes: list[DenoProcess] = []
        self._booting = 0
        self._changed = Broadcast()
        """A slot freed, a process came or went (notified once per request, by `release`)."""
        self.cleaned = trio.Event()
        """Set once `cleanup` removed the version's files."""
        self._paths: VersionPaths | None = None
        self._prepare_lock = trio.Lock()
        self.retired = False
        self._crash_streak = 0
        self._boot_fail_streak = 0
        self._retry_boot_at = 0.0
        self._last_boot_error: BootError | None = None
        self.log_budget = LogBudget(total=shared.counters.log_drops)
        """The version's log lines per second, shared by its processes (loglimit.py)."""
        limit = fn.limits.max_processes or os.cpu_count() or 1
        self.max_processes = max(1, limit)

    # ------------------------------------------------------------------ capacity

    async def acquire(self) -> DenoProcess:
        """A ready process with a slot reserved for the caller (release with `release`).

        Raises BootError if a needed boot fails, WorkerBusy after queue_timeout_s without a free slot,
        VersionRetired once the pool is retired (also while the caller waits for a slot).
        """
        lim = self.fn.limits
        deadline = math.inf  # set on the first wait: a free slot (the usual case) needs no clock read
        while True:
            best: DenoProcess | None = None
            for p in self.processes:
                if p.accepting and p.load < lim.max_concurrency and (best is None or p.load < best.load):
                    best = p
            if best is not None:
                best.load += 1
                return best
            if self.retired:
                # None of its processes takes a new request, and one booted now could outlive the pool's cleanup
                # (its files made again after they were removed): the caller goes to the version live now.
                raise VersionRetired()
            if deadline == math.inf:
                deadline = trio.current_time() + lim.queue_timeout_s
            if len(self.processes) + self._booting < self.max_processes:
                proc = await self._boot(deadline)
                proc.load += 1
                return proc
            with trio.move_on_at(deadline):
                await self._changed.wait()
                continue
            raise WorkerBusy()

    def release(self, proc: DenoProcess, *, ok: bool) -> None:
        proc.load -= 1
        if ok:
            self._crash_streak = 0
        if proc.retiring and proc.load == 0:
            self._stop_soon(proc, proc.stop_reason or "retired")
        self._changed.notify()

    async def warm(self) -> None:
        if any(p.accepting for p in self.processes):
            return
        if len(self.processes) + self._booting >= self.max_processes:
            return
        await self._boot(trio.current_time() + self.fn.limits.boot_timeout_s)

    # ------------------------------------------------------------------ boot / exit

    async def _prepare(self) -> VersionPaths:
        async with self._prepare_lock:
            if self._paths is None:
                base = self._shared.scratch_dir / f"{self.fn.slug}-{self.fn.version}-{os.urandom(3).hex()}"
                template = self._shared.deno_dir
                # The warm-up compiles into the template itself; every other version gets a copy of it: the spare
                # made ahead (spare.py) when there is one, else one made now.
                deno_dir = template if self._warm_up else base / spare.DENO_DIR
                paths = VersionPaths(base, deno_dir, base / spare.TMPS, base / "import_map.json")
                ready = None if self._warm_up else self._shared.spares.take()
                began = False

                def make() -> None:
                    nonlocal began
                    began = True
                    if self._warm_up:
                        paths.base.mkdir(parents=True, exist_ok=True)
                        paths.tmps.mkdir(mode=0o700, exist_ok=True)
                    elif ready is None or not _rename(ready, base):
                        spare.make_version_dir(template, base)
                    write_import_map(self.fn, paths.import_map)

                try:
                    await trio.to_thread.run_sync(make)
                except BaseException:
                    # Cancelled before the thread ran: the spare is untouched and whole, so it stays one (once the
                    # thread runs it is not cancelled: `make` consumed it).
                    if ready is not None and not began:
                        self._shared.spares.put_back(ready)
                    raise
                self._paths = paths
            return self._paths

    async def _boot(self, deadline: float) -> DenoProcess:
        now = trio.current_time()
        if self._last_boot_error is not None and now < self._retry_boot_at:
            err = self._last_boot_error  # fail fast while backing off: don't fork-bomb a broken function
            raise BootError(err.message, output=err.output)
        self._booting += 1
        try:
            if self._crash_streak >= 2:  # crash loop: back off, within the caller's queue budget
                delay = min(0.05 * 2 ** (self._crash_streak - 2), 5.0)
                await trio.sleep_until(min(now + delay, deadline))
            paths = await self._prepare()
            self._shared.process_seq += 1
            proc = DenoProcess(
                self.fn,
                seq=self._shared.process_seq,
                deno_bin=self._shared.deno_bin,
                bootstrap=self._shared.bootstrap,
                paths=paths,
                socket_dir=self._shared.socket_dir,
                spawner=self._shared.spawner,
                tmp_quota=self._shared.tmp_quota,
                on_log=self._shared.on_log,
                on_exit=self._on_exit,
                on_idle=self._on_idle,
                net=self._shared.net,
                log_budget=self.log_budget,
            )
            try:
                await self._shared.nursery.start(proc.serve)
            except BootError as exc:
                if not self._warm_up:
                    self._shared.counters.boot_failures += 1
                self._boot_fail_streak += 1
                self._last_boot_error = exc
                self._retry_boot_at = trio.current_time() + min(0.25 * 2 ** (self._boot_fail_streak - 1), 10.0)
                raise
            if not self._warm_up:
                self._shared.counters.cold_starts += 1
            self._boot_fail_streak = 0
            self._last_boot_error = None
            if self.retired:
                proc.retiring = True
            self.processes.append(proc)
            return proc
        finally:
            self._booting -= 1
            self._changed.notify()

    def _on_exit(self, proc: DenoProcess) -> None:
        if proc in self.processes:
            self.processes.remove(proc)
            if proc.kill_cause in _LIMIT_KINDS:
                self._shared.counters.limit_kills[proc.kill_cause] += 1
            elif proc.stop_reason is None and proc.kill_cause != "stopped":
                self._crash_streak += 1  # exited on its own (Deno.exit, crash)
        self._changed.notify()

    def _on_idle(self, proc: DenoProcess) -> None:
        if proc.load == 0:
            self._stop_soon(proc, proc.stop_reason or "idle")
        self._changed.notify()

    def _stop_soon(self, proc: DenoProcess, reason: str) -> None:
        self._shared.nursery.start_soon(proc.stop, reason, self._shared.stop_grace_s)

    # ------------------------------------------------------------------ retire / close

    def retire(self) -> None:
        """No new requests; each process stops once its in-flight requests are done."""
        self.retired = True
        for p in list(self.processes):
            p.retiring = True
            p.stop_reason = p.stop_reason or "retired"
            if p.load == 0:
                self._stop_soon(p, "retired")
            else:  # requests finish; WebSockets, which need not, are told to go
                p.close_sockets("the function was redeployed or removed")
        self._changed.notify()

    @property
    def live(self) -> bool:
        return bool(self.processes) or self._booting > 0

    async def wait_empty(self) -> None:
        while self.live:
            await self._changed.wait()

    async def cleanup(self) -> None:
        """Remove this version's scratch dir, its DENO_DIR included (after all its processes are gone)."""
        paths = self._paths
        if paths is not None:
            self._paths = None
            await trio.to_thread.run_sync(lambda: shutil.rmtree(paths.base, ignore_errors=True))
        self.cleaned.set()
