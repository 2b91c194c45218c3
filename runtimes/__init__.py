"""Sandboxes that run one deployed function version behind the `Runtime` interface.

The front door only ever sees `Runtime`, `FunctionVersion`, `Invocation`, `InvocationResult` and the errors in
`runtimes.errors`; never a subprocess or a wasmtime Store.
"""

from mbworker.runtimes.api import (
    BodyStream,
    FunctionVersion,
    Invocation,
    InvocationResult,
    Runtime,
    RuntimeStatistics,
)
from mbworker.runtimes.errors import (
    BootError,
    FunctionRuntimeError,
    IdleTimeout,
    InvalidResponse,
    ResourceLimit,
    VersionRetired,
    WorkerBusy,
    WorkerError,
)
from mbworker.runtimes.limits import Limits

__all__ = [
    "BodyStream",
    "BootError",
    "FunctionRuntimeError",
    "FunctionVersion",
    "IdleTimeout",
    "InvalidResponse",
    "Invocation",
    "InvocationResult",
    "Limits",
    "ResourceLimit",
    "Runtime",
    "RuntimeStatistics",
    "VersionRetired",
    "WorkerBusy",
    "WorkerError",
]
