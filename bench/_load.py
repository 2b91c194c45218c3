"""A small HTTP/1.1 keep-alive load generator for loopback benchmarks, and server CPU accounting.

    from _load import run_load, cpu_seconds
    result = run_load("127.0.0.1", 8080, duration=5.0, connections=16)   # wrk if installed, else Python

`run_load` uses `wrk` (Debian package `wrk`) when it is on PATH, else a Python client: one process per
connection, each sending one request at a time on a kept-alive socket. Both send one request per write and
wait for the whole response, so the floor server's "one read = one request" holds.

`free_port()` gives a loopback port that was free a moment ago (every bench here starts its servers on one).

`cpu_seconds(pid)` reads utime+stime from /proc/<pid>/stat (`user_system_seconds(pid)`: the two apart): take it
before and after a run and divide the delta by the requests served to get the server's CPU per request.
`rss_bytes(pid)` and `open_fds(pid)` read a process's resident memory and open file descriptors (Linux).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LoadResult", "cpu_seconds", "free_port", "open_fds", "rss_bytes", "run_load", "user_system_seconds"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LoadResult:
    tool: str
    """'wrk' or 'python'."""
    requests: int
    """Complete 2xx responses."""
    errors: int
    """Non-2xx responses and socket errors."""
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (Linux)."""
    return sum(user_system_seconds(pid))


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds used so far by process `pid` (Linux): the interpreter's share and the kernel's
    (system calls, the loopback TCP stack, waking the processes written to)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" of the command name, utime and stime are the 12th and 13th fields.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` in bytes (VmRSS; Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    """How many file descriptors process `pid` has open (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_load(
    host: str,
    port: int,
    *,
    duration: float = 5.0,
    connections: int = 16,
    path: str = "/",
    tool: str = "auto",
    headers: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """Drive GET `path` on host:port for `duration` seconds over `connections` keep-alive connections, sending
    `headers` (e.g. an Authorization header) with every request."""
    if tool == "wrk" or (tool == "auto" and shutil.which("wrk")):
        return _run_wrk(host, port, duration, connections, path, headers)
    return _run_python(host, port, duration, connections, path, headers)


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_ms(text: str, label: str) -> float:
    m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else float("nan")


def _run_wrk(
    host: str, port: int, duration: float, connections: int, path: str, headers: Sequence[tuple[str, str]] = ()
) -> LoadResult:
    seconds = max(1, round(duration))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers:
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(f"http://{host}:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    total = int(m.group(1))
    elapsed = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    good = total - (int(non2xx.group(1)) if non2xx else 0)
    return LoadResult("wrk", good, errors, elapsed, good / elapsed, _wrk_ms(out, "50"), _wrk_ms(out, "99"))


def _client(
    host: str,
    port: int,
    path: str,
    start_at: float,
    stop_at: float,
    out: multiprocessing.Queue[object],
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()
    latencies: list[float] = []
    errors = 0
    # A server that stops answering fails this client (counted as an error) instead of blocking it for good.
    sock = socket.create_connection((host, port), timeout=max(0.0, stop_at - time.time()) + 10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    ok = False
    time.sleep(max(0.0, start_at - time.time()))  # all clients start together, after the spawns
    try:
        while time.time() < stop_at:
            t0 = time.perf_counter()
            sock.sendall(request)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:end])
                    need = end + 4 + (int(m.group(1)) if m else 0)
                    if len(buf) >= need:
                        ok = buf[9:10] == b"2"
                        buf = buf[need:]
                        break
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                buf += data
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
    except OSError:
        errors += 1
    finally:
        sock.close()
    out.put((latencies, errors))


def _run_python(
    host: str, port: int, duration: float, connections: int, path: str, headers: Sequence[tuple[str, str]] = ()
) -> LoadResult:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[object] = ctx.Queue()
    start_at = time.time() + 1.0 + 0.1 * connections  # spawning a Python process takes a while
    stop_at = start_at + duration
    procs = [
        ctx.Process(target=_client, args=(host, port, path, start_at, stop_at, out, tuple(headers)))
        for _ in range(connections)
    ]
    latencies: list[float] = []
    errors = 0
    try:
        for p in procs:
            p.start()
        for _ in procs:
            got = out.get(timeout=duration + 60)
            assert isinstance(got, tuple)
            lat, err = got
            latencies += lat
            errors += err
    finally:  # a client still running here (out.get timed out, or it hangs on exit) is killed
        deadline = time.monotonic() + 10
        for p in procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    elapsed = duration
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")

    return LoadResult("python", len(latencies), errors, elapsed, len(latencies) / elapsed, pct(0.5), pct(0.99))
