"""A rolling upgrade of a real local cluster (`mbworker up`: redis-server, the control plane, the gateway and two
workers, each running from its own venv under the upgrade supervisor, as a cloud worker runs from /opt/mbworker
under systemd): a version the control plane holds no wheels for is refused before any worker changes; once pushed,
`cluster upgrade` moves both workers to it, one at a time, while a request every 50 ms through the gateway never
fails; a third worker added afterwards, from the venv the cluster was created with, starts on the upgraded version
(its supervisor converges it to the cluster's release first). Project secrets set, listed and unset through the
control plane (`secrets … --cluster`).

The second version is this checkout's wheel under a new number (tests/provision/rewheel.py): built once, retagged.
The workers' venvs are copies of the test venv with the built wheel installed in place of the source checkout, so
their dependencies are already there and an upgrade installs only the mbworker wheel (pinned by hash, no index)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from tests.daemon.fixtures import write_function
from tests.provision.local_cluster import run_cli, write_local_spec
from tests.provision.rewheel import build_wheel, retag_wheel

NEW = "0.1.1"


async def _cli(*args: str, timeout: float = 180) -> tuple[int, str]:
    return await run_cli(*args, env={"PATH": "/usr/bin:/bin"}, timeout=timeout)


def _worker_venv(tmp_path: Path) -> tuple[Path, Path]:
    """(a venv whose mbworker is the wheel built from this checkout, a directory holding the NEW wheel)."""
    built = build_wheel(tmp_path / "built")
    venv = tmp_path / "venv"
    shutil.copytree(sys.prefix, venv, symlinks=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
         "--no-deps", "--force-reinstall", str(built)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    new = tmp_path / "wheels-new"
    retag_wheel(built, NEW, new)
    return venv, new


async def _nodes(spec: Path) -> list[dict[str, object]]:
    """The workers as `cluster status -o json` lists them (asked of the API directly: a CLI start is slow)."""
    state = spec.parent / ".mbcluster-demo"
    url = json.loads((state / "control.json").read_text())["url"]
    headers = {"authorization": f"Bearer {(state / 'control_token').read_text().strip()}"}
    async with httpx.AsyncClient(timeout=10, trust_env=False, headers=headers) as http:
        r = await http.get(f"{url}/control/v1/nodes")
    assert r.status_code == 200, r.text
    return [n for n in r.json() if n["role"] == "worker"]


@pytest.mark.slow
async def test_a_rolling_upgrade_of_two_workers_under_load_loses_no_request(tmp_path: Path) -> None:
    venv, new = await trio.to_thread.run_sync(_worker_venv, tmp_path)
    spec = write_local_spec(tmp_path)
    spec.write_text(spec.read_text() + f'worker_venv = "{venv}"\n')  # [local] is the spec's last table
    code, up = await _cli("up", "-c", str(spec), "--workers", "2")
    try:
        assert code == 0, up
        gateway = re.search(r"gateway: (http://127\.0\.0\.1:\d+)", up)
        assert gateway, up
        with trio.fail_after(60):
            while True:  # polled: the first beats may follow `up` by a moment
                nodes = await _nodes(spec)
                if len(nodes) == 2 and all(n["ready"] for n in nodes):
                    break
                await trio.sleep(0.2)
        before = {str(n["name"]): n for n in nodes}
        assert {n["version"] for n in nodes} == {"0.1.0"}  # the wheel, not the checkout, runs
        secrets = json.loads((tmp_path / ".mbcluster-demo" / "secrets.json").read_text())
        anon = jwt.encode({"role": "anon", "exp": 4102444800}, secrets["jwt_secret"], algorithm="HS256")
        fn = write_function(tmp_path / "src", "hello", "Deno.serve(() => new Response('hi'))")
        code, out = await _cli("deploy", str(fn), "--cluster", str(spec))
        assert code == 0, out

        # Not held: refused before any worker is touched.
        code, out = await _cli("cluster", "upgrade", "--version", NEW, "-c", str(spec))
        assert code != 0
        assert f"holds no wheels for mbworker {NEW}" in out, out
        after = {str(n["name"]): n for n in await _nodes(spec)}
        assert {k: (v["version"], v["ready"]) for k, v in after.items()} == {k: ("0.1.0", True) for k in before}

        code, out = await _cli("cluster", "wheels", "push", str(new), "-c", str(spec))
        assert code == 0, out
        assert f"mbworker {NEW}: 1 wheels" in out

        results: list[str] = []
        async with httpx.AsyncClient(
            timeout=10, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        ) as http:

            async def load(done: trio.Event) -> None:
                while not done.is_set():
                    try:
                        r = await http.get(
                            f"{gateway[1]}/functions/v1/hello", headers={"authorization": f"Bearer {anon}"}
                        )
                        results.append(f"{r.status_code} {r.text[:80]}")
                    except httpx.HTTPError as exc:
                        results.append(repr(exc))
                    await trio.sleep(0.05)  # the pace of the load, not a wait for anything

            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, done)
                code, out = await _cli("cluster", "upgrade", "--version", NEW, "-c", str(spec), timeout=600)
                done.set()
        assert code == 0, out
        print(out)
        assert re.search(rf"2 workers upgraded to {re.escape(NEW)} in [0-9.]+s", out), out
        failed = [r for r in results if r != "200 hi"]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
        assert len(results) > 20
        nodes = await _nodes(spec)
        assert [(n["version"], n["ready"]) for n in nodes] == [(NEW, True), (NEW, True)]
        code, out = await _cli("cluster", "audit", "-c", str(spec), "--limit", "20")
        for i in (1, 2):
            for step in ("leave", "request", "drain", "ready"):
                assert f"upgrade demo-worker-{i:03d} {step}" in out, out

        # scale out after the upgrade: the third worker's venv is a copy of the one the cluster was created with
        # (0.1.0), and its supervisor installs the release before it first starts: every beat of it says NEW
        code, out = await _cli("up", "-c", str(spec), "--workers", "3")
        assert code == 0, out
        seen: set[object] = set()
        with trio.fail_after(180):
            while True:  # polled: the new worker installs, then starts and beats
                third = [n for n in await _nodes(spec) if n["name"] == "demo-worker-003"]
                seen |= {n["version"] for n in third}
                if third and third[0]["ready"]:
                    break
                await trio.sleep(0.2)
        assert seen == {NEW}

        # project secrets through the control plane: the store is the cluster's
        code, out = await _cli("secrets", "set", "UPGRADED=yes", "--cluster", str(spec))
        assert (code, "set UPGRADED" in out) == (0, True), out
        code, out = await _cli("secrets", "list", "-o", "json", "--cluster", str(spec))
        assert code == 0, out
        assert [r["name"] for r in json.loads(out)] == ["UPGRADED"]
        code, out = await _cli("secrets", "unset", "UPGRADED", "--cluster", str(spec))
        assert (code, "unset UPGRADED" in out) == (0, True), out
    finally:
        code, down = await _cli("down", "-c", str(spec))
    assert code == 0, down
