"""One supervised Deno process: spawn, boot, supervise, stop and reap (the supervision of one child).

Frames travel on a unix socket of the process's own (`<socket_dir>/<seq>.ctl`): the daemon listens before the
spawn, accepts exactly one connection (the bootstrap's, made before the user's module is imported), then closes
the listener and removes the path, so nothing the function does can reach the framing. The child's stdout and
stderr are its log streams (`on_log`), line by line.

What is not here: the requests in flight and what each frame does to them (mux.py, sans I/O), the limits as a
decision on samples (watchdog.py, sans I/O), the write path (writer.py: `NonBlockingWriter`, on
`lib.nonblocking`), the command line and environment (spawn.py).

Ownership: a `DenoProcess` owns its child (spawn.ChildProcess), its frame channel and writer, and the tasks that
pump them; `serve()` runs in the runtime's nursery and ALWAYS reaps the child on the way out (shielded terminate →
grace → kill → wait). The pool (pool.py) owns the `DenoProcess` objects and decides which one serves a request.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

from mbworker.runtimes.api import FunctionVersion, Invocation, InvocationResult, SocketClosed
from mbworker.runtimes.deno import protocol
from mbworker.runtimes.deno.loglimit import LogBudget
from mbworker.runtimes.deno.mux import BootFailed, MalformedFrame, Multiplexer, Ready, Request, complete_body
from mbworker.runtimes.deno.permissions import NetPolicy
from mbworker.runtimes.deno.spawn import ChildProcess, Spawner, VersionPaths, build_argv, build_env, process_tmp
from mbworker.runtimes.deno.tmpquota import TmpQuota
from mbworker.runtimes.deno.watchdog import Kill, Retire, Watchdog, read_proc
from mbworker.runtimes.deno.writer import NonBlockingWriter
from mbworker.runtimes.errors import (
    BootError,
    FunctionRuntimeError,
    IdleTimeout,
    ResourceLimit,
    WorkerError,
)

log = logging.getLogger(__name__)

OnLog = Callable[[FunctionVersion, str, str, str], None]
"""on_log(fn, execution_id, stream, line): one line of function output; stream is "stdout" or "stderr"."""

MAX_LINE = 10_000
TAIL_LINES = 40
_NETWORK_HINTS = ("--no-remote", "--cached-only", "jsr:", "https://", "npm:", "not in cache", "Module not found")


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
        tmp_quota: TmpQuota,
        on_log: OnLog,
        on_exit: Callable[[DenoProcess], None],
        on_idle: Callable[[DenoProcess], None],
        net: NetPolicy | None = None,
        log_budget: LogBudget | None = None,
    ) -> None:
        self.fn = fn
        self.limits = fn.limits
        self.execution_id = str(uuid.uuid4())
        self._deno_bin = deno_bin
        self._bootstrap = bootstrap
        self._paths = paths
        self._spawner = spawner
        self._seq = seq
        self._tmp_quota = tmp_quota
        self.tmp = process_tmp(paths, seq)
        """This process's own temp dir: made before the spawn, removed after the reap (`serve`)."""
        self._on_log = on_log
        self._on_exit = on_exit
        self._on_idle = on_idle
        self._net = net
        self._log_budget = log_budget if log_budget is not None else LogBudget()
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
        self._mux = Multiplexer()
        self._writer = NonBlockingWriter()
        self._ready_event = trio.Event()
        self._boot_failed: BootFailed | None = None
        self._watchdog: Watchdog | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stderr_done = trio.Event()
        self._stdout_done = trio.Event()
        self._frames_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._busy = trio.Event()
        self._begun = 0
        """Requests begun on this process: the watchdog's samples tell request CPU from background CPU by it."""
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
                tmp=self.tmp,
                channel=self._channel_path,
            )
        except BootError:
            self.dead.set()
            raise
        env = build_env(self.fn, self._paths, self.execution_id, self._node_socket, tmp=self.tmp)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                with contextlib.suppress(FileNotFoundError):  # a stale one (a killed daemon's); never ours
                    os.unlink(self._channel_path)
                await listener.bind(self._channel_path)
                listener.listen(1)
                self.child = child = await self._spawner.spawn(argv, env, cwd=self.tmp, before=self._make_tmp)
            except OSError as exc:
                self.dead.set()
                raise BootError(f"could not start deno: {exc}") from exc
            self.pid = child.pid
            limit = self.limits.tmp_mb * 1024 * 1024
            self._tmp_quota.watch(self._seq, str(self.tmp), self.pid, limit, self._over_tmp)
            self.started_at = self.last_used = trio.current_time()
            self._watchdog = Watchdog(self.limits, self.started_at)
            boot_error: BootError | None = None
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept_channel, listener)
                    nursery.start_soon(self._read_lines, child.stdout, "stdout", self._stdout_done)
                    nursery.start_soon(self._read_lines, child.stderr, "stderr", self._stderr_done)
                    nursery.start_soon(self._wait_exit, nursery.cancel_scope)
                    nursery.start_soon(self._reap_idle)
                    nursery.start_soon(self._monitor)  # from the spawn: the CPU limit applies while booting too
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
                        self._busy.set()  # the monitor leaves its boot pace
                if boot_error is not None:
                    raise boot_error
            finally:
                with trio.CancelScope(shield=True):
                    await self._reap()
        finally:
            self._close_listener(listener)
            self._tmp_quota.unwatch(self._seq)
            with trio.CancelScope(shield=True):  # the process is gone (or never started): so goes its temp dir
                await trio.to_thread.run_sync(lambda: shutil.rmtree(self.tmp, ignore_errors=True))

    def _make_tmp(self) -> None:
        self.tmp.mkdir(mode=0o700)  # blocking; the version's dir is new to this runtime, so this one is too

    def _over_tmp(self, used: int) -> None:
        """The temp dir measured over `tmp_mb` (tmpquota.py, on the trio thread): kill the process (546 `disk`);
        its dir goes with it."""
        if self.dead.is_set():
            return
        mb = self.limits.tmp_mb
        self._log("stderr", f"mbworker: temp dir uses {used / 1048576:.1f} MiB, over the {mb} MiB limit — killing")
        log.warning("deno process over its temp dir limit", extra=self._event_extra(used=used, limit_mb=mb))
        self._kill("disk")

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
        self._writer.attach(conn.fileno())
        assert self._nursery is not None
        self._nursery.start_soon(self._read_frames, self._channel)
        self._nursery.start_soon(self._writer.drain)

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
        # Callers get a short reason (no stack, source line or path); the detail is in the function's log (the
        # bootstrap prints it) and in the error's `output`, which only deployers see.
        failed = self._boot_failed
        if scope.cancelled_caught and not self.dead.is_set():
            self._kill("boot_timeout")
            await self.dead.wait()
            reason = f"the function did not register a handler within {self.limits.boot_timeout_s:g} s"
        elif self.kill_cause == "cpu":
            reason = f"the function used more than {self.limits.cpu_time_ms} ms of CPU while booting"
        elif self.kill_cause == "memory":
            reason = "the function ran out of memory while booting"
        elif self.kill_cause == "disk":
            reason = f"the function wrote more than {self.limits.tmp_mb} MiB to its temp dir while booting"
        elif failed is not None and failed.no_handler:
            reason = (
                "the function registered no handler (Deno.serve, export default { fetch }, or a node:http "
                "server's listen)"
            )
        elif failed is not None:
            reason = "the function threw while loading (see its log)"
        else:
            reason = f"the function exited during boot (exit code {self._returncode()})"
        with trio.move_on_after(1):
            await self._stderr_done.wait()
        out = self.output_tail()
        detail = failed.detail if failed is not None else ""
        if any(h in detail or h in out for h in _NETWORK_HINTS):
            reason += (
                " (the worker has no network and no module cache: npm:, jsr: and remote imports are resolved "
                "where you deploy from: deploy with `mbworker deploy`)"
            )
        if detail and detail not in out:
            out = f"{out}\n{detail}" if out else detail
        raise BootError(f"Worker failed to boot: {reason}", output=out)

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
                reason=cause or self.stop_reason or "crash", exit_code=rc, in_flight=len(self._mux), served=self.served
            ),
        )
        self._mux.fail_all(self._death_error())
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
        self._mux.fail_all(self._death_error())  # the reaper is gone too: nothing else would end their waits
        child.close_pidfd()
        # No write after this may use the fd number: once closed it can name another file (the pass flusher
        # may still hold this writer until the end of the pass).
        self._writer.close()
        if self._channel is not None:
            await self._channel.aclose()
        await child.aclose_streams()

    def _kill(self, cause: str) -> None:
        if self.kill_cause is None:
            self.kill_cause = cause
        if self.child is not None:
            self.child.signal(signal.SIGKILL)

    def close_sockets(self, reason: str) -> None:
        """Close the WebSockets open on this process (1001, `reason`): the version was retired, and a socket would
        otherwise keep its process, and the old version, until the wall clock ends it."""
        self._mux.going_away(reason)

    async def stop(self, reason: str, grace: float) -> None:
        """Planned stop: `beforeunload`, in-flight and waitUntil finish within `grace`, then kill."""
        self.retiring = True
        if self.dead.is_set():
            return
        self.stop_reason = self.stop_reason or reason
        if self._writer.fd < 0:  # still booting: nobody there to dispatch beforeunload
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
        mux = self._mux
        try:
            while True:
                data = await stream.receive_some(256 * 1024)
                if not data:
                    return
                for head, body in decoder.feed(data):
                    event = mux.on_frame(head, body)
                    if event is None:
                        continue
                    if isinstance(event, Ready):
                        self._ready_event.set()
                    elif isinstance(event, BootFailed):
                        self._boot_failed = event
        except (protocol.ProtocolError, MalformedFrame) as exc:  # only the bootstrap writes here: a bug
            self._log("stderr", f"mbworker: {exc} — killing the process")
            self._kill("protocol")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            self._frames_done.set()

    async def _read_lines(self, stream: trio.lowlevel.FdStream, name: str, done: trio.Event) -> None:
        """The function's stdout or stderr, line by line, into its log (`name` is the stream), within the
        version's log budget (loglimit.py): over it, whole reads are dropped and counted without being split."""
        budget = self._log_budget
        pending = b""
        try:
            while True:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    break
                now = trio.current_time()
                if budget.exhausted(now):  # the lines this read completes are dropped; a partial last one waits
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        pending += data
                    else:
                        budget.drop(data.count(b"\n", 0, cut + 1), len(pending) + cut + 1)
                        pending = data[cut + 1 :]
                    if len(pending) > MAX_LINE * 4:
                        budget.drop(1, len(pending))
                        pending = b""
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if budget.admit(len(line), now):
                        self._log_line(name, line)
                if len(pending) > MAX_LINE * 4:  # a huge line without newline: flush what we have
                    if budget.admit(len(pending), now):
                        self._log_line(name, pending)
                    pending = b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if pending:
                self._log_line(name, pending)
            done.set()

    def _log_line(self, stream: str, line: bytes) -> None:
        dropped = self._log_budget.take_note()
        if dropped:
            self._log("stderr", f"mbworker: {dropped} log lines dropped (over the function's log rate limit)")
        self._log(stream, line.decode("utf-8", "replace"))

    def _log(self, stream: str, line: str) -> None:
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + "…[truncated]"
        self._tail.append(line)
        try:
            self._on_log(self.fn, self.execution_id, stream, line)
        except Exception:  # a broken log sink must not take the process down
            log.exception("on_log callback failed")

    async def _monitor(self) -> None:
        """Samples CPU and RSS for the watchdog (watchdog.py) from the spawn on, and acts on its verdicts; stops
        idle processes. Samples fast while CPU may be charged (booting, requests, background work), slowly
        otherwise."""
        lim = self.limits
        dog = self._watchdog
        assert dog is not None
        begun = self._begun
        while not self.dead.is_set():
            now = trio.current_time()
            sample = read_proc(self.pid)
            if sample is None:
                return
            booting = not self.ready
            cpu_ms, rss, runnable = sample
            served, begun = self._begun != begun, self._begun
            # An open WebSocket is not charged as a request: the process's CPU while it is open is every request's,
            # and it would end up killing the process under plain traffic. What a socket's messages cost counts as
            # work with no request in flight (the watchdog's background budget), as a timer's would.
            charged = (r for r in self._mux.reqs.values() if r.ws is None)
            verdict = dog.sample(now, cpu_ms, rss, charged, booting=booting, runnable=runnable, served=served)
            if isinstance(verdict, Kill):
                self._log("stderr", f"mbworker: {verdict.message} — killing")
                self._kill(verdict.cause)
                return
            if isinstance(verdict, Retire) and not self.retiring:
                self.retiring = True  # no new requests; stopped below once idle, or by the pool after its last
                self.stop_reason = verdict.reason
            if booting or self._mux or dog.background:
                await trio.sleep(dog.busy_interval)
                continue
            if self.load == 0 and (now - self.last_used >= lim.idle_shutdown_s or self.retiring):
                self.stop_reason = self.stop_reason or "idle"
                self.retiring = True
                self._on_idle(self)
                return
            self._busy = trio.Event()
            nxt = min(
                dog.wall_half if not self.retiring else dog.wall_end, self.last_used + lim.idle_shutdown_s, now + 1.0
            )
            with trio.move_on_at(max(nxt, now + dog.busy_interval)):
                await self._busy.wait()

    # ------------------------------------------------------------------ requests

    async def _write(self, data: bytes) -> None:
        """Send one frame; waits only when a lot is queued (backpressure for request bodies)."""
        writer = self._writer
        if not writer.send_now(data):
            with trio.move_on_after(2):
                await self.dead.wait()
            raise self._death_error()
        if writer.queued > writer.high:
            await writer.wait_room()

    def _death_error(self) -> FunctionRuntimeError:
        cause = self.kill_cause
        if cause in ("cpu", "memory", "wall_clock", "disk"):
            return ResourceLimit(cause, output=self.output_tail())
        return WorkerError(output=self.output_tail())

    def new_request(self) -> Request:
        """One request on this process: then `await begin(r, inv)`, and `await end(r)` however it went. The caller
        has reserved a slot (`load`) and releases it. (Methods, not a context manager object: each layer of those
        costs on the daemon's hottest path; `DenoRuntime.invoke` is the context manager.)"""
        return self._mux.new_request()

    async def begin(self, r: Request, inv: Invocation) -> InvocationResult:
        """Send the request and wait for its response head."""
        if self.dead.is_set():  # nothing would answer (or time out) a request registered now
            raise self._death_error()
        rid = r.rid
        self._mux.add(r)
        self._begun += 1
        self._busy.set()
        method = inv.method.upper()
        no_body = method in ("GET", "HEAD")
        head = protocol.encode_request_head(
            rid, method, inv.url or f"http://localhost{inv.target}", inv.headers, no_body=no_body, upgrade=inv.upgrade
        )
        if not self._writer.send_batched(head):
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
        if r.ws is not None:
            return InvocationResult(r.status, r.headers, _Body(self, r), socket=_Socket(self, r))
        return InvocationResult(r.status, r.headers, _Body(self, r), complete_body(r, self.limits.max_response_bytes))

    async def end(self, r: Request) -> None:
        """Clean up after one request, however it went (cancels it in the function if it is still running)."""
        if r.pump_scope is not None:
            r.pump_scope.cancel()
        rid = r.rid
        if self._mux.pop(r) and not (r.ended or r.error) and not self.dead.is_set():
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
            nxt = self._mux.expire(trio.current_time())
            if nxt == math.inf:
                self._reaper_idle = True
                self._reaper_wake = trio.Event()
                await self._reaper_wake.wait()
                self._reaper_idle = False
            else:
                await trio.sleep_until(nxt)

    async def _pump_body(self, r: Request, inv: Invocation) -> None:
        """Runs in the process nursery (not a per-request one: trio would wrap the request's errors in groups)."""
        assert r.pump_scope is not None
        chunks = aiter(inv.body)
        with r.pump_scope:
            try:
                async for chunk in chunks:
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
            finally:
                # A function may answer before it reads its body: close the stream here, not in the garbage
                # collector (an async generator left suspended warns there, out of its task).
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()


