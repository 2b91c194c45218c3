"""Errors a runtime raises; each carries the HTTP status and Supabase error code the front door answers with.

Code above runtimes/ catches only these, never subprocess, wasmtime or trio errors.
"""

from __future__ import annotations


class FunctionRuntimeError(Exception):
    """Base: a function invocation or boot failed. `status`/`code` form the error contract."""

    status: int = 500
    code: str = "WORKER_ERROR"
    default_message: str = "Function exited due to an error (please check logs)"

    def __init__(self, message: str | None = None, *, output: str = "") -> None:
        self.message = message or self.default_message
        self.output = output  # the function's own error output (stderr tail), shown to deployers
        super().__init__(self.message)


class BootError(FunctionRuntimeError):
    """The function failed to start: top-level throw, bad import, no handler within the boot timeout."""

    status = 503
    code = "BOOT_ERROR"
    default_message = "Worker failed to boot (please check logs)"


class WorkerError(FunctionRuntimeError):
    """Uncaught error in the handler, crash mid-request, or a malformed response."""

    status = 500
    code = "WORKER_ERROR"


class InvalidResponse(WorkerError):
    """The function answered a status outside 200–599 (101 excepted) or an unreadable response."""

    code = "INVALID_RESPONSE_STATUS_CODE"
    default_message = "Function returned an invalid response"


class ResourceLimit(FunctionRuntimeError):
    """Killed at a CPU, memory, wall-clock, temp-dir or fuel limit while serving this request."""

    status = 546
    code = "WORKER_LIMIT"
    default_message = "Function failed due to not having enough compute resources (please check logs)"

    def __init__(self, kind: str, message: str | None = None, *, output: str = "") -> None:
        self.kind = kind  # "cpu" | "memory" | "wall_clock" | "disk" | "fuel"
        super().__init__(message or f"{self.default_message} [{kind}]", output=output)


class IdleTimeout(FunctionRuntimeError):
    """No response head within the request idle timeout."""

    status = 504
    code = "IDLE_TIMEOUT"
    default_message = "Function did not respond in time"


class WorkerBusy(FunctionRuntimeError):
    """No process became free within the queue timeout."""

    status = 503
    code = "WORKER_BUSY"
    default_message = "No worker became available in time, try again"


class VersionRetired(WorkerBusy):
    """The version was retired (a deploy switched away from it, a delete) before this request got an instance of
    it. Nothing of the request was used: the caller may run it on the version live now. A runtime never boots a
    retired version's pool again for a waiting request; it raises this instead."""

    default_message = "The function version was retired while the request waited, try again"
