"""The upgrade helper: installs the mbworker version a worker was asked for, then starts the daemon again.

It runs with the rights to write the install (root on a cloud worker: `mbworker-upgrade.service`, started by
mbworker.service's ExecStopPost when the daemon has exited with `<data dir>/upgrade/request` left; on one machine
the local provider's supervisor calls `upgrade` itself). The daemon, which is unprivileged and runs user code,
chooses only a version number; what gets installed is decided here:

1. the request is read (a regular file of a few bytes; it is removed first, so it is handled once);
2. the version's wheel list and sha256 come from the control plane, with this node's own read-only node token
   (root-only file), and the wheels are downloaded into a root-owned directory and checked against them;
3. once the daemon has drained and exited (it drains itself on the request; waited for, bounded, then stopped),
   the install is snapshotted and `pip install --no-index --require-hashes` installs exactly those files;
4. the new install must import and report the version asked for, else the snapshot is put back (the worker
   comes back on its previous version, still serving);
5. the daemon is started again, either way.

`--converge` is the same install run before every start of the daemon (mbworker.service's ExecStartPre; the local
provider's supervisor before it starts its child): the control plane says the cluster's release (`GET /release`,
control/release.py); a node on another version installs it first (steps 2 and 4), so a worker added by a
scale-out after an upgrade, or reinstalled, starts on the cluster's version. It never keeps the daemon from
starting: with the control plane unreachable (or a failed install) the daemon starts on what is installed, and the
node converges at a later start (or the next `cluster upgrade`).

Standard library only, and run by the system's python3: it must work while the install it replaces is half
written. Every step is a line on stdout (the journal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# The same pattern as mbworker.worker.upgrade_request.VERSION (this file runs without mbworker importable).
VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")
WHEEL_FILE = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_REQUEST_BYTES = 256
HTTP_TIMEOUT_S = 120.0
ASK_TIMEOUT_S = 10.0
"""How long a starting daemon waits for the control plane to say the release (a down system node costs this)."""


class UpgradeError(Exception):
    pass


class Service(Protocol):
    """The daemon's service: systemd's unit on a cloud worker, the supervisor's child on one machine."""

    def is_active(self) -> bool: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


@dataclass(frozen=True)
class Config:
    control_url: str
    """The control plane on the private network (`http://<system ip>:<port>`)."""
    token: str
    """The node token: reads wheels (and upstreams), nothing else."""
    venv: Path
    work_dir: Path
    """Root-owned: downloads and the snapshot of the install."""
    drain_timeout_s: float = 120.0


def take_request(path: Path) -> str | None:
    """The version asked for, or None when there is no usable request (it is removed either way)."""
    try:
        return _read_request(path)
    except FileNotFoundError:
        return None
    except (UpgradeError, ValueError, AttributeError, OSError) as exc:  # OSError: ELOOP for a symlink
        say(f"request refused: {exc}")
        return None
    finally:
        path.unlink(missing_ok=True)


def _read_request(path: Path) -> str:
    # The directory is the daemon's (user mbworker): what is checked is what was opened, never a name that may be
    # swapped for a link or a FIFO between a check and an open (root would follow the one, block on the other).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REQUEST_BYTES:
            raise UpgradeError(f"{path} is not a small regular file: ignored")
        raw = os.read(fd, MAX_REQUEST_BYTES)
    finally:
        os.close(fd)
    version = json.loads(raw).get("version")
    if not isinstance(version, str) or not VERSION.match(version):
        raise UpgradeError(f"{path}: no valid version in the request")
    return version


def say(line: str) -> None:
    print(f"mbworker-upgrade: {line}", flush=True)


