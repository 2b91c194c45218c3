"""The worker's upgrade helper (provision/upgrade_helper.py) against a stand-in control plane and service: wheels are
fetched with the node token and checked against the control plane's sha256; a failed install puts the previous
venv back; the daemon is started again whatever happened. Before a daemon starts, the helper converges its node to
the cluster's release (a real pip install of a stand-in wheel), and never keeps it from starting."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from mbworker.provision.upgrade_helper import Config, converge, upgrade
from tests.provision.rewheel import tiny_wheel

TOKEN = "n" * 64
WHEEL = "mbworker-2.0-py3-none-any.whl"


class Service:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def is_active(self) -> bool:
        return False  # the daemon drained and exited

    def stop(self) -> None:
        self.calls.append("stop")

    def start(self) -> None:
        self.calls.append("start")


Control = tuple[str, dict[str, bytes], dict[str, str]]
RELEASE: dict[str, object] = {}
"""What the stand-in control plane answers to `GET /release` (set by each test that asks)."""
ASKED: list[str] = []
LISTING: list[object] = []
"""When set, what the stand-in control plane lists for mbworker 2.0 instead of `files`."""


@pytest.fixture
def control() -> Iterator[Control]:
    """A control plane holding `files` (name → bytes) as mbworker 2.0, listed with their sha256 unless `shas`
    says otherwise, and the release in RELEASE; it answers only the node token. (URL, files, shas)."""
    files: dict[str, bytes] = {}
    listing: dict[str, str] = {}
    RELEASE.clear()
    ASKED.clear()
    LISTING.clear()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            ASKED.append(self.path)
            if self.path == "/control/v1/release":
                body = json.dumps(RELEASE).encode()
            elif self.path == "/control/v1/wheels/2.0" and LISTING:
                body = json.dumps(LISTING).encode()
            elif self.path == "/control/v1/wheels/2.0":
                body = json.dumps([{"filename": n, "sha256": listing.get(n) or hashlib.sha256(d).hexdigest()}
                                   for n, d in files.items()]).encode()  # fmt: skip
            elif self.path.startswith("/control/v1/wheels/2.0/") and self.path.rsplit("/", 1)[1] in files:
                body = files[self.path.rsplit("/", 1)[1]]
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, listing
    server.shutdown()
    server.server_close()


def _setup(tmp_path: Path, url: str) -> tuple[Config, Path]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "mbworker-1.0.dist-info").mkdir()
    (site / "previous.txt").write_text("the install that works")
    return Config(url, TOKEN, venv, tmp_path / "work", drain_timeout_s=5), site


def test_a_failed_install_puts_the_previous_venv_back_and_starts_the_daemon(tmp_path: Path, control: Control) -> None:
    url, files, _ = control
    files[WHEEL] = b"not a wheel at all"
    cfg, site = _setup(tmp_path, url)
    service = Service()
    assert upgrade("2.0", cfg, service) is False  # this venv has no pip: the install fails
    assert (site / "previous.txt").read_text() == "the install that works"
    assert (site / "mbworker-1.0.dist-info").is_dir()
    assert service.calls == ["stop", "start"]
    assert not (tmp_path / "work" / "previous").exists()
    assert not (tmp_path / "work" / "download").exists()


def test_nothing_is_installed_from_a_wheel_that_does_not_match_its_hash_or_without_the_token(
    tmp_path: Path, control: Control, capsys: pytest.CaptureFixture[str]
) -> None:
    url, files, shas = control
    files[WHEEL] = b"the wheel"
    shas[WHEEL] = "0" * 64
    cfg, site = _setup(tmp_path, url)
    service = Service()
    assert upgrade("2.0", cfg, service) is False
    assert "sha256 does not match" in capsys.readouterr().out
    assert service.calls == ["stop", "start"]  # nothing installed, the daemon back on what it had
    assert (site / "previous.txt").exists()
    wrong = Config(url, "x" * 64, cfg.venv, cfg.work_dir, drain_timeout_s=5)
    assert upgrade("2.0", wrong, Service()) is False
    assert "401" in capsys.readouterr().out


def test_a_node_on_the_release_starts_as_it_is_and_one_on_another_version_installs_the_release(
    tmp_path: Path, control: Control, capsys: pytest.CaptureFixture[str]
) -> None:
    url, files, _ = control
    cfg, site = _setup(tmp_path, url)
    RELEASE.update(version="1.0", rolling_to=None)
    assert converge(cfg) == "1.0"
    assert ASKED == ["/control/v1/release"]  # nothing fetched
    RELEASE.update(version="0.9", rolling_to="1.0")  # a rollout to 1.0 runs: this node is not turned back
    assert converge(cfg) == "1.0"
    assert "is the cluster's release" in capsys.readouterr().out

    # another version: the release is fetched and installed first (this venv has no pip: it fails, rolled back)
    RELEASE.update(version="2.0", rolling_to=None)
    files[WHEEL] = b"not a wheel at all"
    assert converge(cfg) == "1.0"
    assert "/control/v1/wheels/2.0" in ASKED
    out = capsys.readouterr().out
    assert "the cluster runs 2.0: installing it before the daemon starts" in out
    assert "putting 1.0 back" in out
    assert (site / "previous.txt").read_text() == "the install that works"
    assert (site / "mbworker-1.0.dist-info").is_dir()


def test_without_the_control_plane_the_daemon_starts_on_what_is_installed(
    tmp_path: Path, control: Control, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, _ = control
    cfg, _ = _setup(tmp_path, url)
    RELEASE.update(nonsense=True)
    assert converge(cfg) == "1.0"
    down = Config("http://127.0.0.1:9", TOKEN, cfg.venv, cfg.work_dir)  # discard port: nothing listens
    assert converge(down) == "1.0"
    out = capsys.readouterr().out
    assert out.count("did not say the cluster's release") == 2
    assert "starting 1.0, converging later" in out


def test_converging_never_raises_whatever_fails_the_daemon_starts_on_what_is_installed(
    tmp_path: Path, control: Control, capsys: pytest.CaptureFixture[str]
) -> None:
    url, files, _ = control
    cfg, site = _setup(tmp_path, url)
    RELEASE.update(version="2.0", rolling_to=None)
    LISTING.append("not an entry")  # item.get: AttributeError
    assert converge(cfg) == "1.0"
    assert "not converged, starting 1.0: AttributeError" in capsys.readouterr().out
    LISTING.clear()
    files[WHEEL] = b"a wheel"
    blocked = Config(url, TOKEN, cfg.venv, tmp_path / "a-file" / "work")  # the download dir cannot be made: OSError
    (tmp_path / "a-file").write_text("")
    assert converge(blocked) == "1.0"
    assert "not converged, starting 1.0: NotADirectoryError" in capsys.readouterr().out
    assert (site / "previous.txt").read_text() == "the install that works"


def test_a_worker_installed_with_the_shipped_version_converges_to_the_release(tmp_path: Path, control: Control) -> None:
    url, files, _ = control
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True)
    shipped = tiny_wheel("1.0", tmp_path / "shipped")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--disable-pip-version-check"]
    subprocess.run([*pip, str(shipped)], check=True, timeout=300, capture_output=True)
    release = tiny_wheel("2.0", tmp_path / "release")
    files[release.name] = release.read_bytes()
    RELEASE.update(version="2.0", rolling_to=None)
    (tmp_path / "token").write_text(TOKEN)
    # as mbworker.service's ExecStartPre runs it: the helper's own file, by a python of the system's, under the
    # unit's umask (0027), which must not make the install unreadable to the unprivileged daemon
    helper = resources.files("mbworker.provision").joinpath("upgrade_helper.py")
    converged = subprocess.run(
        [sys.executable, "-I", str(helper), "--converge", "--control-url", url, "--token-file", str(tmp_path / "token"),
         "--venv", str(venv), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027),
    )  # fmt: skip
    assert converged.returncode == 0, converged.stderr
    assert "installed mbworker 2.0 (was 1.0)" in converged.stdout
    installed = next(venv.glob("lib/python*/site-packages/mbworker/cli/main.py"))
    assert installed.stat().st_mode & 0o777 == 0o644
    done = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", "import mbworker; print(mbworker.__version__)"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "2.0"
    assert not (tmp_path / "work" / "previous").exists()
    assert converge(Config(url, TOKEN, venv, tmp_path / "work")) == "2.0"  # the next start: nothing to do
