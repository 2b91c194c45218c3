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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _bindings, _ffi
from wasmtime._extern import wrap_extern

from runtimes.errors import BootError
from runtimes.wasm.errors import ModuleRejected

WASI_MODULE = "wasi_snapshot_preview1"
ENTRY_EXPORT = "_start"
WASM_PAGE = 65536
WASI_ERRNO_NOSYS = 52

try:
    WASMTIME_VERSION = importlib.metadata.version("wasmtime")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored installs
    WASMTIME_VERSION = "unknown"


# --- stdout/stderr capture -------------------------------------------------------------------------------------
#
# wasmtime-py's `WasiConfig.stdout_custom` registers a Python *finalizer* that wasmtime calls from a tokio thread
# some time after the Store is dropped; at interpreter exit that thread calls into a finalizing interpreter and
# Rust aborts with "panic in a function that cannot unwind" (seen here with plain WAT modules too, intermittently,
# when the process exits right after a burst of calls). So we register our own write callback with a NULL
# finalizer and free our side ourselves. The write callback itself runs on a wasmtime thread while the guest's
# fd_write waits for it, i.e. only during a call.

_WRITE_CB_TYPE = _bindings._wasi_config_set_stdout_custom.argtypes[1]
_FINALIZER_TYPE = _bindings._wasi_config_set_stdout_custom.argtypes[3]
_NO_FINALIZER = _FINALIZER_TYPE()  # a NULL function pointer
_EFBIG = 27  # returned negated: the guest's write fails instead of silently losing bytes


class _Sink:
    """One output stream of one call. `limit` bounds what is kept; past it stdout fails writes, stderr drops."""

    __slots__ = ("chunks", "fail_on_overflow", "limit", "overflowed", "size")

    def __init__(self, limit: int, *, fail_on_overflow: bool) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False
        self.fail_on_overflow = fail_on_overflow

    def write(self, data: bytes) -> int:
        n = len(data)
        room = self.limit - self.size
        if n > room:
            self.overflowed = True
            if self.fail_on_overflow:
                return -_EFBIG
            data = data[: max(0, room)]
        if data:
            self.chunks.append(data)
            self.size += len(data)
        return n

    def value(self) -> bytes:
        return b"".join(self.chunks)


_SINKS: dict[int, _Sink] = {}
_sink_ids = itertools.count(1)  # never 0: a NULL data pointer reads back as None


@_WRITE_CB_TYPE  # type: ignore[untyped-decorator]
def _on_write(data: int | None, ptr: Any, size: int) -> int:
    # Must never raise: an exception here cannot propagate into wasmtime.
    try:
        sink = _SINKS.get(data or 0)
        if sink is None:
            return -_EFBIG
        return sink.write(ctypes.string_at(ptr, size))
    except BaseException:  # pragma: no cover - defensive
        return -_EFBIG


def _set_stdin_bytes(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """stdin from bytes through the C API (the Python API takes only a path).

    `wasm_byte_vec_new` copies `data` (read in place through a c_char_p, no Python-side copy) into a vector Rust
    owns; `wasi_config_set_stdin_bytes` takes ownership of that vector, so we must neither free it nor touch it
    afterwards. `data` itself stays ours.
    """
    vec = _ffi.wasm_byte_vec_t()
    if data:
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(_ffi.wasm_byte_t))
        _ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), src)
    else:
        _ffi.wasm_byte_vec_new_empty(ctypes.byref(vec))
    _bindings.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))


def _char_array(items: list[bytes]) -> Any:
    # One C-level constructor call instead of wasmtime-py's per-item Python loop (~2 µs per variable).
    return ctypes.cast((ctypes.c_char_p * len(items))(*items), ctypes.POINTER(ctypes.POINTER(ctypes.c_char)))


def _set_env_and_argv(wasi: wasmtime.WasiConfig, env: list[tuple[str, str]], argv: list[str]) -> None:
    names = [name.encode() for name, _ in env]
    values = [value.encode() for _, value in env]
    args = [arg.encode() for arg in argv]
    if not _bindings.wasi_config_set_env(wasi.ptr(), len(env), _char_array(names), _char_array(values)):
        raise wasmtime.WasmtimeError("failed to configure the environment")
    if not _bindings.wasi_config_set_argv(wasi.ptr(), len(args), _char_array(args)):
        raise wasmtime.WasmtimeError("failed to configure argv")


_ENTRY_NAME = ENTRY_EXPORT.encode()


def _entry_function(instance: wasmtime.Instance, store: wasmtime.Store) -> wasmtime.Func:
    # One export lookup by name, instead of `instance.exports(store)` wrapping every export of the module.
    item = _ffi.wasmtime_extern_t()
    found = _ffi.wasmtime_instance_export_get(
        store._context(), ctypes.byref(instance._instance), _ENTRY_NAME, len(_ENTRY_NAME), ctypes.byref(item)
    )
    extern = wrap_extern(item) if found else None
    if not isinstance(extern, wasmtime.Func):
        raise wasmtime.WasmtimeError(f"no {ENTRY_EXPORT!r} function")
    return extern


