"""Hostile functions deployed through the CLI into a real `mbworker serve`: each denial asserted from inside.

Packets go only to loopback ports these tests own (the worker's admin port, a listener of the test); the private
ranges are checked with `Deno.permissions.query`, which sends nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import require_binary
from tests.daemon.fixtures import write_function
from tests.hardening.deno_probe import DENO
from tests.processes import deno_processes
from tests.worker_process import run_worker

HOSTILE = (Path(__file__).parent / "hostile.ts").read_text()
FORBIDDEN_FLAGS = ("-A", "--allow-all", "--allow-run", "--allow-ffi", "--allow-sys", "--allow-import")


@dataclass
class Service:
    """A TCP listener on 127.0.0.1 standing in for an internal service (PostgreSQL, Redis): counts connections."""

    port: int
    accepted: list[str]


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    svc = Service(listeners[0].socket.getsockname()[1], [])

    async def accept() -> None:
        while True:
            stream = await listeners[0].accept()
            svc.accepted.append("connection")
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        yield svc
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        yield client


async def test_hostile_function_can_reach_nothing_of_ours(
    tmp_path: Path, http: httpx.AsyncClient, service: Service
) -> None:
    require_binary("deno", DENO)
    data = (tmp_path / "data").resolve()
    async with run_worker(data) as worker:
        victim = write_function(
            tmp_path, "victim", "Deno.serve(() => new Response('victim'))", toml='[env]\nVICTIM_SECRET = "s3cret"\n'
        )
        await worker.deploy(victim)
        await worker.deploy(write_function(tmp_path, "hostile", HOSTILE))
        narrow_toml = '[net]\nallow = ["api.example.com:443", "127.0.0.1:' + str(service.port) + '"]\n'
        await worker.deploy(write_function(tmp_path, "narrow", HOSTILE, toml=narrow_toml))
        (victim_bundle,) = (data / "deployments").glob("victim/**/bundle")
        r = await http.get(f"{worker.public_url}/functions/v1/victim", headers=worker.auth())
        assert r.text == "victim"  # its process runs and its temp dir exists
        (victim_tmp,) = (data / "scratch" / "deno").glob("run-*/victim-*/tmp/p*")  # that process's own
        (victim_tmp / "planted.txt").write_text("victim's file")
        admin_port = worker.admin_url.rsplit(":", 1)[1]
        params = {
            "admin": admin_port,
            "svc": str(service.port),
            "other_bundle": str(victim_bundle),
            "other_tmp": str(victim_tmp),
            "data": str(data),
        }
        r = await http.get(f"{worker.public_url}/functions/v1/hostile", params=params, headers=worker.auth())
        assert r.status_code == 200, r.text
        report = r.json()
        r = await http.get(f"{worker.public_url}/functions/v1/narrow", params=params, headers=worker.auth())
        assert r.status_code == 200, r.text
        narrow = r.json()
        command_lines = list(deno_processes(data).values())

    outcomes = report["outcomes"]
    allowed = {"read own bundle", "write own tmp"}
    assert {k: v for k, v in outcomes.items() if k in allowed} == dict.fromkeys(allowed, "allowed")
    assert {k: v for k, v in outcomes.items() if k not in allowed} == {
        k: "denied" for k in outcomes if k not in allowed
    }
    assert len(outcomes) > 25
    assert service.accepted == []  # not one connection reached the "internal service"
    assert not (victim_tmp / "evil.txt").exists()
    assert not (data / "evil.txt").exists()

    states = report["states"]
    for private in ("10.0.0.5:5432", "172.16.0.1:443", "192.168.1.1:80", "100.64.0.1:80", "169.254.169.254:80",
                    "metadata.google.internal:80", f"[::1]:{admin_port}"):  # fmt: skip
        assert states[private] == "denied", private
    for public in ("example.com:443", "8.8.8.8:53", "api.example.com:443"):
        assert states[public] == "granted", public  # outbound internet stays open by default

    env = set(report["env"])
    assert "VICTIM_SECRET" not in env
    assert not {"HOME", "PATH", "USER", "PWD"} & env
    assert not [k for k in env if k.startswith("MBWORKER_")]

    # [net] allow narrows: only the listed host; listing a loopback service does not open it
    assert narrow["states"]["api.example.com:443"] == "granted"
    assert narrow["states"]["example.com:443"] != "granted"
    assert narrow["states"]["8.8.8.8:53"] != "granted"
    assert narrow["outcomes"]["fetch service"] == "denied"
    assert narrow["outcomes"]["connect service"] == "denied"

    assert len(command_lines) >= 3
    for argv in command_lines:
        flags = [a for a in argv if a.startswith("-")]
        for forbidden in FORBIDDEN_FLAGS:
            assert not any(f == forbidden or f.startswith(forbidden + "=") for f in flags), (forbidden, argv)
        (deny,) = [f for f in flags if f.startswith("--deny-net=")]
        assert "127.0.0.0/8" in deny.split("=", 1)[1].split(",")
        assert "10.0.0.0/8" in deny.split("=", 1)[1].split(",")
    narrow_allow = f"--allow-net=api.example.com:443,127.0.0.1:{service.port},mbworker-node.invalid"
    narrow_flags = [f for argv in command_lines for f in argv if f.startswith("--allow-net=")]
    assert [f.split(",unix:")[0] for f in narrow_flags] == [narrow_allow]  # only its own node:http socket added
