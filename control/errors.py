"""The control plane's errors. Each carries the HTTP status and code the API answers with."""

from __future__ import annotations


class ControlError(Exception):
    status = 400
    code = "BAD_REQUEST"
    output = ""
    """What a worker printed (a boot error's output), passed on to the operator."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ControlError):
    status = 404
    code = "NOT_FOUND"


class StateUnavailable(ControlError):
    """The cluster's Redis can't be reached: nothing was changed. The client reconnects by itself."""

    status = 503
    code = "REDIS_UNAVAILABLE"


class NoWorkers(ControlError):
    status = 503
    code = "NO_READY_WORKERS"


class WorkerCallFailed(ControlError):
    """A worker's admin API refused or failed a call the control plane made on the operator's behalf."""

    status = 502
    code = "WORKER_FAILED"

    def __init__(self, node: str, status: int, code: str, message: str, *, output: str = "") -> None:
        super().__init__(f"{node}: {message}", status=status if 400 <= status < 600 else 502, code=code)
        self.node = node
        self.output = output
