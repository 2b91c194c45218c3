"""`functions new` then `mbworker dev`, as a user runs them: real daemon, real Deno, temp dirs, free ports.

The dev loop redeploys a saved function, shows a boot error with the user's own file and line, keeps the last
good version serving while the new one is broken, and reads supabase/functions/.env the way Supabase does.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tomllib
from pathlib import Path

import httpx
import trio

from tests.conftest import free_port
from tests.worker_process import MBWORKER, run_worker

ENV_ECHO = 'Deno.serve((_req: Request) => new Response(Deno.env.get("GREETING") ?? "unset"));\n'


async def mbworker(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [*MBWORKER, *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
        )


async def test_new_makes_a_supabase_style_folder(tmp_path: Path) -> None:
    done = await mbworker(tmp_path, "functions", "new", "hello-world")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "supabase" / "functions" / "hello-world"
    assert sorted(p.name for p in folder.iterdir()) == ["deno.json", "function.toml", "index.ts"]
    source = (folder / "index.ts").read_text()
    assert "Deno.serve(async (req: Request): Promise<Response> =>" in source
    assert json.loads((folder / "deno.json").read_text()) == {"imports": {}}
    # every setting is shown commented out at its default, so the file as it stands changes nothing
    assert tomllib.loads((folder / "function.toml").read_text()) == {}
    assert "# verify_jwt = true" in (folder / "function.toml").read_text()

    again = await mbworker(tmp_path, "functions", "new", "hello-world")
    assert again.returncode == 2
    assert b"already exists" in again.stderr
    bad = await mbworker(tmp_path, "functions", "new", "9lives", "--dir", "fns")
    assert bad.returncode == 2
    assert b"invalid function name" in bad.stderr
    assert not (tmp_path / "fns").exists()


async def test_dev_redeploys_on_save_and_keeps_the_last_good_version(tmp_path: Path, http: httpx.AsyncClient) -> None:
    assert (await mbworker(tmp_path, "functions", "new", "hello")).returncode == 0
    functions = tmp_path / "supabase" / "functions"
    (functions / "env-echo").mkdir()
    (functions / "env-echo" / "index.ts").write_text(ENV_ECHO)
    (functions / ".env").write_text("GREETING=from the dot env\n")
    index = functions / "hello" / "index.ts"

    async with run_worker(tmp_path / "data", command=("dev",), cwd=tmp_path) as w:
        await w.wait_for_output("watching")
        url = f"{w.public_url}/functions/v1"
        # the template answers as it stands: GET with a query, POST with JSON (as its comment shows)
        r = await http.get(f"{url}/hello?name=Ada", headers=w.auth())
        assert r.json() == {"message": "Hello Ada!"}
        r = await http.post(f"{url}/hello", json={"name": "Functions"}, headers=w.auth())
        assert r.json() == {"message": "Hello Functions!"}
        assert (await http.get(f"{url}/env-echo", headers=w.auth())).text == "from the dot env"

        index.write_text(index.read_text().replace("Hello ${name}", "Howdy ${name}"))
        await w.wait_for_output("✓ hello v2 live")
        assert (await http.get(f"{url}/hello?name=Ada", headers=w.auth())).json() == {"message": "Howdy Ada!"}

        index.write_text(index.read_text() + '\nthrow new Error("half-saved");\n')
        await w.wait_for_output("hello v3 failed to boot")
        await w.wait_for_output("(v2 keeps serving)")
        # the trace names the user's file and line, not the worker's unpacked copy
        line = index.read_text().splitlines().index('throw new Error("half-saved");') + 1
        await w.wait_for_output(f"{index}:{line}:")
        assert (await http.get(f"{url}/hello?name=Ada", headers=w.auth())).json() == {"message": "Howdy Ada!"}

        # a save that fixes it goes live (as v3: the failed attempt gave its number back); a changed .env reaches
        # every function (each gets the file's secrets)
        index.write_text(index.read_text().replace('throw new Error("half-saved");', ""))
        await w.wait_for_output("✓ hello v3 live")
        (functions / "_shared").mkdir()
        (functions / "_shared" / "note.txt").write_text("not imported by anyone")
        (functions / ".env").write_text("GREETING=changed\n")
        await w.wait_for_output("✓ env-echo v2 live")
        await w.wait_for_output("✓ hello v4 live")
        assert (await http.get(f"{url}/env-echo", headers=w.auth())).text == "changed"
        # a file no function ships changes no bundle: nothing was deployed for it
        assert sum("live (" in line for line in w.output) == 6


async def test_functions_serve_one_folder_follows_its_shared_imports(tmp_path: Path, http: httpx.AsyncClient) -> None:
    functions = tmp_path / "supabase" / "functions"
    (functions / "_shared").mkdir(parents=True)
    (functions / "_shared" / "greeting.ts").write_text('export const greeting = "hi";\n')
    (functions / "greet").mkdir()
    (functions / "greet" / "index.ts").write_text(
        'import { greeting } from "../_shared/greeting.ts";\nDeno.serve(() => new Response(greeting));\n'
    )
    folder = str(functions / "greet")
    async with run_worker(
        tmp_path / "data", command=("functions", "serve", folder, "--watch", "--no-verify-jwt"), cwd=tmp_path
    ) as w:
        await w.wait_for_output(f"watching {folder}, {functions / '_shared' / 'greeting.ts'}")
        assert (await http.get(f"{w.public_url}/functions/v1/greet")).text == "hi"  # --no-verify-jwt: no key
        (functions / "_shared" / "greeting.ts").write_text('export const greeting = "hello again";\n')
        await w.wait_for_output("✓ greet v2 live")
        assert (await http.get(f"{w.public_url}/functions/v1/greet")).text == "hello again"


async def test_dev_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = await mbworker(tmp_path, "dev", "--port", port, "--admin-port", str(free_port()), "--data-dir", "d")
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0]
