"""The Deno process's parts without a Deno: the multiplexer and the watchdog (pure), the writer primitives (real
fds, no child)."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from mbworker.runtimes.api import SocketClosed
from mbworker.runtimes.deno.mux import BootFailed, MalformedFrame, Multiplexer, Ready, complete_body
from mbworker.runtimes.deno.protocol import WINDOW
from mbworker.runtimes.deno.watchdog import Kill, Retire, Watchdog
from mbworker.runtimes.deno.writer import NonBlockingWriter
from mbworker.runtimes.errors import InvalidResponse, ResourceLimit, WorkerError
from mbworker.runtimes.limits import Limits

# ------------------------------------------------------------------------------------------ multiplexer


def test_frames_drive_requests_by_id() -> None:
    mux = Multiplexer()
    a, b = mux.new_request(), mux.new_request()
    mux.add(a)
    mux.add(b)
    assert mux.on_frame({"t": "h", "i": b.rid, "s": 201, "h": [["x-a", "caf\u00e9"]], "e": 1}, b"all") is None
    assert (b.status, b.headers, b.ended, b.head_ready) == (201, [(b"x-a", b"caf\xe9")], True, True)
    assert complete_body(b, cap=10) == b"all"
    assert complete_body(b, cap=2) is None  # over the cap: left to the body iterator, which raises
    assert not a.head_ready
    mux.on_frame({"t": "h", "i": a.rid, "s": 200, "h": []}, b"")
    assert complete_body(a, cap=10) is None  # a head without the end: the body streams
    mux.on_frame({"t": "b", "i": a.rid}, b"one")
    mux.on_frame({"t": "b", "i": 99}, b"nobody's")  # a request already gone: ignored
    mux.on_frame({"t": "e", "i": a.rid}, b"")
    assert (list(a.chunks), a.ended) == ([b"one"], True)


def test_failures_and_process_events() -> None:
    mux = Multiplexer()
    a, b = mux.new_request(), mux.new_request()
    mux.add(a)
    mux.add(b)
    mux.on_frame({"t": "f", "i": a.rid, "k": "invalid", "m": "bad status"}, b"")
    assert isinstance(a.error, InvalidResponse)
    assert a.error.output == "bad status"
    assert mux.on_frame({"t": "r"}, b"") == Ready()
    assert mux.on_frame({"t": "x", "k": "no_handler", "m": "none"}, b"") == BootFailed("none", no_handler=True)
    mux.fail_all(WorkerError())
    assert isinstance(b.error, WorkerError)
    assert a.head_ready
    assert b.head_ready
    with pytest.raises(MalformedFrame):
        mux.on_frame({"t": "h", "i": a.rid}, b"")  # no status


def test_websocket_frames_fill_the_socket_within_its_window() -> None:
    mux = Multiplexer()
    r = mux.new_request()
    mux.add(r)
    mux.on_frame({"t": "h", "i": r.rid, "s": 101, "h": [], "p": "chat"}, b"")
    assert r.ws is not None
    ws = r.ws
    assert (r.head_ready, ws.protocol, ws.credit) == (True, "chat", WINDOW)
    mux.on_frame({"t": "wm", "i": r.rid}, "h\u00e9".encode())
    mux.on_frame({"t": "wm", "i": r.rid, "b": 1}, b"\x00\xff")
    mux.on_frame({"t": "wa", "i": r.rid, "n": 3}, b"")
    assert (list(ws.inbox), ws.credit) == (["h\u00e9", b"\x00\xff"], WINDOW + 3)
    for _ in range(WINDOW - 2):
        mux.on_frame({"t": "wm", "i": r.rid}, b"x")
    mux.on_frame({"t": "wc", "i": r.rid, "c": 4000, "r": "done"}, b"")
    mux.on_frame({"t": "wm", "i": r.rid}, b"late")  # after its close: dropped
    assert ws.inbox[-1] == SocketClosed(4000, "done")
    assert len(ws.inbox) == WINDOW + 1


def test_the_functions_messages_are_held_to_the_cap_and_the_window_by_the_daemon() -> None:
    """Whatever the function's process writes, one socket's trouble ends that socket, never the process."""
    mux = Multiplexer()
    big, flood, other = mux.new_request(), mux.new_request(), mux.new_request()
    for r in (big, flood, other):
        mux.add(r)
        mux.on_frame({"t": "h", "i": r.rid, "s": 101, "h": []}, b"")
        assert r.ws is not None
        r.ws.max_message = 10  # `wo` went out (process.py sets it)
    assert big.ws is not None
    assert flood.ws is not None
    assert other.ws is not None
    mux.on_frame({"t": "wm", "i": big.rid}, b"x" * 10)  # at the cap: passes
    mux.on_frame({"t": "wm", "i": big.rid, "b": 1}, b"x" * 11)  # over it: 1009, as for a client's
    mux.on_frame({"t": "wm", "i": big.rid}, b"after")  # the socket is closing: dropped
    assert list(big.ws.inbox) == ["x" * 10, SocketClosed(1009, "message of 11 bytes is over the 10 byte limit")]
    for _ in range(WINDOW + 5):  # past the window: 1011, the inbox stays bounded
        mux.on_frame({"t": "wm", "i": flood.rid}, b"y")
    assert len(flood.ws.inbox) == WINDOW + 1
    assert flood.ws.inbox[-1] == SocketClosed(1011, "the function sent beyond its WebSocket window")
    mux.on_frame({"t": "wm", "i": other.rid}, b"fine")  # the process's other sockets go on
    assert list(other.ws.inbox) == ["fine"]
    assert other.ws.gone is None


def test_the_functions_messages_toward_a_client_are_windowed_in_bytes() -> None:
    """`wo`'s `w`: what the function has unacked toward a client is at most that many bytes, or one message."""
    mux = Multiplexer()
    r = mux.new_request()
    mux.add(r)
    mux.on_frame({"t": "h", "i": r.rid, "s": 101, "h": []}, b"")
    assert r.ws is not None
    ws = r.ws
    ws.max_message, ws.window_bytes = 100, 10  # `wo` went out (process.py sets them)
    mux.on_frame({"t": "wm", "i": r.rid, "b": 1}, b"a" * 50)  # one message over the window: nothing else unacked
    ws.inbox.popleft()
    ws.acked(1)  # the client's connection took it
    assert (ws.unacked_bytes, len(ws.unacked)) == (0, 0)
    for part in (b"b" * 6, b"c" * 4):  # ten bytes: the window
        mux.on_frame({"t": "wm", "i": r.rid, "b": 1}, part)
    assert ws.unacked_bytes == 10
    mux.on_frame({"t": "wm", "i": r.rid, "b": 1}, b"d")  # beyond it: the bootstrap's fault, 1011 for this socket
    assert list(ws.inbox) == [b"b" * 6, b"c" * 4, SocketClosed(1011, "the function sent beyond its WebSocket window")]


