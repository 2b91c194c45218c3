"""Helpers shared by the Deno runtime tests (no tests here): write a function, open a runtime, call it."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body
from mbworker.runtimes.deno import DenoRuntime, DenoSettings, open_deno_runtime
from mbworker.runtimes.limits import Limits
from tests.conftest import require_binary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "functions"


def deno_bin() -> str:
    return require_binary("deno", DenoSettings.model_validate({}).deno_bin)


def run_deno_check(script: Path, deno_dir: Path) -> dict[str, Any]:
    """Run a self-checking Deno script (no network, no config, nothing granted) and return the JSON object it
    prints last; fails the test when the script exits non-zero."""
    done = subprocess.run(
        [deno_bin(), "run", "--no-remote", "--no-config", "--no-lock", "--no-prompt", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"DENO_DIR": str(deno_dir), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def write_fn(tmp_path: Path, source: str, *, name: str = "fn", files: dict[str, str] | None = None) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.ts").write_text(textwrap.dedent(source))
    for rel, text in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(textwrap.dedent(text))
    return d


def version(
    bundle: Path,
    *,
    slug: str = "fn",
    ver: int = 1,
    entry: str = "index.ts",
    env: dict[str, str] | None = None,
    import_map: str | None = None,
    **limits: Any,
) -> FunctionVersion:
    return FunctionVersion(
        slug=slug,
        version=ver,
        runtime="deno",
        bundle_dir=bundle,
        entrypoint=entry,
        import_map=import_map,
        env=env or {},
        limits=Limits(**{"request_idle_timeout_s": 20, **limits}),
    )


class LogSink:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str, str]] = []

    def __call__(self, fn: FunctionVersion, execution_id: str, stream: str, line: str) -> None:
        self.lines.append((fn.slug, execution_id, stream, line))


@asynccontextmanager
async def deno_runtime(tmp_path: Path, logs: LogSink | None = None, **settings: Any) -> AsyncIterator[DenoRuntime]:
    s = DenoSettings(deno_bin=deno_bin(), scratch_dir=tmp_path / "scratch", **settings)
    async with open_deno_runtime(s, on_log=logs) as rt:
        yield rt


async def fed_by(recv: trio.MemoryReceiveChannel[bytes]) -> AsyncIterator[bytes]:
    """A request body that streams what the test sends on the other end of `recv`, and ends when it closes."""
    async with recv:
        async for c in recv:
            yield c


async def chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def inv(
    method: str, target: str, body: bytes | AsyncIterator[bytes] = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> Invocation:
    stream = (chunks([body]) if body else empty_body()) if isinstance(body, bytes) else body
    return Invocation(method, target, headers or [], stream, "req-1", url=f"http://localhost{target}")


async def call(
    rt: DenoRuntime,
    fn: FunctionVersion,
    method: str,
    target: str,
    body: bytes | AsyncIterator[bytes] = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    async with rt.invoke(fn, inv(method, target, body, headers)) as res:
        data = b"".join([c async for c in res.body])
    return res.status, dict(res.headers), data


async def call_json(rt: DenoRuntime, fn: FunctionVersion, method: str, target: str, body: bytes = b"") -> Any:
    status, _, data = await call(rt, fn, method, target, body)
    assert status == 200, data
    return json.loads(data)


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (reaped, or a zombie waiting for a reaper that isn't us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def deno_pids() -> set[int]:
    """Every running deno process whose parent is this test process."""
    me = os.getpid()
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if comm == "deno" and int(fields[1]) == me and fields[0] != "Z":
            out.add(int(entry))
    return out
