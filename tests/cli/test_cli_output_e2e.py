"""The CLI as a user reads it: the serve banner off a terminal, list/versions tables and JSON, `| head`."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio

from mbworker.cli.banner import banner_lines
from mbworker.cli.output import human_time
from tests.worker_process import MBWORKER, REPO, run_worker

HELLO = REPO / "examples" / "functions" / "hello"


def test_human_time() -> None:
    now = 1_000_000.0
    assert human_time(int((now - 5) * 1000), now=now) == "5s ago"
    assert human_time(int((now - 300) * 1000), now=now) == "5m ago"
    assert human_time(int((now - 7200) * 1000), now=now) == "2h ago"
    assert human_time(int((now - 3 * 86400) * 1000), now=now) == "3d ago"
    assert human_time(0, now=now) == "-"
    assert human_time(86400 * 1000, now=now * 100) == "1970-01-02 00:00 UTC"


async def test_banner_off_a_terminal_and_tables(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with run_worker(tmp_path / "data", args=("--deploy", str(HELLO))) as w:
        banner = "\n".join(w.output)
        # stdout is a pipe (as under systemd): no key is printed, the banner says where they are
        assert w.anon_key not in banner
        assert w.service_role_key not in banner
        assert f"Keys          : in {w.data_dir.resolve() / 'secrets' / 'keys.env'}" in banner
        assert f"Admin token   : in {w.data_dir.resolve() / 'secrets' / 'admin_token'} (mode 0600)" in banner
        # the suggested curl line is complete: bash expands it to the real key and URL
        try_line = next(line for line in w.output if line.strip().startswith("Try"))
        command = try_line.split(":", 1)[1].strip()
        assert command.startswith("curl -H ")
        printed = await trio.run_process(
            ["bash", "-c", "printf '%s\\n' " + command.removeprefix("curl ")], capture_stdout=True, check=True
        )
        expanded = printed.stdout.decode()
        flag, header, url = expanded.splitlines()
        assert (flag, header) == ("-H", f"Authorization: Bearer {w.anon_key}")
        assert (await http.get(url, headers=dict([header.split(": ", 1)]))).json() == {"message": "Hello Ada!"}
        assert "1 functions live (0 restored from the store)" in banner

        await w.deploy(HELLO)
        # npm: packages are resolved here, before the upload: the deploy says so while it waits
        npm = await w.cli("deploy", str(REPO / "examples" / "functions" / "npm-dep"), check=True)
        assert b"npm-dep: resolving its packages" in npm.stderr
        assert b"npm-dep: resolved in " in npm.stderr
        assert b"npm-dep v1" in npm.stdout
        listing = (await w.cli("functions", "list", check=True)).stdout.decode().splitlines()
        assert listing[0].split() == ["NAME", "VERSION", "STATUS", "RUNTIME", "VERIFY_JWT", "UPDATED"]
        assert listing[1].split()[:5] == ["hello", "2", "ACTIVE", "deno", "True"]
        assert listing[1].endswith("s ago")
        rows = json.loads((await w.cli("functions", "list", "-o", "json", check=True)).stdout)
        assert [(r["slug"], r["version"]) for r in rows] == [("hello", 2), ("npm-dep", 1)]
        versions = (await w.cli("functions", "versions", "hello", check=True)).stdout.decode().splitlines()
        assert [line.split()[:2] for line in versions[1:]] == [["2", "ACTIVE"], ["1", "INACTIVE"]]
        missing = await w.cli("functions", "versions", "nope")
        assert missing.returncode == 1
        assert b"No function 'nope'" in missing.stderr

        # the reader of stdout has gone (`| head` closed it): a quiet exit, no traceback
        read, write = os.pipe()
        os.close(read)
        with trio.fail_after(60):
            done = await trio.run_process(
                [*MBWORKER, "functions", "list"], env=w.cli_env(), stdout=write, capture_stderr=True, check=False
            )
        os.close(write)
        assert done.stderr == b""
        assert done.returncode == 141
        shell = await trio.run_process(
            ["bash", "-c", f"{shlex.join([*MBWORKER, '--help'])} | head -1"], capture_stdout=True, capture_stderr=True
        )
        assert shell.stderr == b""


NURSERY_WRITER = """
import sys, trio
from mbworker.cli.output import exit_quietly_on_broken_pipe

async def main() -> None:
    async with trio.open_nursery():
        print("x" * 70000, flush=True)

def run() -> int:
    trio.run(main)
    return 0

sys.exit(exit_quietly_on_broken_pipe(run))
"""


async def test_broken_pipe_inside_a_nursery_ends_quietly() -> None:
    """`mbworker dev | head`: the write that fails happens inside Trio, which raises it in an exception group."""
    read, write = os.pipe()
    os.close(read)
    try:
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-c", NURSERY_WRITER], stdout=write, capture_stderr=True, check=False
            )
    finally:
        os.close(write)
    assert done.stderr == b""
    assert done.returncode == 141


def test_banner_prints_keys_only_to_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SimpleNamespace(data_dir=tmp_path, admin_token=None)
    keys = SimpleNamespace(anon_key="anon.jwt.value", service_role_key="service.jwt.value")
    handle = SimpleNamespace(
        keys=keys,
        settings=settings,
        public_url="http://127.0.0.1:8000",
        admin_url="http://127.0.0.1:8001",
        deployer=SimpleNamespace(table=SimpleNamespace(slugs=lambda: ["hello"])),
    )
    on_tty = "\n".join(banner_lines(handle, tty=True))
    assert "anon key      : anon.jwt.value" in on_tty
    assert "service_role key: service.jwt.value" in on_tty
    assert (
        "curl -H 'Authorization: Bearer anon.jwt.value' 'http://127.0.0.1:8000/functions/v1/hello?name=Ada'" in on_tty
    )
    off_tty = "\n".join(banner_lines(handle, tty=False))
    assert "jwt.value" not in off_tty
    settings.admin_token = "set"
    monkeypatch.setenv("MBWORKER_ADMIN_TOKEN", "set")
    assert "  Admin token   : from MBWORKER_ADMIN_TOKEN" in banner_lines(handle, tty=False)
