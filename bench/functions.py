"""The function path end to end, through the REAL daemon: issue 2's and issue 4's speed targets in one run.

    .venv/bin/python bench/functions.py [--duration 3] [--rounds 3] [--connections 16] [--cold 7] [--tool auto]

What it does (loopback only, temp data dir, free ports; stops by itself, ~2 minutes with the defaults):
1. Starts `mbworker serve` as a subprocess (as a user would) and deploys through the CLI: `hello` with
   `--no-verify-jwt`, and a tree holding `hellojwt` (same code, JWT gate on: the default), `cached`
   (`[cache] ttl = "60s"`) and `cold0..N` (never requested before the cold-start phase). Every function is
   limited to ONE Deno process (`[limits] max_processes = 1`), so "× Deno direct" compares one process to one.
2. Starts the references: bench/floor_server.py (trio, canned response, no parsing), the same handler under
   `Deno.serve` in one `deno run` process, and bench/forward_floor.py, plain and `--lean`: the floor that
   forwards each read to one Deno child through the real bootstrap before answering — the shape DESIGN.md fixes
   with none of the daemon's features. `mbworker /health` (the daemon answering a route of its own, no
   function, no cache) shows what the daemon's HTTP layer costs by itself.
3. Drives each with the same load (bench/_load.py: wrk if installed, else a Python keep-alive client), in
   alternating rounds so background load hits all alike, and reports per-target medians over the rounds.
   CPU/request: utime+stime of a process over the round ÷ 2xx responses. For mbworker: the daemon (Python,
   everything the front door does: HTTP, routing, JWT, cache, metrics, framing) and, separately, its Deno child.
4. Cold start: restarts the daemon (versions are restored lazily, nothing booted), then alternately times the
   first request to each never-run `coldN` through mbworker and a bare `deno run` of the direct server from spawn
   to its first HTTP response (fresh DENO_DIR each, like a new version's), medians.

Targets (issue 17, after issue 2's): hello req/s ≥ 0.15× Deno direct; daemon CPU per forwarded request ≤ 2.5× the
floor's; the Deno child's CPU per forwarded request ≤ 2× Deno direct's own; cold start ≤ 1.3× bare deno. Issue 4:
cache-hit req/s ≥ 0.7× the floor. On a shared machine, read the CPU ratios first: req/s follows whatever share of
the cores each process gets in its round, CPU per request much less.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _load import LoadResult, cpu_seconds, free_port, run_load  # noqa: E402
from deno_direct import first_response, spawn_direct, time_cold_direct  # noqa: E402

HANDLER = '() => new Response("hello", { headers: { "content-type": "text/plain" } })'
FUNCTION = f"Deno.serve({HANDLER});\n"
DIRECT = f'Deno.serve({{ hostname: "127.0.0.1", port: Number(Deno.args[0]), onListen() {{}} }}, {HANDLER});\n'
ONE_PROCESS = "[limits]\nmax_processes = 1\n"
START_TIMEOUT = 60


def loadavg() -> str:
    """The machine's load average (1, 5, 15 min): how much else ran on it during a measurement."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def total_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def get(port: int, path: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One GET on a fresh connection (Connection: close); the whole response. Loopback only."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# ------------------------------------------------------------------------------------------- processes


