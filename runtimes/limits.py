"""Per-function limits: Supabase Edge Functions defaults, overridable in function.toml `[limits]`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """What one function version may use. Frozen: a version's limits never change while it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mb: int = Field(
        default=256, ge=16, le=16384, description="V8 heap / RSS cap per Deno process; Store memory for Wasm"
    )
    cpu_time_ms: int = Field(
        default=2000, ge=10, description="CPU time one request may use before the process is killed (546)"
    )
    wall_clock_s: float = Field(
        default=400, gt=0, description="Lifetime of one Deno process; retired at half, killed at full"
    )
    request_idle_timeout_s: float = Field(
        default=150, gt=0, description="No response head within this → 504 IDLE_TIMEOUT"
    )
    boot_timeout_s: float = Field(
        default=15, gt=0, description="Process start to handler registered, else 503 BOOT_ERROR"
    )
    max_processes: int = Field(default=0, ge=0, description="Warm processes per version; 0 means the CPU count")
    max_concurrency: int = Field(default=64, ge=1, description="Concurrent requests one process takes")
    queue_timeout_s: float = Field(default=10, gt=0, description="Wait for a free process before 503 WORKER_BUSY")
    idle_shutdown_s: float = Field(default=300, gt=0, description="Stop a process with no request for this long")
    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=0, description="Request body cap (413)")
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=0, description="Response body cap (500 on overflow)")
    max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=125,
        description="WebSocket message cap, both ways (Deno.upgradeWebSocket); a larger message closes the socket "
        "with 1009",
    )
    tmp_mb: int = Field(
        default=64,
        ge=1,
        description="Disk a Deno process's own temp dir (TMPDIR) may use; over it the process is killed (546). "
        "At most the node's `max_tmp_mb`",
    )
    requests_per_second: int | None = Field(
        default=None,
        ge=1,
        description="Front door: requests per second to this function (across the cluster with Redis); over it 429",
    )
    fuel: int | None = Field(
        default=None, ge=1, description="Wasm only: instructions budget per request (546 when spent)"
    )
