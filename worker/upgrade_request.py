"""The worker's half of a rolling upgrade (control/upgrade.py): `POST /admin/v1/upgrade {"version"}` leaves a
request for the node's upgrade helper, then drains the node.

The daemon never installs anything itself: it runs unprivileged and cannot write its own install. The helper does
(root on a cloud node: provision/upgrade_helper.py started by mbworker.service's ExecStopPost; the local provider's
supervisor on one machine). The daemon hands it only a version number, nothing it could be made to install from:
the helper fetches that version's wheels and their sha256 from the control plane with its own token, installs them with
`pip --no-index --require-hashes`, and starts the daemon again once this one has drained and exited.

    <data dir>/upgrade/            made by whoever runs the helper: its presence says a helper is watching
    <data dir>/upgrade/request     {"version": "X"}, written atomically; the helper takes it away
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import trio

VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")
"""A version as pip writes it in a wheel's name (and nothing a path could be made of)."""
UPGRADE_DIR = "upgrade"
REQUEST_FILE = "request"


class UpgradeUnavailable(Exception):
    """No helper watches this node: an upgrade request would only stop it."""


class UpgradeRequests:
    """Owns `<data dir>/upgrade/request`; `drain` is the daemon's drain trigger."""

    def __init__(self, data_dir: Path, drain: Callable[[], None]) -> None:
        self.directory = data_dir / UPGRADE_DIR
        self._drain = drain

    async def request(self, version: str) -> None:
        """Leave the request, then drain. `ValueError` for a bad version, `UpgradeUnavailable` when no helper
        watches."""
        await trio.to_thread.run_sync(self._write, version)
        self._drain()  # in the loop: the drain wakes its waiters

    def _write(self, version: str) -> None:
        if not VERSION.match(version):
            raise ValueError(f"version {version!r} must match {VERSION.pattern}")
        if not self.directory.is_dir():
            raise UpgradeUnavailable(f"no upgrade helper watches this node ({self.directory} does not exist)")
        tmp = self.directory / f".{REQUEST_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": version}, f)
        os.replace(tmp, self.directory / REQUEST_FILE)
