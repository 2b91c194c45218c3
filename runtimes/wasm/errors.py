"""Errors of the Wasm runtime that are not invocation outcomes.

Invocation outcomes use `runtimes.errors` (BootError, WorkerError, ResourceLimit, ...). `ModuleRejected` is raised
at deploy time by `compile_module`: the admin API answers it with `status` (a 4xx) and keeps the old version.
"""

from __future__ import annotations

from mbworker.runtimes.errors import BootError


class ModuleRejected(BootError):
    """The uploaded module is not a valid WAGI module (bad WAT, invalid Wasm, no `_start`).

    A `BootError` (the version can't run) that is the deployer's fault, hence a 4xx rather than 503.
    """

    status = 422
    code = "MODULE_REJECTED"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Wasm module rejected: {reason}")
