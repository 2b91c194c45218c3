"""Fixtures for the realtime tests on Redis: a client on the per-test redis-server (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mbworker.lib.redis import RedisClient, open_redis
from tests.redis_server import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    async with open_redis(redis_server.url) as client:
        yield client
