from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_binary
from tests.worker_process import RunningWorker, run_worker

BUNDLED_DENO = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "deno")


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[RunningWorker]:
    require_binary("deno", BUNDLED_DENO)
    async with run_worker(tmp_path / "data") as w:
        yield w


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        yield client
