"""`lib.nonblocking`: writes that never wait, and the end-of-pass flusher, on real sockets in a real trio run."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from mbworker.lib.nonblocking import pass_flusher, write_some


def test_write_some_takes_what_fits_and_says_when_the_peer_is_gone() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert write_some(a.fileno(), b"hello") == 5
        assert b.recv(10) == b"hello"
        taken = 0
        while (n := write_some(a.fileno(), b"x" * 65536)) > 0:  # fill the kernel's buffers
            taken += n
        assert n == 0  # full: would block, not an error
        assert taken > 0
        b.close()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            write_some(a.fileno(), b"more")
    with pytest.raises(OSError, match="Bad file descriptor"):  # a closed socket's fileno() is -1: EBADF
        write_some(a.fileno(), b"late")


class Item:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def flush(self) -> None:
        self.log.append(f"flush {self.name}")
        if self.fail:
            raise RuntimeError("broken item")


async def test_items_are_flushed_once_every_ready_task_has_run() -> None:
    log: list[str] = []
    flusher = pass_flusher()
    assert pass_flusher() is flusher  # one per run

    async def task(name: str, fail: bool = False) -> None:
        flusher.add(Item(log, name, fail))
        log.append(f"ran {name}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task, "a", True)  # a failing flush does not stop the others
        nursery.start_soon(task, "b")
        await trio.testing.wait_all_tasks_blocked()
    # Both tasks ran in one pass before anything was flushed: the flushes came together, at the pass's end.
    assert log[:2] == ["ran a", "ran b"] or log[:2] == ["ran b", "ran a"]
    assert sorted(log[2:]) == ["flush a", "flush b"]
    flusher.add(Item(log, "c"))  # the flusher is still installed after an item raised
    await trio.testing.wait_all_tasks_blocked()
    assert log[-1] == "flush c"
