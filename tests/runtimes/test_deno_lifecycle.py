"""Pooling, concurrency, rollover, scale to zero and 'no orphans' for the Deno runtime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import trio
import trio.testing

import mbworker.runtimes.deno.runtime
from mbworker.runtimes.deno.runtime import DENO_DIR_NAME, close_run_dir, open_run_dir
from mbworker.runtimes.errors import VersionRetired
from tests.runtimes.test_deno_support import (
    call,
    call_json,
    deno_bin,
    deno_pids,
    deno_runtime,
    fed_by,
    gone,
    inv,
    version,
    write_fn,
)

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP_DIR = Path(os.path.dirname(mbworker.runtimes.deno.runtime.__file__))  # as the runtime names it


async def test_many_concurrent_requests_share_one_process(tmp_path: Path) -> None:
    src = """
        let inFlight = 0, peak = 0;
        let release: () => void = () => {};
        const all = new Promise<void>((r) => (release = r));
        Deno.serve(async (req) => {
          inFlight++; peak = Math.max(peak, inFlight);
          if (inFlight === Number(new URL(req.url).searchParams.get("n"))) release();
          await all;  // every request waits until all of them are inside the handler at once
          inFlight--;
          return Response.json({ pid: Deno.pid, peak });
        });
    """
    n = 40
    fn = version(write_fn(tmp_path, src), max_processes=1, max_concurrency=n)
    results: list[dict[str, int]] = []
    async with deno_runtime(tmp_path) as rt:
        await rt.warm(fn)

        async def one() -> None:
            results.append(await call_json(rt, fn, "GET", f"/fn?n={n}"))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)
        stats = rt.statistics()
    assert len(results) == n
    assert len({r["pid"] for r in results}) == 1
    assert max(r["peak"] for r in results) == n
    assert stats.processes == 1
    assert stats.cold_starts == 1


async def test_concurrency_limit_spreads_over_processes(tmp_path: Path) -> None:
    src = """
        let release: () => void = () => {};
        const gate = new Promise<void>((r) => (release = r));
        Deno.serve(async (req) => {
          if (new URL(req.url).pathname === "/fn/open") { release(); return new Response("opened"); }
          return new Response(new ReadableStream({ async start(c) { await gate; c.close(); } }));
        });
    """
    fn = version(write_fn(tmp_path, src), max_processes=2, max_concurrency=1)
    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("GET", "/fn/wait")) as _:
        # the only process is busy: the next request boots a second one
        assert (await call(rt, fn, "GET", "/fn/open"))[2] == b"opened"
        assert rt.statistics().processes == 2


async def test_retire_lets_in_flight_finish_then_stops(tmp_path: Path) -> None:
    src = 'Deno.serve((req) => new Response(req.body, { headers: { "x-pid": String(Deno.pid) } }));'
    fn = version(write_fn(tmp_path, src))
    send, recv = trio.open_memory_channel[bytes](0)

    async with deno_runtime(tmp_path) as rt:
        await rt.warm(fn)
        (old_pid,) = deno_pids()
        async with rt.invoke(fn, inv("POST", "/fn", fed_by(recv))) as res:
            await rt.retire(fn)
            # a request that comes after retire() boots a fresh process; the old one is still serving us
            _, headers, _ = await call(rt, fn, "POST", "/fn", b"x")
            assert int(headers[b"x-pid"]) != old_pid
            assert not gone(old_pid)
            await send.send(b"still ")
            await send.send(b"served")
            await send.aclose()
            assert b"".join([c async for c in res.body]) == b"still served"
        await rt.retire(fn)  # and the process booted after the first retire
        with trio.fail_after(10):
            await rt.wait_stopped(fn)
        assert gone(old_pid)


async def test_a_request_waiting_in_a_retired_pool_is_sent_back_not_booted(tmp_path: Path) -> None:
    """A request queued for a slot when its version is retired gets VersionRetired (for the caller to run it on
    the live version): the retired pool boots nothing more, and once its in-flight request is done it is gone
    with its files."""
    src = "Deno.serve((req) => new Response(req.body));"
    fn = version(write_fn(tmp_path, src), max_processes=1, max_concurrency=1, queue_timeout_s=30)
    send, recv = trio.open_memory_channel[bytes](0)

    outcome: list[BaseException] = []

    async def queued() -> None:
        try:
            await call(rt, fn, "POST", "/fn", b"late")
        except VersionRetired as exc:
            outcome.append(exc)

    async with deno_runtime(tmp_path) as rt:
        run = next(p for p in (tmp_path / "scratch").iterdir() if p.is_dir())
        async with rt.invoke(fn, inv("POST", "/fn", fed_by(recv))) as res, trio.open_nursery() as nursery:
            nursery.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()  # queued for the one slot
            await rt.retire(fn)
            await send.send(b"in flight")
            await send.aclose()
            assert b"".join([c async for c in res.body]) == b"in flight"  # the retired version still serves it
        assert len(outcome) == 1
        with trio.fail_after(20):
            await rt.wait_stopped(fn)
        stats = rt.statistics()
        assert (stats.versions, stats.processes, stats.cold_starts) == (0, 0, 1)
        assert not list(run.glob("fn-1-*"))


async def test_redeploy_rolls_over_to_the_new_version(tmp_path: Path) -> None:
    v1 = version(write_fn(tmp_path, 'Deno.serve(() => new Response("v1"));', name="v1"), ver=1)
    v2 = version(write_fn(tmp_path, 'Deno.serve(() => new Response("v2"));', name="v2"), ver=2)
    async with deno_runtime(tmp_path) as rt:
        assert (await call(rt, v1, "GET", "/fn"))[2] == b"v1"
        assert (await call(rt, v2, "GET", "/fn"))[2] == b"v2"
        assert rt.statistics().versions == 2
        await rt.retire(v1)
        with trio.fail_after(10):
            await rt.wait_stopped(v1)
        assert rt.statistics().versions == 1
        assert (await call(rt, v2, "GET", "/fn"))[2] == b"v2"


def emitted_dir(deno_dir: Path, source_dir: Path) -> Path:
    """Where Deno keeps the JavaScript it transpiled from the files of `source_dir`."""
    return deno_dir / "gen" / "file" / os.path.abspath(source_dir).lstrip("/")


async def test_versions_start_from_the_compiled_template_and_take_their_code_with_them(tmp_path: Path) -> None:
    """The runtime's template DENO_DIR, made in its own run dir at start, where the bootstrap is compiled once
    before the runtime serves (not per version); each version's DENO_DIR starts from it, and a retired version's
    transpiled code leaves with it while the others' stays. A run dir nobody holds (a runtime that did not close)
    is swept at start."""
    scratch = tmp_path / "scratch"
    stale = scratch / "run-0123456789ab"
    (stale / DENO_DIR_NAME).mkdir(parents=True)
    (stale / DENO_DIR_NAME / "left-from-last-run").write_text("x")
    (scratch / "run-0123456789ab.lock").write_text("")
    v1 = version(write_fn(tmp_path, 'Deno.serve(() => new Response("v1"));', name="v1"), ver=1)
    v2 = version(write_fn(tmp_path, 'Deno.serve(() => new Response("v2"));', name="v2"), ver=2)
    async with deno_runtime(tmp_path) as rt:
        assert not stale.exists()
        (run,) = [p for p in scratch.iterdir() if p.is_dir()]
        deno_dir = run / DENO_DIR_NAME
        bootstrap_js = emitted_dir(deno_dir, BOOTSTRAP_DIR) / "bootstrap.ts.js"
        # compiled at start by a throwaway process, which left nothing else behind and counts as no cold start;
        # then one version dir made ahead in the background, seeded with the compiled template (spare.py)
        assert bootstrap_js.is_file()
        with trio.fail_after(30):
            await rt._shared.spares.fill()  # waits for the one under way
        (spare,) = [p for p in run.iterdir() if p.name != DENO_DIR_NAME]
        assert spare.name.startswith(".spare-")
        assert (emitted_dir(spare / "deno", BOOTSTRAP_DIR) / "bootstrap.ts.js").is_file()
        assert (spare / "tmp").stat().st_mode & 0o777 == 0o700
        assert (rt.statistics().processes, rt.statistics().cold_starts) == (0, 0)
        assert (await call(rt, v1, "GET", "/fn"))[2] == b"v1"
        assert not spare.exists()  # it became v1's dir
        assert (await call(rt, v2, "GET", "/fn"))[2] == b"v2"
        own = {v.version: next(run.glob(f"fn-{v.version}-*")) / "deno" for v in (v1, v2)}
        emitted = {v.version: emitted_dir(own[v.version], v.bundle_dir) for v in (v1, v2)}
        for ver in (1, 2):
            assert (emitted[ver] / "index.ts.js").is_file()
            assert (emitted_dir(own[ver], BOOTSTRAP_DIR) / "bootstrap.ts.js").is_file()  # the seed
        assert not emitted_dir(deno_dir, v1.bundle_dir).exists()  # the template holds no function's code
        await rt.retire(v1)
        with trio.fail_after(10):
            await rt.wait_stopped(v1)  # for a retired version: until its files are gone too
        assert not emitted[1].exists()
        assert (emitted[2] / "index.ts.js").is_file()
        assert (await call(rt, v2, "GET", "/fn"))[2] == b"v2"


async def test_idle_processes_stop_and_come_back(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, "Deno.serve(() => new Response(String(Deno.pid)));"), idle_shutdown_s=0.3)
    async with deno_runtime(tmp_path) as rt:
        first = (await call(rt, fn, "GET", "/fn"))[2]
        with trio.fail_after(10):
            await rt.wait_stopped(fn)
        assert rt.statistics().processes == 0
        assert gone(int(first))
        assert (await call(rt, fn, "GET", "/fn"))[2] != first
        assert rt.statistics().cold_starts == 2


async def test_closing_the_runtime_leaves_no_deno_process(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/spin") { while (true) {} }  // ignores the shutdown frame
          return new Response(String(Deno.pid));
        });
    """
    fn = version(write_fn(tmp_path, src), max_processes=2, max_concurrency=1)
    other = version(write_fn(tmp_path, src, name="other"), slug="other")
    async with deno_runtime(tmp_path, close_grace_s=0.5) as rt:
        await rt.warm(other)
        await rt.warm(fn)
        async with trio.open_nursery() as nursery:

            async def spin() -> None:
                try:
                    await call(rt, fn, "GET", "/fn/spin")
                except Exception:
                    pass

            nursery.start_soon(spin)
            await trio.testing.wait_all_tasks_blocked()  # the spin request is in flight
            assert rt.statistics().in_flight == 1
            pids = deno_pids()
            assert len(pids) == 2
            nursery.cancel_scope.cancel()
    assert deno_pids() == set()
    assert all(gone(p) for p in pids)


