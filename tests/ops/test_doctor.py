"""`mbworker doctor`: fails clearly on a missing Deno and a bad data dir, passes on a good node."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

from mbworker.cli.doctor import (
    CheckResult,
    check_data_dir,
    check_ports,
    collect_checks,
    find_deno_binary,
    run_doctor,
)
from mbworker.worker.config import WorkerSettings, load_settings
from tests.conftest import free_port, require_binary
from tests.redis_server import redis_server_running


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MBWORKER_"):
            monkeypatch.delenv(name)


def settings_for(tmp_path: Path, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {"port": free_port(), "admin_port": free_port(), "data_dir": tmp_path / "data"}
    values.update(overrides)
    return load_settings(None, **values)


def by_name(results: list[CheckResult], name: str) -> list[CheckResult]:
    return [r for r in results if r.name == name]


def doctor(settings: WorkerSettings) -> tuple[int, str]:
    out = io.StringIO()
    return run_doctor(settings, out=out), out.getvalue()


def test_healthy_node_passes(tmp_path: Path) -> None:
    path, _ = find_deno_binary(WorkerSettings())
    require_binary("deno", path)
    rc, out = doctor(settings_for(tmp_path))
    assert rc == 0, out
    assert "FAIL" not in out
    for name in ("deno", "wasmtime", "public port", "admin port", "data dir"):
        assert f"OK    {name}" in out
    assert "all good" in out


def test_missing_deno_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBWORKER_DENO", "/nonexistent")
    rc, out = doctor(settings_for(tmp_path))
    assert rc == 1
    (deno,) = by_name(collect_checks(settings_for(tmp_path)), "deno")
    assert deno.status == "FAIL"
    assert "/nonexistent" in deno.detail
    assert "does not exist" in deno.detail
    assert "MBWORKER_DENO" in deno.fix
    assert "FAIL  deno" in out
    assert "fix:" in out


def test_deno_that_does_not_run_fails(tmp_path: Path) -> None:
    fake = tmp_path / "deno"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    (deno,) = by_name(collect_checks(settings_for(tmp_path, deno=fake)), "deno")
    assert deno.status == "FAIL"
    assert "does not run" in deno.detail


def test_data_dir_under_a_regular_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    rc, out = doctor(settings_for(tmp_path, data_dir=blocker / "data"))
    assert rc == 1
    assert "FAIL  data dir" in out
    assert "is a file" in out
    (result,) = check_data_dir(settings_for(tmp_path, data_dir=blocker))
    assert result.status == "FAIL"
    assert "not a directory" in result.detail


def test_data_dir_permissions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "secrets").mkdir(parents=True)
    secret = data / "secrets" / "admin_token"
    secret.write_text("x\n")
    secret.chmod(0o644)
    data.chmod(0o777)
    results = check_data_dir(settings_for(tmp_path, data_dir=data))
    (dir_result,) = by_name(results, "data dir")
    assert dir_result.status == "FAIL"
    assert "world-writable" in dir_result.detail
    secrets = by_name(results, "secrets")
    assert secrets[0].status == "FAIL"
    assert "admin_token" in secrets[0].detail
    assert "chmod 600" in secrets[0].fix

    data.chmod(0o750)
    secret.chmod(0o600)
    (data / "secrets").chmod(0o700)
    results = check_data_dir(settings_for(tmp_path, data_dir=data))
    assert [r.status for r in results if r.name != "disk"] == ["OK", "OK"]


def test_port_in_use_fails(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        public, admin = check_ports(settings_for(tmp_path, port=port))
    assert public.status == "FAIL"
    assert "in use" in public.detail
    assert admin.status == "OK"
    _, same = check_ports(settings_for(tmp_path, port=port, admin_port=port))
    assert same.status == "FAIL"
    assert "both use" in same.detail


async def test_redis_reachable_and_clock(tmp_path: Path) -> None:
    import trio

    async with redis_server_running(tmp_path) as server:
        settings = settings_for(tmp_path, redis_url=server.url)
        results = await trio.to_thread.run_sync(collect_checks, settings)
    (redis,) = by_name(results, "redis")
    assert redis.status == "OK", redis
    (clock,) = by_name(results, "clock")
    assert clock.status == "OK"
    assert "against Redis TIME" in clock.detail


async def test_unreachable_redis_fails(tmp_path: Path) -> None:
    import trio

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    settings = settings_for(tmp_path, redis_url=url)
    results = await trio.to_thread.run_sync(collect_checks, settings)
    (redis,) = by_name(results, "redis")
    assert redis.status == "FAIL"
    assert "unreachable" in redis.detail
    assert "secret" not in redis.detail  # the password is not printed
