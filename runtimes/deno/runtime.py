"""`DenoRuntime`: Supabase-style functions in supervised Deno subprocesses, behind `runtimes.api.Runtime`.

Ownership: `open_deno_runtime()` owns a nursery in which every Deno process is supervised, the spawner thread,
the temp-dir quota thread (tmpquota.py), its run dir and one `VersionPool` per live (slug, version). Leaving the
context stops every process (planned shutdown with `beforeunload`, then kill after `close_grace_s`) and reaps
them all; nothing outlives it, not even when the daemon is SIGKILLed (see spawn.py).

Files: each open runtime works in a run dir of its own, `<scratch_dir>/run-<hex>/` (the template DENO_DIR, one
dir per version, one temp dir per process, one version dir made ahead: spare.py), held by an flock on
`run-<hex>.lock` for as long as it is open. A runtime that did not close (a killed daemon) leaves its run dir
behind unlocked: the next one to open on the same scratch dir removes it (`sweep_runs`), while runs still open
there (several runtimes may share the default scratch dir) keep theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType

import trio
from pydantic import BaseModel, ConfigDict, Field

from mbworker.runtimes.api import FunctionVersion, Invocation, InvocationResult, RuntimeStatistics, empty_body
from mbworker.runtimes.deno.permissions import NetPolicy
from mbworker.runtimes.deno.pool import Counters, Shared, VersionPool
from mbworker.runtimes.deno.process import OnLog
from mbworker.runtimes.deno.spare import SpareDirs
from mbworker.runtimes.deno.spawn import Spawner
from mbworker.runtimes.deno.tmpquota import open_tmp_quota
from mbworker.runtimes.errors import FunctionRuntimeError
from mbworker.runtimes.limits import Limits

log = logging.getLogger("mbworker.runtimes.deno")
fn_log = logging.getLogger("mbworker.runtimes.deno.function")


WARM_UP_SLUG = "_mbworker_warm_up"
"""The throwaway function `open_deno_runtime` boots (no deployed slug can start with `_`)."""
_WARM_UP_SOURCE = 'import "node:module";\nimport "node:process";\nDeno.serve(() => new Response(""));\n'
"""Also loads what running an npm package from node_modules needs (the CommonJS loader, node:process), so their
compiled code is in the template too: a CommonJS package's first request came ~200-300 ms sooner (measured, ms@2)."""
DENO_DIR_NAME = "_deno_dir"
"""Under the run dir, beside the per-version dirs (`<slug>-<version>-<hex>`: a slug starts with a letter)."""
RUN_PREFIX = "run-"
LOCK_SUFFIX = ".lock"


def _default_deno_bin() -> str:
    env = os.environ.get("MBWORKER_DENO")
    if env:
        return env
    try:
        import deno

        return str(deno.find_deno_bin())
    except (ImportError, FileNotFoundError, RuntimeError):
        return "deno"


@dataclass(frozen=True, slots=True)
class DenoStatistics(RuntimeStatistics):
    """RuntimeStatistics plus `log_lines_dropped`: function output lines over the log rate limit (loglimit.py)."""

    log_lines_dropped: int = 0


class DenoSettings(BaseModel):
    """How the Deno runtime runs. Function-specific limits come with each FunctionVersion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deno_bin: str = Field(
        default_factory=_default_deno_bin,
        description="The deno executable: env MBWORKER_DENO, else the `deno` PyPI package's binary",
    )
    scratch_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / "mbworker-deno",
        description="Base for the runtime's run dir: DENO_DIR, per-version dirs (import map), per-process temp dirs",
    )
    limits: Limits = Field(
        default_factory=lambda: Limits.model_validate({}), description="Defaults for callers building FunctionVersions"
    )
    stop_grace_s: float = Field(15, gt=0, description="Planned stop (retire, idle, wall clock): drain before kill")
    close_grace_s: float = Field(5, gt=0, description="Runtime shutdown: drain before kill")
    net: NetPolicy = Field(
        default_factory=NetPolicy,
        description="Operator network policy: private ranges are always denied; extra denies and deliberate "
        "private openings (runtimes/deno/permissions.py)",
    )


def _default_on_log(fn: FunctionVersion, execution_id: str, stream: str, line: str) -> None:
    fn_log.info(
        "%s", line, extra={"function": fn.slug, "version": fn.version, "execution_id": execution_id, "stream": stream}
    )


class _Invoke:
    """`DenoRuntime.invoke`'s context manager: a slot on a process of the version, the request on it, the slot
    back. A class: an @asynccontextmanager costs an async generator per request on the daemon's hottest path."""

    __slots__ = ("_fn", "_invocation", "_pool", "_proc", "_request", "_runtime")

    def __init__(self, runtime: DenoRuntime, fn: FunctionVersion, invocation: Invocation) -> None:
        self._runtime = runtime
        self._fn = fn
        self._invocation = invocation

    async def __aenter__(self) -> InvocationResult:
        self._pool = pool = self._runtime._pool(self._fn)
        self._proc = proc = await pool.acquire()
        self._request = request = proc.new_request()
        try:
            return await proc.begin(request, self._invocation)
        except BaseException:
            try:
                await proc.end(request)
            finally:
                pool.release(proc, ok=False)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        ok = False
        try:
            await self._proc.end(self._request)
            ok = exc_type is None
        finally:
            self._pool.release(self._proc, ok=ok)


