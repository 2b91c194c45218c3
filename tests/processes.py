"""The Deno processes one test's worker started, found by that worker's own data dir.

A test's data dir is a fresh temp dir, and every Deno child of its worker names it on its command line, so this
finds the test's own processes (orphans included, which no longer hang under the worker) and never another
test's that happen to run at the same time.
"""

from __future__ import annotations

import os
from pathlib import Path


def deno_processes(data_dir: Path) -> dict[int, list[str]]:
    """PID → argv of every live Deno process whose command line names `data_dir` (zombies are not live)."""
    needle = str(data_dir)
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or a kernel thread
        if state != "Z" and any(a.endswith("bootstrap.ts") for a in argv) and any(needle in a for a in argv):
            out[int(entry)] = argv
    return out
