"""What systemd and the upgrade helper's units are to a cloud worker, for one local worker: run it from its own
venv, converge it to the cluster's release before every start (`upgrade_helper.converge`, as mbworker.service's
ExecStartPre), and when it asks for an upgrade (`<data dir>/upgrade/request`), let `upgrade_helper.upgrade` install
the version from the control plane into that venv and start it again; start it again, too, after a drain for the
control plane (it comes back cordoned until `cluster undrain`).

Run by the local provider (`local.worker_venv`) as
`python -m mbworker.provision.local_supervisor --venv V --data-dir D --control-url U --token-file T -- ARGV...`
where ARGV is the worker's argv after the interpreter. It owns its one child: SIGTERM/SIGINT (the provider stops
the whole process group) end the loop, and it exits once the child has.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .upgrade_helper import Config, converge, take_request, upgrade

POLL_S = 0.1
CORDON_EXIT_STATUS = 75
"""worker/daemon.py's: the worker drained for the control plane and is to be started again, cordoned (systemd does
it through mbworker.service's Restart=on-failure; the provisioner does not import the daemon, hence the copy)."""
RESTART_S = 1.0


class ChildService:
    """The worker process, as the helper's `Service`."""

    def __init__(self, argv: list[str], cfg: Config) -> None:
        self.argv = argv
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None

    def is_active(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.is_active():
            assert self.proc is not None
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def start(self) -> None:
        converge(self.cfg)
        # the child's own environment: not the PYTHONPATH that let this supervisor import mbworker from a checkout
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--venv", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--control-url", required=True)
    p.add_argument("--token-file", type=Path, required=True)
    p.add_argument("worker", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    worker = [a for a in args.worker if a != "--"]
    upgrade_dir = args.data_dir / "upgrade"
    upgrade_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the daemon's sign that a helper watches
    request = upgrade_dir / "request"
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True  # the child got the same signal (one process group) and drains by itself

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    work = args.data_dir.parent / f"{args.data_dir.name}.upgrade"  # beside the data dir, not in it
    cfg = Config(args.control_url, args.token_file.read_text().strip(), args.venv, work)
    child = ChildService([str(args.venv / "bin" / "python"), *worker], cfg)
    child.start()
    while True:
        version = None if stopping else take_request(request)
        if version is not None:
            upgrade(version, cfg, child)
            continue
        if not child.is_active():
            assert child.proc is not None
            if child.proc.returncode == CORDON_EXIT_STATUS and not stopping:
                time.sleep(RESTART_S)
                child.start()
                continue
            return child.proc.returncode or 0
        time.sleep(POLL_S)  # a file another process writes, and a child: polled


if __name__ == "__main__":
    sys.exit(main())