class DenoRuntime:
    """Implements `runtimes.api.Runtime`. Create with `open_deno_runtime`."""

    name = "deno"

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._pools: dict[str, VersionPool] = {}
        self._retired: set[VersionPool] = set()
        self._closing = False

    def _pool(self, fn: FunctionVersion) -> VersionPool:
        # A version retired earlier gets a new pool here: the same version comes back with a new env (secrets
        # changed) or by a rollback. Which version is live is the caller's to know (the front door asks its
        # function table right before it invokes); a request already waiting in a retired pool gets
        # VersionRetired (pool.py) and goes to the live one.
        if self._closing:
            raise FunctionRuntimeError("the runtime is shutting down")
        pool = self._pools.get(fn.key)
        if pool is None:
            pool = self._pools[fn.key] = VersionPool(fn, self._shared)
        elif pool.fn is not fn:
            # The same version with newer settings (an operator's limits after SIGHUP): processes started from
            # now on run with them; running ones keep what they started with.
            pool.fn = fn
        return pool

    async def warm(self, fn: FunctionVersion) -> None:
        await self._pool(fn).warm()

    def invoke(self, fn: FunctionVersion, invocation: Invocation) -> _Invoke:
        return _Invoke(self, fn, invocation)

    async def retire(self, fn: FunctionVersion) -> None:
        """Returns at once; in-flight requests finish, then the processes stop (in the runtime's nursery)."""
        pool = self._pools.pop(fn.key, None)
        if pool is None:
            return
        pool.retire()
        self._retired.add(pool)
        self._shared.nursery.start_soon(self._cleanup_when_empty, pool)

    async def wait_stopped(self, fn: FunctionVersion) -> None:
        """Wait until no process of `fn` runs (after `retire`, idle shutdown or wall-clock retirement), and, for
        a retired version, until its files are removed.

        Bound it with a timeout: a version that keeps getting requests never stops.
        """
        for pool in [p for p in (self._pools.get(fn.key), *self._retired) if p is not None and p.fn.key == fn.key]:
            await pool.wait_empty()
            if pool.retired:
                await pool.cleaned.wait()

    async def _cleanup_when_empty(self, pool: VersionPool) -> None:
        await pool.wait_empty()
        await pool.cleanup()
        self._retired.discard(pool)  # after: `wait_stopped` finds the pool until its files are gone

    async def _compile_bootstrap(self, limits: Limits) -> None:
        """Boot a throwaway function and serve it one request, with the runtime's template DENO_DIR as its own:
        Deno transpiles the bootstrap and V8 caches the compiled code of it and of the fetch classes a request
        uses. Every version's DENO_DIR starts as a copy (pool.py), so no cold start pays for that (~15 ms).
        Best effort: a Deno that cannot boot is logged here, and every real boot reports its own error."""
        shared = self._shared
        bundle = shared.scratch_dir / WARM_UP_SLUG
        fn = FunctionVersion(WARM_UP_SLUG, 0, "deno", bundle, "index.js", limits=limits)
        pool = self._pools[fn.key] = VersionPool(fn, shared, warm_up=True)
        started = trio.current_time()

        def write() -> None:
            bundle.mkdir(parents=True, exist_ok=True)
            (bundle / "index.js").write_text(_WARM_UP_SOURCE)

        try:
            await trio.to_thread.run_sync(write)
            async with self.invoke(fn, Invocation("GET", "/", [], empty_body(), "warm-up")) as result:
                async for _ in result.body:
                    pass
            log.info("deno bootstrap compiled", extra={"ms": round((trio.current_time() - started) * 1000, 1)})
        except (FunctionRuntimeError, OSError) as exc:
            log.warning("could not compile the deno bootstrap ahead of the first function: %s", exc)
        finally:
            with trio.CancelScope(shield=True):
                del self._pools[fn.key]
                pool.retire()
                with trio.move_on_after(shared.stop_grace_s + 10):
                    await pool.wait_empty()
                await pool.cleanup()
                await trio.to_thread.run_sync(lambda: shutil.rmtree(bundle, ignore_errors=True))

    def statistics(self) -> DenoStatistics:
        pools = [*self._pools.values(), *self._retired]
        procs = [p for pool in pools for p in pool.processes if not p.dead.is_set()]
        c = self._shared.counters
        return DenoStatistics(
            versions=sum(1 for pool in pools if pool.processes),
            processes=len(procs),
            busy=sum(1 for p in procs if p.load > 0),
            in_flight=sum(p.load for p in procs),
            cold_starts=c.cold_starts,
            boot_failures=c.boot_failures,
            limit_kills=dict(c.limit_kills),
            log_lines_dropped=c.log_drops.lines,
        )

    async def _aclose(self, grace: float) -> None:
        self._closing = True
        pools = [*self._pools.values(), *self._retired]
        async with trio.open_nursery() as n:
            for pool in pools:
                pool.retire()
                for p in list(pool.processes):
                    n.start_soon(p.stop, "shutdown", grace)
        for pool in pools:
            await pool.cleanup()