# --- the per-call kill switch ----------------------------------------------------------------------------------
#
# Each call's Store gets an epoch deadline of one tick and a callback that wasmtime runs (on the call's thread) each
# time the epoch passes it: the callback counts the call's deadline down and either extends it by one tick or ends
# the call with an error. Setting `CallControl.reason` from the trio thread therefore stops that one call within a
# tick, which is how a cancelled request frees its thread promptly.

_EPOCH_CB_TYPE = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_EPOCH_FINALIZER_TYPE = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[3]
_NO_EPOCH_FINALIZER = _EPOCH_FINALIZER_TYPE()
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


@_EPOCH_CB_TYPE  # type: ignore[untyped-decorator]
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
        error = _ffi.wasmtime_error_new(f"call stopped: {reason}".encode())
        return int(ctypes.cast(error, ctypes.c_void_p).value or 0)
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


@dataclass(slots=True)
class PreparedModule:
    """A compiled module linked against WASI. Owned by the runtime's version table; `close()` when unused."""

    sha256: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    loaded_from_cache: bool

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


class Sandbox:
    """The daemon's one Engine and Linker. Thread-safe: calls run concurrently in worker threads."""

    def __init__(
        self,
        *,
        cache_dir: Path | None,
        fuel_metering: bool,
        epoch_tick_ms: int,
        max_table_elements: int,
    ) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel_metering
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
        self.linker.allow_shadowing = False
        # Compiled code depends on the wasmtime version and on engine flags (fuel instrumentation).
        self._fingerprint = f"{WASMTIME_VERSION}-fuel{int(fuel_metering)}-epoch1"

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
        return PreparedModule(sha256=sha, module=module, pre=pre, loaded_from_cache=loaded)

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
                tables=8,
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
    ) -> CallOutcome:
        """Run `_start` once in a fresh Store. Never raises for guest behaviour; see `CallOutcome.failure`.

        `control` (made by the caller with `limits.deadline_ticks`) lets another thread stop the call.
        """
        if control is None:
            control = CallControl(limits.deadline_ticks)
        out = _Sink(limits.max_stdout_bytes, fail_on_overflow=True)
        err = _Sink(limits.max_stderr_bytes, fail_on_overflow=False)
        out_id, err_id = next(_sink_ids), next(_sink_ids)
        _SINKS[out_id] = out
        _SINKS[err_id] = err
        control_id = next(_control_ids)
        _CONTROLS[control_id] = control
        failure: str | None = None
        detail = ""
        store: wasmtime.Store | None = None
        try:
            try:
                store = self._new_store(limits)
                store.set_epoch_deadline(1)
                _bindings.wasmtime_store_epoch_deadline_callback(
                    store.ptr(), _on_epoch, control_id, _NO_EPOCH_FINALIZER
                )
                wasi = wasmtime.WasiConfig()
                try:
                    _set_env_and_argv(wasi, env, argv)
                    _set_stdin_bytes(wasi, stdin)
                    _bindings.wasi_config_set_stdout_custom(wasi.ptr(), _on_write, out_id, _NO_FINALIZER)
                    _bindings.wasi_config_set_stderr_custom(wasi.ptr(), _on_write, err_id, _NO_FINALIZER)
                    store.set_wasi(wasi)  # moves the config into the store
                finally:
                    wasi.close()  # no-op once moved; frees it if a setter failed
            except wasmtime.WasmtimeError as exc:
                return CallOutcome(b"", b"", False, failure="setup", detail=_first_line(exc))
            try:
                instance = prepared.pre.instantiate(store)
            except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
                failure, detail = "instantiate", _first_line(exc)
            else:
                try:
                    _entry_function(instance, store)(store)
                except wasmtime.ExitTrap as exc:
                    if exc.code != 0:
                        failure, detail = "exit", f"exit status {exc.code}"
                except wasmtime.Trap as exc:
                    failure, detail = self._classify_trap(exc), _first_line(exc)
                except wasmtime.WasmtimeError as exc:
                    failure, detail = "trap", _first_line(exc)
                if failure in ("trap", "exit") and self._memory_exhausted(instance, store, limits):
                    failure = "memory"
            if failure is not None and control.reason is not None:  # stopped by the kill switch
                failure = "interrupt" if control.reason == "deadline" else "cancelled"
        finally:
            if store is not None:
                store.close()
            _SINKS.pop(out_id, None)
            _SINKS.pop(err_id, None)
            _CONTROLS.pop(control_id, None)
        return CallOutcome(
            stdout=out.value(),
            stderr=err.value(),
            stdout_overflowed=out.overflowed,
            failure=failure,
            detail=detail,
        )

    @staticmethod
    def _classify_trap(exc: wasmtime.Trap) -> str:
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return "interrupt"
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return "fuel"
        return "trap"

    @staticmethod
    def _memory_exhausted(instance: wasmtime.Instance, store: wasmtime.Store, limits: CallLimits) -> bool:
        # The store limiter makes memory.grow return -1; guests usually trap or exit non-zero right after. A
        # failure with memory within one page of the cap is reported as the memory limit.
        try:
            memory = instance.exports(store).get("memory")
            if isinstance(memory, wasmtime.Memory):
                return bool(memory.data_len(store) + WASM_PAGE > limits.memory_bytes)
        except (wasmtime.WasmtimeError, ValueError):
            pass
        return False
