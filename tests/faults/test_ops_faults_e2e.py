"""An unlucky operator: a broken config, a port in use, Redis gone, a runtime that cannot start processes.

Real `mbworker serve` subprocesses, a real redis-server, real Deno.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import httpx
import trio

from tests.daemon.conftest import BUNDLED_DENO
from tests.redis_server import RedisServer
from tests.worker_process import MBWORKER, REPO, run_worker


async def _serve_fails(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    with trio.fail_after(60):
        result = await trio.run_process(
            [*MBWORKER, "serve", "--admin-port", "0", "--data-dir", str(tmp_path / "data"), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("MBWORKER_")},
        )
    return result.returncode, result.stderr.decode().splitlines()


async def test_a_bad_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\nmax_request_bytes = 1\n")
    code, lines = await _serve_fails(tmp_path, "--config", str(bad), "--port", "0")
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("mbworker: config file")
    assert "not valid TOML" in lines[0]
    bad.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")  # past Python's recursion limit
    code, lines = await _serve_fails(tmp_path, "--config", str(bad), "--port", "0")
    assert (code, len(lines)) == (2, 1)
    assert "nested too deeply" in lines[0]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, lines = await _serve_fails(tmp_path, "--port", str(taken.getsockname()[1]))
    assert code == 2
    assert not [line for line in lines if "Traceback" in line], lines
    assert [line for line in lines if line.startswith("mbworker:")] == [lines[-1]]
    assert "cannot listen on 127.0.0.1" in lines[-1]
    assert "Address already in use" in lines[-1]


async def test_sighup_with_broken_toml_keeps_the_node_running(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("log_level = 'info'\n")
    async with run_worker(tmp_path / "data", args=("--config", str(config))) as worker, httpx.AsyncClient() as http:
        config.write_text("[limits\n")
        worker.process.send_signal(signal.SIGHUP)
        line = await worker.wait_for_output("reload refused")
        assert "not valid TOML" in line
        assert (await http.get(f"{worker.public_url}/health")).status_code == 200
        assert worker.process.returncode is None


async def _ready(http: httpx.AsyncClient, url: str, status: int, path: str = "/ready") -> dict[str, object]:
    """Ask /ready (or `path`) until it answers `status` (a state change the node notices on its next check)."""
    with trio.fail_after(30):
        while True:
            r = await http.get(f"{url}{path}")
            if r.status_code == status:
                body: dict[str, object] = r.json()
                return body
            await trio.sleep(0.1)  # polling an HTTP endpoint: there is no event to wait for


async def test_ready_follows_redis_and_the_runtime(tmp_path: Path, redis_server: RedisServer) -> None:
    # The Deno binary behind a wrapper the test can make unusable, as an upgrade gone wrong would.
    deno = tmp_path / "deno"
    deno.write_text(f'#!/bin/sh\nexec {BUNDLED_DENO} "$@"\n')
    deno.chmod(0o755)
    env = {"MBWORKER_REDIS_URL": redis_server.url, "MBWORKER_DENO": str(deno)}
    async with run_worker(tmp_path / "data", env=env) as worker, httpx.AsyncClient(timeout=30) as http:
        assert (await _ready(http, worker.public_url, 200))["ready"] is True

        await redis_server.stop()
        body = await _ready(http, worker.public_url, 503)
        assert body["ready"] is False
        assert "redis" in body["problems"]  # type: ignore[operator]
        # the cluster's Redis is every node's: the node-local readiness (the proxy's fallback) leaves it out
        assert (await _ready(http, worker.public_url, 200, "/ready/local"))["ready"] is True
        await redis_server.start()
        await _ready(http, worker.public_url, 200)

        deno.chmod(stat.S_IRUSR)
        body = await _ready(http, worker.public_url, 503)
        assert "runtime deno" in body["problems"]  # type: ignore[operator]
        body = await _ready(http, worker.public_url, 503, "/ready/local")
        assert list(body["problems"]) == ["runtime deno"]  # type: ignore[call-overload]
        deno.chmod(0o755)
        await _ready(http, worker.public_url, 200)
