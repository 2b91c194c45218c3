"""The worker's upgrade helper (provision/upgrade_helper.py) against a stand-in control plane and service: wheels are
fetched with the node token and checked against the control plane's sha256; a failed install puts the previous
venv back; the daemon is started again whatever happened."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mbworker.provision.upgrade_helper import Config, upgrade

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


@pytest.fixture
def control() -> Iterator[tuple[str, dict[str, bytes], dict[str, str]]]:
    """A control plane holding `files` (name → bytes) as mbworker 2.0, listed with their sha256 unless `shas`
    says otherwise; it answers only the node token. (URL, files, shas)."""
    files: dict[str, bytes] = {}
    listing: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            if self.path == "/control/v1/wheels/2.0":
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


def test_a_failed_install_puts_the_previous_venv_back_and_starts_the_daemon(
    tmp_path: Path, control: tuple[str, dict[str, bytes], dict[str, str]]
) -> None:
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
    tmp_path: Path, control: tuple[str, dict[str, bytes], dict[str, str]], capsys: pytest.CaptureFixture[str]
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