SCRIPT = """
import sys, trio
from pathlib import Path
sys.path.insert(0, {root!r})
from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime

from mbworker.runtimes.api import Invocation, empty_body
from mbworker.runtimes.limits import Limits

async def main():
    fn = FunctionVersion("fn", 1, "deno", Path({bundle!r}), "index.ts", limits=Limits(cpu_time_ms=600_000))
    spinning = trio.Event()  # the function logs as it enters its busy loop
    def on_log(fn, execution_id, stream, line):
        if "spinning" in line:
            spinning.set()
    settings = DenoSettings(deno_bin={deno!r}, scratch_dir=Path({scratch!r}))
    async with open_deno_runtime(settings, on_log=on_log) as rt:
        async def spin():
            async with rt.invoke(fn, Invocation("GET", "/fn", [], empty_body(), "r")):
                pass
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spin)
            with trio.fail_after(30):
                await spinning.wait()
            pid = next(p.pid for pool in rt._pools.values() for p in pool.processes)
            print(pid, rt._shared.socket_dir, flush=True)

trio.run(main)
"""


async def test_sigkilled_daemon_leaves_no_orphans(tmp_path: Path) -> None:
    # The function is stuck in a busy loop, so it cannot notice its stdin closing: only the parent-death
    # signal can take it down.
    bundle = write_fn(tmp_path, "Deno.serve(() => { console.log('spinning'); while (true) {} });")
    script = tmp_path / "daemon.py"
    script.write_text(
        textwrap.dedent(SCRIPT).format(root=str(ROOT), bundle=str(bundle), deno=deno_bin(), scratch=str(tmp_path / "s"))
    )
    proc = await trio.lowlevel.open_process([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(100)
                assert chunk, "the daemon script exited before warming"
                line += chunk
        pid_text, socket_dir = line.decode().split()
        child = int(pid_text)
        assert not gone(child)
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(socket_dir)  # a SIGKILLed daemon cannot clean up its (empty) socket dir
        with trio.fail_after(10):
            while not gone(child):  # noqa: ASYNC110 - polling is fine here: the child is not ours to wait for
                await trio.sleep(0.02)
    finally:
        proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_statistics_while_serving(tmp_path: Path) -> None:
    fn = version(write_fn(tmp_path, "Deno.serve((req) => new Response(req.body));"))
    send, recv = trio.open_memory_channel[bytes](0)

    async with deno_runtime(tmp_path) as rt:
        async with rt.invoke(fn, inv("POST", "/fn", fed_by(recv))) as res:
            s = rt.statistics()
            assert (s.versions, s.processes, s.busy, s.in_flight, s.cold_starts) == (1, 1, 1, 1, 1)
            await send.aclose()
            assert [c async for c in res.body] == []
        s = rt.statistics()
        assert (s.busy, s.in_flight) == (0, 0)
        assert json.dumps(s.limit_kills) == "{}"


def test_a_sweep_keeps_the_runs_of_live_runtimes(tmp_path: Path) -> None:
    """Runtimes may share a scratch dir (the default one): each sweeps only what no live runtime holds."""
    scratch = tmp_path / "scratch"
    live, live_lock = open_run_dir(scratch)
    stale = scratch / "run-0123456789ab"
    stale.mkdir()
    (scratch / "run-0123456789ab.lock").write_text("")
    orphan = scratch / "run-ba9876543210.lock"  # its dir already gone
    orphan.write_text("")
    other, other_lock = open_run_dir(scratch)
    try:
        assert live.is_dir()
        assert live.with_name(live.name + ".lock").exists()
        assert not stale.exists()
        assert not orphan.exists()
        assert sorted(p.name for p in scratch.iterdir()) == sorted(
            [live.name, live.name + ".lock", other.name, other.name + ".lock"]
        )
    finally:
        close_run_dir(other, other_lock)
        close_run_dir(live, live_lock)
    assert list(scratch.iterdir()) == []
