"""Wasm sandboxes: no preopened directories, no sockets, no environment beyond WAGI's, nothing shared between
functions. Runs the real wasmtime runtime in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.limits import Limits
from mbworker.runtimes.wasm import WasmRuntime, WasmSettings, open_wasm_runtime
from tests.runtimes import wasm_modules as wm
from tests.runtimes.test_wasm_runtime import call, request

EXTRA_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fd_fdstat_get (param i32 i32) (result i32)))
"""

# Each probe's errno is written as one byte 'A' + errno after the CGI head: 'A' would mean success.
PROBES = [
    "(call $fd_prestat_get (i32.const 3) (i32.const 700))",  # first preopen slot
    "(call $fd_prestat_get (i32.const 4) (i32.const 700))",
    "(call $path_open (i32.const 3) (i32.const 0) (i32.const 800) (i32.const 11) (i32.const 0)"
    " (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 720))",  # /etc/passwd via fd 3
    "(call $fd_fdstat_get (i32.const 3) (i32.const 740))",  # is there any fd 3 at all?
    "(call $sock_accept (i32.const 3) (i32.const 0) (i32.const 760))",  # an inherited listening socket?
    "(call $sock_accept (i32.const 0) (i32.const 0) (i32.const 760))",  # stdin as a socket?
]
STORES = "".join(f"    (i32.store8 (i32.const {900 + i}) (i32.add (i32.const 65) {p}))\n" for i, p in enumerate(PROBES))
PROBE_MODULE = f"""(module
{wm.WASI_IMPORTS}
{EXTRA_IMPORTS}
  (memory (export "memory") 1)
  (data (i32.const 256) "Content-Type: text/plain\\n\\n")
  (data (i32.const 800) "/etc/passwd")
{wm.HELPERS}
  (func (export "_start")
    (drop (call $write (i32.const 1) (i32.const 256) (i32.const 26)))
{STORES}    (drop (call $write (i32.const 1) (i32.const 900) (i32.const {len(PROBES)}))))
)
"""
EBADF = 8


def _version(tmp_path: Path, slug: str, wat: str, env: dict[str, str]) -> FunctionVersion:
    bundle = tmp_path / slug
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "fn.wat").write_text(wat)
    (bundle / "secret.txt").write_text("bundle file")
    return FunctionVersion(slug, 1, "wasm", bundle, "fn.wat", env=env, limits=Limits.model_validate({}))


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[WasmRuntime]:
    async with open_wasm_runtime(WasmSettings(cache_dir=tmp_path / "cache")) as rt:
        yield rt


async def test_no_preopened_directories_and_no_sockets(runtime: WasmRuntime, tmp_path: Path) -> None:
    fn = _version(tmp_path, "probe", PROBE_MODULE, {})
    status, _, body = await call(runtime, fn, request("/probe"))
    assert status == 200, body
    errnos = [b - 65 for b in body]
    assert len(errnos) == len(PROBES)
    assert errnos[:4] == [EBADF] * 4  # no fd 3 or 4: no directory (not even its own bundle) and no socket
    assert all(e != 0 for e in errnos)  # and sock_accept fails on every fd


async def test_environment_is_wagi_plus_its_own_and_nothing_crosses_functions(
    runtime: WasmRuntime, tmp_path: Path
) -> None:
    a = _version(tmp_path, "a", wm.DUMP, {"SECRET_A": "only-a"})
    b = _version(tmp_path, "b", wm.DUMP, {"SECRET_B": "only-b"})
    _, _, body_a = await call(runtime, a, request("/a"))
    _, _, body_b = await call(runtime, b, request("/b"))
    env_a = {line[4:].split("=", 1)[0] for line in body_a.decode().splitlines() if line.startswith("env:")}
    env_b = {line[4:].split("=", 1)[0] for line in body_b.decode().splitlines() if line.startswith("env:")}
    assert "SECRET_A" in env_a
    assert "SECRET_B" not in env_a
    assert "SECRET_B" in env_b
    assert "SECRET_A" not in env_b
    cgi_prefixes: tuple[str, ...] = ("HTTP_", "X_", "SERVER_", "PATH_", "CONTENT_", "REMOTE_", "AUTH_")
    cgi_prefixes += ("REQUEST_", "SCRIPT_", "QUERY_", "GATEWAY_")
    extra = {n for n in env_b if not n.startswith(cgi_prefixes)}
    assert extra == {"SECRET_B"}  # nothing of the host (PATH, HOME, MBWORKER_*)


async def test_state_never_crosses_functions(runtime: WasmRuntime, tmp_path: Path) -> None:
    """The counter module increments a global and a memory cell: every call, of either function, starts fresh."""
    a = _version(tmp_path, "ca", wm.COUNTER, {})
    b = _version(tmp_path, "cb", wm.COUNTER, {})
    seen = [(await call(runtime, fn, request(f"/{fn.slug}")))[2] for fn in (a, b, a, b)]
    assert seen == [b"1 1"] * 4
