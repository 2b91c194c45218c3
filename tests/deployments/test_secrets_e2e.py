"""`mbworker secrets` as a user runs it against a real worker: every function sees them from its next process
on, `list` never shows a value, a redeploy without --env-file keeps them, and the startup-env rules hold."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import httpx

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.worker_process import run_worker

ECHO = "Deno.serve(() => Response.json({api: Deno.env.get('API_KEY') ?? null, own: Deno.env.get('OWN') ?? null}))"


async def test_secrets_set_list_unset(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    env_file = tmp_path / "fn.env"
    env_file.write_text("OWN=from the env file\nAPI_KEY=own value\n")
    fn = write_function(tmp_path / "src", "echo", ECHO)
    async with run_worker(tmp_path / "data") as w, httpx.AsyncClient(timeout=30, trust_env=False) as http:

        async def seen() -> object:
            return (await http.get(f"{w.public_url}/functions/v1/echo", headers=w.auth())).json()

        await w.deploy(fn)
        assert await seen() == {"api": None, "own": None}
        result = await w.cli("secrets", "set", "API_KEY=s3cret value", "OTHER=x", check=True)
        assert b"API_KEY" in result.stdout
        assert await seen() == {"api": "s3cret value", "own": None}  # the next process has it

        listing = (await w.cli("secrets", "list", check=True)).stdout.decode()
        assert "s3cret" not in listing
        assert hashlib.sha256(b"s3cret value").hexdigest() in listing
        rows = json.loads((await w.cli("secrets", "list", "-o", "json", check=True)).stdout)
        assert [r["name"] for r in rows] == ["API_KEY", "OTHER"]

        # A deploy's own env wins for its names; a redeploy without --env-file keeps the project's.
        await w.deploy(fn, "--env-file", str(env_file))
        assert await seen() == {"api": "own value", "own": "from the env file"}
        (fn / "index.ts").write_text(ECHO + "\n// changed\n")
        await w.deploy(fn)
        assert await seen() == {"api": "s3cret value", "own": None}

        refused = await w.cli("secrets", "set", "LD_PRELOAD=/tmp/evil.so")
        assert refused.returncode == 1
        assert b"LD_PRELOAD" in refused.stderr

        assert b"unset API_KEY" in (await w.cli("secrets", "unset", "API_KEY", "NOPE", check=True)).stdout
        assert await seen() == {"api": None, "own": None}
        stored = w.data_dir / "deployments" / ".secrets.json"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
