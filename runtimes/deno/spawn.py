"""Starting one Deno child so that it can never outlive the daemon, and the exact command line it runs with.

Who owns what: `Spawner` owns one thread that lives as long as the runtime; every child is forked from that
thread. Why a dedicated thread: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, and
trio's worker threads come and go (an idle one exits after a few seconds, which would kill healthy children).
A `ChildProcess` owns its pipe ends and its pidfd; `DenoProcess` (process.py) owns the `ChildProcess`.

No orphans: each child gets its own process group (so a group kill reaches anything it might start) and a
parent-death signal (SIGKILL), so a SIGKILLed daemon takes its children with it. The signal is set by util-linux's
`setpriv --pdeathsig KILL` exec'd in front of deno when it is installed: without a `preexec_fn`, CPython spawns
with vfork, which costs ~3 ms instead of the 8–14 ms a fork of the (large) daemon costs (measured, cold starts).
Without setpriv, `preexec_fn` sets it. setpriv has no "did the parent die before prctl" check; a child orphaned
in that window still exits, because its frame channel (a unix socket to the daemon, process.py) reaches EOF or
never connects, and the bootstrap then shuts down.

The child's stdin is /dev/null; its stdout and stderr are pipes the daemon reads as the function's log streams.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.deno.permissions import NetPolicy, net_flags
from mbworker.runtimes.errors import BootError
from mbworker.runtimes.startup_env import forbidden_env_reason

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved here: the preexec_fn runs after fork and should do as little as possible


def _make_preexec(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the daemon died between fork and prctl
            os._exit(1)

    return preexec


def _setpriv_prefix() -> list[str]:
    """`[setpriv, --pdeathsig, KILL, --]` if util-linux's setpriv is here and supports it, else []. Blocking."""
    path = shutil.which("setpriv") or next(
        (p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None
    )
    if path is None:
        return []
    prefix = [path, "--pdeathsig", "KILL", "--"]
    try:
        probe = subprocess.run([*prefix, path, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return prefix if probe.returncode == 0 else []


@dataclass(slots=True)
class ChildProcess:
    """A started child: its output pipes as trio streams and a pidfd to wait on and signal without pid-reuse
    races."""

    popen: subprocess.Popen[bytes]
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    pidfd: int
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait(self) -> int:
        """Wait for the child to exit and reap it."""
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
            # the pidfd is readable: the child has exited, so this wait does not block
            self.returncode = self.popen.wait()
        return self.returncode

    def signal(self, sig: int) -> None:
        """Signal the child and its process group; a no-op once it has been reaped."""
        if self.returncode is not None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def aclose_streams(self) -> None:
        for s in (self.stdout, self.stderr):
            await s.aclose()

    def close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


async def _result(fut: concurrent.futures.Future[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """The future's result, waited for on the trio thread (its done-callback wakes us: no worker thread in
    between). Shielded: a started child must reach its owner."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
    with trio.CancelScope(shield=True):
        await done.wait()
    return fut.result()


class Spawner:
    """Forks children from one long-lived thread (see module docstring). Close it with `shutdown()`."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbworker-deno-spawn")
        # Probed in the spawner thread, off the daemon's start; it runs before any spawn (one worker, FIFO).
        self._prefix = self._pool.submit(_setpriv_prefix)

    async def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
        before: Callable[[], None] | None = None,
    ) -> ChildProcess:
        """Start `argv`; `before` (blocking: e.g. making `cwd`) runs first in the spawner thread, so a cold start
        waits for one thread hand-off, not one per step. Not cancellable once begun: the child it starts is
        owned by the returned `ChildProcess`, never left behind."""
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w]
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += [err_r, err_w]

            def popen_fn() -> subprocess.Popen[bytes]:  # runs in the spawner thread
                prefix = self._prefix.result()
                if before is not None:
                    before()
                return subprocess.Popen(
                    [*prefix, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    env=dict(env),
                    cwd=cwd,
                    close_fds=True,
                    process_group=0,
                    preexec_fn=None if prefix else _make_preexec(os.getpid()),
                )

            popen = await _result(self._pool.submit(popen_fn))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (out_w, err_w):
            os.close(fd)
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        return ChildProcess(
            popen,
            trio.lowlevel.FdStream(out_r),
            trio.lowlevel.FdStream(err_r),
            pidfd,
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


# ------------------------------------------------------------------------------------------ command line

DENO_ENV = (
    "DENO_DIR",
    "NO_COLOR",
    "DENO_NO_UPDATE_CHECK",
    "DENO_NO_PROMPT",
    "NPM_CONFIG_REGISTRY",
    "PATH",
    "DENO_NODE_SHIM_ACTIVE",
)
"""Variables set for (or by) Deno itself; the bootstrap deletes them before the function loads.
(Deno adds PATH and DENO_NODE_SHIM_ACTIVE to its own environment at startup.)"""

NO_NPM_REGISTRY = "http://npm-registry.invalid/"
"""The npm registry a function's Deno is pointed at: a name that never resolves (RFC 6761). Its packages were
resolved where it was deployed; should anything still ask for one at run time, it fails rather than fetch."""

PLATFORM_ENV = frozenset({"DENO_DEPLOYMENT_ID"})
"""Supabase's platform variables under a reserved prefix: set by the deployer, changing nothing in how Deno
starts."""


def reserved_env(name: str) -> bool:
    """True for a variable a function's env may never set: the one list deploys refuse (`runtimes.startup_env`),
    less Supabase's platform variables the deployer sets itself. Case-insensitive, as the list is."""
    return name.upper() not in PLATFORM_ENV and forbidden_env_reason(name) is not None


@dataclass(frozen=True, slots=True)
class VersionPaths:
    """Per-version scratch layout (created by the pool, removed when the version's pool goes away)."""

    base: Path
    deno_dir: Path
    """DENO_DIR of this version's processes: transpiled and compiled code only, seeded from the runtime's template
    (`Shared.deno_dir`, where the bootstrap is compiled)."""
    tmps: Path
    """Where the version's processes get their own temp dirs (`process_tmp`)."""
    import_map: Path


def process_tmp(paths: VersionPaths, seq: int) -> Path:
    """The temp dir of process `seq` (TMPDIR, TMP, TEMP, its cwd and all it may write): created before its spawn,
    removed when it has been reaped, limited to `Limits.tmp_mb` (tmpquota.py)."""
    return paths.tmps / f"p{seq}"


def build_argv(
    deno_bin: str,
    bootstrap: Path,
    fn: FunctionVersion,
    paths: VersionPaths,
    node_socket: str,
    net: NetPolicy | None = None,
    *,
    tmp: Path,
    channel: str = "",
) -> list[str]:
    """The child's command line. Network flags come from permissions.py (`net`: the operator's policy).
    `tmp`: the process's own temp dir (`process_tmp`), the only place it may write; `channel`: the unix socket
    the daemon listens on for this child's frames (process.py)."""
    bundle = fn.bundle_dir.resolve()
    entry = (bundle / fn.entrypoint).resolve()
    hide = list(DENO_ENV)
    if not node_socket:
        hide.append("DENO_SERVE_ADDRESS")
    if fn.deno_config:
        # npm packages shipped as packages: the config beside the bundle's node_modules, with its frozen lockfile
        # and the imports (stubs included) it was resolved with. Nothing is fetched: --cached-only, and the npm
        # registry Deno would ask does not resolve (build_env).
        config = [f"--config={(bundle / fn.deno_config).resolve()}"]
    else:
        config = ["--no-config", "--no-lock", f"--import-map={paths.import_map}"]
    return [
        deno_bin,
        "run",
        "--no-remote",
        "--cached-only",
        "--no-prompt",
        *config,
        f"--v8-flags=--max-old-space-size={fn.limits.memory_mb}",
        *net_flags(fn.net_allow, net, node_socket, channel),
        "--allow-env",
        "--allow-read=" + path_list(bundle, tmp, node_socket, channel),
        "--allow-write=" + path_list(tmp, node_socket, channel),
        str(bootstrap),
        entry.as_uri(),
        node_socket,
        ",".join(hide),
        channel,
    ]


def path_list(*paths: Path | str) -> str:
    """Paths for an `--allow-read`/`--allow-write` value. Deno splits it at commas, and its doubled-comma escape
    fails for directories in 2.9 ("Empty path is not allowed"): a path with a comma is refused here (the
    daemon's settings already refuse such a data dir) rather than granting its pieces."""
    for p in paths:
        if "," in str(p):
            raise BootError(f"cannot grant {str(p)!r} to a function: Deno's permission lists cannot hold a comma")
    return ",".join(str(p) for p in paths if p)


def build_env(
    fn: FunctionVersion, paths: VersionPaths, execution_id: str, node_socket: str, *, tmp: Path
) -> dict[str, str]:
    """The function's env minus what it may not set (`reserved_env`: deploys refuse those, and this guards the
    spawn whatever reached it), then SB_EXECUTION_ID, the process's temp dir (TMPDIR, and TMP and TEMP that some
    libraries read instead) and what Deno itself needs (hidden later): nothing a function sets can override the
    runtime's own."""
    env = {k: v for k, v in fn.env.items() if not reserved_env(k)}
    env["SB_EXECUTION_ID"] = execution_id
    env["TMPDIR"] = env["TMP"] = env["TEMP"] = str(tmp)
    env["DENO_DIR"] = str(paths.deno_dir)
    env["NO_COLOR"] = "1"
    env["DENO_NO_UPDATE_CHECK"] = "1"
    env["DENO_NO_PROMPT"] = "1"
    env["NPM_CONFIG_REGISTRY"] = NO_NPM_REGISTRY
    if node_socket:
        # Deno's node:http (and so Express) listens here instead of the port the code asks for
        env["DENO_SERVE_ADDRESS"] = f"unix:{node_socket}"
    return env
