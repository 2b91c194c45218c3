"""Progress on stderr while `mbworker deploy` waits on something slow (resolving npm packages, bundling jsr: modules).

On a terminal an elapsed-seconds counter ticks in place (a thread: the CLI has no event loop); elsewhere (CI
logs) one line when it starts and one when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

TICK_S = 0.5


@contextmanager
def bundling_progress(slug: str, out: TextIO | None = None) -> Iterator[None]:
    stream = out or sys.stderr
    tty = stream.isatty()
    started = time.monotonic()
    print(f"… {slug}: resolving its packages (on this machine)", file=stream, flush=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK_S):
            stream.write(f"\r  {time.monotonic() - started:4.0f} s")
            stream.flush()

    ticker = threading.Thread(target=tick, name="bundling-progress", daemon=True) if tty else None
    if ticker is not None:
        ticker.start()
    outcome = "failed after"
    try:
        yield
        outcome = "resolved in"
    finally:
        stop.set()
        if ticker is not None:
            ticker.join(timeout=TICK_S * 4)
        print(
            f"{chr(13) if tty else ''}  {slug}: {outcome} {time.monotonic() - started:.1f} s", file=stream, flush=True
        )
