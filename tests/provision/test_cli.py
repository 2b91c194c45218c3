"""The provision CLI: `python -m provision provision …` against the fake API; secrets never reach the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbworker.provision.cli import main, set_count_in_file
from tests.conftest import require_binary

from .conftest import SPEC_TOML, FakeNodeOps, fake_wheelhouse
from .fake_hcloud import FakeHcloud

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(SPEC_TOML)
    return path


@pytest.fixture
def cli_env(fake: FakeHcloud, monkeypatch: pytest.MonkeyPatch) -> FakeHcloud:
    monkeypatch.setenv("HCLOUD_TOKEN", "test-token")
    monkeypatch.setenv("HCLOUD_ENDPOINT", fake.endpoint)
    return fake


def run(spec_file: Path, *argv: str, ops: FakeNodeOps | None = None) -> int:
    wheels = fake_wheelhouse(spec_file.parent / "wheels")
    argv_ = ["provision", *argv, "-c", str(spec_file), "--poll-interval", "0"]
    return main(argv_, node_ops=ops or FakeNodeOps(), wheelhouse=wheels)


def secret_values(spec_file: Path) -> list[str]:
    return list(json.loads((spec_file.parent / ".mbcluster-demo" / "secrets.json").read_text()).values())


def test_plan_apply_reapply_scale_destroy(
    spec_file: Path, cli_env: FakeHcloud, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(spec_file, "plan") == 0
    out = capsys.readouterr().out
    assert "+ create    server          demo-worker-003" in out
    assert "Summary: 23 to create, 10 to change" in out

    assert run(spec_file, "apply", "--yes") == 0
    out = capsys.readouterr().out
    assert "[33/33] change wheelhouse demo-system" in out
    assert "done: 33 step(s)" in out

    cli_env.clear_log()
    assert run(spec_file, "apply", "--yes") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli_env.mutations() == []

    ops = FakeNodeOps()
    assert run(spec_file, "scale", "worker=1", "--yes", ops=ops) == 0
    assert [n.name for n in ops.drained] == ["demo-worker-003", "demo-worker-002"]
    assert "count = 1" in spec_file.read_text().split("[worker]")[1].split("[state]")[0]
    assert run(spec_file, "plan") == 0
    assert "nothing to do" in capsys.readouterr().out

    assert run(spec_file, "destroy", "--yes") == 0
    assert cli_env.servers() == []
    out, err = capsys.readouterr()
    for value in secret_values(spec_file):
        assert value not in out
        assert value not in err


def test_undrainable_exit_code(spec_file: Path, cli_env: FakeHcloud, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(spec_file, "apply", "--yes") == 0
    code = run(spec_file, "scale", "worker=2", "--yes", ops=FakeNodeOps(undrainable=("demo-worker-003",)))
    assert code == 3
    assert "not deleted: demo-worker-003" in capsys.readouterr().out


def test_refuses_without_yes_when_not_a_terminal(
    spec_file: Path, cli_env: FakeHcloud, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115
    try:
        assert run(spec_file, "apply") == 1
    finally:
        sys.stdin.close()
    assert "refusing to apply without --yes" in capsys.readouterr().err
    assert cli_env.mutations() == []


def test_errors_are_one_line_without_traceback(
    spec_file: Path, cli_env: FakeHcloud, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_file.write_text(SPEC_TOML.replace('[state]\ntype = "ccx13"\ncount = 3', '[state]\ntype = "ccx13"\ncount = 2'))
    assert run(spec_file, "plan") == 1
    assert "error: invalid cluster spec:\n  state.count: state count must be 1, 3 or 5" in capsys.readouterr().err
    monkeypatch.delenv("HCLOUD_TOKEN")
    spec_file.write_text(SPEC_TOML)
    assert run(spec_file, "plan") == 1
    assert "set HCLOUD_TOKEN" in capsys.readouterr().err


def test_set_count_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n\n[worker]\n# how many\ntype = "cx33"\ncount = 3\n\n[state]\ncount = 3\n')
    set_count_in_file(path, "worker", 7)
    assert path.read_text() == 'name = "x"\n\n[worker]\n# how many\ntype = "cx33"\ncount = 7\n\n[state]\ncount = 3\n'
    set_count_in_file(path, "state", 5)
    assert path.read_text().endswith("[state]\ncount = 5\n")


def test_python_m_provision_runs_as_a_program(spec_file: Path, fake: FakeHcloud) -> None:
    env = dict(os.environ, HCLOUD_TOKEN="test-token", HCLOUD_ENDPOINT=fake.endpoint, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "provision", "provision", "plan", "-c", str(spec_file), "--poll-interval", "0"],
        capture_output=True, text=True, timeout=60, env=env, cwd=spec_file.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Plan for cluster 'demo' (hetzner):" in result.stdout
    assert not any(v in result.stdout + result.stderr for v in secret_values(spec_file))


def test_up_and_down_locally_print_urls_not_secrets(tmp_path: Path) -> None:
    from .test_local import STANDIN, free_base

    redis_server = require_binary("redis-server")
    spec = tmp_path / "local.toml"
    spec.write_text(
        SPEC_TOML
        + f"""
[local]
worker_command = {json.dumps(STANDIN)}
redis_server = "{redis_server}"
base_port = {free_base()}
"""
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    up = subprocess.run([sys.executable, "-m", "provision", "up", "-c", str(spec), "--workers", "2"],
                        capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    down = subprocess.run([sys.executable, "-m", "provision", "down", "-c", str(spec)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    assert down.returncode == 0, down.stdout + down.stderr
    assert "   gateway: http://127.0.0.1:" in up.stdout
    assert "  worker-2: http://127.0.0.1:" in up.stdout
    for value in secret_values(spec):
        assert value not in up.stdout + up.stderr + down.stdout + down.stderr
    records = json.loads((tmp_path / ".mbcluster-demo" / "local" / "processes.json").read_text())
    assert records == {}
