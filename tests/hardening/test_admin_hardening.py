"""The admin API: nothing without the token (every route), bounded bodies, and no public bind without a flag."""

from __future__ import annotations

import hmac
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from mbworker.worker.config import WorkerSettings, is_private_bind_address, load_settings
from mbworker.worker.daemon import function_net_policy
from mbworker.worker.errors import ConfigError
from tests.conftest import free_port, require_binary
from tests.daemon.fixtures import write_function
from tests.hardening.deno_probe import DENO
from tests.worker_process import REPO, run_worker

ROUTES = [
    ("GET", "/admin/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/admin/v1/functions"),
    ("GET", "/admin/v1/functions/secretfn"),
    ("GET", "/admin/v1/functions/secretfn/logs"),
    ("POST", "/admin/v1/functions/secretfn/deploy"),
    ("PUT", "/admin/v1/functions/secretfn"),
    ("POST", "/admin/v1/functions/secretfn/rollback"),
    ("DELETE", "/admin/v1/functions/secretfn"),
    ("POST", "/admin/v1/drain"),
    ("POST", "/admin/v1/cache/purge"),
    ("GET", "/admin/v1/no-such-route"),
    ("GET", "/"),
]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        yield client


async def test_admin_answers_nothing_without_the_token_and_bounds_bodies(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    require_binary("deno", DENO)
    async with run_worker(tmp_path / "data", env={"MBWORKER_MAX_BUNDLE_MB": "1"}) as worker:
        await worker.deploy(write_function(tmp_path, "secretfn", "Deno.serve(() => new Response('alive'))"))
        token = worker.admin_token
        bad_headers = [
            {},
            {"authorization": ""},
            {"authorization": "Bearer"},
            {"authorization": f"Basic {token}"},
            {"authorization": f"Bearer {token}x"},
            {"authorization": f"Bearer {token[:-1]}"},
            {"authorization": f"Bearer {worker.service_role_key}"},  # the project's keys are not admin tokens
        ]
        for method, path in ROUTES:
            for headers in bad_headers:
                r = await http.request(method, worker.admin_url + path, headers=headers, content=b"{}")
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["code"] == "UNAUTHORIZED"
                assert "secretfn" not in r.text
        # nothing happened: the function is still deployed and the worker is not draining
        r = await http.get(f"{worker.public_url}/functions/v1/secretfn", headers=worker.auth())
        assert r.text == "alive"

        admin = {"authorization": f"Bearer {token}"}
        r = await http.get(f"{worker.admin_url}/admin/v1/functions", headers=admin)
        assert r.status_code == 200
        assert "secretfn" in r.text  # the same request with the token does answer
        big = b"x" * (1024 * 1024 + 1024)  # over the 1 MiB bundle cap
        assert await raw_post_status(worker.admin_url, "/admin/v1/functions/other/deploy", token, big) == 413
        small_cap = b'{"version": 1, "pad": "' + b"x" * (70 * 1024) + b'"}'  # over the 64 KiB JSON cap
        for path in ("/admin/v1/functions/secretfn/rollback", "/admin/v1/cache/purge"):
            r = await http.post(worker.admin_url + path, headers=admin, content=small_cap)
            assert r.status_code == 413, path


async def raw_post_status(base_url: str, path: str, token: str, body: bytes) -> int:
    """POST over a raw socket (the server may answer 413 before reading the body, which httpx reports as an
    unfinished upload); returns the response status."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(head)
            try:
                await stream.send_all(body)
            except trio.BrokenResourceError:
                pass  # answered and closed before the whole body was read: fine
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                data += chunk
    return int(data.split(b" ", 2)[1])


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mbworker.worker.admin import AdminApp

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)

    class Req:
        def header(self, name: bytes) -> bytes | None:
            return b"Bearer guess" if name == b"authorization" else None

    app = AdminApp.__new__(AdminApp)
    app._token = b"the-token"
    assert not app._authorized(Req())  # type: ignore[arg-type]
    assert calls == [(b"guess", b"the-token")]


@pytest.mark.parametrize(
    ("host", "private"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("10.0.1.5", True),
        ("172.20.0.2", True),
        ("192.168.7.7", True),
        ("100.64.3.3", True),
        ("169.254.1.1", True),
        ("fd12::5", True),
        ("fe80::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("49.12.3.4", False),
        ("8.8.8.8", False),
        ("2a01:4f8::2", False),
        ("no-such-host.invalid", False),
    ],
)
def test_admin_bind_classification(host: str, private: bool) -> None:
    assert is_private_bind_address(host) is private


def test_public_admin_bind_needs_the_flag() -> None:
    for host in ("0.0.0.0", "::", "49.12.3.4"):
        with pytest.raises(ConfigError, match="admin_host"):
            load_settings(admin_host=host)
        assert load_settings(admin_host=host, admin_allow_public=True).admin_host == host
    assert load_settings(admin_host="10.0.1.5").admin_host == "10.0.1.5"


async def test_serve_refuses_a_public_admin_address(tmp_path: Path) -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "mbworker.cli.main", "serve", "--admin-host", "0.0.0.0", "--admin-port",
             str(free_port()), "--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert result.returncode != 0
    assert b"--admin-public" in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_invalid_net_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="net_deny"):
        load_settings(net_deny=["fc00::/7"])
    with pytest.raises(ConfigError, match="net_deny"):
        load_settings(net_allow_private=["db.internal:5432"])


def test_a_data_dir_with_a_comma_is_refused(tmp_path: Path) -> None:
    # Deno's permission lists are comma-separated: functions could not be granted their own bundle
    with pytest.raises(ConfigError, match="comma"):
        load_settings(data_dir=tmp_path / "a,b")
    assert load_settings(data_dir=tmp_path / "a-b").data_dir == tmp_path / "a-b"


def test_daemon_denies_its_own_services_whatever_their_range() -> None:
    settings = WorkerSettings(
        admin_host="0.0.0.0",
        admin_allow_public=True,
        redis_url="redis://:pw@203.0.113.7:6390/0",
        net_deny=["198.51.100.20:5432", "[2001:db8::5]"],
        net_allow_private=["10.0.5.7:5432"],
    )
    policy = function_net_policy(settings)
    assert "203.0.113.7" in policy.deny  # Redis, every port, though it is a public address
    assert "198.51.100.20:5432" in policy.deny
    assert "[2001:db8::5]" in policy.deny
    assert policy.allow_private == ("10.0.5.7:5432",)
    with_names = function_net_policy(WorkerSettings(redis_url="redis://localhost:6379", admin_host="localhost"))
    assert "localhost" in with_names.deny
    assert "127.0.0.1" in with_names.deny
