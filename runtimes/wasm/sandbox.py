"""The wasmtime layer: one Engine + Linker, compiled modules, and one sync call per fresh Store.

Everything here is synchronous and meant to run in a worker thread (the GIL is released while wasm runs), except
`Sandbox.tick()`, which the runtime's ticker calls on the trio loop. Nothing above runtimes/wasm/ sees a wasmtime
object: this module maps wasmtime errors to `ModuleRejected`, `BootError` or a `CallOutcome`.

Ownership: `Sandbox` owns the Engine and Linker and closes them in `close()`. A `PreparedModule` owns its Module
and InstancePre; whoever created it (the runtime's version table) closes it once no call uses it. Each call owns
its Store and closes it before returning.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import itertools
import math
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from mbworker.runtimes.errors import BootError
from mbworker.runtimes.wasm import capi
from mbworker.runtimes.wasm.errors import ModuleRejected

WASI_MODULE = "wasi_snapshot_preview1"
ENTRY_EXPORT = "_start"
WASM_PAGE = 65536
WASI_ERRNO_NOSYS = 52
_ENTRY_NAME = ENTRY_EXPORT.encode()
MAX_TABLES = 8  # per Store (and per pool slot)
POOL_KEEP_RESIDENT = 1 << 20  # per pooled memory: pages kept mapped and zeroed by memset on reuse

try:
    WASMTIME_VERSION = importlib.metadata.version("wasmtime")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored installs
    WASMTIME_VERSION = "unknown"


# --- stdout/stderr capture -------------------------------------------------------------------------------------
#
# The guest's `fd_write` is shadowed by our own host function (defined on the Linker next to WASI's): it copies
# writes to fds 1 and 2 straight from guest memory into the calling thread's current sinks. Why not wasmtime's
# custom output streams (`wasi_config_set_stdout_custom`): they hand every write to a tokio thread, which re-takes
# the GIL to run a Python callback (~10 context switches and ~80 µs CPU per hello request, docs/benchmarks.md),
# and wasmtime-py's version registers Python finalizers that a wasmtime thread could run in a finalizing
# interpreter ("panic in a function that cannot unwind" at exit). A shadowed import has neither: it runs on the
# thread that called into wasm, during the call, and holds no Python object beyond it.

_WASI_EBADF = 8
_WASI_EFAULT = 21
_WASI_EFBIG = 22  # stdout over its cap: the guest's write fails instead of silently losing bytes
_WASI_EINVAL = 28
_WASI_EIO = 29
_MAX_IOVECS = 1024  # like Linux's IOV_MAX; also bounds the host work of one write (it cannot be interrupted)
_FD_WRITE_ARGS = struct.Struct("<I12xI12xI12xI12x")  # four wasmtime_val_raw_t (16 bytes each), i32 at offset 0


class _Sink:
    """One output stream of one call. `limit` bounds what is kept; past it stdout fails writes, stderr drops."""

    __slots__ = ("chunks", "fail_on_overflow", "limit", "overflowed", "size")

    def __init__(self, limit: int, *, fail_on_overflow: bool) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False
        self.fail_on_overflow = fail_on_overflow

    def write(self, pieces: list[tuple[int, int]]) -> int:
        """Copy (address, length) pieces of guest memory; a WASI errno (0 = all taken or, for stderr, dropped)."""
        room = self.limit - self.size
        if sum(length for _, length in pieces) > room:
            self.overflowed = True
            if self.fail_on_overflow:
                return _WASI_EFBIG
        for address, length in pieces:
            take = min(length, room)
            if take > 0:
                self.chunks.append(ctypes.string_at(address, take))
                self.size += take
                room -= take
        return 0

    def value(self) -> bytes:
        return b"".join(self.chunks)


class _Current(threading.local):
    """The sinks of the call running on this thread (host functions run on the thread that called into wasm)."""

    sinks: tuple[_Sink, _Sink] | None = None


_current = _Current()


@capi.HOST_CALLBACK  # type: ignore[untyped-decorator]
def _fd_write(_env: int | None, caller: int | None, args: int | None, _count: int) -> int:
    """WASI `fd_write(fd, iovs, iovs_len, nwritten_ptr) -> errno` for fds 1 and 2; other fds are not open."""
    assert args is not None
    errno = _WASI_EIO
    try:  # must never raise: an exception cannot propagate into wasmtime
        fd, iovs, count, nwritten = _FD_WRITE_ARGS.unpack(ctypes.string_at(args, _FD_WRITE_ARGS.size))
        errno = _write(caller or 0, fd, iovs, count, nwritten)
    finally:
        ctypes.c_int32.from_address(args).value = errno
    return 0


def _write(caller: int, fd: int, iovs: int, count: int, nwritten: int) -> int:
    if fd not in (1, 2):
        return _WASI_EBADF
    if count > _MAX_IOVECS:
        return _WASI_EINVAL
    memory = capi.Extern()
    if (
        not capi.caller_export_get(caller, b"memory", 6, ctypes.byref(memory))
        or capi.extern_kind(memory) != capi.EXTERN_MEMORY
    ):
        return _WASI_EFAULT
    base, size = capi.memory_of(capi.caller_context(caller), memory)
    pieces = capi.read_iovecs(base, size, iovs, count)
    if pieces is None or nwritten + 4 > size:
        return _WASI_EFAULT
    sinks = _current.sinks
    if sinks is not None:  # None: a start section run by the boot check; its output goes nowhere
        errno = sinks[fd - 1].write(pieces)
        if errno:
            return errno
    ctypes.c_uint32.from_address(base + nwritten).value = sum(length for _, length in pieces)
    return 0


def _env_and_argv(wasi: int, env: list[tuple[str, str]], argv: list[str]) -> str | None:
    """Set the guest's environment and argv on a raw `wasi_config_t*`; an error message if the C API refuses."""
    names = capi.StringArray([name for name, _ in env])
    values = capi.StringArray([value for _, value in env])
    args = capi.StringArray(argv)
    if not capi.wasi_config_set_env(wasi, len(env), names.address, values.address):
        return "failed to configure the environment"
    if not capi.wasi_config_set_argv(wasi, len(argv), args.address):
        return "failed to configure argv"
    return None


