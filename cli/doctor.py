"""`mbworker doctor`: checks that a node can run, and says what to fix.

Checks: Deno (found, runs), the listeners' ports (free and bindable), the data dir (exists or can be created,
writable, not world-writable, secrets 0600, free space), Redis (reachable when `redis_url` is set), the clock
(against Redis `TIME` when there is a Redis, and NTP sync via `timedatectl` when there is one), and wasmtime
(imports and compiles a module). Each prints OK, WARN, FAIL (with the fix) or SKIP; any FAIL exits 1.

Synchronous: the CLI calls `run_doctor(settings)` outside any trio loop (the Redis check runs its own).
Side effects: none beyond a probe file created and removed in the data dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from mbworker.worker.config import WorkerSettings

__all__ = ["CheckResult", "collect_checks", "find_deno_binary", "run_doctor"]

Status = Literal["OK", "WARN", "FAIL", "SKIP"]

SUBPROCESS_TIMEOUT_S = 20.0
REDIS_TIMEOUT_S = 5.0
CLOCK_WARN_S = 0.5
CLOCK_FAIL_S = 5.0
DISK_WARN_BYTES = 1024**3
DISK_FAIL_BYTES = 100 * 1024**2


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def render(self) -> str:
        line = f"{self.status:<4}  {self.name:<11}  {self.detail}"
        if self.fix and self.status in ("FAIL", "WARN"):
            line += f"\n{'':<19}fix: {self.fix}"
        return line


def run_doctor(settings: WorkerSettings, *, out: TextIO | None = None) -> int:
    """Run every check, print one line (plus a fix) per result; 1 if any FAILed, else 0."""
    out = out or sys.stdout
    results = collect_checks(settings, on_result=lambda r: print(r.render(), file=out, flush=True))
    failed = [r for r in results if r.status == "FAIL"]
    warned = [r for r in results if r.status == "WARN"]
    summary = f"{len(failed)} failed, {len(warned)} warnings, {len(results)} checks"
    print(("doctor: " if failed else "doctor: all good — ") + summary, file=out, flush=True)
    return 1 if failed else 0


def collect_checks(
    settings: WorkerSettings, *, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    results: list[CheckResult] = []
    checks: list[Callable[[WorkerSettings], list[CheckResult]]] = [
        check_deno,
        check_wasmtime,
        check_ports,
        check_data_dir,
        check_redis_and_clock,
    ]
    for check in checks:
        try:
            found = check(settings)
        except Exception as exc:  # a bug in a check must not hide the others
            found = [CheckResult(check.__name__.removeprefix("check_"), "FAIL", f"check crashed: {exc!r}")]
        for r in found:
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


# -- deno -----------------------------------------------------------------------------------------------------


def find_deno_binary(settings: WorkerSettings) -> tuple[str | None, str]:
    """(path or None, where it came from): settings/`MBWORKER_DENO`, the `deno` package, then PATH."""
    if settings.deno is not None:
        return str(settings.deno), "MBWORKER_DENO / deno setting"
    env = os.environ.get("MBWORKER_DENO")
    if env:
        return env, "MBWORKER_DENO"
    try:
        import deno as deno_pkg

        found = deno_pkg.find_deno_bin()
        if found:
            return str(found), "the deno Python package"
    except (ImportError, FileNotFoundError, RuntimeError):
        pass
    which = shutil.which("deno")
    return (which, "PATH") if which else (None, "")


def check_deno(settings: WorkerSettings) -> list[CheckResult]:
    path, source = find_deno_binary(settings)
    fix_install = "install the `deno` package in the daemon's venv (pip install deno), or set MBWORKER_DENO"
    if path is None:
        return [CheckResult("deno", "FAIL", "no deno binary found", fix_install)]
    if not os.path.isfile(path):
        return [CheckResult("deno", "FAIL", f"{path} (from {source}) does not exist", fix_install)]
    if not os.access(path, os.X_OK):
        return [CheckResult("deno", "FAIL", f"{path} is not executable", f"chmod +x {path}")]
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
        if version.returncode != 0:
            raise RuntimeError(f"exit {version.returncode}: {version.stderr.strip()[:300]}")
        # Starting V8 proves more than --version does (noexec mounts, seccomp, a broken binary).
        with tempfile.TemporaryDirectory(prefix="mbworker-doctor-") as deno_dir:
            probe = subprocess.run(
                [path, "eval", "--quiet", "console.log(1 + 1)"],
                capture_output=True,
                text=True,
                timeout=SUBPROCESS_TIMEOUT_S,
                check=False,
                env={**os.environ, "DENO_DIR": deno_dir, "NO_COLOR": "1"},
            )
        if probe.returncode != 0 or probe.stdout.strip() != "2":
            raise RuntimeError(f"deno eval failed (exit {probe.returncode}): {probe.stderr.strip()[:300]}")
    except (OSError, subprocess.TimeoutExpired, RuntimeError) as exc:
        return [CheckResult("deno", "FAIL", f"{path} does not run: {exc}", fix_install)]
    first = version.stdout.splitlines()[0] if version.stdout else "deno (unknown version)"
    return [CheckResult("deno", "OK", f"{first} at {path} (from {source})")]


# -- wasmtime -------------------------------------------------------------------------------------------------


def check_wasmtime(settings: WorkerSettings) -> list[CheckResult]:
    fix = "reinstall the daemon's dependencies (pip install wasmtime) on a supported platform (x86_64/aarch64)"
    try:
        import wasmtime

        engine = wasmtime.Engine()
        wasmtime.Module(engine, "(module)")
    except Exception as exc:  # ImportError, or a native library that does not load
        return [CheckResult("wasmtime", "FAIL", f"wasmtime unusable: {exc}", fix)]
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("wasmtime")
    except Exception:  # vendored or not installed as a distribution
        version = "?"
    return [CheckResult("wasmtime", "OK", f"wasmtime {version} compiles modules")]


# -- ports ----------------------------------------------------------------------------------------------------


def check_ports(settings: WorkerSettings) -> list[CheckResult]:
    results = []
    same = settings.port == settings.admin_port and settings.port != 0 and settings.host == settings.admin_host
    for name, host, port in (
        ("public", settings.host, settings.port),
        ("admin", settings.admin_host, settings.admin_port),
    ):
        label = f"{name} port"
        if same and name == "admin":
            fix = "set MBWORKER_ADMIN_PORT (or admin_port) to another port"
            results.append(CheckResult(label, "FAIL", f"admin and public both use {host}:{port}", fix))
            continue
        results.append(_check_port(label, host, port))
    return results


def _check_port(label: str, host: str, port: int) -> CheckResult:
    if port == 0:
        return CheckResult(label, "OK", f"{host}:0 (any free port, chosen at start)")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return CheckResult(label, "FAIL", f"cannot resolve {host!r}: {exc}", "use an IP address or a resolvable name")
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            s.bind(address)
    except OSError as exc:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            if _answers_as_mbworker(host, port):
                return CheckResult(label, "WARN", f"{where} is in use by a running mbworker", "stop it first if needed")
            return CheckResult(
                label, "FAIL", f"{where} is in use", f"find the owner with `ss -ltnp 'sport = :{port}'`, or pick a port"
            )
        if exc.errno == errno.EACCES:
            return CheckResult(
                label, "FAIL", f"{where}: permission denied", "use a port >= 1024 (or grant CAP_NET_BIND_SERVICE)"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return CheckResult(label, "FAIL", f"{host} is not an address of this machine", "check the host setting")
        return CheckResult(label, "FAIL", f"cannot bind {where}: {exc.strerror}", "check the host and port settings")
    return CheckResult(label, "OK", f"{host}:{port} is free")


def _answers_as_mbworker(host: str, port: int) -> bool:
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((connect_host, port), timeout=2.0) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: doctor\r\nconnection: close\r\n\r\n")
            head = s.recv(4096)
    except OSError:
        return False
    return b"\r\nserver: mbworker" in head.lower()


# -- data dir -------------------------------------------------------------------------------------------------


def check_data_dir(settings: WorkerSettings) -> list[CheckResult]:
    d = settings.data_dir.absolute()
    name = "data dir"
    if d.exists() and not d.is_dir():
        return [CheckResult(name, "FAIL", f"{d} exists but is not a directory", "remove it or set MBWORKER_DATA_DIR")]
    if not d.exists():
        ancestor = d.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return [CheckResult(name, "FAIL", f"{d} cannot be created: {ancestor} is a file", "set MBWORKER_DATA_DIR")]
        problem = _probe_write(ancestor)
        if problem:
            fix = f"create {d} owned by the daemon's user (install -d -o mbworker -m 0750 {d})"
            return [CheckResult(name, "FAIL", f"{d} cannot be created: {problem}", fix)]
        return [CheckResult(name, "OK", f"{d} does not exist yet; it will be created under {ancestor}")]
    results: list[CheckResult] = []
    problem = _probe_write(d)
    if problem:
        fix = f"chown the dir to the daemon's user (chown -R mbworker: {d}) or fix the mount (read-only? full?)"
        return [CheckResult(name, "FAIL", f"{d} is not writable: {problem}", fix)]
    mode = d.stat().st_mode
    if mode & stat.S_IWOTH:
        results.append(CheckResult(name, "FAIL", f"{d} is world-writable ({oct(mode & 0o777)})", f"chmod o-w {d}"))
    else:
        results.append(CheckResult(name, "OK", f"{d} is writable ({oct(mode & 0o777)})"))
    results.extend(_check_secrets(d))
    results.append(_check_disk(d))
    return results


def _probe_write(d: Path) -> str | None:
    """None if a file can be created in `d` (really tried: root passes os.access for anything)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".doctor-", dir=d)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _check_secrets(d: Path) -> list[CheckResult]:
    secrets = d / "secrets"
    if not secrets.is_dir():
        return [CheckResult("secrets", "OK", "none yet (generated with mode 0600 on first start)")]
    bad = []
    for f in sorted(secrets.iterdir()):
        if f.is_file() and f.stat().st_mode & 0o077:
            bad.append(f"{f.name} ({oct(f.stat().st_mode & 0o777)})")
    results = []
    if bad:
        results.append(
            CheckResult("secrets", "FAIL", f"readable by others: {', '.join(bad)}", f"chmod 600 {secrets}/*")
        )
    else:
        results.append(CheckResult("secrets", "OK", f"{secrets}: files are 0600"))
    dir_mode = secrets.stat().st_mode
    if dir_mode & 0o077:
        fix = f"chmod 700 {secrets}"
        results.append(CheckResult("secrets", "WARN", f"{secrets} is {oct(dir_mode & 0o777)}, expected 0700", fix))
    return results