def test_websockets_end_with_the_process() -> None:
    mux = Multiplexer()
    a, b, c = mux.new_request(), mux.new_request(), mux.new_request()
    for r in (a, b, c):
        mux.add(r)
        mux.on_frame({"t": "h", "i": r.rid, "s": 101, "h": []}, b"")
    mux.going_away("redeployed")  # a retired version's sockets: closed with 1001, after what is queued
    assert a.ws is not None
    assert a.ws.inbox[-1] == SocketClosed(1001, "redeployed")
    mux.reqs.pop(a.rid)
    mux.reqs.pop(b.rid)
    b.fail(ResourceLimit("wall_clock"))
    c.fail(ResourceLimit("cpu"))
    assert b.ws is not None
    assert b.ws.gone == SocketClosed(1001, "the function reached its wall clock limit")
    assert c.ws is not None
    assert c.ws.gone == SocketClosed(1011, "the function failed")


def test_expire_times_out_only_requests_without_a_head() -> None:
    mux = Multiplexer()
    late, answered, later = mux.new_request(), mux.new_request(), mux.new_request()
    late.deadline, answered.deadline, later.deadline = 5.0, 5.0, 9.0
    for r in (late, answered, later):
        mux.add(r)
    mux.on_frame({"t": "h", "i": answered.rid, "s": 200, "h": []}, b"")
    assert mux.expire(6.0) == 9.0
    assert late.timed_out
    assert not answered.timed_out
    assert not later.timed_out
    assert mux.pop(late)
    assert not mux.pop(late)
    assert len(mux) == 2


# ------------------------------------------------------------------------------------------ watchdog