def _get(cfg: Config, path: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    req = urllib.request.Request(cfg.control_url.rstrip("/") + path, headers={"authorization": f"Bearer {cfg.token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read()
            return data
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise UpgradeError(f"GET {path}: {exc}") from None


def fetch(cfg: Config, version: str, into: Path) -> str:
    """Download `version`'s wheels into `into`, each checked against the control plane's sha256; the pip
    requirements pinning them (name==version --hash=sha256:...)."""
    listing = json.loads(_get(cfg, f"/control/v1/wheels/{version}"))
    if not isinstance(listing, list) or not listing:
        raise UpgradeError(f"the control plane lists no wheels for {version}")
    lines: list[str] = []
    for item in listing:
        filename, sha = str(item.get("filename", "")), str(item.get("sha256", ""))
        if not WHEEL_FILE.match(filename) or not SHA256.match(sha):
            raise UpgradeError(f"bad wheel entry {item!r}")
        data = _get(cfg, f"/control/v1/wheels/{version}/{filename}")
        if hashlib.sha256(data).hexdigest() != sha:
            raise UpgradeError(f"{filename}: sha256 does not match the control plane's")
        (into / filename).write_bytes(data)
        name, wheel_version = filename.split("-")[:2]
        lines.append(f"{name.lower().replace('_', '-')}=={wheel_version} --hash=sha256:{sha}")
    if not any(line.startswith(f"mbworker=={version} ") for line in lines):
        raise UpgradeError(f"no mbworker {version} wheel among {len(lines)}")
    return "\n".join(sorted(lines)) + "\n"


def installed_version(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", "import mbworker.cli.main, mbworker; print(mbworker.__version__)"],
        capture_output=True, text=True, timeout=120, env=_clean_env(),
    )  # fmt: skip
    if done.returncode != 0:
        raise UpgradeError(f"the install does not import: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def _dist_version(venv: Path) -> str:
    found = sorted(venv.glob("lib/python*/site-packages/mbworker-*.dist-info"))
    return found[0].name.removesuffix(".dist-info").split("-")[1] if found else "none"


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH or venv of whoever started us: the install is judged on its own."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _wait_stopped(service: Service, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
    deadline = clock() + timeout
    while service.is_active() and clock() < deadline:
        time.sleep(0.2)  # a process we do not own: polled (systemd has no blocking wait for another unit)
    service.stop()  # an exited unit: a no-op that also cancels an automatic restart; else ends the drain


def upgrade(version: str, cfg: Config, service: Service) -> bool:
    """Install `version` and restart the daemon; True when it now runs `version`."""
    work = _fresh(cfg.work_dir / "download")
    try:
        try:
            say(f"fetching mbworker {version} from the control plane")
            requirements = fetch(cfg, version, work)
        except (UpgradeError, ValueError) as exc:
            say(f"not upgraded: {exc}")
            return False
        finally:
            say("waiting for the daemon to drain and exit")
            _wait_stopped(service, cfg.drain_timeout_s)
        return _install(version, requirements, cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        say("starting the daemon")
        service.start()


def converge(cfg: Config) -> str:
    """Before the daemon starts: install the cluster's release if this node runs another version. The version
    the daemon will start on; never raises (the daemon starts either way, on what is installed)."""
    work = cfg.work_dir / "download"
    try:
        installed = _dist_version(cfg.venv)
        try:
            release = json.loads(_get(cfg, "/control/v1/release", timeout=ASK_TIMEOUT_S))
            accepted = {release["version"], release.get("rolling_to")}
            wanted = release.get("rolling_to") or release["version"]
            if not isinstance(wanted, str) or not VERSION.match(wanted):
                raise UpgradeError(f"no valid version in {release!r}")
        except Exception as exc:  # any answer but a release: the daemon starts on what is installed
            say(f"the control plane did not say the cluster's release ({exc}): starting {installed}, converging later")
            return installed
        if installed in accepted:
            say(f"mbworker {installed} is the cluster's release")
            return installed
        say(f"this node has mbworker {installed}, the cluster runs {wanted}: installing it before the daemon starts")
        _fresh(work)
        requirements = fetch(cfg, wanted, work)
        return wanted if _install(wanted, requirements, cfg, work) else installed
    except Exception as exc:
        # a download or disk failure, a bad wheel listing, a cut transfer: whatever it was, the daemon starts on what
        # is installed (`_install` put the previous install back if it had begun) and converges at a later start
        now = _dist_version(cfg.venv)
        say(f"not converged, starting {now}: {exc!r}")
        return now
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    return work


def _install(version: str, requirements: str, cfg: Config, work: Path) -> bool:
    """Install the fetched wheels (`requirements` pins them) with the daemon stopped; the previous install is put
    back when the new one fails or does not report `version`."""
    snapshot = cfg.work_dir / "previous"
    before = _dist_version(cfg.venv)
    shutil.rmtree(snapshot, ignore_errors=True)
    try:
        # hard links: quick, and pip never writes into an installed file (it removes and creates), so the snapshot
        # keeps the previous files whole
        shutil.copytree(cfg.venv, snapshot, symlinks=True, copy_function=os.link)
        (work / "requirements.txt").write_text(requirements)
        pip = [str(cfg.venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-index", "--require-hashes", "--find-links", str(work),
               "-r", str(work / "requirements.txt")]  # fmt: skip
        try:
            done = subprocess.run(pip, capture_output=True, text=True, timeout=600, env=_clean_env())
            if done.returncode != 0:
                raise UpgradeError(f"pip failed: {done.stderr.strip()[-500:]}")
            now = installed_version(cfg.venv)
            if now != version:
                raise UpgradeError(f"installed, but it reports {now}")
        except (UpgradeError, OSError, subprocess.TimeoutExpired) as exc:
            say(f"install of {version} failed, putting {before} back: {exc}")
            shutil.rmtree(cfg.venv, ignore_errors=True)
            snapshot.rename(cfg.venv)
            return False
        say(f"installed mbworker {version} (was {before})")
        return True
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


class SystemdService:
    def __init__(self, unit: str) -> None:
        self.unit = unit

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", *args, self.unit], capture_output=True, text=True, timeout=180)

    def is_active(self) -> bool:
        return self._ctl("is-active", "--quiet").returncode == 0

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("reset-failed")
        done = self._ctl("start")
        if done.returncode != 0:
            say(f"systemctl start {self.unit} failed: {done.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="install the mbworker version a worker was asked for")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--request", type=Path, help="install the version the daemon asked for, then start it")
    how.add_argument("--converge", action="store_true", help="before the daemon starts: install the cluster's release")
    p.add_argument("--control-url", required=True)
    p.add_argument("--token-file", type=Path, required=True)
    p.add_argument("--venv", type=Path, default=Path("/opt/mbworker"))
    p.add_argument("--work-dir", type=Path, default=Path("/var/cache/mbworker-upgrade"))
    p.add_argument("--unit", default="mbworker.service")
    args = p.parse_args(argv)
    # the install is read by the unprivileged daemon: not the umask of the unit this runs for (mbworker.service's
    # 0027 applies to its ExecStartPre, and would leave new files unreadable to the mbworker user)
    os.umask(0o022)
    cfg = Config(args.control_url, args.token_file.read_text().strip(), args.venv, args.work_dir)
    if args.converge:
        converge(cfg)
        return 0  # the daemon starts whatever happened
    version = take_request(args.request)
    if version is None:
        return 0
    return 0 if upgrade(version, cfg, SystemdService(args.unit)) else 1


if __name__ == "__main__":
    sys.exit(main())