@asynccontextmanager
async def open_deno_runtime(
    settings: DenoSettings | None = None, *, on_log: OnLog | None = None
) -> AsyncIterator[DenoRuntime]:
    """Open the Deno runtime. `on_log(fn, execution_id, stream, line)` receives every line of function output
    (default: the `runtimes.deno.function` logger with slug/version/execution_id/stream as `extra`)."""
    settings = settings or DenoSettings.model_validate({})
    bootstrap = Path(str(resources.files("mbworker.runtimes.deno").joinpath("bootstrap.ts")))
    # The template DENO_DIR, made at each start and compiled into once (`DenoRuntime._compile_bootstrap`):
    # each version's own DENO_DIR starts as a copy of it, so the bootstrap is transpiled and compiled once, not
    # per version (a cold start ~15 ms sooner, docs/benchmarks.md), and goes with the version's scratch dir.
    run_dir, lock_fd = await trio.to_thread.run_sync(open_run_dir, settings.scratch_dir.resolve())
    deno_dir = run_dir / DENO_DIR_NAME
    try:
        await trio.to_thread.run_sync(deno_dir.mkdir)
        socket_dir = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="mbwd-", dir="/tmp")))
    except BaseException:
        await trio.to_thread.run_sync(close_run_dir, run_dir, lock_fd)
        raise
    spawner = Spawner()
    try:
        async with open_tmp_quota() as tmp_quota, trio.open_nursery() as nursery:
            shared = Shared(
                nursery=nursery,
                spawner=spawner,
                deno_bin=settings.deno_bin,
                bootstrap=bootstrap,
                scratch_dir=run_dir,
                deno_dir=deno_dir,
                spares=SpareDirs(deno_dir, run_dir, nursery),
                socket_dir=socket_dir,
                stop_grace_s=settings.stop_grace_s,
                on_log=on_log or _default_on_log,
                tmp_quota=tmp_quota,
                counters=Counters(),
                net=settings.net,
            )
            runtime = DenoRuntime(shared)
            await runtime._compile_bootstrap(settings.limits)
            # After the compile (a copy of the compiled template), in the background: the runtime serves without
            # waiting for it, and a cold start before it is ready copies for itself.
            nursery.start_soon(shared.spares.fill)
            try:
                yield runtime
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(settings.close_grace_s + 10):
                    await runtime._aclose(settings.close_grace_s)
                nursery.cancel_scope.cancel()
    finally:
        spawner.shutdown()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: shutil.rmtree(socket_dir, ignore_errors=True))
            await trio.to_thread.run_sync(close_run_dir, run_dir, lock_fd)


def open_run_dir(scratch_dir: Path) -> tuple[Path, int]:
    """A new run dir under `scratch_dir` and the fd holding its lock (see the module docstring), after removing
    the run dirs nobody holds any more. Blocking: run it in a thread.

    The lock file is locked before it gets its name (made under a dot-name `sweep_runs` ignores, then renamed), so
    another runtime's sweep can never find it unlocked."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    swept = sweep_runs(scratch_dir)
    if swept:
        log.info("removed %d run dirs left by runtimes that did not close", swept)
    name = RUN_PREFIX + os.urandom(6).hex()
    pending = scratch_dir / f".{name}{LOCK_SUFFIX}"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, scratch_dir / f"{name}{LOCK_SUFFIX}")
        run_dir = scratch_dir / name
        run_dir.mkdir(mode=0o700)
    except BaseException:
        os.close(fd)
        raise
    return run_dir, fd


def close_run_dir(run_dir: Path, lock_fd: int) -> None:
    """Remove the run dir, then its lock file, then let go of the lock. Blocking."""
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run_dir.with_name(run_dir.name + LOCK_SUFFIX))
    os.close(lock_fd)


def _drop_orphan_lock(lock: Path) -> None:
    """Remove a run's lock file whose run dir is gone, unless a live runtime holds it (one between naming its
    lock and making its dir does). Blocking."""
    if lock.with_name(lock.name.removesuffix(LOCK_SUFFIX)).exists():
        return  # its dir's turn decides
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)


def sweep_runs(scratch_dir: Path) -> int:
    """Remove every run dir under `scratch_dir` whose lock nobody holds (its runtime is gone). Returns how many.
    Blocking."""
    swept = 0
    for entry in os.scandir(scratch_dir):
        if not entry.name.startswith(RUN_PREFIX):
            continue
        if entry.name.endswith(LOCK_SUFFIX):
            _drop_orphan_lock(Path(entry.path))
            continue
        lock = scratch_dir / (entry.name + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1  # its runtime removed the lock file last, after the dir: this one was being removed
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live runtime's
            shutil.rmtree(entry.path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            swept += 1
        finally:
            if fd >= 0:
                os.close(fd)
    return swept
