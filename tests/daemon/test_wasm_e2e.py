"""The Wasm examples through the real daemon and CLI: compiled from their .wat source at deploy."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.worker_process import RunningWorker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "functions"


async def test_wasm_examples_deploy_and_answer(worker: RunningWorker, http: httpx.AsyncClient) -> None:
    await worker.deploy(EXAMPLES / "wasm-hello")
    await worker.deploy(EXAMPLES / "wasm-echo")
    r = await http.get(f"{worker.public_url}/functions/v1/wasm-hello", headers=worker.auth())
    assert r.status_code == 200
    assert r.json() == {"message": "Hello from Wasm!"}
    assert r.headers["content-type"] == "application/json"
    r = await http.post(f"{worker.public_url}/functions/v1/wasm-echo/x/y?a=1&b=2", content=b"hi there")
    assert r.status_code == 200
    echoed = r.json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == (
        "POST",
        "/x/y",
        "a=1&b=2",
        "hi there",
    )
    r = await http.get(f"{worker.public_url}/functions/v1/wasm-hello")
    assert r.status_code == 401  # the same JWT gate as Deno functions


async def test_invalid_module_is_refused_at_deploy(worker: RunningWorker, tmp_path: Path) -> None:
    fn = tmp_path / "broken"
    fn.mkdir()
    (fn / "function.toml").write_text('runtime = "wasm"\nentrypoint = "broken.wat"\n')
    (fn / "broken.wat").write_text('(module (func (export "_start") (i32.add)))')
    result = await worker.cli("deploy", str(fn))
    assert result.returncode != 0
    assert b"422" in result.stderr
    assert b"MODULE_REJECTED" in result.stderr