class _Body:
    """The response body of one request, as an async iterator.

    A class, not an async generator: a consumer that stops early (client gone) leaves nothing to finalize.
    """

    __slots__ = ("_cap", "_proc", "_r", "_sent", "_unacked")

    def __init__(self, proc: DenoProcess, r: Request) -> None:
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


class _Socket:
    """`FunctionSocket` over one upgraded request (mux.SocketState holds its frames; see protocol.py for the
    window). Used by the front door's relay: one task receives, another sends, inside the request's invoke."""

    __slots__ = ("_closed", "_proc", "_r", "_relaying", "_taken", "_ws")

    def __init__(self, proc: DenoProcess, r: Request) -> None:
        assert r.ws is not None
        self._proc = proc
        self._r = r
        self._ws = r.ws
        self._relaying = False  # `receive` returned a message the relay has not asked past yet
        self._taken = 0  # messages the client's connection took, not acked yet
        self._closed = False

    @property
    def protocol(self) -> str | None:
        return self._ws.protocol

    async def _frame(self, head: dict[str, object], body: bytes = b"") -> bool:
        """Write one frame for this socket; False when the process is gone (the socket's `gone` says why)."""
        try:
            await self._proc._write(protocol.encode(head, body))
        except FunctionRuntimeError:
            return False
        return True

    async def opened(self, max_message: int) -> None:
        self._ws.max_message = max_message
        self._ws.window_bytes = protocol.SOCKET_WINDOW_BYTES
        # What the function may have waiting for a slow client (`q`): a window's worth of the largest message.
        await self._frame(
            {
                "t": "wo",
                "i": self._r.rid,
                "m": max_message,
                "q": protocol.WINDOW * max_message,
                "w": protocol.SOCKET_WINDOW_BYTES,
            }
        )

    async def receive(self) -> str | bytes | SocketClosed:
        ws = self._ws
        if self._relaying:
            # The relay asks for the next message once the client's connection took the previous one: only then
            # is it acked, so a slow client's backlog stays in the function (bounded there), not here.
            self._relaying = False
            self._taken += 1
        while True:
            # Ack in batches, and everything before waiting (the function may be waiting for the window).
            taken = self._taken
            if taken and (taken >= protocol.ACK_EVERY or not ws.inbox or ws.unacked_bytes >= ws.window_bytes / 2):
                self._taken = 0
                ws.acked(taken)
                await self._frame({"t": "wa", "i": self._r.rid, "n": taken})
            if ws.inbox:
                item = ws.inbox.popleft()
                self._relaying = not isinstance(item, SocketClosed)
                return item
            if ws.gone is not None:
                return ws.gone
            await ws.changed()

    async def send(self, message: str | bytes) -> None:
        ws = self._ws
        while ws.credit <= 0 and ws.gone is None:
            await ws.changed()
        if ws.gone is not None or self._closed:
            return  # the function's end is gone: `receive` reports it
        ws.credit -= 1
        if isinstance(message, str):
            await self._frame({"t": "wm", "i": self._r.rid}, message.encode())
        else:
            await self._frame({"t": "wm", "i": self._r.rid, "b": 1}, message)

    async def close(self, code: int, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        r = self._r
        if self._ws.gone is None and await self._frame({"t": "wc", "i": r.rid, "c": code, "r": reason}):
            r.ended = True  # the socket's last frame: the request is over in the function, no cancel needed
