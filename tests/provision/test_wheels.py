"""The worker wheelhouse: built from the running mbworker for the nodes' platforms (x86_64 and arm64 here),
served over HTTP the way the system node serves it, and installed the way a worker installs it (`--no-index
--require-hashes`, one hash per architecture for compiled projects): the daemon's entry point runs."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mbworker.provision import desired as d
from mbworker.provision.render import NodeContext, user_data
from mbworker.provision.secrets import ClusterSecrets
from mbworker.provision.wheels import build_wheelhouse

from .conftest import make_spec
from .test_render import block


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[functools.partial[str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(directory: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield functools.partial(start)
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.slow
def test_workers_install_the_shipped_wheels_with_hashes_and_no_index(
    tmp_path: Path, serve: functools.partial[str]
) -> None:
    house = build_wheelhouse(tmp_path / "state", ("x86_64", "arm64"))
    assert house.version == "0.1.0"
    names = {w.name for w in house.wheels}
    assert {"mbworker", "trio", "pydantic-core", "wasmtime", "deno"} <= names
    # compiled projects come for both architectures, each pinned by both hashes; pure ones once
    for compiled in ("pydantic-core", "wasmtime", "deno", "hiredis"):
        files = [w.filename for w in house.wheels if w.name == compiled]
        assert any("x86_64" in f for f in files), files
        assert any("aarch64" in f for f in files), files
        (line,) = [r for r in house.requirements().splitlines() if r.startswith(f"{compiled}==")]
        assert line.count("--hash=sha256:") == 2, line
    assert next(w.filename for w in house.wheels if w.name == "trio").endswith("-none-any.whl")
    assert not any("cp312" in w.filename or "cp313" in w.filename for w in house.wheels)  # the nodes' Python 3.11
    assert build_wheelhouse(tmp_path / "state", ("arm64", "x86_64")) == house  # same source: reused, same hashes
    spec = make_spec(worker={"type": "cx33", "count": 1})
    worker = next(s for s in d.desired_servers(spec) if s.role == "worker")
    doc = user_data(spec, worker, ClusterSecrets.generate(), NodeContext(wheels=house, node_token="n" * 64))
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(block(doc, "/etc/mbworker/requirements.txt"))
    url = serve(house.directory)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--require-hashes", "--find-links", url, "--trusted-host", "127.0.0.1", "-r", str(reqs)]  # fmt: skip
    result = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    help_ = subprocess.run([str(venv / "bin" / "mbworker"), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0, help_.stderr[-2000:]
    assert "serve" in help_.stdout
    # a wheel that is not the one pinned is refused
    (house.directory / "mbworker-0.1.0-py3-none-any.whl").write_bytes(b"not the wheel we pinned")
    tampered = subprocess.run([*pip, "--force-reinstall"], capture_output=True, text=True, timeout=600)
    assert tampered.returncode != 0
    assert "hash" in tampered.stderr.lower()
