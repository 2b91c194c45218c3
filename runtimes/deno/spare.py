"""A version's scratch dir made ahead of need, so that a cold start does not wait for it.

A version's dir holds its own DENO_DIR, a copy of the runtime's compiled template (about 1 MB over a dozen files:
4–10 ms of copying, measured on the first request of a never-run version), and the parent of its processes' temp
dirs. `SpareDirs` keeps one such dir ready; the first boot of a version renames it into place (microseconds) and a
new one is copied in the background; the first one too is copied in the background, after the runtime has compiled
its template (the runtime serves without waiting for it). A boot that finds none ready copies for itself, as does the
second of two versions booting at once.

Who owns what: the runtime owns one `SpareDirs`; its dirs live in the runtime's run dir (removed with it). A dir
being copied has no owner but its filling task until it is complete: only then is it offered (`take`), so a
half-made copy is never used; a copy never offered (failed, or not needed) is removed by its task. A taken dir is its
taker's, who renames it or, cancelled before touching it, puts it back (`put_back`). The fills run in the runtime's
nursery, one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import trio

log = logging.getLogger(__name__)

DENO_DIR = "deno"
"""The version's DENO_DIR, under its dir."""
TMPS = "tmp"
"""The parent of the version's process temp dirs, under its dir (mode 0700)."""


def make_version_dir(template: Path, base: Path) -> None:
    """`base` with a copy of `template` as its DENO_DIR and an empty temp parent. Blocking."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template, base / DENO_DIR, symlinks=True)
    (base / TMPS).mkdir(mode=0o700, exist_ok=True)


class SpareDirs:
    """At most one version dir ready to be renamed into place (see the module docstring)."""

    def __init__(self, template: Path, parent: Path, nursery: trio.Nursery) -> None:
        self._template = template
        self._parent = parent
        self._nursery = nursery
        self._ready: Path | None = None
        self._filling: trio.Event | None = None
        """Set when the fill under way is over."""

    async def fill(self) -> None:
        """Make the spare if there is none (a copy in a worker thread), or wait for the fill under way. Best effort:
        a failed copy is logged and removed, and the next boot copies for itself. A copy that is not offered (it
        failed, its task was cancelled, or one was put back meanwhile) is removed before this returns."""
        if self._filling is not None:
            await self._filling.wait()
            return
        if self._ready is not None:
            return
        self._filling = done = trio.Event()
        made = self._parent / f".spare-{os.urandom(4).hex()}"
        path: Path | None = made  # None once offered
        try:
            await trio.to_thread.run_sync(make_version_dir, self._template, made)
            if self._ready is None:  # else one was put back while this was made
                self._ready, path = made, None
        except OSError as exc:
            log.warning("could not make a spare version dir: %s", exc)
        finally:
            try:
                if path is not None:
                    with trio.CancelScope(shield=True):  # bounded: a local rmtree of one copy
                        await trio.to_thread.run_sync(_remove, path)
            finally:
                self._filling = None
                done.set()

    def take(self) -> Path | None:
        """The ready dir, now the caller's to rename (into the same filesystem), or None; the next one is made in
        the background. A taker that could not use it gives it back (`put_back`)."""
        path, self._ready = self._ready, None
        if path is not None:
            with contextlib.suppress(RuntimeError):  # the runtime is closing: no more spares
                self._nursery.start_soon(self.fill)
        return path

    def put_back(self, path: Path) -> None:
        """A dir from `take` that its taker left untouched (it was cancelled before using it): ready again, or
        removed if another is ready by now."""
        if self._ready is None:
            self._ready = path
            return
        with contextlib.suppress(RuntimeError):  # closing: it goes with the run dir
            self._nursery.start_soon(trio.to_thread.run_sync, _remove, path)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
