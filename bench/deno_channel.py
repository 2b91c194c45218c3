"""What a frame channel costs Deno: a 90-byte echo through its stdin/stdout, a named FIFO pair, a unix socket.

    .venv/bin/python bench/deno_channel.py [--messages 40000]      # ~10 s

One `deno run` per channel kind echoes what it reads (the bootstrap's read loop and write path, nothing else);
this side keeps 16 messages in flight, written together as the daemon's pass flusher does, and reports messages/s
and Deno's CPU (utime+stime from /proc) per message. An inherited pipe fd is not among them: Deno 2.9 asks for
`--allow-all` to open `/dev/fd/N`. Loopback and temp files only.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mbworker.runtimes.deno.runtime import _default_deno_bin  # noqa: E402

ECHO = """
const [kind, a, b] = Deno.args;
let r: { read(p: Uint8Array): Promise<number | null> }, w: { write(p: Uint8Array): Promise<number> };
if (kind === "stdio") { r = Deno.stdin; w = Deno.stdout; }
else if (kind === "socket") { const c = await Deno.connect({ transport: "unix", path: a }); r = c; w = c; }
else { r = await Deno.open(a, { read: true }); w = await Deno.open(b, { write: true }); }
const buf = new Uint8Array(65536);
while (true) {
  const n = await r.read(buf);
  if (n === null) break;
  const out = buf.slice(0, n);
  let off = 0;
  while (off < n) off += await w.write(out.subarray(off));
}
"""
MSG = b"x" * 90
IN_FLIGHT = 16


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, tmp: Path, n: int) -> tuple[float, float]:
    script = tmp / "echo.ts"
    script.write_text(ECHO)
    sock, fin, fout = tmp / f"{kind}.sock", tmp / "in.fifo", tmp / "out.fifo"
    argv = [_default_deno_bin(), "run", f"--allow-read={tmp}", f"--allow-write={tmp}", f"--allow-net=unix:{sock}",
            str(script), kind]  # fmt: skip
    env = {"DENO_DIR": str(tmp / "deno"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    listener = None
    if kind == "stdio":
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert p.stdin is not None
        assert p.stdout is not None
        wfd, rfd = p.stdin.fileno(), p.stdout.fileno()
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(sock))
        listener.listen(1)
        p = subprocess.Popen([*argv, str(sock)], env=env)
        conn, _ = listener.accept()
        wfd = rfd = conn.fileno()
    else:
        for f in (fin, fout):
            os.mkfifo(f)
        p = subprocess.Popen([*argv, str(fin), str(fout)], env=env)
        wfd, rfd = os.open(fin, os.O_WRONLY), os.open(fout, os.O_RDONLY)
    try:
        for _ in range(2000):  # warm up: JIT, buffers
            os.write(wfd, MSG)
            got = 0
            while got < len(MSG):
                got += len(os.read(rfd, 65536))
        c0, t0 = cpu_s(p.pid), time.perf_counter()
        sent = got = 0
        while got < n * len(MSG):
            k = min(IN_FLIGHT - (sent - got // len(MSG)), n - sent)
            if k > 0:
                os.write(wfd, MSG * k)
                sent += k
            got += len(os.read(rfd, 65536))
        dt, cpu = time.perf_counter() - t0, cpu_s(p.pid) - c0
        return n / dt, cpu / n * 1e6
    finally:
        p.kill()
        p.wait()
        if listener is not None:
            listener.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=40000)
    args = ap.parse_args()
    print(f"{'channel':8} {'msgs/s':>9} {'deno µs/msg':>12}")
    for kind in ("stdio", "fifo", "socket", "stdio", "fifo", "socket"):
        with tempfile.TemporaryDirectory(prefix="mbw-channel-") as tmp:
            rate, cpu = measure(kind, Path(tmp), args.messages)
        print(f"{kind:8} {rate:9.0f} {cpu:12.1f}", flush=True)


if __name__ == "__main__":
    main()