def _check_disk(d: Path) -> CheckResult:
    usage = shutil.disk_usage(d)
    free = f"{usage.free / 1024**3:.1f} GiB free of {usage.total / 1024**3:.1f} GiB"
    fix = "free space: old versions (mbworker functions delete), scratch dirs, logs"
    if usage.free < DISK_FAIL_BYTES:
        return CheckResult("disk", "FAIL", f"{d}: {free}", fix)
    if usage.free < DISK_WARN_BYTES:
        return CheckResult("disk", "WARN", f"{d}: {free}", fix)
    return CheckResult("disk", "OK", f"{d}: {free}")


# -- redis and the clock --------------------------------------------------------------------------------------


def check_redis_and_clock(settings: WorkerSettings) -> list[CheckResult]:
    results: list[CheckResult] = []
    if not settings.redis_url:
        results.append(CheckResult("redis", "SKIP", "MBWORKER_REDIS_URL not set (single node)"))
    else:
        results.extend(_check_redis(settings.redis_url))
    results.append(_check_ntp())
    return results


def _check_redis(url: str) -> list[CheckResult]:
    import trio

    from mbworker.lib.redis import RedisError, RedisUrlError, open_redis, parse_redis_url

    try:
        redis_settings = parse_redis_url(url).replace(
            connect_timeout=REDIS_TIMEOUT_S, command_timeout=REDIS_TIMEOUT_S, pool_size=1
        )
    except RedisUrlError as exc:
        return [CheckResult("redis", "FAIL", f"invalid MBWORKER_REDIS_URL: {exc}", "see docs/operations.md")]

    async def probe() -> tuple[tuple[str, int] | None, float, float]:
        with trio.fail_after(REDIS_TIMEOUT_S * 3):
            async with open_redis(redis_settings) as client:
                await client.ping()
                before = time.time()
                reply = await client.execute("TIME")
                after = time.time()
                server = int(reply[0]) + int(reply[1]) / 1e6
                return client.statistics().address, server - (before + after) / 2, after - before

    where = _redacted(url)
    try:
        address, skew, rtt = trio.run(probe)
    except (RedisError, trio.TooSlowError, OSError) as exc:
        fix = "start Redis / check the URL, password and firewall (without Redis the node runs degraded)"
        return [CheckResult("redis", "FAIL", f"{where} unreachable: {exc or type(exc).__name__}", fix)]
    results = [CheckResult("redis", "OK", f"{where} answers PING (at {address}, {rtt * 1000:.1f} ms)")]
    detail = f"{skew:+.3f} s against Redis TIME"
    fix = "enable NTP (timedatectl set-ntp true, or chrony) on this node and the Redis host"
    if abs(skew) > CLOCK_FAIL_S:
        results.append(CheckResult("clock", "FAIL", detail + " (presence TTLs and JWT expiry go wrong)", fix))
    elif abs(skew) > CLOCK_WARN_S + rtt:
        results.append(CheckResult("clock", "WARN", detail, fix))
    else:
        results.append(CheckResult("clock", "OK", detail))
    return results


def _check_ntp() -> CheckResult:
    timedatectl = shutil.which("timedatectl")
    if timedatectl is None:
        return CheckResult("ntp", "SKIP", "timedatectl not available: NTP sync status unknown")
    try:
        done = subprocess.run(
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult("ntp", "SKIP", f"timedatectl failed: {exc}")
    value = done.stdout.strip()
    if done.returncode != 0 or value not in ("yes", "no"):
        return CheckResult("ntp", "SKIP", "NTP sync status unknown (no systemd-timedated here)")
    if value == "no":
        return CheckResult("ntp", "WARN", "clock not NTP-synchronized", "timedatectl set-ntp true (or run chrony)")
    return CheckResult("ntp", "OK", "clock is NTP-synchronized")


def _redacted(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://***@{host}"