class _Req:
    def __init__(self) -> None:
        self.cpu_start: float | None = None


LIMITS = Limits(cpu_time_ms=200, memory_mb=64, wall_clock_s=100)


def test_boot_cpu_is_limited() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    assert dog.sample(0.1, 150.0, 1 << 20, [], booting=True) is None
    verdict = dog.sample(0.2, 250.0, 1 << 20, [], booting=True)
    assert isinstance(verdict, Kill)
    assert verdict.cause == "cpu"
    assert "booting" in verdict.message


def test_a_request_is_charged_from_its_first_sample() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    r = _Req()
    assert dog.sample(1.0, 1000.0, 0, [r]) is None  # the process's earlier CPU is not the request's
    assert r.cpu_start == 1000.0
    assert dog.sample(1.1, 1150.0, 0, [r]) is None
    verdict = dog.sample(1.2, 1250.0, 0, [r])
    assert isinstance(verdict, Kill)
    assert "in a request" in verdict.message


def test_work_left_spinning_after_a_response_is_retired_then_killed() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    assert dog.sample(1.0, 100.0, 0, []) is None
    assert dog.sample(1.04, 140.0, 0, []) is None  # 40 ms of CPU in 40 ms with nothing in flight
    assert dog.background
    assert dog.sample(1.1, 200.0, 0, []) == Retire("cpu_background")  # over a quarter of the budget: no new work
    verdict = dog.sample(1.25, 350.0, 0, [])
    assert isinstance(verdict, Kill)
    assert "no request in flight" in verdict.message


def test_cpu_of_requests_that_came_and_went_between_samples_is_not_background() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    dog.sample(1.0, 100.0, 0, [])
    for i in range(1, 20):  # a busy process, nothing in flight at the instant of each sample
        assert dog.sample(1.0 + i / 10, 100.0 + 90 * i, 0, [], served=True) is None
    assert not dog.background


def test_quiet_samples_forgive_short_background_work() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    dog.sample(1.0, 100.0, 0, [])
    dog.sample(1.1, 140.0, 0, [])  # a waitUntil task doing 40 ms of work
    assert dog.background
    dog.sample(1.2, 141.0, 0, [], runnable=True)  # starved by a loaded machine, not quiet
    assert dog.background
    dog.sample(2.1, 141.0, 0, [])  # then a quiet second
    assert not dog.background
    for t in range(3, 30):  # a little work now and then never adds up
        assert dog.sample(float(t), 141.0 + t, 0, []) is None


def test_memory_and_wall_clock() -> None:
    dog = Watchdog(LIMITS, started_at=0.0)
    assert dog.sample(1.0, 0.0, 1 << 40, []) == Kill("memory", "RSS 1048576 MiB over the 224 MiB cap")
    dog = Watchdog(LIMITS, started_at=0.0)
    assert dog.sample(50.0, 0.0, 0, []) == Retire("wall_clock")
    assert dog.sample(60.0, 0.0, 0, []) is None
    verdict = dog.sample(100.0, 0.0, 0, [])
    assert isinstance(verdict, Kill)
    assert verdict.cause == "wall_clock"


# ------------------------------------------------------------------------------------------ writer


async def test_writer_keeps_frames_whole_and_in_order_past_a_full_socket() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = NonBlockingWriter(a.fileno(), high=64 * 1024)
    frames = [bytes([i]) * 10_000 for i in range(40)]  # far more than the socket holds
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.drain)
        for i, f in enumerate(frames):
            if i % 2:
                assert writer.send_batched(f)  # flushed by the pass flusher, after what is queued
            else:
                assert writer.send_now(f)
        assert writer.queued > 0
        while len(got) < sum(map(len, frames)):
            await trio.lowlevel.wait_readable(b)
            got += b.recv(1 << 20)
        await writer.wait_room()
        writer.close()
    assert bytes(got) == b"".join(frames)
    a.close()
    b.close()


async def test_writer_reports_a_broken_peer_and_never_writes_after_close() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    writer = NonBlockingWriter()
    assert not writer.send_now(b"x")  # not attached yet
    writer.attach(w)
    assert writer.send_now(b"x")
    os.close(r)
    assert not writer.send_now(b"y")  # EPIPE
    assert writer.broken
    writer.close()
    assert writer.fd == -1
    assert not writer.send_batched(b"z")
    os.close(w)
