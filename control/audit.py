"""The audit ring: every mutating call (who by token name, what, when, result), newest last, bounded.

`AuditLog` is the seam; `MemoryAuditLog` keeps the ring of this control plane (one per cluster). Each entry is
also logged as a JSON line (`mbworker.control.audit`), which is what outlives a restart (Loki).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

log = logging.getLogger("mbworker.control.audit")


@dataclass(frozen=True)
class AuditEntry:
    at: float
    """Epoch seconds."""
    token: str
    action: str
    """Method and path, e.g. `POST /control/v1/functions/hello/deploy`."""
    status: int
    result: str
    """What happened, in a few words (the error message on failure)."""


class AuditLog(Protocol):
    def record(self, token: str, action: str, status: int, result: str) -> AuditEntry: ...

    def entries(self, limit: int | None = None) -> list[AuditEntry]: ...


class MemoryAuditLog:
    def __init__(self, size: int = 1000) -> None:
        self._ring: deque[AuditEntry] = deque(maxlen=size)

    def record(self, token: str, action: str, status: int, result: str) -> AuditEntry:
        entry = AuditEntry(time.time(), token, action, status, result[:500])
        self._ring.append(entry)
        log.info("audit", extra={"audit": asdict(entry)})
        return entry

    def entries(self, limit: int | None = None) -> list[AuditEntry]:
        items = list(self._ring)
        return items[-limit:] if limit else items


def entry_json(entry: AuditEntry) -> dict[str, Any]:
    return asdict(entry)
