"""Errors of the daemon package (config, keys, admin API, CLI). Runtimes and realtime have their own."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the daemon's own errors."""


class ConfigError(WorkerError):
    """The configuration (file, environment or flags) is invalid; the message says what to fix."""


class AdminApiError(WorkerError):
    """The admin API refused a call. `status` and `code` come from its JSON error body."""

    def __init__(self, status: int, code: str, message: str, *, output: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.output = output
        super().__init__(f"{status} {code}: {message}")
