"""`InvocationResult.complete_body` from the Wasm runtime: always the whole (buffered) body."""

from __future__ import annotations

from pathlib import Path

from mbworker.runtimes.wasm import WasmRuntime
from tests.runtimes import wasm_modules as wm
from tests.runtimes.test_wasm_runtime import request, runtime, version

__all__ = ["runtime"]  # the fixture, re-exported for pytest


async def test_complete_body_is_the_whole_body_and_the_iterator_agrees(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.printing(b"Content-Type: text/plain\n\nhello"))
    async with runtime.invoke(fn, request()) as result:
        assert result.complete_body == b"hello"
        assert [chunk async for chunk in result.body] == [b"hello"]


async def test_empty_body_is_complete_and_yields_nothing(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = version(tmp_path, wm.printing(b"Status: 204 No Content\n\n"), slug="empty")
    async with runtime.invoke(fn, request("/empty")) as result:
        assert (result.status, result.complete_body) == (204, b"")
        assert [chunk async for chunk in result.body] == []
