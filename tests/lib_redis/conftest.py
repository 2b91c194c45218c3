"""Fixtures for the Redis client tests (the `redis_server` fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from tests.conftest import free_port


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
