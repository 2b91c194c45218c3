"""Two trees side by side: the CPU one forwarded request costs the daemon and its Deno child, in each.

    .venv/bin/python bench/functions_ab.py --before /tmp/mbw-before [--after .] [--rounds 7] [--duration 3]

For before/after pairs on a shared machine. `--before` and `--after` are checkouts (e.g. `git archive <rev> |
tar -x -C /tmp/mbw-before`; the `mbworker/` links come with it); both run with THIS interpreter, so their
dependencies must match the venv. Each tree's `mbworker serve` starts as in bench/functions.py, `hello` is deployed
with `--no-verify-jwt` and one Deno process, and the two daemons are driven in alternating rounds (wrk, 16
keep-alive connections, GET), so background load hits both alike. Per round and tree: daemon and Deno child
utime+stime (/proc) ÷ 2xx responses, and the daemon's stime alone ("of it kernel"). Reported: per-round figures,
medians, and the median of the per-round after/before ratios (a round pair shares the machine's load of the
moment: its ratio holds better than either).

CPU per request, not req/s, is the figure to compare on a loaded machine: a process's CPU per request moves far
less with other work than its throughput does (which follows whatever share of the cores it gets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import functions  # noqa: E402
from _load import run_load, user_system_seconds  # noqa: E402


def start(root: Path, work: Path, name: str) -> functions.Daemon:
    functions.ROOT = root  # Daemon and its CLI calls run `python -m mbworker...` with this as cwd
    (work / name).mkdir()
    hello = work / name / "hello"
    hello.mkdir()
    (hello / "index.ts").write_text(functions.FUNCTION)
    (hello / "function.toml").write_text(functions.ONE_PROCESS)
    daemon = functions.Daemon(work / name / "data", work / name / "daemon.log")
    daemon.cli("deploy", str(hello), "--no-verify-jwt")
    reply = functions.get(daemon.port, "/functions/v1/hello")
    if not reply.startswith(b"HTTP/1.1 200"):
        daemon.stop()
        raise RuntimeError(f"{name}: hello answered {reply[:200]!r}")
    return daemon


def measure(daemon: functions.Daemon, args: argparse.Namespace, duration: float) -> tuple[float, float, float, float]:
    """Per request: the daemon's CPU, the part of it spent in the kernel, the Deno child's CPU; and req/s."""
    me, kids = daemon.proc.pid, daemon.deno_pids()
    (user0, sys0), side0 = user_system_seconds(me), functions.total_cpu(kids)
    res = run_load("127.0.0.1", daemon.port, duration=duration, connections=args.connections,
                   path="/functions/v1/hello", tool=args.tool)  # fmt: skip
    (user1, sys1), side1 = user_system_seconds(me), functions.total_cpu(kids)
    us = 1e6 / max(1, res.requests)
    return (user1 - user0 + sys1 - sys0) * us, (sys1 - sys0) * us, (side1 - side0) * us, res.rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=HERE.parent)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rows: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in trees}
    loads = [functions.loadavg()]
    with tempfile.TemporaryDirectory(prefix="mbw-bench-ab-") as tmp:
        daemons: dict[str, functions.Daemon] = {}
        try:
            for name, root in trees.items():
                daemons[name] = start(root, Path(tmp), name)
            for d in daemons.values():  # warm-up: JIT, pools
                measure(d, args, 1.0)
            for i in range(args.rounds):
                order = list(daemons.items()) if i % 2 == 0 else list(reversed(daemons.items()))
                for name, d in order:
                    rows[name].append(measure(d, args, args.duration))
                loads.append(functions.loadavg())
        finally:
            for d in daemons.values():
                d.stop()
    print(f"hello through `mbworker serve`, {args.rounds} alternating rounds × {args.duration:g} s, "
          f"{args.connections} connections; load average (1/5/15 min) by round: {' | '.join(loads)}")  # fmt: skip
    print(f"{'tree':<7} {'daemon µs/req':>14} {'of it kernel':>13} {'deno µs/req':>12} {'req/s':>8}"
          "   by round (daemon/deno µs)")  # fmt: skip
    for name, rs in rows.items():
        per = " ".join(f"{a:.0f}/{c:.0f}" for a, _, c, _ in rs)
        daemon, kernel, deno, rps = (statistics.median(r[k] for r in rs) for k in range(4))
        print(f"{name:<7} {daemon:14.1f} {kernel:13.1f} {deno:12.1f} {rps:8.0f}   {per}")
    pairs = list(zip(rows["before"], rows["after"], strict=True))
    print(f"after/before, median of per-round ratios: daemon {statistics.median(a[0] / b[0] for b, a in pairs):.2f}×,"
          f" deno {statistics.median(a[2] / b[2] for b, a in pairs):.2f}×,"
          f" req/s {statistics.median(a[3] / b[3] for b, a in pairs):.2f}×")  # fmt: skip
    print(f"trees: before {trees['before']}, after {trees['after']}; {time.strftime('%H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
