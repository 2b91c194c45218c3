"""The few wasmtime C API functions on the per-request path, declared directly on wasmtime-py's shared library.

Why not wasmtime-py's classes here: per request they cost more CPU than the wasm itself (a hello module's call is
~10 µs of wasm inside ~200 µs of host work). Measured on the bench's hello module (docs/benchmarks.md, Wasm):
- `WasiConfig.stdout_custom` runs every guest write on a tokio thread that re-takes the GIL: ~10 context switches
  and ~80 µs CPU per request. `fd_write` is shadowed here by a host function that runs on the calling thread.
- `Func.__call__` fetches and converts the function type, `Store.set_limits`/`WasiConfig` setters validate in
  Python, each wrapper allocates objects; here each step is one foreign call with plain-int arguments.
- ctypes releases and re-takes the GIL around every foreign call of a `CDLL`. Calls that only do host work for a
  few µs (store setup, memory lookups) go through a `PyDLL` handle of the same library, which keeps the GIL: the
  trio thread waits at most those µs, and the call thread is not queued behind it ~15 times per request. Calls
  that run guest code (instantiate: the start section; the export call) and the Store's teardown, which grows
  with the memory the guest touched, release the GIL.

Everything here is synchronous. Pointers are plain ints (`c_void_p`); structs are wasmtime-py's ctypes types.
Nothing here owns anything: `sandbox.py` pairs every create with its delete.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import struct
from collections.abc import Callable
from typing import Any

from wasmtime import _bindings, _ffi

_P = ctypes.c_void_p
_ERROR_P = ctypes.POINTER(_bindings.wasmtime_error_t)
_TRAP_P = ctypes.POINTER(_bindings.wasm_trap_t)

_RELEASES_GIL = ctypes.CDLL(str(_ffi.filename))  # same handle as wasmtime-py's (dlopen is refcounted)
_HOLDS_GIL = ctypes.PyDLL(str(_ffi.filename))


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn  # type: ignore[no-any-return]


Extern = _bindings.wasmtime_extern_t
Func = _bindings.wasmtime_func_t
Instance = _bindings.wasmtime_instance_t
ByteVec = _ffi.wasm_byte_vec_t
EXTERN_FUNC = _ffi.WASMTIME_EXTERN_FUNC.value
EXTERN_MEMORY = _ffi.WASMTIME_EXTERN_MEMORY.value

# Callback types (C signatures from wasmtime.h), with pointers as plain ints.
EPOCH_CALLBACK = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
"""`(context, data, *epoch_deadline_delta, *update_kind) -> wasmtime_error_t* | 0`"""
HOST_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, _P, _P, _P, ctypes.c_size_t)
"""Unchecked host function: `(env, caller, args_and_results: wasmtime_val_raw_t*, count) -> wasm_trap_t* | 0`"""
_FINALIZER = ctypes.CFUNCTYPE(None, _P)
NO_FINALIZER = _FINALIZER()

# -- store --
store_new = _declare(_HOLDS_GIL, "wasmtime_store_new", _P, _P, _P, _FINALIZER)
store_context = _declare(_HOLDS_GIL, "wasmtime_store_context", _P, _P)
store_delete = _declare(_RELEASES_GIL, "wasmtime_store_delete", None, _P)
"""Releases the GIL: freeing a Store unmaps or resets every page the guest touched (~7 ms for 128 MiB), which
must not stop the trio thread."""
store_limiter = _declare(
    _HOLDS_GIL,
    "wasmtime_store_limiter",
    None,
    _P,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
)
store_epoch_deadline_callback = _declare(
    _HOLDS_GIL, "wasmtime_store_epoch_deadline_callback", None, _P, EPOCH_CALLBACK, _P, _FINALIZER
)
context_set_epoch_deadline = _declare(_HOLDS_GIL, "wasmtime_context_set_epoch_deadline", None, _P, ctypes.c_uint64)
context_set_fuel = _declare(_HOLDS_GIL, "wasmtime_context_set_fuel", _P, _P, ctypes.c_uint64)
context_set_wasi = _declare(_HOLDS_GIL, "wasmtime_context_set_wasi", _P, _P, _P)

# -- WASI config --
wasi_config_new = _declare(_HOLDS_GIL, "wasi_config_new", _P)
wasi_config_delete = _declare(_HOLDS_GIL, "wasi_config_delete", None, _P)
wasi_config_set_env = _declare(_HOLDS_GIL, "wasi_config_set_env", ctypes.c_bool, _P, ctypes.c_size_t, _P, _P)
wasi_config_set_argv = _declare(_HOLDS_GIL, "wasi_config_set_argv", ctypes.c_bool, _P, ctypes.c_size_t, _P)
wasi_config_set_stdin_bytes = _declare(_HOLDS_GIL, "wasi_config_set_stdin_bytes", None, _P, ctypes.POINTER(ByteVec))
byte_vec_new = _declare(_HOLDS_GIL, "wasm_byte_vec_new", None, ctypes.POINTER(ByteVec), ctypes.c_size_t, _P)
byte_vec_new_empty = _declare(_HOLDS_GIL, "wasm_byte_vec_new_empty", None, ctypes.POINTER(ByteVec))

# -- running guest code: these release the GIL --
instance_pre_instantiate = _declare(
    _RELEASES_GIL,
    "wasmtime_instance_pre_instantiate",
    _P,
    _P,
    _P,
    ctypes.POINTER(Instance),
    ctypes.POINTER(_P),
)
instance_pre_instantiate_holding_gil = _declare(
    _HOLDS_GIL,
    "wasmtime_instance_pre_instantiate",
    _P,
    _P,
    _P,
    ctypes.POINTER(Instance),
    ctypes.POINTER(_P),
)
"""For modules without a start function only: then instantiating runs no guest code (memories, tables, data
segments: host work bounded by the module's size), and keeping the GIL saves a contended re-take per request."""
func_call = _declare(
    _RELEASES_GIL, "wasmtime_func_call", _P, _P, ctypes.POINTER(Func), _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P
)

# -- exports, memory, errors --
instance_export_get = _declare(
    _HOLDS_GIL,
    "wasmtime_instance_export_get",
    ctypes.c_bool,
    _P,
    ctypes.POINTER(Instance),
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.POINTER(Extern),
)
caller_export_get = _declare(
    _HOLDS_GIL,
    "wasmtime_caller_export_get",
    ctypes.c_bool,
    _P,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.POINTER(Extern),
)
caller_context = _declare(_HOLDS_GIL, "wasmtime_caller_context", _P, _P)
memory_data = _declare(_HOLDS_GIL, "wasmtime_memory_data", _P, _P, ctypes.c_void_p)
memory_data_size = _declare(_HOLDS_GIL, "wasmtime_memory_data_size", ctypes.c_size_t, _P, ctypes.c_void_p)
error_new = _declare(_HOLDS_GIL, "wasmtime_error_new", _P, ctypes.c_char_p)
error_exit_status = _declare(_HOLDS_GIL, "wasmtime_error_exit_status", ctypes.c_bool, _P, ctypes.POINTER(ctypes.c_int))
error_delete = _declare(_HOLDS_GIL, "wasmtime_error_delete", None, _P)
linker_define_func_unchecked = _declare(
    _HOLDS_GIL,
    "wasmtime_linker_define_func_unchecked",
    _P,
    _P,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
    _P,
    HOST_CALLBACK,
    _P,
    _FINALIZER,
)


def use_pooling_allocator(config: Any, *, slots: int, max_tables: int, table_elements: int, keep_resident: int) -> None:
    """Make the engine built from `config` (a wasmtime.Config) reuse `slots` pre-reserved instance slots.

    Per request this replaces mmap/mprotect/munmap of a fresh linear memory (and the TLB shoot-downs a munmap
    sends to the other CPUs of a multi-threaded process) with a memset of the pages used, up to `keep_resident`
    bytes per memory. A slot holds one memory of up to 4 GiB (all of wasm32; the Store limiter enforces
    `Limits.memory_mb`), `max_tables` tables of `table_elements`. More live instances than `slots` fail to
    instantiate, so the owner sizes it above its concurrency.
    """
    pooling = _bindings.wasmtime_pooling_allocation_config_new()
    try:
        _bindings.wasmtime_pooling_allocation_config_total_core_instances_set(pooling, slots)
        _bindings.wasmtime_pooling_allocation_config_total_memories_set(pooling, slots)
        _bindings.wasmtime_pooling_allocation_config_total_tables_set(pooling, slots * max_tables)
        _bindings.wasmtime_pooling_allocation_config_total_stacks_set(pooling, slots)
        _bindings.wasmtime_pooling_allocation_config_max_memories_per_module_set(pooling, 1)
        _bindings.wasmtime_pooling_allocation_config_max_tables_per_module_set(pooling, max_tables)
        _bindings.wasmtime_pooling_allocation_config_table_elements_set(pooling, table_elements)
        _bindings.wasmtime_pooling_allocation_config_max_memory_size_set(pooling, 4 << 30)
        _bindings.wasmtime_pooling_allocation_config_max_core_instance_size_set(pooling, 8 << 20)
        _bindings.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pooling, keep_resident)
        _bindings.wasmtime_pooling_allocation_config_table_keep_resident_set(pooling, keep_resident)
        _bindings.wasmtime_pooling_allocation_strategy_set(config.ptr(), pooling)  # copies the settings
    finally:
        _bindings.wasmtime_pooling_allocation_config_delete(pooling)


