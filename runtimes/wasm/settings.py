"""Settings of the Wasm runtime (one Engine per daemon). Per-function limits live in `runtimes.limits.Limits`."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class WasmSettings(BaseModel):
    """How the daemon's one Wasmtime engine is configured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_dir: Path | None = Field(
        None,
        description="Compiled-module cache (Module.serialize output). Must be writable by the daemon only: "
        "its files are native code. None keeps compiled modules in memory only.",
    )
    threads: int = Field(
        default_factory=lambda: os.cpu_count() or 2,
        ge=1,
        le=256,
        description="Concurrent Wasm calls (threads). Default: the CPU count; more threads than cores measured no "
        "faster (docs/benchmarks.md, Wasm runtime)",
    )
    sync_wait_us: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Opt-in: how long the trio thread may wait, BLOCKED, for a call to finish before it serves "
        "other work meanwhile (0, the default: never; whole milliseconds, rounded up). Short calls then cost far "
        "less CPU (no GIL hand-overs between a busy trio thread and the call thread), but every other connection "
        "waits meanwhile and calls no longer overlap; a version whose call uses over half of it in CPU is handed "
        "over without waiting for its next calls. docs/benchmarks.md, Wasm runtime",
    )
    epoch_tick_ms: int = Field(10, ge=1, le=1000, description="Epoch ticker period: the CPU deadline resolution")
    fuel_metering: bool = Field(
        True,
        description="Compile with fuel metering so that `Limits.fuel` can be enforced. Engine-wide: a version "
        "with `fuel` set fails to boot when this is off.",
    )
    route_prefix: str = Field("/functions/v1", description="Public prefix of function routes (SCRIPT_NAME)")
    server_name: str = Field("localhost", description="SERVER_NAME when the request has no Host header")
    server_port: int = Field(80, ge=1, le=65535, description="SERVER_PORT when the Host header has no port")
    max_stderr_bytes: int = Field(64 * 1024, ge=0, description="stderr kept per request for the log hook")
    max_table_elements: int = Field(200_000, ge=1, description="Store limit on table elements")
