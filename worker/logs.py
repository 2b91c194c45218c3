"""Logging: one JSON object per line on stderr (Loki-ready), with a component and optional labels.

`configure_logging` is called once by the CLI. Function output goes through `function_log`, which adds the
function's labels and truncates a line at 10,000 characters like Supabase does.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

MAX_LINE = 10_000
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
"""What every LogRecord carries; anything else in a record came from `extra=` and is the event's data."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": record.name.removeprefix("mbworker."),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():  # labels (function, version, ...) and event data (boot_ms, ...)
            if key not in _RECORD_FIELDS and key not in entry and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    # Every package logs under "mbworker" (its import root), so one logger carries the whole product's lines.
    root = logging.getLogger("mbworker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_function_log = logging.getLogger("mbworker.function")


def function_log(slug: str, version: int, execution_id: str, stream: str, line: str) -> None:
    """Log one line of a function's stdout/stderr with its labels."""
    if len(line) > MAX_LINE:
        line = line[:MAX_LINE] + "…[truncated]"
    _function_log.info(
        line,
        extra={"function": slug, "version": version, "execution_id": execution_id, "stream": stream},
    )
