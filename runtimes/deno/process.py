"""One supervised Deno process: boot, multiplexed requests over frames, limits, stop and reap.

Frames travel on a unix socket of the process's own (`<socket_dir>/<seq>.ctl`): the daemon listens before the
spawn, accepts exactly one connection (the bootstrap's, made before the user's module is imported), then closes
the listener and removes the path, so nothing the function does can reach the framing. The child's stdout and
stderr are its log streams (`on_log`), line by line.

Ownership: a `DenoProcess` owns its child (spawn.ChildProcess), its frame channel and the tasks that pump them;
`serve()` runs in the runtime's nursery and ALWAYS reaps the child on the way out (shielded terminate → grace →
kill → wait). The pool (pool.py) owns the `DenoProcess` objects and decides which one serves a request.

Limits enforced here (see docs/deno-runtime.md):
- memory: V8 heap cap (flag) — V8's OOM abort exits with SIGTRAP (-5 / 133) → "memory"; plus an RSS watch.
- CPU: utime+stime sampled from /proc/<pid>/stat; when the process used more than cpu_time_ms since a request
  started, it is killed and every in-flight request on it fails with ResourceLimit("cpu"). CPU is per process,
  so with concurrent requests all of them are charged with the process's CPU.
- wall clock: retired (no new requests) at half, killed at full.
- idle: stopped after idle_shutdown_s without requests (scale to zero).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from mbworker.runtimes.api import FunctionVersion, Headers, Invocation, InvocationResult
from mbworker.runtimes.deno import protocol
from mbworker.runtimes.deno.broadcast import Broadcast
from mbworker.runtimes.deno.permissions import NetPolicy
from mbworker.runtimes.deno.spawn import ChildProcess, Spawner, VersionPaths, build_argv, build_env
from mbworker.runtimes.errors import (
    BootError,
    FunctionRuntimeError,
    IdleTimeout,
    InvalidResponse,
    ResourceLimit,
    WorkerError,
)

log = logging.getLogger(__name__)

OnLog = Callable[[FunctionVersion, str, str, str], None]
"""on_log(fn, execution_id, stream, line): one line of function output; stream is "stdout" or "stderr"."""

WRITE_HIGH = 1 << 20
"""Bytes queued for a child's channel above which writers wait (request bodies faster than the child reads)."""
MAX_LINE = 10_000
TAIL_LINES = 40
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_NETWORK_HINTS = ("--no-remote", "--cached-only", "jsr:", "https://", "npm:", "not in cache", "Module not found")


def _read_proc(pid: int) -> tuple[float, int] | None:
    """(CPU ms, RSS bytes) of `pid`, or None if it is gone.

    procfs reads never block on disk, so this runs on the trio thread (a worker thread would cost more than it).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu_ms = (int(fields[11]) + int(fields[12])) * 1000.0 / _CLK_TCK
    rss = int(statm.split()[1]) * _PAGE
    return cpu_ms, rss


@dataclass(eq=False, slots=True)
class _Request:
    """One request on a process. Exactly one task waits on it at a time (the requester: first for the head, then
    for body chunks), so it parks that task itself instead of holding trio.Events (two per request, plus their
    set and wait, were a visible share of the per-request cost)."""

    rid: int
    cpu_start: float | None = None
    """Process CPU (ms) at the monitor's first sample after the request started (it wakes for new requests)."""
    head_ready: bool = False
    """The head came, or the request failed or timed out: `begin` stops waiting."""
    status: int = 0
    headers: Headers = field(default_factory=list)
    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    ended: bool = False
    error: FunctionRuntimeError | None = None
    pump_scope: trio.CancelScope | None = None
    """Set only while a request body is being pumped (GET/HEAD have none: no scope to pay for)."""
    deadline: float = math.inf
    """No response head by then: the reaper (`DenoProcess._reap_idle`) times the request out."""
    timed_out: bool = False
    parked: trio.lowlevel.Task | None = None
    """The task waiting for this request's next event, if any."""

    def fail(self, exc: FunctionRuntimeError) -> None:
        if self.error is None and not self.ended:
            self.error = exc
        self.head_ready = True
        self.wake()

    def wake(self) -> None:
        """Something happened to this request (head, chunk, end, failure): resume the task waiting for it."""
        task = self.parked
        if task is not None:
            self.parked = None
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        """Wait for the next `wake()` (the caller re-checks the state: a wake may be for something else)."""
        assert self.parked is None, "one task waits on a request at a time"
        self.parked = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self.parked = None
        return trio.lowlevel.Abort.SUCCEEDED