class Daemon:
    """`mbworker serve` in a subprocess; its output goes to a file (read for the ready line)."""

    def __init__(self, data_dir: Path, log_path: Path, settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.admin_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MBWORKER_")}
        self.env.update(settings or {})  # e.g. {"MBWORKER_WASM_SYNC_WAIT_US": "1000"}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        start = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mbworker.cli.main", "serve", "--port", str(self.port), "--admin-port",
             str(self.admin_port), "--data-dir", str(data_dir)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
        )  # fmt: skip
        try:  # from here on, any failure (or Ctrl-C) stops the process before it propagates
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                with open(log_path, "rb") as f:
                    f.seek(start)
                    out = f.read()
                if b"mbworker is serving" in out:
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = out[-3000:].decode(errors="replace")
                    raise RuntimeError(f"mbworker serve did not start (log: {log_path}):\n{tail}")
                time.sleep(0.05)
            secrets = data_dir / "secrets"
            keys = dict(line.split("=", 1) for line in (secrets / "keys.env").read_text().splitlines() if "=" in line)
            self.anon_key = keys["ANON_KEY"]
            # MBWORKER_ADMIN_TOKEN set: the daemon uses it and writes no admin_token file
            self.admin_token = self.env.get("MBWORKER_ADMIN_TOKEN") or (secrets / "admin_token").read_text().strip()
        except BaseException:
            self.stop()
            raise

    def cli(self, *args: str) -> str:
        env = dict(
            self.env, MBWORKER_ADMIN_URL=f"http://127.0.0.1:{self.admin_port}", MBWORKER_ADMIN_TOKEN=self.admin_token
        )
        done = subprocess.run(
            [sys.executable, "-m", "mbworker.cli.main", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mbworker {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def deno_pids(self) -> list[int]:
        return children_of(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class Ready:
    """A reference server subprocess on a known port: the floor (`announced`, it prints `READY <port>`) or the
    direct Deno server (spawned by deno_direct.spawn_direct and polled until it answers)."""

    def __init__(self, proc: subprocess.Popen[Any], port: int, child_pids: list[int] | None = None) -> None:
        self.proc = proc
        self.port = port
        self.child_pids = child_pids or []
        """Pids it announced after its port (the forward floor's Deno child)."""

    @classmethod
    def announced(cls, cmd: list[str]) -> Ready:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            cls(proc, 0).stop()
            raise RuntimeError(f"{cmd[1]} did not start: {line!r}")
        _, port, *pids = line.split()
        return cls(proc, int(port), [int(p) for p in pids])

    def stop(self) -> None:
        """SIGINT first (trio raises KeyboardInterrupt: the forward floor kills its Deno child and removes its
        temp dir; Deno exits on it), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Target:
    name: str
    port: int
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    cpu_pids: Callable[[], list[int]] = list
    """The process(es) whose CPU is 'the server' (the front door for mbworker)."""
    side_pids: Callable[[], list[int]] = list
    """Other processes to account separately (mbworker's Deno child)."""
    rounds: list[tuple[LoadResult, float, float]] = field(default_factory=list)

    def measure(self, args: argparse.Namespace, duration: float | None = None, keep: bool = True) -> None:
        pids, side = self.cpu_pids(), self.side_pids()
        cpu0, side0 = total_cpu(pids), total_cpu(side)
        res = run_load(
            "127.0.0.1",
            self.port,
            duration=duration or args.duration,
            connections=args.connections,
            path=self.path,
            tool=args.tool,
            headers=self.headers,
        )
        n = max(1, res.requests)
        if keep:
            self.rounds.append((res, (total_cpu(pids) - cpu0) / n * 1e6, (total_cpu(side) - side0) / n * 1e6))

    def med(self, pick: Callable[[tuple[LoadResult, float, float]], float]) -> float:
        return statistics.median(pick(r) for r in self.rounds)

    @property
    def rps(self) -> float:
        return self.med(lambda r: r[0].rps)

    @property
    def cpu(self) -> float:
        return self.med(lambda r: r[1])

    @property
    def side(self) -> float:
        return self.med(lambda r: r[2])


def write_functions(work: Path, cold: int) -> tuple[Path, Path]:
    hello = work / "fns" / "hello"
    hello.mkdir(parents=True)
    (hello / "index.ts").write_text(FUNCTION)
    (hello / "function.toml").write_text(ONE_PROCESS)
    tree = work / "project" / "supabase" / "functions"
    specs = {
        "hellojwt": ONE_PROCESS,
        "cached": f'verify_jwt = false\n[cache]\nttl = "60s"\n{ONE_PROCESS}',
        **{f"cold{i}": "verify_jwt = false\n" for i in range(cold)},
    }
    for slug, toml in specs.items():
        (tree / slug).mkdir(parents=True)
        (tree / slug / "index.ts").write_text(FUNCTION)
        (tree / slug / "function.toml").write_text(toml)
    (work / "direct.ts").write_text(DIRECT)
    return hello, work / "project"


def cold_starts(work: Path, daemon: Daemon, count: int) -> tuple[list[float], list[float]]:
    bare, through = [], []
    for i in range(count):
        bare.append(time_cold_direct(work, i, 30))
        t0 = time.perf_counter()
        reply = get(daemon.port, f"/functions/v1/cold{i}")
        through.append(time.perf_counter() - t0)
        if not reply.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"cold{i} answered {reply[:200]!r}")
    return bare, through


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of load per target and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--cold", type=int, default=7, help="cold starts to time (each a never-run function)")
    ap.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    args = ap.parse_args()
    load_start = loadavg()

    with tempfile.TemporaryDirectory(prefix="mbw-bench-fn-") as tmp:
        work = Path(tmp)
        hello, project = write_functions(work, args.cold)
        log_path = work / "daemon.log"
        refs: list[Ready] = []
        daemon = Daemon(work / "data", log_path)
        try:
            daemon.cli("deploy", str(hello), "--no-verify-jwt")
            daemon.cli("deploy", str(project))
            for path, headers in (("hello", ()), ("hellojwt", (("authorization", f"Bearer {daemon.anon_key}"),))):
                reply = get(daemon.port, f"/functions/v1/{path}", headers)
                if not reply.startswith(b"HTTP/1.1 200") or b"content-length: 5" not in reply.lower():
                    raise RuntimeError(f"unexpected answer from {path}: {reply[:300]!r}")
            if b"x-mbworker-cache: MISS" not in get(daemon.port, "/functions/v1/cached"):
                raise RuntimeError("the cached function did not answer MISS first")

            floor = Ready.announced([sys.executable, str(HERE / "floor_server.py"), "--port", "0"])
            refs.append(floor)
            forward = Ready.announced([sys.executable, str(HERE / "forward_floor.py"), "--port", "0"])
            refs.append(forward)
            lean = Ready.announced([sys.executable, str(HERE / "forward_floor.py"), "--port", "0", "--lean"])
            refs.append(lean)
            direct_port = free_port()
            direct = Ready(spawn_direct(work, direct_port, work / "deno-direct"), direct_port)
            refs.append(direct)
            first_response(direct_port, time.perf_counter() + 30)

            me, kids = [daemon.proc.pid], daemon.deno_pids
            auth = (("authorization", f"Bearer {daemon.anon_key}"),)
            targets = [
                Target("trio floor (no parsing)", floor.port, cpu_pids=lambda: [floor.proc.pid]),
                Target("Deno.serve direct", direct_port, cpu_pids=lambda: [direct.proc.pid]),
                Target("forward floor, plain", forward.port, "/", (), lambda: [forward.proc.pid],
                       lambda: forward.child_pids),
                Target("forward floor, lean", lean.port, "/", (), lambda: [lean.proc.pid], lambda: lean.child_pids),
                Target("mbworker hello", daemon.port, "/functions/v1/hello", (), lambda: me, kids),
                Target("mbworker hello + JWT", daemon.port, "/functions/v1/hellojwt", auth, lambda: me, kids),
                Target("mbworker cache hit", daemon.port, "/functions/v1/cached", (), lambda: me, kids),
                Target("mbworker /health", daemon.port, "/health", (), lambda: me, kids),
            ]  # fmt: skip
            for t in targets:  # warm-up: JIT, pools, caches
                t.measure(args, duration=1.0, keep=False)
            for _ in range(args.rounds):
                for t in targets:
                    t.measure(args)

            daemon.stop()  # restart: every version is restored lazily, so coldN boots on its first request
            daemon = Daemon(work / "data", log_path)
            bare, through = cold_starts(work, daemon, args.cold)
        finally:
            for r in refs:
                r.stop()
            daemon.stop()

    floor_t, direct_t, _plain_t, lean_t, hello_t, jwt_t, hit_t, _health_t = targets
    tool = floor_t.rounds[0][0].tool
    print(f"load average (1/5/15 min) at start: {load_start}; at the end: {loadavg()}")
    print(
        f"function path through `mbworker serve` — {os.cpu_count()} CPUs, load: {tool}, {args.connections} keep-alive"
        f" connections, GET, loopback; {args.rounds} alternating rounds × {args.duration:g} s, medians"
    )
    print(
        f"{'target':<24} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>11} {'deno µs/req':>12}"
        f" {'× floor CPU':>12} {'× floor req/s':>14} {'× direct req/s':>15} {'errors':>7}"
    )
    for t in targets:
        deno = f"{t.side:12.1f}" if t.name.startswith(("mbworker", "forward")) else f"{'':>12}"
        errors = sum(r[0].errors for r in t.rounds)
        print(
            f"{t.name:<24} {t.rps:8.0f} {t.med(lambda r: r[0].p50_ms):7.2f} {t.med(lambda r: r[0].p99_ms):7.2f}"
            f" {t.cpu:11.1f} {deno} {t.cpu / floor_t.cpu:12.2f} {t.rps / floor_t.rps:14.2f}"
            f" {t.rps / direct_t.rps:15.2f} {errors:7d}"
        )
    cb, ct = statistics.median(bare) * 1e3, statistics.median(through) * 1e3
    print(
        f"cold start (first request of a never-run function), median of {args.cold}: bare `deno run` {cb:.1f} ms,"
        f" through mbworker {ct:.1f} ms → {ct / cb:.2f}×"
    )
    print("  bare:    " + " ".join(f"{x * 1e3:.1f}" for x in bare))
    print("  mbworker: " + " ".join(f"{x * 1e3:.1f}" for x in through))
    verdict = [
        ("hello req/s ≥ 0.15× Deno direct", hello_t.rps / direct_t.rps, 0.15, "≥"),
        ("daemon CPU per forwarded request ≤ 2.5× floor (hello, no JWT)", hello_t.cpu / floor_t.cpu, 2.5, "≤"),
        ("daemon CPU per forwarded request ≤ 2.5× floor (hello + JWT)", jwt_t.cpu / floor_t.cpu, 2.5, "≤"),
        ("Deno child CPU per forwarded request ≤ 2× Deno direct's (hello)", hello_t.side / direct_t.cpu, 2.0, "≤"),
        ("cache-hit req/s ≥ 0.7× floor (issue 4)", hit_t.rps / floor_t.rps, 0.7, "≥"),
        ("cold start ≤ 1.3× bare deno", ct / cb, 1.3, "≤"),
    ]
    for name, value, goal, op in verdict:
        ok = value <= goal if op == "≤" else value >= goal
        print(f"  {'met ' if ok else 'MISS'}  {name}: {value:.2f}×")
    print(
        f"  the shape alone (lean forward floor): {lean_t.cpu / floor_t.cpu:.2f}× floor CPU,"
        f" {lean_t.rps / direct_t.rps:.2f}× direct req/s; mbworker hello = {hello_t.cpu / lean_t.cpu:.2f}× its CPU"
    )
    for t in targets:
        print(f"  {t.name} by round: req/s " + " ".join(f"{r[0].rps:.0f}" for r in t.rounds) + "; CPU µs/req "
              + " ".join(f"{r[1]:.1f}" for r in t.rounds))  # fmt: skip


if __name__ == "__main__":
    main()
