from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    require_binary("deno", BUNDLED_DENO)
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        yield client
