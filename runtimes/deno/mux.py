"""The request multiplexer of one Deno process, sans I/O: frames in, request state and process events out.

`Multiplexer` keeps the requests in flight on one process (by id), applies each frame the child sends to the
request it names (`on_frame`), times requests out (`expire`) and fails them all when the process dies
(`fail_all`). It never reads, writes or sleeps: process.py feeds it the frames its channel reader decodes and
acts on what `on_frame` returns (ready, boot error). Tests drive it with frames alone.

A `Request` is waited on by exactly one task at a time (the requester: first for the head, then for body
chunks), so it parks that task itself (`park`/`wake`) instead of holding trio.Events (two per request, plus their
set and wait, were a visible share of the per-request cost). Owned by the process it runs on.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import trio

from mbworker.runtimes.api import Headers, SocketClosed
from mbworker.runtimes.deno.protocol import WINDOW
from mbworker.runtimes.errors import FunctionRuntimeError, InvalidResponse, ResourceLimit, WorkerError


@dataclass(eq=False, slots=True)
class SocketState:
    """The daemon's side of one upgraded request's WebSocket (the function's end): the function's messages not yet
    relayed (within the window: `unacked`, plus its close), and how many more messages the
    function may be sent before it acks. Two tasks wait on it (one per direction): `changed` wakes both."""

    protocol: str | None
    inbox: collections.deque[str | bytes | SocketClosed] = field(default_factory=collections.deque)
    unacked: collections.deque[int] = field(default_factory=collections.deque)
    """The sizes of the function's messages received and not acked yet (in the inbox or being relayed), oldest
    first: at most `WINDOW` of them, and at most `window_bytes` beyond one message (the bootstrap keeps to both)."""
    unacked_bytes: int = 0
    window_bytes: float = math.inf
    """Set when the socket opens (`wo`'s `w`): nothing comes before that."""
    credit: int = WINDOW
    gone: SocketClosed | None = None
    """The function's end is gone without a `wc` (its process died, or the request failed)."""
    closing: bool = False
    """A close is queued in `inbox` (the function's `wc`, or `going_away`): later messages are dropped."""
    max_message: float = math.inf
    """The cap on the function's messages, from `wo` on (the bootstrap checks it too; this side does not trust it)."""
    _event: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self._event.set()

    def close(self, closed: SocketClosed) -> None:
        """Queue the end of the function's messages (at most once)."""
        if not self.closing:
            self.closing = True
            self.inbox.append(closed)
            self.notify()

    def acked(self, n: int) -> None:
        """The oldest `n` unacked messages were acked to the function."""
        for _ in range(n):
            self.unacked_bytes -= self.unacked.popleft()

    async def changed(self) -> None:
        """Wait for the next `notify` (callers check their condition first; no await lies in between)."""
        event = self._event
        if event.is_set():  # a notify the caller has already seen
            event = self._event = trio.Event()
        await event.wait()


@dataclass(eq=False, slots=True)
class Request:
    """One request on a process (see the module docstring for who waits on it)."""

    rid: int
    cpu_start: float | None = None
    """Process CPU (ms) at the watchdog's first sample after the request started (watchdog.py)."""
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
    """No response head by then: `Multiplexer.expire` times the request out."""
    timed_out: bool = False
    parked: trio.lowlevel.Task | None = None
    """The task waiting for this request's next event, if any."""
    ws: SocketState | None = None
    """Set when the function accepted a WebSocket upgrade (a 101 head)."""

    def fail(self, exc: FunctionRuntimeError) -> None:
        if self.error is None and not self.ended:
            self.error = exc
        self.head_ready = True
        self.wake()
        ws = self.ws
        if ws is not None and ws.gone is None:
            # The wall clock ends a connection as Supabase does ("going away"); anything else is a failure.
            wall = isinstance(exc, ResourceLimit) and exc.kind == "wall_clock"
            ws.gone = (
                SocketClosed(1001, "the function reached its wall clock limit")
                if wall
                else SocketClosed(1011, "the function failed")
            )
            ws.notify()

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


@dataclass(frozen=True, slots=True)
class Ready:
    """The function's module loaded and a handler is registered."""


@dataclass(frozen=True, slots=True)
class BootFailed:
    """The function threw at the top level, could not be imported, or registered no handler."""

    detail: str
    """Its error, for the log and the deployer (never for callers)."""
    no_handler: bool = False


ProcessEvent = Ready | BootFailed


class MalformedFrame(Exception):
    """A well-formed frame with nonsense inside (only the bootstrap writes frames: a bug, not the function's)."""


class Multiplexer:
    """The requests in flight on one process, by id (see the module docstring)."""

    __slots__ = ("_next_rid", "reqs")

    def __init__(self) -> None:
        self.reqs: dict[int, Request] = {}
        self._next_rid = 1

    def new_request(self) -> Request:
        rid = self._next_rid
        self._next_rid = rid + 1
        return Request(rid)

    def add(self, r: Request) -> None:
        self.reqs[r.rid] = r

    def pop(self, r: Request) -> bool:
        """Forget `r`; True if it was still in flight."""
        return self.reqs.pop(r.rid, None) is not None

    def __len__(self) -> int:
        return len(self.reqs)

    def on_frame(self, head: dict[str, Any], body: bytes) -> ProcessEvent | None:
        """Apply one frame from the child. Raises MalformedFrame for a frame that makes no sense."""
        try:
            return self._apply(head, body)
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeError) as exc:
            raise MalformedFrame(f"malformed frame {str(head)[:200]}") from exc

    def _apply(self, head: dict[str, Any], body: bytes) -> ProcessEvent | None:
        t = head["t"]
        if t == "b":
            r = self.reqs.get(head["i"])
            if r is not None:
                r.chunks.append(body)
                r.wake()
        elif t == "h":
            r = self.reqs.get(head["i"])
            if r is not None:
                r.status = head["s"]
                if r.status == 101:
                    r.ws = SocketState(head.get("p"))
                r.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["h"]]
                if body:
                    r.chunks.append(body)
                if "e" in head:
                    r.ended = True
                r.timed_out = False  # the head won a race with `expire` in the same tick
                r.head_ready = True
                r.wake()
        elif t == "e":
            r = self.reqs.get(head["i"])
            if r is not None:
                r.ended = True
                r.wake()
        elif t == "f":
            r = self.reqs.get(head["i"])
            if r is not None:
                msg = str(head.get("m", ""))
                exc: FunctionRuntimeError = (
                    InvalidResponse(output=msg) if head.get("k") == "invalid" else WorkerError(output=msg)
                )
                r.fail(exc)
        elif t == "wm":
            r = self.reqs.get(head["i"])
            if r is not None and r.ws is not None:
                ws = r.ws
                size = len(body)
                if ws.closing:
                    pass
                elif size > ws.max_message:  # as for a client's: 1009 to the client, then `wc` to the function
                    why = f"message of {size} bytes is over the {ws.max_message} byte limit"
                    ws.close(SocketClosed(1009, why))
                elif len(ws.unacked) >= WINDOW or (ws.unacked and ws.unacked_bytes + size > ws.window_bytes):
                    # The function's socket keeps to the window and user code cannot reach its counters
                    # (websocket.ts), so this is the bootstrap's fault; the socket ends, not the process.
                    ws.close(SocketClosed(1011, "the function sent beyond its WebSocket window"))
                else:
                    ws.unacked.append(size)
                    ws.unacked_bytes += size
                    ws.inbox.append(body if "b" in head else body.decode())
                    ws.notify()
        elif t == "wa":
            r = self.reqs.get(head["i"])
            if r is not None and r.ws is not None:
                r.ws.credit += int(head["n"])
                r.ws.notify()
        elif t == "wc":
            r = self.reqs.get(head["i"])
            if r is not None and r.ws is not None:
                r.ws.close(SocketClosed.from_function(head.get("c"), head.get("r", "")))
        elif t == "r":
            return Ready()
        elif t == "x":
            return BootFailed(str(head.get("m", "")), no_handler=head.get("k") == "no_handler")
        return None

    def expire(self, now: float) -> float:
        """Time out (`timed_out`, woken) every request whose head did not come by its deadline; the earliest
        deadline still pending (inf: none)."""
        nxt = math.inf
        for r in self.reqs.values():
            if r.head_ready:
                continue
            if r.deadline <= now:
                r.timed_out = True
                r.head_ready = True
                r.wake()
            elif r.deadline < nxt:
                nxt = r.deadline
        return nxt

    def going_away(self, reason: str) -> None:
        """Close every WebSocket on this process with 1001 (its version was retired): the front door closes each
        client, then tells the function (`wc`)."""
        for r in self.reqs.values():
            if r.ws is not None:
                r.ws.close(SocketClosed(1001, reason))

    def fail_all(self, exc: FunctionRuntimeError) -> None:
        for r in list(self.reqs.values()):
            r.fail(exc)


def complete_body(r: Request, cap: int) -> bytes | None:
    """The whole body when it came with the head (one frame: head + body + end), else None.

    Lets the front door answer with Content-Length in one write. The body iterator still yields the same chunk;
    a body over the cap is left to it, which raises when it is read.
    """
    if not r.ended or r.error is not None or len(r.chunks) > 1:
        return None
    body = r.chunks[0] if r.chunks else b""
    return body if len(body) <= cap else None
