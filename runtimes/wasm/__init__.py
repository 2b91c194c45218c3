"""Wasm functions: WAGI (CGI over WASI preview 1) modules in Wasmtime, one fresh Store per request.

Public: `open_wasm_runtime(settings, *, on_log=None)` (the Runtime), `compile_module(source, is_wat)` (deploy-time
validation, raises `ModuleRejected`), `WasmSettings`. The WAGI contract is in docs/wasm.md.
"""

from __future__ import annotations

from mbworker.runtimes.wasm.errors import ModuleRejected
from mbworker.runtimes.wasm.runtime import LogHook, WasmRuntime, WasmStatistics, open_wasm_runtime
from mbworker.runtimes.wasm.sandbox import compile_module
from mbworker.runtimes.wasm.settings import WasmSettings

__all__ = [
    "LogHook",
    "ModuleRejected",
    "WasmRuntime",
    "WasmSettings",
    "WasmStatistics",
    "compile_module",
    "open_wasm_runtime",
]
