"""`mbworker up` as a user runs it, for the tests that start a real local cluster (redis-server, real workers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.conftest import require_binary
from tests.provision.conftest import SPEC_TOML
from tests.provision.test_local import free_base

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "mbworker.cli.main"]


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str]:
    """Run `mbworker <args>` from the checkout; (exit code, stdout + stderr)."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT, env=env
        )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


def write_local_spec(tmp_path: Path) -> Path:
    """A local-provider spec whose workers run this interpreter's mbworker, on free ports, with the real
    redis-server (and Deno from the venv)."""
    redis_server = require_binary("redis-server")
    require_binary("deno", str(ROOT / ".venv" / "bin" / "deno"))
    spec = tmp_path / "local.toml"
    local = (
        f'\n[local]\nworker_command = {json.dumps(CLI)}\nredis_server = "{redis_server}"\nbase_port = {free_base()}\n'
    )
    spec.write_text(SPEC_TOML + local)
    return spec
