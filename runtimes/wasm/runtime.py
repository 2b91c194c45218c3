"""WasmRuntime: WAGI functions in Wasmtime, one fresh Store per request, calls in worker threads.

Ownership: `open_wasm_runtime` owns the Sandbox (Engine + Linker), the epoch ticker task and every prepared module;
leaving it drains in-flight calls (bounded by their epoch deadlines), stops the ticker and closes all wasmtime
objects explicitly. Callers own nothing wasmtime-related: `invoke` yields a fully buffered response.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from mbworker.lib.nursery import open_owned_nursery
from mbworker.runtimes.api import FunctionVersion, Invocation, InvocationResult, Runtime, RuntimeStatistics
from mbworker.runtimes.errors import (
    BootError,
    IdleTimeout,
    InvalidResponse,
    ResourceLimit,
    VersionRetired,
    WorkerBusy,
    WorkerError,
)
from mbworker.runtimes.limits import Limits
from mbworker.runtimes.wasm import cgi
from mbworker.runtimes.wasm.errors import ModuleRejected
from mbworker.runtimes.wasm.sandbox import CallControl, CallLimits, CallOutcome, PreparedModule, Sandbox
from mbworker.runtimes.wasm.settings import WasmSettings
from mbworker.runtimes.wasm.threads import CallThreads, open_call_threads

LogHook = Callable[[FunctionVersion, str, str, str], None]
"""`on_log(fn, execution_id, stream, line)`: called on the trio thread after each call; must not raise or block."""

MAX_LOG_LINE = 10_000
HEAD_ALLOWANCE = 64 * 1024  # CGI header block on top of max_response_bytes
OUTPUT_TAIL = 4096
ASYNC_STREAK = 64  # after a call used over half the synchronous wait in CPU: its version's next calls skip the wait


@dataclass(frozen=True, slots=True)
class WasmStatistics(RuntimeStatistics):
    """RuntimeStatistics plus the module cache: `compiles` (native compiles) and `cache_loads` (from disk)."""

    compiles: int = 0
    cache_loads: int = 0


@dataclass(slots=True)
class _Version:
    lock: trio.Lock = field(default_factory=trio.Lock)
    prepared: PreparedModule | None = None
    error: BootError | None = None
    users: int = 0
    retired: bool = False
    limits: tuple[Limits, CallLimits, bool] | None = None
    """(the version's Limits, the CallLimits derived from them, whether the deadline is the CPU limit): the same
    for every request of a version, so derived once."""
    async_calls: int = 0
    """Calls left to hand over without the synchronous wait: set when a call was too slow to wait for."""


def _deadline_ms(limits: Limits) -> tuple[float, bool]:
    """The call's epoch deadline in ms, and whether hitting it means the CPU limit (else the idle timeout).

    A guest cannot block (no preopens, no sockets, poll_oneoff answers ENOSYS), so time inside a call is CPU time
    of that thread; the wall-clock deadline doubles as the CPU limit (conservative when threads > cores).
    """
    idle_ms = limits.request_idle_timeout_s * 1000
    if limits.cpu_time_ms <= idle_ms:
        return float(limits.cpu_time_ms), True
    return idle_ms, False


def outcome_to_response(outcome: CallOutcome, limits: Limits, *, cpu_deadline: bool) -> cgi.CgiResponse:
    """Map one call's outcome to a response or to the error contract. Pure."""
    output = outcome.stderr[-OUTPUT_TAIL:].decode("utf-8", "replace")
    too_large = f"Function response exceeds the limit of {limits.max_response_bytes} bytes"
    if outcome.stdout_overflowed:
        raise WorkerError(too_large, output=output)
    match outcome.failure:
        case None:
            pass
        case "instantiate":
            raise BootError(f"Wasm module failed to instantiate: {outcome.detail}", output=output)
        case "interrupt":
            if cpu_deadline:
                raise ResourceLimit("cpu", output=output)
            raise IdleTimeout(output=output)
        case "fuel":
            raise ResourceLimit("fuel", output=output)
        case "memory":
            raise ResourceLimit("memory", output=output)
        case "setup":
            raise WorkerError(f"Could not set up the Wasm sandbox: {outcome.detail}", output=output)
        case "cancelled":
            raise WorkerError("The request was cancelled", output=output)
        case "exit":
            raise WorkerError(f"Function exited with an error ({outcome.detail})", output=output)
        case _:
            raise WorkerError(f"Function trapped: {outcome.detail}", output=output)
    try:
        response = cgi.parse_response(outcome.stdout)
    except cgi.BadStatus as exc:
        raise InvalidResponse(f"Function returned an invalid response: {exc}", output=output) from exc
    except cgi.MalformedOutput as exc:
        raise WorkerError(f"Function returned malformed CGI output: {exc}", output=output) from exc
    if len(response.body) > limits.max_response_bytes:
        raise WorkerError(too_large, output=output)
    return response


async def _read_body(body: AsyncIterable[bytes], limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise WorkerError(f"Request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def _copy_boot_error(error: BootError) -> BootError:
    """The remembered boot failure, raised anew for this caller with its own class, status and code."""
    if isinstance(error, ModuleRejected):
        return ModuleRejected(error.reason)
    return BootError(error.message, output=error.output)


class WasmRuntime:
    """The Wasm `Runtime`. Create it with `open_wasm_runtime`; methods are called from trio tasks."""

    name = "wasm"

    def __init__(
        self, settings: WasmSettings, sandbox: Sandbox, call_threads: CallThreads, on_log: LogHook | None
    ) -> None:
        self._settings = settings
        self._sandbox = sandbox
        self._call_threads = call_threads
        self._on_log = on_log
        self._versions: dict[str, _Version] = {}
        # One token per live wasm thread (calls and compiles); a call's token is released when its thread is done.
        self._threads = trio.CapacityLimiter(settings.threads)
        self._in_flight = 0
        self._running = 0
        self._cold_starts = 0
        self._boot_failures = 0
        self._compiles = 0
        self._cache_loads = 0
        self._limit_kills: dict[str, int] = {}
        self._closing = False
        self._max_deadline_ms = 0.0
        self._active = 0  # calls and compiles in threads: the ticker runs only while this is > 0
        self._activity: trio.Event | None = None  # set while the ticker waits for activity
        self._sync_wait_s = settings.sync_wait_us / 1e6

    # -- Runtime --

    async def warm(self, fn: FunctionVersion) -> None:
        """Compile (or load from the disk cache), link and test-instantiate `fn`. Raises BootError."""
        with contextlib.suppress(VersionRetired):  # retired while it compiled: nothing left to warm
            await self._ready(fn)

    @asynccontextmanager
    async def invoke(self, fn: FunctionVersion, invocation: Invocation) -> AsyncIterator[InvocationResult]:
        """Run one request to completion in a fresh Store, then yield the buffered response."""
        if self._closing:
            raise WorkerBusy("The Wasm runtime is shutting down")
        version = await self._ready(fn)
        assert version.prepared is not None
        version.users += 1  # released exactly once: below, or by _call when the call's thread ends
        handed_over = False
        try:
            limits = fn.limits
            body = await _read_body(invocation.body, limits.max_request_bytes)
            request = cgi.build_request(
                method=invocation.method,
                target=invocation.target,
                headers=invocation.headers,
                body_length=len(body),
                url=invocation.url,
                function_env=fn.env,
                route_prefix=self._settings.route_prefix,
                server_name=self._settings.server_name,
                server_port=self._settings.server_port,
            )
            call_limits, cpu_deadline = self._call_limits(version, limits)
            handed_over = True
            outcome = await self._call(version, request, body, call_limits, queue_timeout_s=limits.queue_timeout_s)
        finally:
            if not handed_over:
                self._release_version(version)
        self._emit_logs(fn, invocation.request_id, outcome.stderr)
        try:
            response = outcome_to_response(outcome, limits, cpu_deadline=cpu_deadline)
        except ResourceLimit as exc:
            self._limit_kills[exc.kind] = self._limit_kills.get(exc.kind, 0) + 1
            raise
        except IdleTimeout:
            self._limit_kills["idle"] = self._limit_kills.get("idle", 0) + 1
            raise
        # Fully buffered: hand the front door the whole body too, so it answers with Content-Length in one write.
        yield InvocationResult(
            status=response.status,
            headers=response.headers,
            body=_single(response.body),
            complete_body=response.body,
        )

    async def retire(self, fn: FunctionVersion) -> None:
        """Forget `fn`; its compiled module is closed once in-flight calls finish. The disk cache stays."""
        version = self._versions.pop(fn.key, None)
        if version is not None:
            version.retired = True
            self._close_if_unused(version)

    def statistics(self) -> WasmStatistics:
        return WasmStatistics(
            versions=sum(1 for v in self._versions.values() if v.prepared is not None),
            processes=self._running,
            busy=self._running,
            in_flight=self._in_flight,
            cold_starts=self._cold_starts,
            boot_failures=self._boot_failures,
            limit_kills=dict(self._limit_kills),
            compiles=self._compiles,
            cache_loads=self._cache_loads,
        )

    # -- internals --

    async def _ready(self, fn: FunctionVersion) -> _Version:
        """The prepared version, compiling/loading it once (single flight per version). Raises BootError, or
        VersionRetired when `fn` was retired while this waited."""
        version = self._versions.get(fn.key)
        if version is None:
            version = self._versions[fn.key] = _Version()
        if version.prepared is None:
            async with version.lock:
                if version.prepared is None and version.error is None and not version.retired:
                    self._thread_started()  # the start section runs under an epoch deadline too
                    try:
                        prepared = await trio.to_thread.run_sync(self._prepare_sync, fn, limiter=self._threads)
                    except BootError as exc:
                        version.error = exc
                        self._boot_failures += 1
                        prepared = None
                    finally:
                        self._thread_ended()
                    if prepared is not None:
                        self._cold_starts += 1
                        if prepared.loaded_from_cache:
                            self._cache_loads += 1
                        else:
                            self._compiles += 1
                        if version.retired:  # retired while compiling: nobody else would close it
                            prepared.close()
                        else:
                            version.prepared = prepared
        if version.error is not None:
            # A fresh exception per caller (re-raising one object would chain tracebacks across requests), of
            # the same class: 422 for a rejected module, else 503.
            raise _copy_boot_error(version.error)
        if version.retired:
            # Retired while it compiled (or queued for it): preparing it again would leave a version nobody
            # retires. The caller goes to the version live now.
            raise VersionRetired()
        return version

    def _call_limits(self, version: _Version, limits: Limits) -> tuple[CallLimits, bool]:
        cached = version.limits
        if cached is not None and cached[0] is limits:
            return cached[1], cached[2]
        call_limits, cpu_deadline, deadline_ms = self._derive_limits(limits)
        self._max_deadline_ms = max(self._max_deadline_ms, deadline_ms)
        version.limits = (limits, call_limits, cpu_deadline)
        return call_limits, cpu_deadline

    def _derive_limits(self, limits: Limits) -> tuple[CallLimits, bool, float]:
        """What `limits` mean for one call: its CallLimits, whether CPU time (not wall time) is the deadline, and
        the deadline in ms. Pure (the boot check calls it from its thread)."""
        deadline_ms, cpu_deadline = _deadline_ms(limits)
        call_limits = CallLimits(
            memory_bytes=limits.memory_mb * 1024 * 1024,
            deadline_ticks=self._sandbox.deadline_ticks(deadline_ms),
            fuel=limits.fuel,
            max_stdout_bytes=limits.max_response_bytes + HEAD_ALLOWANCE,
            max_stderr_bytes=self._settings.max_stderr_bytes,
        )
        return call_limits, cpu_deadline, deadline_ms

    def _prepare_sync(self, fn: FunctionVersion) -> PreparedModule:
        if fn.limits.fuel is not None and not self._sandbox.fuel_metering:
            raise BootError("This function sets a fuel limit but the worker runs without fuel metering")
        path = fn.bundle_dir / fn.entrypoint
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise BootError(f"Cannot read the Wasm module {fn.entrypoint!r}: {exc.strerror}") from exc
        prepared = self._sandbox.prepare(source, is_wat=fn.entrypoint.endswith(".wat"))
        try:
            self._sandbox.check_instantiate(prepared, self._derive_limits(fn.limits)[0])
        except BaseException:
            prepared.close()
            raise
        return prepared

    async def _call(
        self,
        version: _Version,
        request: cgi.CgiRequest,
        body: bytes,
        limits: CallLimits,
        *,
        queue_timeout_s: float,
    ) -> CallOutcome:
        """Run one call in a thread. Takes over one `users` reference on `version`."""
        prepared = version.prepared
        assert prepared is not None  # users > 0 keeps it open
        self._in_flight += 1
        try:
            holder = object()
            try:
                try:
                    self._threads.acquire_on_behalf_of_nowait(holder)  # the usual case: no timeout scope needed
                except trio.WouldBlock:
                    with trio.fail_after(queue_timeout_s):
                        await self._threads.acquire_on_behalf_of(holder)
            except BaseException as exc:
                self._release_version(version)
                if isinstance(exc, trio.TooSlowError):
                    raise WorkerBusy() from None
                raise
            self._running += 1
            self._thread_started()

            def done() -> None:  # on the trio thread, once the call's thread has finished (even if abandoned)
                self._running -= 1
                self._thread_ended()
                self._threads.release_on_behalf_of(holder)
                self._release_version(version)

            control = CallControl(limits.deadline_ticks)
            sync_wait_s = self._sync_wait_s
            if sync_wait_s and version.async_calls > 0:
                version.async_calls -= 1
                sync_wait_s = 0.0
            call = functools.partial(
                self._sandbox.call,
                prepared,
                env=request.env,
                argv=request.argv,
                stdin=body,
                limits=limits,
                control=control,
                measure_cpu=self._sync_wait_s > 0,
            )
            # On cancel the thread stops at the next epoch tick; `done` then frees its token and the module.
            outcome = await self._call_threads.run(
                call, on_done=done, on_abandon=lambda: control.kill("cancelled"), sync_wait_s=sync_wait_s
            )
            if self._sync_wait_s and outcome.cpu_s > self._sync_wait_s / 2:
                # Too slow to wait for (its own CPU time, not a wait stretched by other load): the next calls of
                # this version let the loop run meanwhile; then waiting is tried again.
                version.async_calls = ASYNC_STREAK
            return outcome
        finally:
            self._in_flight -= 1

    def _thread_started(self) -> None:
        self._active += 1
        if self._active == 1 and self._activity is not None:
            self._activity.set()

    def _thread_ended(self) -> None:
        self._active -= 1

    def _release_version(self, version: _Version) -> None:
        version.users -= 1
        self._close_if_unused(version)

    def _emit_logs(self, fn: FunctionVersion, execution_id: str, stderr: bytes) -> None:
        if self._on_log is None or not stderr:
            return
        for line in stderr.decode("utf-8", "replace").splitlines():
            self._on_log(fn, execution_id, "stderr", line[:MAX_LOG_LINE])

    def _close_if_unused(self, version: _Version) -> None:
        if version.retired and version.users == 0 and version.prepared is not None:
            version.prepared.close()
            version.prepared = None

    async def _tick_forever(self) -> None:
        # Ticks only while some wasm runs: a trio wake-up every 10 ms costs ~2% of a core here even when idle.
        # Deadlines are relative to the epoch at Store creation, so pausing between calls changes nothing.
        period = self._settings.epoch_tick_ms / 1000
        next_tick = trio.current_time()
        while True:
            if self._active == 0:
                self._activity = trio.Event()
                await self._activity.wait()
                self._activity = None
                next_tick = trio.current_time()
            self._sandbox.tick()
            # Absolute schedule: a late wake-up does not stretch every later deadline.
            next_tick = max(next_tick + period, trio.current_time())
            await trio.sleep_until(next_tick)

    async def _drain(self) -> bool:
        """Refuse new calls and wait until no wasm thread runs (each ends at its deadline). True if drained."""
        self._closing = True
        holders = [object() for _ in range(int(self._threads.total_tokens))]
        acquired = 0
        # Holding every token means no call or compile thread is alive. Cancelled calls end within a tick.
        with trio.move_on_after(self._max_deadline_ms / 1000 + 30):
            for holder in holders:
                await self._threads.acquire_on_behalf_of(holder)
                acquired += 1
        return acquired == len(holders)

    def _close_all(self) -> None:
        for version in self._versions.values():
            version.retired = True
            self._close_if_unused(version)
        self._versions.clear()


@asynccontextmanager
async def open_wasm_runtime(settings: WasmSettings, *, on_log: LogHook | None = None) -> AsyncIterator[WasmRuntime]:
    """Open the Wasm runtime: one Engine, its epoch ticker, the module cache. Leaving closes everything."""
    if settings.cache_dir is not None:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    sandbox = Sandbox(
        cache_dir=settings.cache_dir,
        fuel_metering=settings.fuel_metering,
        epoch_tick_ms=settings.epoch_tick_ms,
        max_table_elements=settings.max_table_elements,
        # Every live Store holds a slot. Calls and boot checks each hold one of `threads` tokens while they have
        # one, so `threads` slots would do; the rest is margin.
        pool_slots=2 * settings.threads + 8,
    )
    drained = False
    try:
        async with open_call_threads(settings.threads) as call_threads, open_owned_nursery() as nursery:
            runtime = WasmRuntime(settings, sandbox, call_threads, on_log)
            nursery.start_soon(runtime._tick_forever)
            try:
                yield runtime
            finally:
                with trio.CancelScope(shield=True):
                    drained = await runtime._drain()
                nursery.cancel_scope.cancel()
                if drained:
                    runtime._close_all()
    finally:
        if drained:
            sandbox.close()
        # else: a call still runs in a thread (it holds references to what it uses, so nothing is freed under it).


if TYPE_CHECKING:

    def _conforms(runtime: WasmRuntime) -> Runtime:  # mypy: WasmRuntime implements the Runtime protocol
        return runtime


__all__ = ["LogHook", "WasmRuntime", "WasmStatistics", "open_wasm_runtime"]