def address(pointer: Any) -> int:
    """The address held by a wasmtime-py pointer object (e.g. `engine.ptr()`)."""
    value = ctypes.cast(pointer, ctypes.c_void_p).value
    if not value:
        raise ValueError("NULL pointer")
    return value


def error_object(error: int) -> Any:
    """Wrap an owned `wasmtime_error_t*` as wasmtime-py's WasmtimeError/ExitTrap (which then owns and frees it)."""
    from wasmtime import WasmtimeError

    return WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_P))


def trap_object(trap: int) -> Any:
    """Wrap an owned `wasm_trap_t*` as wasmtime-py's Trap (which then owns and frees it)."""
    from wasmtime import Trap

    return Trap._from_ptr(ctypes.cast(trap, _TRAP_P))


def exit_status(error: int) -> int | None:
    """The WASI exit status if `error` is a `proc_exit`, else None. Does not take ownership."""
    code = ctypes.c_int(0)
    return code.value if error_exit_status(error, ctypes.byref(code)) else None


def extern_kind(extern: Any) -> int:
    """The kind (EXTERN_FUNC, EXTERN_MEMORY, ...) of a `wasmtime_extern_t`."""
    return int(extern.kind)


def memory_of(context: int, extern: Any) -> tuple[int, int]:
    """(base address, size in bytes) of the memory in `extern` (kind EXTERN_MEMORY)."""
    ref = ctypes.addressof(extern.of.memory)
    return memory_data(context, ref) or 0, memory_data_size(context, ref)


