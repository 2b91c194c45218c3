"""Start `mbworker serve` as a real subprocess on free ports, as a user would, and deploy through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.conftest import free_port

MBWORKER = [sys.executable, "-m", "mbworker.cli.main"]
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60


@dataclass
class RunningWorker:
    process: trio.Process
    public_url: str
    admin_url: str
    data_dir: Path
    admin_token: str
    anon_key: str
    service_role_key: str
    output: list[str]
    waiters: list[tuple[str, trio.Event]]

    async def wait_for_output(self, text: str, timeout: float = 20, *, count: int = 1) -> str:
        """Wait until `count` lines of the worker's output contain `text`; returns the last of them."""
        with trio.fail_after(timeout):
            while True:
                matching = [line for line in self.output if text in line]
                if len(matching) >= count:
                    return matching[-1]
                event = trio.Event()
                self.waiters.append((text, event))
                try:
                    await event.wait()
                finally:
                    self.waiters.remove((text, event))

    def cli_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MBWORKER_ADMIN_URL"] = self.admin_url
        env["MBWORKER_ADMIN_TOKEN"] = self.admin_token
        return env

    async def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """Run `mbworker <args>` against this worker; returns the completed process (stdout/stderr captured)."""
        with trio.fail_after(timeout):
            result = await trio.run_process(
                [*MBWORKER, *args], env=self.cli_env(), capture_stdout=True, capture_stderr=True, check=False, cwd=REPO
            )
        if check and result.returncode != 0:
            out, err = result.stdout.decode(), result.stderr.decode()
            raise AssertionError(f"mbworker {' '.join(args)} exited {result.returncode}:\n{out}\n{err}")
        return result

    async def deploy(self, path: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return await self.cli("deploy", str(path), *extra, check=True)

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.anon_key}"}


@asynccontextmanager
async def run_worker(
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    command: tuple[str, ...] = ("serve",),
    cwd: Path = REPO,
    wrap: tuple[str, ...] = (),
) -> AsyncIterator[RunningWorker]:
    """A worker on free ports until the block ends; then SIGTERM and wait (kill after a timeout).

    `command` is what runs it (`serve`, or `dev PATH`); it must take --port, --admin-port and --data-dir.
    `wrap`: a command line that ends by exec'ing its arguments (e.g. to set up a mount namespace first)."""
    port, admin_port = free_port(), free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MBWORKER_")}
    child_env.update(env or {})
    process = await trio.lowlevel.open_process(
        [
            *wrap,
            *MBWORKER,
            *command,
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--data-dir",
            str(data_dir),
            *args,
        ],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    output: list[str] = []
    waiters: list[tuple[str, trio.Event]] = []
    assert process.stdout is not None
    stdout = process.stdout
    ready = trio.Event()

    async def pump() -> None:
        buffer = b""
        async for chunk in stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                output.append(text)
                for wanted, event in waiters:
                    if wanted in text:
                        event.set()
                if text.startswith("mbworker is serving"):
                    ready.set()
        ready.set()  # exited: let the waiter see it

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.move_on_after(START_TIMEOUT):
                await ready.wait()
            if process.returncode is not None or not any(o.startswith("mbworker is serving") for o in output):
                raise AssertionError("worker did not start:\n" + "\n".join(output[-60:]))
            keys = dict(
                line.split("=", 1)
                for line in (data_dir / "secrets" / "keys.env").read_text().splitlines()
                if "=" in line
            )
            worker = RunningWorker(
                process=process,
                public_url=f"http://127.0.0.1:{port}",
                admin_url=f"http://127.0.0.1:{admin_port}",
                data_dir=data_dir,
                admin_token=child_env.get("MBWORKER_ADMIN_TOKEN")
                or (data_dir / "secrets" / "admin_token").read_text().strip(),
                anon_key=keys["ANON_KEY"],
                service_role_key=keys["SERVICE_ROLE_KEY"],
                output=output,
                waiters=waiters,
            )
            yield worker
            await stop_worker(process)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(10):
                await process.wait()


async def stop_worker(process: trio.Process, timeout: float = 45) -> int:
    """SIGTERM, then wait for a clean exit; kill if it takes longer than `timeout`."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    with trio.move_on_after(timeout):
        return await process.wait()
    process.kill()
    return await process.wait()
