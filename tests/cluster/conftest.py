"""Fixtures for the cluster tests: clients on the per-test redis-server (`redis_server`, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mbworker.lib.redis import RedisClient, RedisSettings, open_redis, parse_redis_url
from tests.redis_server import RedisServer


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
