"""One Deno child alone, driven over its frame socket without the daemon: its CPU per request by batch size.

    .venv/bin/python bench/deno_child.py [--tree .] [--batches 1,4,16] [--rounds 3] [--seconds 3] [--cpu-prof DIR]

The child is the real one: `runtimes/deno/bootstrap.ts` of `--tree` with a hello function, started with the
runtime's own command line and environment (spawn.build_argv / build_env). This script plays the daemon: it
listens on the child's unix socket, then sends `q` frames as the daemon sends them for a GET through the front
door (its x-forwarded-* headers) in batches of k (one write), and waits for the k response frames before the next
batch. Per batch size: the child's utime+stime ÷ requests, median of the rounds. A batch is one wake-up of the
child, so the figures split into a per-request part and a per-read part (docs/benchmarks.md, "Function path",
round 7); through the daemon, batches are as large as the requests that arrive in one scheduler pass.
`--cpu-prof DIR`: Deno writes a V8 CPU profile there when the child exits (open it in Chrome's DevTools).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _load import cpu_seconds  # noqa: E402

HELLO = 'Deno.serve(() => new Response("hello", { headers: { "content-type": "text/plain" } }));\n'
PREFIX = struct.Struct(">II")
PORT = 8080  # only in the URL and Host header, as the front door writes them


class Child:
    def __init__(self, tree: Path, work: Path, cpu_prof: str | None) -> None:
        sys.path.insert(0, str(tree))
        from mbworker.runtimes.api import FunctionVersion
        from mbworker.runtimes.deno.importmap import write_import_map
        from mbworker.runtimes.deno.runtime import _default_deno_bin
        from mbworker.runtimes.deno.spawn import VersionPaths, build_argv, build_env
        from mbworker.runtimes.limits import Limits

        (work / "fn").mkdir()
        (work / "fn" / "index.js").write_text(HELLO)
        fn = FunctionVersion("hello", 1, "deno", work / "fn", "index.js", limits=Limits(max_processes=1))
        paths = VersionPaths(work, work / "deno", work / "tmp", work / "import_map.json")
        paths.tmps.mkdir()
        write_import_map(fn, paths.import_map)
        tmp = paths.tmps / "p1"
        tmp.mkdir()
        channel = str(work / "c.ctl")
        bootstrap = tree / "runtimes" / "deno" / "bootstrap.ts"
        argv = build_argv(_default_deno_bin(), bootstrap, fn, paths, "", None, tmp=tmp, channel=channel)
        if cpu_prof:
            argv[2:2] = ["--cpu-prof", f"--cpu-prof-dir={cpu_prof}"]
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(channel)
        listener.listen(1)
        listener.settimeout(30)
        self.proc = subprocess.Popen(argv, env=build_env(fn, paths, "bench", "", tmp=tmp), cwd=tmp)
        try:
            self.conn, _ = listener.accept()
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()
        self.conn.settimeout(30)
        self.buf = bytearray()
        self.rid = 0
        if self.frames()[0]["t"] != "r":
            raise RuntimeError("the child did not report ready")
        headers = [["host", f"127.0.0.1:{PORT}"], ["x-forwarded-for", "127.0.0.1"],
                   ["x-forwarded-host", f"127.0.0.1:{PORT}"], ["x-forwarded-proto", "http"]]  # fmt: skip
        self.head_tail = f',"m":"GET","u":"http://127.0.0.1:{PORT}/hello","h":{json.dumps(headers)},"e":1}}'

    def frames(self) -> list[dict[str, object]]:
        """The whole frames received so far (at least one: reads until one is complete)."""
        while True:
            out, pos = [], 0
            while len(self.buf) - pos >= 8:
                jlen, blen = PREFIX.unpack_from(self.buf, pos)
                if len(self.buf) < pos + 8 + jlen + blen:
                    break
                out.append(json.loads(self.buf[pos + 8 : pos + 8 + jlen]))
                pos += 8 + jlen + blen
            del self.buf[:pos]
            if out:
                return out
            data = self.conn.recv(256 * 1024)
            if not data:
                raise RuntimeError("the child closed its channel")
            self.buf += data

    def batch(self, k: int) -> None:
        out = bytearray()
        for _ in range(k):
            self.rid += 1
            j = f'{{"t":"q","i":{self.rid}{self.head_tail}'.encode()
            out += PREFIX.pack(len(j), 0) + j
        self.conn.sendall(out)
        got = 0
        while got < k:
            got += sum(1 for f in self.frames() if f["t"] == "h")

    def run(self, k: int, seconds: float) -> float:
        """CPU µs per request over `seconds` of batches of `k`."""
        n, cpu0 = 0, cpu_seconds(self.proc.pid)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.batch(k)
            n += k
        return (cpu_seconds(self.proc.pid) - cpu0) / n * 1e6

    def stop(self) -> None:
        """A planned shutdown (`s` frame: Deno exits and writes its profile), killed after 10 s."""
        try:
            j = b'{"t":"s","r":"bench"}'
            self.conn.sendall(PREFIX.pack(len(j), 0) + j)
        except (AttributeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose bootstrap.ts runs")
    ap.add_argument("--batches", default="1,4,16", help="requests per write, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cpu-prof", help="directory for Deno's V8 CPU profile")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="mbw-deno-child-", dir="/tmp") as tmp:  # sun_path is 108 bytes
        child = Child(args.tree.resolve(), Path(tmp), args.cpu_prof)
        try:
            child.run(16, 1.0)  # warm-up: JIT
            rows: dict[int, list[float]] = {k: [] for k in sizes}
            for _ in range(args.rounds):
                for k in sizes:
                    rows[k].append(child.run(k, args.seconds))
        finally:
            child.stop()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"one Deno child ({args.tree}), hello, {args.rounds} rounds × {args.seconds:g} s per batch size; load {load}")
    for k, xs in rows.items():
        print(f"  batch {k:>3}: {statistics.median(xs):6.2f} µs CPU per request   by round: "
              + " ".join(f"{x:.1f}" for x in xs))  # fmt: skip


if __name__ == "__main__":
    main()