# --- the per-call kill switch ----------------------------------------------------------------------------------
#
# Each call's Store gets an epoch deadline of one tick and a callback that wasmtime runs (on the call's thread) each
# time the epoch passes it: the callback counts the call's deadline down and either extends it by one tick or ends
# the call with an error. Setting `CallControl.reason` from the trio thread therefore stops that one call within a
# tick, which is how a cancelled request frees its thread promptly.

_UPDATE_DEADLINE_CONTINUE = 0


class CallControl:
    """Shared by the trio side and the call's thread. `kill(reason)` stops the call at the next epoch tick."""

    __slots__ = ("reason", "ticks_left")

    def __init__(self, deadline_ticks: int) -> None:
        self.ticks_left = deadline_ticks
        self.reason: str | None = None  # "deadline" | "cancelled"

    def kill(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


_CONTROLS: dict[int, CallControl] = {}
_control_ids = itertools.count(1)


@capi.EPOCH_CALLBACK  # type: ignore[untyped-decorator]
def _on_epoch(_context: Any, data: int | None, delta: Any, kind: Any) -> int:
    # Must never raise. Returning a non-NULL wasmtime_error_t* ends the call; wasmtime takes ownership of it.
    try:
        control = _CONTROLS.get(data or 0)
        if control is not None and control.reason is None:
            control.ticks_left -= 1
            if control.ticks_left > 0:
                delta[0] = 1
                kind[0] = _UPDATE_DEADLINE_CONTINUE
                return 0
            control.kill("deadline")
        reason = control.reason if control is not None else "unknown call"
        return int(capi.error_new(f"call stopped: {reason}".encode()) or 0)
    except BaseException:  # pragma: no cover - defensive: keep the guest stopped rather than unwinding into Rust
        delta[0] = 1
        kind[0] = _UPDATE_DEADLINE_CONTINUE
        return 0


# --- compiling -------------------------------------------------------------------------------------------------


def wat_or_wasm(source: bytes, *, is_wat: bool) -> bytes:
    """The Wasm binary for `source`; WAT text is converted. Raises `ModuleRejected`."""
    if not is_wat:
        return source
    try:
        return bytes(wasmtime.wat2wasm(source.decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise ModuleRejected("WAT text is not UTF-8") from exc
    except wasmtime.WasmtimeError as exc:
        raise ModuleRejected(f"invalid WAT: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """A one-line reason from a wasmtime error: its "Caused by:" part when it has one, else its first line."""
    text = str(exc).strip()
    if "Caused by:" in text:
        causes = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines() if line.strip()]
        return "; ".join(causes)
    return text.splitlines()[0] if text else type(exc).__name__


def _check_entry(module: wasmtime.Module) -> None:
    for export in module.exports:
        if export.name == ENTRY_EXPORT:
            ty = export.type
            if isinstance(ty, wasmtime.FuncType) and not ty.params and not ty.results:
                return
            raise ModuleRejected(f"export {ENTRY_EXPORT!r} must be a function () -> ()")
    raise ModuleRejected(f"no {ENTRY_EXPORT!r} export: build a WASI command (wasm32-wasi), not a library")


def compile_module(source: bytes, is_wat: bool) -> bytes:
    """Deploy-time check: the Wasm binary of `source` if it validates, compiles and exports `_start`.

    CPU-bound (tens to hundreds of ms): call it from a thread. Raises `ModuleRejected` (a 4xx for the deployer).
    Imports are checked when the version boots (a module importing beyond WASI fails with BootError 503).
    """
    wasm = wat_or_wasm(source, is_wat=is_wat)
    engine = wasmtime.Engine()
    try:
        try:
            wasmtime.Module.validate(engine, wasm)
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected(f"invalid Wasm module: {_first_line(exc)}") from exc
        try:
            _check_entry(module)
        finally:
            module.close()
    finally:
        engine.close()
    return wasm


_START_SECTION = 8


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def has_start_function(wasm: bytes) -> bool:
    """Whether the module binary has a start section (guest code run by instantiation). True if unsure."""
    if wasm[:4] != b"\0asm":
        return True
    pos = 8
    try:
        while pos < len(wasm):
            section = wasm[pos]
            size, pos = _leb128(wasm, pos + 1)
            if section == _START_SECTION:
                return True
            pos += size
    except IndexError:
        return True
    return pos != len(wasm)


@dataclass(slots=True)
class PreparedModule:
    """A compiled module linked against WASI. Owned by the runtime's version table; `close()` when unused."""

    sha256: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    loaded_from_cache: bool
    has_start: bool = True
    """The module has a start function: instantiating it runs guest code (so it must release the GIL)."""
    pre_address: int = 0
    """`pre`'s `wasmtime_instance_pre_t*`, for the raw per-call path."""

    def __post_init__(self) -> None:
        self.pre_address = capi.address(self.pre.ptr())

    def close(self) -> None:
        self.pre.close()
        self.module.close()


# --- calls -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallLimits:
    memory_bytes: int
    deadline_ticks: int
    fuel: int | None
    max_stdout_bytes: int
    max_stderr_bytes: int


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one call produced. `failure` is None for a clean exit (return from _start or proc_exit(0))."""

    stdout: bytes
    stderr: bytes
    stdout_overflowed: bool
    failure: str | None
    """None | "exit" | "trap" | "interrupt" (deadline) | "cancelled" | "fuel" | "memory" | "instantiate" | "setup"
    (the host could not configure the Store, e.g. a variable the C API refuses)."""
    detail: str = ""
    cpu_s: float = 0.0
    """CPU time of the calling thread spent in the call (setup, wasm, teardown); 0 unless asked for."""


class Sandbox:
    """The daemon's one Engine and Linker. Thread-safe: calls run concurrently in worker threads."""

    def __init__(
        self,
        *,
        cache_dir: Path | None,
        fuel_metering: bool,
        epoch_tick_ms: int,
        max_table_elements: int,
        pool_slots: int = 0,
    ) -> None:
        """`pool_slots` > 0: instances live in that many reused slots (the pooling allocator, see
        `capi.use_pooling_allocator`); more concurrent Stores than that fail to instantiate."""
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel_metering
        if pool_slots:
            capi.use_pooling_allocator(
                config,
                slots=pool_slots,
                max_tables=MAX_TABLES,
                table_elements=max_table_elements,
                keep_resident=POOL_KEEP_RESIDENT,
            )
        self.fuel_metering = fuel_metering
        self.epoch_tick_ms = epoch_tick_ms
        self.max_table_elements = max_table_elements
        self.cache_dir = cache_dir
        self.engine = wasmtime.Engine(config)  # consumes `config`
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        # poll_oneoff is WASI's only way to block (sleep, wait on clocks): a blocked host call is not interrupted
        # by the epoch deadline and would pin a thread. Guests get ENOSYS instead.
        self.linker.allow_shadowing = True
        i32 = wasmtime.ValType.i32()
        self.linker.define_func(
            WASI_MODULE,
            "poll_oneoff",
            wasmtime.FuncType([i32, i32, i32, i32], [i32]),
            lambda *_args: WASI_ERRNO_NOSYS,
        )
        with wasmtime.FuncType([i32, i32, i32, i32], [i32]) as fd_write_type:
            error = capi.linker_define_func_unchecked(
                capi.address(self.linker.ptr()),
                WASI_MODULE.encode(),
                len(WASI_MODULE),
                b"fd_write",
                len(b"fd_write"),
                capi.address(fd_write_type.ptr()),
                _fd_write,
                None,
                capi.NO_FINALIZER,
            )
        if error:
            raise capi.error_object(error)
        self.linker.allow_shadowing = False
        self._engine_address = capi.address(self.engine.ptr())
        # Compiled code depends on the wasmtime version and on engine flags (fuel instrumentation).
        self._fingerprint = f"{WASMTIME_VERSION}-fuel{int(fuel_metering)}-epoch1-pool{int(pool_slots > 0)}"

    def close(self) -> None:
        self.linker.close()
        self.engine.close()

    def tick(self) -> None:
        """Advance the epoch by one (the ticker task calls this every `epoch_tick_ms`)."""
        self.engine.increment_epoch()

    def deadline_ticks(self, ms: float) -> int:
        # A deadline of n ticks traps after (n-1)..n tick periods: one extra tick so it is never early.
        return max(1, math.ceil(ms / self.epoch_tick_ms)) + 1

    # -- modules --

    def _cache_path(self, sha: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{sha}-{self._fingerprint}.cwasm"

    def prepare(self, source: bytes, *, is_wat: bool) -> PreparedModule:
        """Compile (or load from the disk cache) and link `source`. Raises BootError; `ModuleRejected` (a
        BootError answered 422) when the module itself is invalid: the deployer's fault."""
        wasm = wat_or_wasm(source, is_wat=is_wat)
        sha = hashlib.sha256(wasm).hexdigest()
        path = self._cache_path(sha)
        module: wasmtime.Module | None = None
        loaded = False
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
                loaded = True
            except wasmtime.WasmtimeError:
                module = None  # stale or corrupt: compile again and overwrite
        if module is None:
            try:
                module = wasmtime.Module(self.engine, wasm)
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"invalid Wasm module: {_first_line(exc)}") from exc
            if path is not None:
                self._store_cache(path, module)
        try:
            _check_entry(module)  # ModuleRejected: the module is no WASI command
            try:
                pre = self.linker.instantiate_pre(module)
            except wasmtime.WasmtimeError as exc:
                unknown = [f"{imp.module}::{imp.name}" for imp in module.imports if imp.module != WASI_MODULE]
                hint = f" (imports beyond WASI preview 1: {', '.join(unknown)})" if unknown else ""
                raise BootError(f"module cannot be linked{hint}: {_first_line(exc)}") from exc
        except BaseException:
            module.close()
            raise
        return PreparedModule(
            sha256=sha, module=module, pre=pre, loaded_from_cache=loaded, has_start=has_start_function(wasm)
        )

    def _store_cache(self, path: Path, module: wasmtime.Module) -> None:
        try:
            data = module.serialize()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cwasm")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)  # atomic: readers never see half a file
            except BaseException:
                os.unlink(tmp)
                raise
        except (OSError, wasmtime.WasmtimeError):
            pass  # the cache is an optimisation; the next boot compiles again

    # -- calls --

    def _new_store(self, limits: CallLimits) -> wasmtime.Store:
        store = wasmtime.Store(self.engine)
        try:
            store.set_limits(
                memory_size=limits.memory_bytes,
                table_elements=self.max_table_elements,
                instances=1,
                tables=MAX_TABLES,
                memories=1,
            )
            store.set_epoch_deadline(limits.deadline_ticks)
            if self.fuel_metering:
                store.set_fuel(limits.fuel if limits.fuel is not None else 2**63 - 1)
        except BaseException:
            store.close()
            raise
        return store

    def check_instantiate(self, prepared: PreparedModule, limits: CallLimits) -> None:
        """Boot check: instantiate once (runs the module's start section, not `_start`). Raises BootError."""
        store = self._new_store(limits)
        try:
            store.set_wasi(wasmtime.WasiConfig())
            prepared.pre.instantiate(store)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise BootError(f"module failed to instantiate: {_first_line(exc)}") from exc
        finally:
            store.close()

    def call(
        self,
        prepared: PreparedModule,
        *,
        env: list[tuple[str, str]],
        argv: list[str],
        stdin: bytes,
        limits: CallLimits,
        control: CallControl | None = None,
        measure_cpu: bool = False,
    ) -> CallOutcome:
        """Run `_start` once in a fresh Store. Never raises for guest behaviour; see `CallOutcome.failure`.

        `control` (made by the caller with `limits.deadline_ticks`) lets another thread stop the call.
        `measure_cpu` fills `CallOutcome.cpu_s` (two clock syscalls: only for callers that use it). Straight on
        the C API (runtimes/wasm/capi.py): this is the per-request hot path.
        """
        started = time.thread_time() if measure_cpu else 0.0
        if control is None:
            control = CallControl(limits.deadline_ticks)
        out = _Sink(limits.max_stdout_bytes, fail_on_overflow=True)
        err = _Sink(limits.max_stderr_bytes, fail_on_overflow=False)
        control_id = next(_control_ids)
        _CONTROLS[control_id] = control
        _current.sinks = (out, err)
        store = capi.store_new(self._engine_address, None, capi.NO_FINALIZER)
        try:
            context = capi.store_context(store)
            failure, detail = self._run(prepared, store, context, env, argv, stdin, limits, control_id)
            if failure is not None and control.reason is not None:  # stopped by the kill switch
                failure = "interrupt" if control.reason == "deadline" else "cancelled"
        finally:
            capi.store_delete(store)
            _current.sinks = None
            _CONTROLS.pop(control_id, None)
        return CallOutcome(
            stdout=out.value(),
            stderr=err.value(),
            stdout_overflowed=out.overflowed,
            failure=failure,
            detail=detail,
            cpu_s=time.thread_time() - started if measure_cpu else 0.0,
        )

    def _run(
        self,
        prepared: PreparedModule,
        store: int,
        context: int,
        env: list[tuple[str, str]],
        argv: list[str],
        stdin: bytes,
        limits: CallLimits,
        control_id: int,
    ) -> tuple[str | None, str]:
        """Configure the Store, instantiate, call `_start`: (failure, detail) as in `CallOutcome`."""
        capi.store_limiter(store, limits.memory_bytes, self.max_table_elements, 1, MAX_TABLES, 1)
        capi.context_set_epoch_deadline(context, 1)
        capi.store_epoch_deadline_callback(store, _on_epoch, control_id, capi.NO_FINALIZER)
        if self.fuel_metering:
            error = capi.context_set_fuel(context, limits.fuel if limits.fuel is not None else 2**63 - 1)
            if error:
                return "setup", _first_line(capi.error_object(error))
        wasi = capi.wasi_config_new()
        problem = _env_and_argv(wasi, env, argv)
        if problem is not None:
            capi.wasi_config_delete(wasi)
            return "setup", problem
        # stdin from bytes: the vector (a copy of `stdin`) is owned by the config from here on.
        capi.wasi_config_set_stdin_bytes(wasi, ctypes.byref(capi.byte_vec(stdin)))
        error = capi.context_set_wasi(context, wasi)  # takes ownership of `wasi`, also on error
        if error:
            return "setup", _first_line(capi.error_object(error))

        instance = capi.Instance()
        trap = ctypes.c_void_p()
        instantiate = capi.instance_pre_instantiate if prepared.has_start else capi.instance_pre_instantiate_holding_gil
        error = instantiate(prepared.pre_address, context, ctypes.byref(instance), ctypes.byref(trap))
        if error or trap.value:
            problem_obj = capi.error_object(error) if error else capi.trap_object(trap.value or 0)
            return "instantiate", _first_line(problem_obj)
        entry = capi.Extern()
        if (
            not capi.instance_export_get(context, ctypes.byref(instance), _ENTRY_NAME, len(_ENTRY_NAME), entry)
            or capi.extern_kind(entry) != capi.EXTERN_FUNC
        ):
            return "trap", f"no {ENTRY_EXPORT!r} function"
        error = capi.func_call(context, ctypes.byref(entry.of.func), None, 0, None, 0, ctypes.byref(trap))
        failure: str | None = None
        detail = ""
        if error:
            status = capi.exit_status(error)
            if status is None:
                failure, detail = "trap", _first_line(capi.error_object(error))
            else:
                capi.error_delete(error)
                if status != 0:
                    failure, detail = "exit", f"exit status {status}"
        elif trap.value:
            trap_obj = capi.trap_object(trap.value)
            failure, detail = self._classify_trap(trap_obj), _first_line(trap_obj)
        if failure in ("trap", "exit") and self._memory_exhausted(context, instance, limits):
            failure = "memory"
        return failure, detail

    @staticmethod
    def _classify_trap(exc: wasmtime.Trap) -> str:
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return "interrupt"
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return "fuel"
        return "trap"

    @staticmethod
    def _memory_exhausted(context: int, instance: Any, limits: CallLimits) -> bool:
        # The store limiter makes memory.grow return -1; guests usually trap or exit non-zero right after. A
        # failure with memory within one page of the cap is reported as the memory limit.
        memory = capi.Extern()
        if not capi.instance_export_get(context, ctypes.byref(instance), b"memory", 6, memory):
            return False
        if capi.extern_kind(memory) != capi.EXTERN_MEMORY:
            return False
        _, size = capi.memory_of(context, memory)
        return size + WASM_PAGE > limits.memory_bytes
