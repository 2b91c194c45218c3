"""The systemd unit of a worker node, shipped as package data (`mbworker.service` beside this file).

`unit_text()` is what an installer writes to /etc/systemd/system/mbworker.service; the unit's comments say what
it expects on the machine (user, venv, config and env files).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["UNIT_NAME", "unit_text"]

UNIT_NAME = "mbworker.service"


def unit_text() -> str:
    """The unit file's text, as installed with the package."""
    return resources.files(__name__).joinpath(UNIT_NAME).read_text(encoding="utf-8")
