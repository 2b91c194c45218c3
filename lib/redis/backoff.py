"""Reconnect delays: exponential backoff with jitter (pure)."""

from __future__ import annotations

import random


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failed attempts: half fixed, half random (so nodes that lost Redis
    together do not reconnect in step), doubling from `initial` up to `maximum`."""
    ceiling = min(maximum, initial * 2.0 ** min(failures, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
