"""`mbworker up` as a user runs it: the venv's own script with the venv not on PATH, a local-only spec without
Hetzner locations or server types, the real daemon; it prints where the keys and the admin token are."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import trio

from tests.conftest import require_binary
from tests.daemon.fixtures import write_function
from tests.provision.test_local import free_base

SCRIPT = str(Path(sys.executable).parent / "mbworker")
BARE_PATH = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    with trio.fail_after(180):
        done = await trio.run_process(
            [SCRIPT, *args], capture_stdout=True, capture_stderr=True, check=False, env={**BARE_PATH, **(env or {})}
        )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def test_up_from_the_venv_with_a_local_only_spec(tmp_path: Path, http: httpx.AsyncClient) -> None:
    redis_server = require_binary("redis-server")
    spec = tmp_path / "cluster.toml"
    spec.write_text(f'name = "mini"\n\n[local]\nredis_server = "{redis_server}"\nbase_port = {free_base()}\n')
    code, up = await run("up", "-c", str(spec), "--workers", "1")
    try:
        assert code == 0, up
        state = tmp_path / ".mbcluster-mini"
        keys_file = state / "local" / "worker-1" / "secrets" / "keys.env"
        assert f"keys: in {keys_file} (ANON_KEY, SERVICE_ROLE_KEY" in up
        assert f"admin token: in {state / 'secrets.json'} (admin_token" in up
        secrets = json.loads((state / "secrets.json").read_text())
        keys = dict(line.split("=", 1) for line in keys_file.read_text().splitlines())
        for value in (secrets["admin_token"], keys["ANON_KEY"], keys["SERVICE_ROLE_KEY"]):
            assert value not in up  # stdout is not a terminal: locations only

        admin = re.search(r"worker-1: http://127\.0\.0\.1:\d+ \(admin :(\d+)\)", up)
        gateway = re.search(r"gateway: (http://127\.0\.0\.1:\d+)", up)
        assert admin, up
        assert gateway, up
        fn = write_function(tmp_path / "src", "up-hello", "Deno.serve(() => new Response('up and serving'))")
        code, out = await run(
            "deploy",
            str(fn),
            env={"MBWORKER_ADMIN_URL": f"http://127.0.0.1:{admin[1]}", "MBWORKER_ADMIN_TOKEN": secrets["admin_token"]},
        )
        assert code == 0, out
        r = await http.get(
            f"{gateway[1]}/functions/v1/up-hello", headers={"authorization": f"Bearer {keys['ANON_KEY']}"}
        )
        assert (r.status_code, r.text) == (200, "up and serving")
    finally:
        code, down = await run("down", "-c", str(spec))
        assert code == 0, down