class StringArray:
    """A `char**` over `items`, UTF-8 encoded: one buffer holding them all, NUL-separated, and an array of their
    addresses in it. Keep the object alive while C reads `address`. ~3× cheaper than a `c_char_p` array, which
    converts and keeps a reference per item."""

    __slots__ = ("_blob", "_pointers", "address")

    def __init__(self, items: list[str]) -> None:
        blob = "\0".join(items).encode() + b"\0"
        start = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
        parts = blob.split(b"\0")
        parts.pop()  # the empty tail after the last NUL
        if len(parts) != len(items):  # an item holds NUL itself: C would stop there anyway, so cut it there too
            parts = [item.encode().split(b"\0", 1)[0] for item in items]
            blob = b"".join(part + b"\0" for part in parts)
            start = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
        self._blob = blob
        self._pointers = array.array("Q", itertools.accumulate((len(part) + 1 for part in parts[:-1]), initial=start))
        if not items:  # a valid (non-NULL) address for a count of 0: Rust makes a slice of it
            self._pointers = array.array("Q", [0])
        self.address = self._pointers.buffer_info()[0]


def byte_vec(data: bytes) -> Any:
    """A new `wasm_byte_vec_t` holding a copy of `data`, owned by whoever it is handed to."""
    vec = ByteVec()
    if data:
        byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(ctypes.c_char_p(data), _P))
    else:
        byte_vec_new_empty(ctypes.byref(vec))
    return vec


_IOVEC = struct.Struct("<II")


def read_iovecs(base: int, size: int, iovs: int, count: int) -> list[tuple[int, int]] | None:
    """The (address, length) pairs of a guest's iovec array, or None if any part lies outside its memory."""
    end = iovs + _IOVEC.size * count
    if iovs < 0 or count < 0 or end > size:
        return None
    raw = ctypes.string_at(base + iovs, _IOVEC.size * count)
    pairs = []
    for ptr, length in _IOVEC.iter_unpack(raw):
        if ptr + length > size:
            return None
        pairs.append((base + ptr, length))
    return pairs
