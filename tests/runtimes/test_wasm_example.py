"""examples/functions/wasm-echo served by the Wasm runtime: valid JSON for awkward input."""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

from mbworker.runtimes.api import FunctionVersion, Invocation
from mbworker.runtimes.limits import Limits
from mbworker.runtimes.wasm import WasmSettings, compile_module, open_wasm_runtime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "functions" / "wasm-echo"


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_example_compiles_at_deploy() -> None:
    config = tomllib.loads((EXAMPLE / "function.toml").read_text())
    assert (config["runtime"], config["entrypoint"]) == ("wasm", "echo.wat")
    assert compile_module((EXAMPLE / config["entrypoint"]).read_bytes(), True).startswith(b"\x00asm")


async def test_example_echoes_request_as_json() -> None:
    config = tomllib.loads((EXAMPLE / "function.toml").read_text())
    fn = FunctionVersion(
        slug="wasm-echo",
        version=1,
        runtime="wasm",
        bundle_dir=EXAMPLE,
        entrypoint=config["entrypoint"],
        env=config["env"],
        limits=Limits(**config["limits"]),
    )
    body = 'say "hi"\\\n\ttab \x01 ünï'.encode()
    invocation = Invocation(
        method="POST",
        target="/wasm-echo/a/b?x=1&y=%22",
        headers=[(b"host", b"w.test"), (b"x-request-id", b'q"1'), (b"content-type", b"text/plain")],
        body=chunks(body[:5], body[5:]),
        request_id="r1",
    )
    async with open_wasm_runtime(WasmSettings()) as rt, rt.invoke(fn, invocation) as result:
        assert result.status == 200
        assert dict(result.headers)[b"content-type"] == b"application/json"
        data = json.loads(b"".join([c async for c in result.body]))
    assert data == {
        "method": "POST",
        "path": "/a/b",
        "query": "x=1&y=%22",
        "headers": {"host": "w.test", "x-request-id": 'q"1', "content-type": "text/plain"},
        "body": body.decode(),
    }
