"""Fixtures for the cluster tests: a real redis-server per test (tests/redis_server.py) and clients on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, start_redis_server
from worker.redis import RedisClient, RedisSettings, open_redis, parse_redis_url


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = await start_redis_server(tmp_path)
    try:
        yield server
    finally:
        await server.stop()


def fast_settings(url: str) -> RedisSettings:
    """Short timeouts and backoff so outage tests recover quickly."""
    return parse_redis_url(url, command_timeout=2.0, connect_timeout=2.0, backoff_initial=0.02, backoff_max=0.2)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    async with open_redis(fast_settings(redis_server.url)) as client:
        yield client


@pytest.fixture
async def redis2(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    """A second client on the same server: another "node"."""
    async with open_redis(fast_settings(redis_server.url)) as client:
        yield client
