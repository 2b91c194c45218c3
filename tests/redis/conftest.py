"""Fixtures for the Redis client tests: a real redis-server per test (see tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.conftest import free_port
from tests.redis_server import RedisServer, start_redis_server


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = await start_redis_server(tmp_path)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A listening socket that accepts and reads but never answers."""
    port = free_port()

    async def swallow(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_tcp, swallow, port)
        yield port
        nursery.cancel_scope.cancel()
