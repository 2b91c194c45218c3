"""LocalProvider: the same cluster shape on this machine, without Docker.

One redis-server (the state pillar), N `mbworker serve` processes sharing its URL (the worker pillar), a TCP
gateway in front (the proxy pillar) and `mbworker control serve` (the system pillar's control plane). Ports come
upwards from `local.base_port`: redis = base, gateway = base+1, control = base+2, worker n = base+10+2(n-1) (HTTP)
and the next port (admin). Each worker gets its own data dir. The control plane's token is created in the state
dir with the secrets, and its URL recorded there (`mbworker.control.endpoint`), where `--cluster` finds both.

The provider owns the processes it starts: PIDs (with their kernel start times, so a recycled PID is never
mistaken for ours) are recorded in `<state dir>/local/processes.json`; `down` / scale-in stop them (SIGTERM to
the process group, then SIGKILL after a grace period) and reap the ones that are our children.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mbworker.control.endpoint import control_token, node_token, node_token_path, token_path, write_endpoint

from .errors import DrainError, ProviderError, StepFailed
from .nodeops import NodeOps, NodeRef
from .plan import Plan, Step
from .provider import ApplyOptions, ApplyReport, Progress, no_progress
from .secrets import ClusterSecrets
from .spec import ClusterSpec

Kind = Literal["redis", "worker", "gateway", "control"]
STOP_GRACE = 10.0
READY_TIMEOUT = 30.0

#: Children started by this Python process, by PID, so they can be reaped (no zombies) by whichever provider
#: instance stops them. Processes started by an earlier CLI run were re-parented when it exited.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class StartProcess:
    kind: Kind
    index: int = 0


@dataclass(frozen=True)
class StopProcess:
    kind: Kind
    index: int = 0


@dataclass(frozen=True)
class DrainProcess:
    index: int


@dataclass(frozen=True)
class WriteBackends:
    pass


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is gone for our purposes
        return None
    return fields[19]


class LocalProvider:
    name = "local"

    def __init__(
        self,
        spec: ClusterSpec,
        secrets: ClusterSecrets,
        state_dir: Path,
        *,
        node_ops: NodeOps | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.spec = spec
        self._secrets = secrets
        self.dir = state_dir / "local"
        self._node_ops = node_ops
        self._ready_timeout = ready_timeout

    # --- addresses ---------------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.spec.local.host

    def port(self, kind: Kind, index: int = 0) -> int:
        base = self.spec.local.base_port
        if kind == "redis":
            return base
        if kind == "gateway":
            return base + 1
        if kind == "control":
            return base + 2
        return base + 10 + 2 * (index - 1)

    def admin_port(self, index: int) -> int:
        return self.port("worker", index) + 1

    def control_url(self) -> str:
        return f"http://{self.host}:{self.port('control')}"

    def redis_url(self) -> str:
        pw = self._secrets.redis_password.get_secret_value()
        return f"redis://:{pw}@{self.host}:{self.port('redis')}/0"

    def urls(self) -> dict[str, str]:
        """What `up` prints: no secrets in here."""
        out = {"redis": f"redis://{self.host}:{self.port('redis')}/0 (password in the secrets file)"}
        if self.spec.local.gateway:
            out["gateway"] = f"http://{self.host}:{self.port('gateway')}"
        out["control"] = f"{self.control_url()}/control/v1 (token in the state dir)"
        for i in range(1, self.spec.worker.count + 1):
            out[f"worker-{i}"] = f"http://{self.host}:{self.port('worker', i)} (admin :{self.admin_port(i)})"
        return out

    def worker_keys_file(self, index: int = 1) -> Path:
        """Where worker `index` keeps the anon and service_role keys it minted from the cluster's JWT secret (the
        daemon's data-dir layout: `<data dir>/secrets/keys.env`)."""
        return self.dir / f"worker-{index}" / "secrets" / "keys.env"

    # --- facts: the recorded processes that are still alive ------------------------------------------------------

    def _records_path(self) -> Path:
        return self.dir / "processes.json"

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads(self._records_path().read_text())
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ProviderError(f"cannot read {self._records_path()}: {exc}") from exc

    def _save(self, records: dict[str, dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._records_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
        os.replace(tmp, self._records_path())

    def running(self) -> dict[str, dict[str, Any]]:
        """Recorded processes that are alive and still the same process (PID and start time match)."""
        return {k: r for k, r in self._load().items() if _start_time(r["pid"]) == r["start"]}

    @staticmethod
    def _key(kind: Kind, index: int = 0) -> str:
        return f"worker-{index}" if kind == "worker" else kind

    # --- plans -------------------------------------------------------------------------------------------------------

    def plan(self, *, drain: bool = True) -> Plan:
        alive = self.running()
        steps: list[Step] = []

        def want(kind: Kind, index: int = 0, detail: str = "") -> None:
            key = self._key(kind, index)
            if key in alive:
                steps.append(Step("noop", "process", key, f"pid {alive[key]['pid']}"))
            else:
                steps.append(Step("create", "process", key, detail, StartProcess(kind, index)))

        want("redis", detail=f"redis-server on {self.host}:{self.port('redis')}")
        want("control", detail=f"control plane on {self.host}:{self.port('control')}")
        count = self.spec.worker.count
        for i in range(1, count + 1):
            want("worker", i, f"port {self.port('worker', i)}, admin {self.admin_port(i)}")
        leaving = sorted(
            (int(k.split("-")[1]) for k in alive if k.startswith("worker-") and int(k.split("-")[1]) > count),
            reverse=True,
        )
        if self.spec.local.gateway:
            want("gateway", detail=f"{self.host}:{self.port('gateway')}")
        if drain:
            steps += [Step("drain", "process", f"worker-{i}", "admin drain", DrainProcess(i)) for i in leaving]
        # like the cloud: drained workers leave the gateway's rotation before they stop
        if self.spec.local.gateway and self._backends_content(set()) != self._current_backends():
            steps.append(Step("change", "gateway", "backends", "worker list", WriteBackends()))
        steps += [Step("delete", "process", f"worker-{i}", op=StopProcess("worker", i)) for i in leaving]
        if not self.spec.local.gateway and "gateway" in alive:
            steps.append(Step("delete", "process", "gateway", op=StopProcess("gateway")))
        return Plan(self.spec.name, self.name, tuple(steps))

    def destroy_plan(self) -> Plan:
        alive = self.running()
        order = sorted(alive, key=lambda k: (k == "redis", k != "gateway", k))  # gateway, workers, redis last
        steps = []
        for key in order:
            kind: Kind = "worker" if key.startswith("worker-") else key  # type: ignore[assignment]
            index = int(key.split("-")[1]) if kind == "worker" else 0
            steps.append(Step("delete", "process", key, f"pid {alive[key]['pid']}", StopProcess(kind, index)))
        return Plan(self.spec.name, self.name, tuple(steps))

    # --- apply --------------------------------------------------------------------------------------------------------

    def apply(self, plan: Plan, options: ApplyOptions, progress: Progress = no_progress) -> ApplyReport:
        report = ApplyReport()
        kept: set[int] = set()
        changes = plan.changes
        for n, step in enumerate(changes, 1):
            label = f"{step.action} {step.kind} {step.name}"
            progress(f"[{n}/{len(changes)}] {label}{f' ({step.detail})' if step.detail else ''}")
            op = step.op
            try:
                if isinstance(op, StartProcess):
                    self._start(op.kind, op.index)
                elif isinstance(op, StopProcess):
                    if op.kind == "worker" and op.index in kept:
                        progress(f"      left in place: worker-{op.index} was not drained")
                        continue
                    if op.kind == "worker":
                        self._write_backends(kept)  # out of the gateway's rotation before it stops
                    self._stop(self._key(op.kind, op.index))
                elif isinstance(op, DrainProcess):
                    self._drain(op.index, options, report, kept, progress)
                elif isinstance(op, WriteBackends):
                    self._write_backends(kept)
            except (ProviderError, OSError) as exc:
                raise StepFailed(label, str(exc)) from exc
            report.done.append(label)
        return report

    def _backends_path(self) -> Path:
        return self.dir / "backends"

    def _backends_content(self, kept: set[int]) -> str:
        indexes = sorted(set(range(1, self.spec.worker.count + 1)) | kept)
        return "".join(f"{self.host}:{self.port('worker', i)}\n" for i in indexes)

    def _current_backends(self) -> str | None:
        try:
            return self._backends_path().read_text()
        except OSError:
            return None

    def _write_backends(self, kept: set[int]) -> None:
        if not self.spec.local.gateway:
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._backends_path().with_suffix(".tmp")
        tmp.write_text(self._backends_content(kept))
        os.replace(tmp, self._backends_path())

    def _drain(
        self, index: int, options: ApplyOptions, report: ApplyReport, kept: set[int], progress: Progress
    ) -> None:
        if self._node_ops is None:
            raise ProviderError("no node transport configured for draining (use --no-drain to skip)")
        node = NodeRef(f"worker-{index}", "worker", self.host, None, admin_port=self.admin_port(index))
        try:
            self._node_ops.drain(node, timeout=options.drain_timeout)
        except DrainError as exc:
            if options.force:
                report.forced.append((node.name, str(exc)))
                progress(f"      drain failed ({exc}); stopping anyway (--force)")
            else:
                report.left_in_place.append((node.name, str(exc)))
                kept.add(index)
                progress(f"      drain failed ({exc}); leaving {node.name} running")

    def _argv_env(self, kind: Kind, index: int) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if kind == "redis":
            conf = self.dir / "redis.conf"
            data = self.dir / "redis"
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(
                    f'bind {self.host}\nport {self.port("redis")}\ndir {data}\nsave ""\nappendonly no\n'
                    f"requirepass {self._secrets.redis_password.get_secret_value()}\n"
                )
            return [self.spec.local.redis_server, str(conf)], env
        if kind == "gateway":
            # run our own module even when the package is not installed (a source checkout)
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            listen = f"{self.host}:{self.port('gateway')}"
            argv = [sys.executable, "-m", "mbworker.provision.local_gateway", "--listen", listen,
                    "--backends", str(self._backends_path()), "--control", self.control_url(),
                    "--node-token-file", str(node_token_path(self.dir.parent)),
                    "--name", f"{self.spec.name}-gateway"]  # fmt: skip
            return argv, env  # it pulls its upstreams from the control plane (started before it), as proxies do
        command = self.spec.local.worker_command or [sys.executable, "-m", "mbworker.cli.main"]
        if kind == "control":
            state_dir = self.dir.parent
            control_token(state_dir)  # created with the cluster's secrets, 0600, before the process reads them
            node_token(state_dir)
            argv = [*command, "control", "serve", "--host", self.host,
                    "--port", str(self.port("control")), "--token-file", str(token_path(state_dir)),
                    "--node-token-file", str(node_token_path(state_dir))]  # fmt: skip
            env |= {
                "MBWORKER_CONTROL_REDIS_URL": self.redis_url(),
                "MBWORKER_CONTROL_ADMIN_TOKEN": self._secrets.admin_token.get_secret_value(),
            }
            return argv, env
        data_dir = self.dir / f"worker-{index}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [*command, "serve", "--host", self.host,
                "--port", str(self.port("worker", index)), "--admin-port", str(self.admin_port(index)),
                "--data-dir", str(data_dir)]  # fmt: skip
        if self.spec.local.worker_venv is not None:
            # its own copy of the venv, under the supervisor that installs upgrades into it (as root does on a cloud
            # worker); the supervisor is this checkout's, the worker the venv's
            venv = self.dir / f"worker-{index}.venv"
            if not venv.exists():
                shutil.copytree(self.spec.local.worker_venv, venv, symlinks=True)
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            argv = [sys.executable, "-m", "mbworker.provision.local_supervisor", "--venv", str(venv),
                    "--data-dir", str(data_dir), "--control-url", self.control_url(),
                    "--token-file", str(node_token_path(self.dir.parent)), "--", "-m", "mbworker.cli.main",
                    *argv[len(command):]]  # fmt: skip
        env |= {
            "MBWORKER_REDIS_URL": self.redis_url(),
            "MBWORKER_JWT_SECRET": self._secrets.jwt_secret.get_secret_value(),
            "MBWORKER_ADMIN_TOKEN": self._secrets.admin_token.get_secret_value(),
            "MBWORKER_NODE_ID": f"{self.spec.name}-worker-{index:03d}",
        }
        return argv, env

    def _start(self, kind: Kind, index: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self._key(kind, index)
        if kind == "gateway":
            self._write_backends(set())
        argv, env = self._argv_env(kind, index)
        log = self.dir / f"{key}.log"
        with open(log, "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, cwd=self.dir,
                )  # fmt: skip
            except OSError as exc:
                raise ProviderError(f"cannot start {key} ({argv[0]}): {exc.strerror}") from exc
        _CHILDREN[proc.pid] = proc
        start = _start_time(proc.pid)
        records = self._load()
        records[key] = {"pid": proc.pid, "start": start, "argv": argv[:2], "port": self.port(kind, index)}
        self._save(records)
        self._wait_ready(key, proc, self.port(kind, index))
        if kind == "control":
            write_endpoint(self.dir.parent, self.control_url())

    def _wait_ready(self, key: str, proc: subprocess.Popen[bytes], port: int) -> None:
        """Wait until the process accepts TCP on its port; fail (and stop it) if it exits or takes too long."""
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if proc.poll() is not None:
                self._forget(key)
                raise ProviderError(f"{key} exited with status {proc.returncode}; see {self.dir / (key + '.log')}")
            try:
                with socket.create_connection((self.host, port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._stop(key)
                raise ProviderError(f"{key} did not listen on port {port} within {self._ready_timeout:.0f}s")
            time.sleep(0.05)

    def _forget(self, key: str) -> None:
        records = self._load()
        rec = records.pop(key, None)
        self._save(records)
        if rec is not None and (child := _CHILDREN.pop(rec["pid"], None)) is not None:
            child.wait(timeout=STOP_GRACE)

    def _stop(self, key: str) -> None:
        records = self._load()
        rec = records.get(key)
        if rec is None:
            return
        pid = rec["pid"]
        if _start_time(pid) == rec["start"]:
            _signal_group(pid, signal.SIGTERM)
            if not _wait_gone(pid, STOP_GRACE):
                _signal_group(pid, signal.SIGKILL)
                _wait_gone(pid, STOP_GRACE)
        self._forget(key)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: the group id is the pid
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise ProviderError(f"cannot signal process {pid}: {exc.strerror}") from exc


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        child = _CHILDREN.get(pid)
        if child is not None:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
                return True
            except subprocess.TimeoutExpired:
                return False
        if _start_time(pid) is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
