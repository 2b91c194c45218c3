"""Shared fixtures: free ports, temp data dirs, binaries that must exist under CI, and a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str, path: str | None = None) -> str:
    """The path of binary `name`. Missing: a failure under CI=true (a skip there would hide it), else a skip."""
    found = path if path and os.path.exists(path) else shutil.which(name)
    if found:
        return found
    if IN_CI:
        pytest.fail(f"{name} is required in CI but was not found on PATH")
    pytest.skip(f"{name} not installed")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A fresh redis-server for the test (tests/redis_server.py: free port, no persistence); stopped after."""
    from tests.redis_server import redis_server_running  # it imports this module: import when used

    async with redis_server_running(tmp_path) as server:
        yield server
