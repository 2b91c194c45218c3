"""As a user deploys: `mbworker deploy` of functions using npm packages to a real worker. A package's own .wasm
loads; a throw at load is shown by the deploy at the user's file and line, a throw in a request in the function's
log the same way."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.worker_process import run_worker

BROTLI = "npm:brotli-wasm@3.0.1"  # loads its .wasm with fetch(new URL(..., import.meta.url))
NO_JWT = "verify_jwt = false\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.slow
async def test_deploy_npm_functions_and_read_their_errors(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the deploying machine's Deno cache (the CLI's environment), shared with test_npm_packages
    monkeypatch.setenv("MBWORKER_DENO_DIR", str(tmp_path_factory.getbasetemp() / "mbworker-deno-cache"))
    fns = tmp_path / "supabase" / "functions"
    write(fns / "br" / "function.toml", NO_JWT)
    write(
        fns / "br" / "index.ts",
        f'import ready from "{BROTLI}";\nconst brotli = await ready;\n'
        "Deno.serve((req) => {\n"
        '  const input = new TextEncoder().encode(new URL(req.url).searchParams.get("t") ?? "");\n'
        "  return new Response(new TextDecoder().decode(brotli.decompress(brotli.compress(input))));\n"
        "});\n",
    )
    write(fns / "boom" / "function.toml", NO_JWT)
    write(
        fns / "boom" / "index.ts",
        'import ms from "npm:ms@2.1.3";\n\nconst limit: number = ms("1s");\n'
        'if (limit > 0) {\n  // the line below is line 6\n  throw new Error("boom while loading");\n}\n'
        'Deno.serve(() => new Response("never"));\n',
    )
    write(fns / "oops" / "function.toml", NO_JWT)
    write(
        fns / "oops" / "index.ts",
        'import ms from "npm:ms@2.1.3";\n\ninterface Shape {\n  n: number;\n}\n'
        "Deno.serve((req: Request): Response => {\n"
        '  const s: Shape = { n: ms("2s") };\n'
        '  if (new URL(req.url).searchParams.has("fail")) throw new TypeError(`oops ${s.n}`);\n'
        '  return new Response("fine");\n'
        "});\n",
    )
    async with run_worker(tmp_path / "data") as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
        await w.deploy(fns / "br")
        r = await http.get(f"{w.public_url}/functions/v1/br", params={"t": "hello wasm"})
        assert (r.status_code, r.text) == (200, "hello wasm")

        boom = await w.cli("deploy", str(fns / "boom"))
        assert boom.returncode == 1
        assert "boom while loading" in boom.stderr.decode()
        assert "boom/index.ts:6:9" in boom.stderr.decode()

        await w.deploy(fns / "oops")
        assert (await http.get(f"{w.public_url}/functions/v1/oops")).text == "fine"
        assert (await http.get(f"{w.public_url}/functions/v1/oops", params={"fail": "1"})).status_code == 500
        await w.wait_for_output("oops/index.ts:8:56")  # the worker's own log carries the function's lines too
        logs = (await w.cli("functions", "logs", "oops", check=True)).stdout.decode()
        assert "TypeError: oops 2000" in logs
        assert "oops/index.ts:8:56" in logs
        assert "mbworker.bundle.js" not in logs