class DenoProcess:
    """One `deno run bootstrap.ts <entry>` child serving one function version."""

    def __init__(
        self,
        fn: FunctionVersion,
        *,
        seq: int,
        deno_bin: str,
        bootstrap: Path,
        paths: VersionPaths,
        socket_dir: Path,
        spawner: Spawner,
        on_log: OnLog,
        on_exit: Callable[[DenoProcess], None],
        on_idle: Callable[[DenoProcess], None],
        net: NetPolicy | None = None,
    ) -> None:
        self.fn = fn
        self.limits = fn.limits
        self.execution_id = str(uuid.uuid4())
        self._deno_bin = deno_bin
        self._bootstrap = bootstrap
        self._paths = paths
        self._spawner = spawner
        self._on_log = on_log
        self._on_exit = on_exit
        self._on_idle = on_idle
        self._net = net
        node_socket = str(socket_dir / f"{seq}.sock")
        self._node_socket = node_socket if len(node_socket) < 100 else ""  # sun_path is 108 bytes
        self._channel_path = str(socket_dir / f"{seq}.ctl")
        self._channel: trio.SocketStream | None = None
        self.child: ChildProcess | None = None
        self.pid = 0
        self.started_at = 0.0
        self.last_used = 0.0
        self.ready = False
        self.retiring = False
        """No new requests (wall clock half, retire(), stop()); stops once in_flight reaches 0."""
        self.dead = trio.Event()
        self.kill_cause: str | None = None
        self.stop_reason: str | None = None
        self.load = 0
        """Reserved slots: requests assigned to this process (in flight or about to be)."""
        self.served = 0
        self._reqs: dict[int, _Request] = {}
        self._next_rid = 1
        self._wbuf = bytearray()  # frames the socket had no room for; `_drain_channel` writes them in order
        self._wwake = trio.Event()
        self._wdrained = Broadcast()  # `_wbuf` was written out (writers held back by WRITE_HIGH re-check it)
        self._wbroken = False
        self._chan_fd = -1
        self._ready_event = trio.Event()
        self._boot_error: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stderr_done = trio.Event()
        self._stdout_done = trio.Event()
        self._frames_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._busy = trio.Event()
        self._cpu_ms = 0.0
        self._reaper_idle = True
        self._reaper_wake = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def accepting(self) -> bool:
        return self.ready and not self.retiring and not self.dead.is_set()

    def _event_extra(self, **more: object) -> dict[str, object]:
        return {  # the daemon's log label for a function is `function` (docs/operations.md, "Logs")
            "function": self.fn.slug,
            "version": self.fn.version,
            "execution_id": self.execution_id,
            "pid": self.pid,
            **more,
        }

    def output_tail(self) -> str:
        return "\n".join(self._tail)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spawn, wait until the function registered its handler (`started()`), then supervise until exit.

        Raises BootError before `started()` if the function does not come up. Always reaps the child.
        """
        try:
            argv = build_argv(
                self._deno_bin,
                self._bootstrap,
                self.fn,
                self._paths,
                self._node_socket,
                self._net,
                channel=self._channel_path,
            )
        except BootError:
            self.dead.set()
            raise
        env = build_env(self.fn, self._paths, self.execution_id, self._node_socket)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                with contextlib.suppress(FileNotFoundError):  # a stale one (a killed daemon's); never ours
                    os.unlink(self._channel_path)
                await listener.bind(self._channel_path)
                listener.listen(1)
                self.child = child = await self._spawner.spawn(argv, env, cwd=self._paths.tmp)
            except OSError as exc:
                self.dead.set()
                raise BootError(f"could not start deno: {exc}") from exc
            self.pid = child.pid
            self.started_at = self.last_used = trio.current_time()
            boot_error: BootError | None = None
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept_channel, listener)
                    nursery.start_soon(self._read_lines, child.stdout, "stdout", self._stdout_done)
                    nursery.start_soon(self._read_lines, child.stderr, "stderr", self._stderr_done)
                    nursery.start_soon(self._wait_exit, nursery.cancel_scope)
                    nursery.start_soon(self._reap_idle)
                    try:
                        await self._wait_boot()
                    except BootError as exc:  # raised outside the nursery: trio would wrap it in a group
                        boot_error = exc
                        nursery.cancel_scope.cancel()
                    else:
                        self.ready = True
                        log.info(
                            "deno process booted",
                            extra=self._event_extra(boot_ms=round((trio.current_time() - self.started_at) * 1000, 1)),
                        )
                        task_status.started()
                        nursery.start_soon(self._monitor)
                if boot_error is not None:
                    raise boot_error
            finally:
                with trio.CancelScope(shield=True):
                    await self._reap()
        finally:
            self._close_listener(listener)

    def _close_listener(self, listener: trio.socket.SocketType) -> None:
        """After this no one can connect to the channel path again (it is gone, and so is the socket)."""
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self._channel_path)

    async def _accept_channel(self, listener: trio.socket.SocketType) -> None:
        """Accept the bootstrap's connection — the first one: it connects before importing the user's module, and
        a listen backlog is served in order — then close the listener so no later connection can be made."""
        try:
            conn, _ = await listener.accept()
        except OSError:
            return  # the process died first: `_wait_boot` reports that
        finally:
            self._close_listener(listener)
        self._channel = trio.SocketStream(conn)
        self._chan_fd = conn.fileno()
        assert self._nursery is not None
        self._nursery.start_soon(self._read_frames, self._channel)
        self._nursery.start_soon(self._drain_channel)

    async def _wait_boot(self) -> None:
        with trio.move_on_after(self.limits.boot_timeout_s) as scope:
            async with trio.open_nursery() as n:

                async def ready() -> None:
                    await self._ready_event.wait()
                    n.cancel_scope.cancel()

                async def died() -> None:
                    await self.dead.wait()
                    n.cancel_scope.cancel()

                n.start_soon(ready)
                n.start_soon(died)
        if self._ready_event.is_set() and not self.dead.is_set():
            return
        if scope.cancelled_caught and not self.dead.is_set():
            self._kill("boot_timeout")
            await self.dead.wait()
            msg = f"function did not register a handler within {self.limits.boot_timeout_s:g} s"
        else:
            msg = self._boot_error or f"function exited during boot (exit code {self._returncode()})"
        with trio.move_on_after(1):
            await self._stderr_done.wait()
        out = self.output_tail()
        if any(h in msg or h in out for h in _NETWORK_HINTS):
            msg += (
                "\n(hint: the worker has no network and no module cache: remote, jsr: and npm: imports must be "
                "inlined with `deno bundle` before deploying)"
            )
        raise BootError(f"Worker failed to boot: {msg}", output=out)

    def _returncode(self) -> int | None:
        return self.child.returncode if self.child else None

    async def _wait_exit(self, scope: trio.CancelScope) -> None:
        assert self.child is not None
        rc = await self.child.wait()
        was_ready = self.ready
        self.dead.set()
        self.ready = False
        with trio.move_on_after(0.5):  # drain what is left: last frames, and the function's last words for errors
            if self._channel is not None:
                await self._frames_done.wait()
            await self._stdout_done.wait()
            await self._stderr_done.wait()
        cause = self.kill_cause
        if cause is None and (rc in (-signal.SIGTRAP, 128 + signal.SIGTRAP) or "out of memory" in self.output_tail()):
            cause = "memory"
        self.kill_cause = cause
        log.info(
            "deno process exited",
            extra=self._event_extra(
                reason=cause or self.stop_reason or "crash", exit_code=rc, in_flight=len(self._reqs), served=self.served
            ),
        )
        for r in list(self._reqs.values()):
            r.fail(self._death_error())
        if was_ready:  # while booting, _wait_boot sees `dead` and reports why
            scope.cancel()
        self._on_exit(self)

    async def _reap(self) -> None:
        child = self.child
        if child is None:
            return
        if child.returncode is None:
            child.signal(signal.SIGTERM)
            with trio.move_on_after(1.0):
                await child.wait()
            if child.returncode is None:
                child.signal(signal.SIGKILL)
                await child.wait()
        self.dead.set()
        self.ready = False
        for r in list(self._reqs.values()):  # the reaper is gone too: nothing else would end their waits
            r.fail(self._death_error())
        child.close_pidfd()
        # No write after this may use the fd number: once closed it can name another file (the pass flusher
        # may still hold this process until the end of the pass).
        self._wbroken = True
        self._wbuf.clear()
        self._chan_fd = -1
        if self._channel is not None:
            await self._channel.aclose()
        await child.aclose_streams()

    def _kill(self, cause: str) -> None:
        if self.kill_cause is None:
            self.kill_cause = cause
        if self.child is not None:
            self.child.signal(signal.SIGKILL)

    async def stop(self, reason: str, grace: float) -> None:
        """Planned stop: `beforeunload`, in-flight and waitUntil finish within `grace`, then kill."""
        self.retiring = True
        if self.dead.is_set():
            return
        self.stop_reason = self.stop_reason or reason
        if self._chan_fd < 0:  # still booting: nobody there to dispatch beforeunload
            self._kill("stopped")
        else:
            try:
                await self._write(protocol.encode({"t": "s", "r": reason}))
            except FunctionRuntimeError:
                pass
        with trio.move_on_after(grace):
            await self.dead.wait()
        if not self.dead.is_set():
            self._kill("stopped")
            with trio.move_on_after(5):
                await self.dead.wait()

    # ------------------------------------------------------------------ pumps

    async def _read_frames(self, stream: trio.SocketStream) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while True:
                data = await stream.receive_some(256 * 1024)
                if not data:
                    return
                for head, body in decoder.feed(data):
                    try:
                        self._on_frame(head, body)
                    except (KeyError, TypeError, ValueError, AttributeError, UnicodeError) as exc:
                        raise protocol.ProtocolError(f"malformed frame {str(head)[:200]}") from exc
        except protocol.ProtocolError as exc:  # only the bootstrap writes here: a bug, not the function's doing
            self._log("stderr", f"mbworker: {exc} — killing the process")
            self._kill("protocol")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            self._frames_done.set()

    def _on_frame(self, head: dict[str, Any], body: bytes) -> None:
        t = head["t"]
        if t == "b":
            r = self._reqs.get(head["i"])
            if r is not None:
                r.chunks.append(body)
                r.wake()
        elif t == "h":
            r = self._reqs.get(head["i"])
            if r is not None:
                r.status = head["s"]
                r.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["h"]]
                if body:
                    r.chunks.append(body)
                if "e" in head:
                    r.ended = True
                r.timed_out = False  # the head won a race with the reaper in the same tick
                r.head_ready = True
                r.wake()
        elif t == "e":
            r = self._reqs.get(head["i"])
            if r is not None:
                r.ended = True
                r.wake()
        elif t == "f":
            r = self._reqs.get(head["i"])
            if r is not None:
                msg = str(head.get("m", ""))
                exc: FunctionRuntimeError = (
                    InvalidResponse(output=msg) if head.get("k") == "invalid" else WorkerError(output=msg)
                )
                r.fail(exc)
        elif t == "r":
            self._ready_event.set()
        elif t == "x":
            self._boot_error = str(head.get("m", ""))

    async def _read_lines(self, stream: trio.lowlevel.FdStream, name: str, done: trio.Event) -> None:
        """The function's stdout or stderr, line by line, into its log (`name` is the stream)."""
        pending = b""
        try:
            while True:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log(name, line.decode("utf-8", "replace"))
                if len(pending) > MAX_LINE * 4:  # a huge line without newline: flush what we have
                    self._log(name, pending.decode("utf-8", "replace"))
                    pending = b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if pending:
                self._log(name, pending.decode("utf-8", "replace"))
            done.set()

    def _log(self, stream: str, line: str) -> None:
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + "…[truncated]"
        self._tail.append(line)
        try:
            self._on_log(self.fn, self.execution_id, stream, line)
        except Exception:  # a broken log sink must not take the process down
            log.exception("on_log callback failed")

    async def _monitor(self) -> None:
        """CPU / RSS / wall clock / idle checks. Samples fast while busy, slowly while idle."""
        lim = self.limits
        busy_interval = min(0.1, max(0.01, lim.cpu_time_ms / 1000 / 5))
        rss_cap = int((lim.memory_mb * 1.5 + 128) * 1024 * 1024)
        wall_half = self.started_at + lim.wall_clock_s / 2
        wall_end = self.started_at + lim.wall_clock_s
        while not self.dead.is_set():
            now = trio.current_time()
            sample = _read_proc(self.pid)
            if sample is None:
                return
            self._cpu_ms, rss = sample
            if rss > rss_cap:
                self._log("stderr", f"mbworker: RSS {rss >> 20} MiB over the {rss_cap >> 20} MiB cap — killing")
                self._kill("memory")
                return
            for r in self._reqs.values():
                if r.cpu_start is None:
                    r.cpu_start = self._cpu_ms
                elif self._cpu_ms - r.cpu_start > lim.cpu_time_ms:
                    self._log("stderr", f"mbworker: CPU time over {lim.cpu_time_ms} ms in a request — killing")
                    self._kill("cpu")
                    return
            if now >= wall_end:
                self._log("stderr", "mbworker: wall clock time limit reached — killing")
                self._kill("wall_clock")
                return
            if now >= wall_half and not self.retiring:
                self.retiring = True
                self.stop_reason = "wall_clock"  # stopped below if idle, else by the pool when its last request ends
            if self.load == 0 and (now - self.last_used >= lim.idle_shutdown_s or self.retiring):
                self.stop_reason = self.stop_reason or "idle"
                self.retiring = True
                self._on_idle(self)
                return
            if self._reqs:
                await trio.sleep(busy_interval)
            else:
                self._busy = trio.Event()
                nxt = min(wall_half if not self.retiring else wall_end, self.last_used + lim.idle_shutdown_s, now + 1.0)
                with trio.move_on_at(max(nxt, now + busy_interval)):
                    await self._busy.wait()

    # ------------------------------------------------------------------ requests

    def _send_nowait(self, data: bytes) -> bool:
        """Queue one frame for the child's channel, writing it at once if the socket has room.

        Why not `send_all` under a lock: that costs two checkpoints per frame, a large share of the per-request
        budget; a direct non-blocking write needs none. Frames stay whole and in order because anything that
        does not fit goes to `_wbuf`, which is written before any later frame. False: the channel is broken (or
        not connected yet).
        """
        if self._wbroken or self._chan_fd < 0:
            return False
        if self._wbuf:
            self._wbuf += data
            return True
        try:
            n = os.write(self._chan_fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE: the child is gone
            self._wbroken = True
            return False
        if n < len(data):
            self._wbuf += data[n:]
            self._wwake.set()
        return True

    def _send_batched(self, data: bytes) -> bool:
        """Queue one frame for the end of this scheduler pass (`_PassFlusher`): the request heads of every task
        that runs in one pass reach Deno in one `write` (and one read on its side) instead of one each. Order
        is kept: `_send_nowait` appends while anything is queued."""
        if self._wbroken:
            return False
        if not self._wbuf:
            _pass_flusher().add(self)
        self._wbuf += data
        return True

    def flush_channel(self) -> None:
        """Write what is queued for the channel now, without waiting (the pass flusher calls this); what the
        socket has no room for is left to `_drain_channel`. Never raises."""
        if not self._wbuf or self._wbroken:
            return
        try:
            n = os.write(self._chan_fd, self._wbuf)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE: the child is gone (its reader reports why)
            self._wbroken = True
            self._wbuf.clear()
            self._wwake.set()
            return
        del self._wbuf[:n]
        if self._wbuf:
            self._wwake.set()
        else:
            self._wdrained.notify()

    async def _write(self, data: bytes) -> None:
        """Send one frame; waits only when a lot is queued (backpressure for request bodies)."""
        if not self._send_nowait(data):
            with trio.move_on_after(2):
                await self.dead.wait()
            raise self._death_error()
        while len(self._wbuf) > WRITE_HIGH and not self._wbroken:
            await self._wdrained.wait()

    async def _drain_channel(self) -> None:
        """Write `_wbuf`: what a full socket did not take, and request heads batched by `_send_batched`."""
        fd = self._chan_fd
        while True:
            await self._wwake.wait()
            self._wwake = trio.Event()
            while self._wbuf:
                try:
                    n = os.write(fd, self._wbuf)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                except OSError:
                    self._wbroken = True
                    self._wbuf.clear()
                    break
                del self._wbuf[:n]
                if self._wbuf:
                    await trio.lowlevel.wait_writable(fd)
            self._wdrained.notify()

    def _death_error(self) -> FunctionRuntimeError:
        cause = self.kill_cause
        if cause in ("cpu", "memory", "wall_clock"):
            return ResourceLimit(cause, output=self.output_tail())
        return WorkerError(output=self.output_tail())

    def new_request(self) -> _Request:
        """One request on this process: then `await begin(r, inv)`, and `await end(r)` however it went. The caller
        has reserved a slot (`load`) and releases it. (Methods, not a context manager object: each layer of those
        costs on the daemon's hottest path; `DenoRuntime.invoke` is the context manager.)"""
        rid = self._next_rid
        self._next_rid = rid + 1
        return _Request(rid)

    async def begin(self, r: _Request, inv: Invocation) -> InvocationResult:
        """Send the request and wait for its response head."""
        if self.dead.is_set():  # nothing would answer (or time out) a request registered now
            raise self._death_error()
        rid = r.rid
        self._reqs[rid] = r
        self._busy.set()
        method = inv.method.upper()
        no_body = method in ("GET", "HEAD")
        head = protocol.encode_request_head(
            rid, method, inv.url or f"http://localhost{inv.target}", inv.headers, no_body=no_body
        )
        if not self._send_batched(head):
            await self._write(head)  # raises why the process is gone
        if not no_body:
            r.pump_scope = trio.CancelScope()
            try:
                assert self._nursery is not None
                self._nursery.start_soon(self._pump_body, r, inv)
            except RuntimeError as exc:  # the process died since it was picked: its nursery is closed
                raise self._death_error() from exc
        # The idle timeout is a deadline the reaper enforces, not a CancelScope per request (~7 µs each).
        r.deadline = trio.current_time() + self.limits.request_idle_timeout_s
        if self._reaper_idle:
            self._reaper_wake.set()
        while not r.head_ready:
            await r.park()
        if r.error is not None:
            raise r.error
        if r.timed_out:
            raise IdleTimeout()
        return InvocationResult(r.status, r.headers, _Body(self, r), _complete(r, self.limits.max_response_bytes))

    async def end(self, r: _Request) -> None:
        """Clean up after one request, however it went (cancels it in the function if it is still running)."""
        if r.pump_scope is not None:
            r.pump_scope.cancel()
        rid = r.rid
        if self._reqs.pop(rid, None) is not None and not (r.ended or r.error) and not self.dead.is_set():
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self._write(protocol.encode({"t": "c", "i": rid}))
                except FunctionRuntimeError:
                    pass
        self.last_used = trio.current_time()
        if r.ended and r.error is None:
            self.served += 1

    async def _reap_idle(self) -> None:
        """Fail with IdleTimeout (504) every request whose response head did not come within
        request_idle_timeout_s. One task per process sleeping until the earliest deadline: requests pay for no
        CancelScope, and under steady load this wakes about once per timeout period."""
        while True:
            now = trio.current_time()
            nxt = math.inf
            for r in self._reqs.values():
                if r.head_ready:
                    continue
                if r.deadline <= now:
                    r.timed_out = True
                    r.head_ready = True
                    r.wake()
                elif r.deadline < nxt:
                    nxt = r.deadline
            if nxt == math.inf:
                self._reaper_idle = True
                self._reaper_wake = trio.Event()
                await self._reaper_wake.wait()
                self._reaper_idle = False
            else:
                await trio.sleep_until(nxt)

    async def _pump_body(self, r: _Request, inv: Invocation) -> None:
        """Runs in the process nursery (not a per-request one: trio would wrap the request's errors in groups)."""
        assert r.pump_scope is not None
        with r.pump_scope:
            try:
                async for chunk in inv.body:
                    if r.error is not None or r.ended:
                        return
                    if chunk:
                        await self._write(protocol.encode({"t": "b", "i": r.rid}, chunk))
                await self._write(protocol.encode({"t": "e", "i": r.rid}))
            except FunctionRuntimeError:
                return  # the process died: the response side reports why
            except Exception as exc:  # the caller's body stream failed (client gone): fail this request only
                log.debug("request body stream failed", exc_info=True)
                r.fail(WorkerError(f"reading the request body failed: {exc!r}"))


def _complete(r: _Request, cap: int) -> bytes | None:
    """The whole body when it came with the head (one frame: head + body + end), else None.

    Lets the front door answer with Content-Length in one write. `_Body` still yields the same chunk; a body over
    the cap is left to `_Body`, which raises when it is read.
    """
    if not r.ended or r.error is not None or len(r.chunks) > 1:
        return None
    body = r.chunks[0] if r.chunks else b""
    return body if len(body) <= cap else None


class _Body:
    """The response body of one request, as an async iterator.

    A class, not an async generator: a consumer that stops early (client gone) leaves nothing to finalize.
    """

    __slots__ = ("_cap", "_proc", "_r", "_sent", "_unacked")

    def __init__(self, proc: DenoProcess, r: _Request) -> None:
        self._proc = proc
        self._r = r
        self._unacked = 0
        self._sent = 0
        self._cap = proc.limits.max_response_bytes

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        r = self._r
        while True:
            if r.chunks:
                chunk = r.chunks.popleft()
                self._sent += len(chunk)
                if self._sent > self._cap:  # leaving the invoke context cancels the request in the function
                    raise WorkerError(f"Function response exceeded {self._cap} bytes")
                self._unacked += 1
                if self._unacked >= protocol.ACK_EVERY:
                    await self._proc._write(protocol.encode({"t": "a", "i": r.rid, "n": self._unacked}))
                    self._unacked = 0
                return chunk
            if r.error is not None:
                raise r.error
            if r.ended:
                raise StopAsyncIteration
            await r.park()


class _PassFlusher(trio.abc.Instrument):
    """Writes the channel bytes that processes queued during one scheduler pass, just before trio polls for I/O:
    one syscall per process per pass, and no task switch to a writer task. One per trio run (`_pass_flusher`),
    installed on first use; with nothing queued a pass costs it one method call."""

    def __init__(self) -> None:
        self._queued: list[DenoProcess] = []

    def add(self, proc: DenoProcess) -> None:
        self._queued.append(proc)

    def before_io_wait(self, timeout: float) -> None:
        queued = self._queued
        if queued:
            self._queued = []
            for proc in queued:
                proc.flush_channel()


_FLUSHER: trio.lowlevel.RunVar[_PassFlusher] = trio.lowlevel.RunVar("mbworker_deno_pass_flusher")


def _pass_flusher() -> _PassFlusher:
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = _PassFlusher()
        trio.lowlevel.add_instrument(flusher)
        _FLUSHER.set(flusher)
        return flusher
