"""How the CLI prints: relative times, aligned tables, and quiet exits when the reader goes away (`| head`)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mbworker.worker.errors import ConfigError


def program() -> str:
    """How to run this very `mbworker` again from here: `mbworker` when PATH finds it, else the script's path
    (`.venv/bin/mbworker` after `make setup`, whose venv is not on PATH)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "mbworker" or not os.path.exists(argv0):
        return "mbworker"  # `python -m mbworker.cli.main`, or an embedding: the plain name reads best
    found = shutil.which("mbworker")
    if found and os.path.samefile(found, argv0):
        return "mbworker"
    relative = os.path.relpath(argv0)
    return relative if not relative.startswith("..") else os.path.abspath(argv0)


def human_time(epoch_ms: int | None, *, now: float | None = None) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`; older than a week (or in the future) as a UTC date."""
    if not epoch_ms:
        return "-"
    now = time.time() if now is None else now
    age = now - epoch_ms / 1000
    if 0 <= age < 60:
        return f"{int(age)}s ago"
    if 0 <= age < 3600:
        return f"{int(age // 60)}m ago"
    if 0 <= age < 86400:
        return f"{int(age // 3600)}h ago"
    if 0 <= age < 7 * 86400:
        return f"{int(age // 86400)}d ago"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch_ms / 1000))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Columns as wide as their widest cell; the last column is not padded."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)) + "  " + row[-1])


def exit_quietly_on_broken_pipe(run: Callable[[], int]) -> int:
    """Run the command; if stdout's reader has gone (`mbworker functions list | head -1`), end without a traceback.

    Python's own advice (docs: signal, "Note on SIGPIPE"): point stdout at devnull so the flush at exit does not
    raise a second time, and exit with 141 (128 + SIGPIPE) as a shell pipeline expects.
    """
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        pass
    except BaseExceptionGroup as group:  # raised inside a Trio nursery (`mbworker serve | head -3`)
        matched, rest = group.split(BrokenPipeError)
        if matched is None or rest is not None:
            raise
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def config_error_in(group: BaseExceptionGroup[BaseException]) -> ConfigError | None:
    """The `ConfigError` a start failed with (a port in use, a bad file), out of trio's exception groups: the
    operator gets its one line, not a traceback per nursery. None when anything else failed too."""
    matched, rest = group.split(ConfigError)
    if matched is None or rest is not None:
        return None
    found: BaseException = matched
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found if isinstance(found, ConfigError) else None
