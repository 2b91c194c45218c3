"""The floor of forwarding through Deno on trio: what issue 2's shape costs before any feature is added.

    python bench/forward_floor.py --port 8080     # prints "READY <port>" once listening and Deno is up

Like bench/floor_server.py (accept, read, answer every read with a canned response, no parsing), but every read
is forwarded first: one `q` frame (runtimes/deno/protocol.py) to ONE Deno child running the real bootstrap.ts
with a hello function, and the canned answer goes out only when the child's response head frame comes back.
What it leaves out is everything the daemon adds: HTTP parsing, routing, JWT, cache, metrics, limits, headers
and bodies, error handling. What it keeps is the shape DESIGN.md fixes: trio, one task per connection, frames
on a unix socket of the child's own (the daemon listens, the bootstrap connects before the function loads)
multiplexed by request id, the connection's task parked until its response.

Two ways to write it: the plain one (each frame goes out with `send_all` under a lock, each parked task waits
on a `trio.Event`) and `--lean`, with the daemon's own tricks: frames queued during one scheduler pass go out
in one `write` just before trio polls (an instrument), and a parked task is rescheduled directly, no Event.
`--reader-answers` (implies `--lean`) measures what the park costs: the connection's task queues the frame and goes
straight back to reading its socket, and the task that reads the child's frames writes the canned answer to the
client's socket itself. One task step per request instead of two; not the shape DESIGN.md fixes (a reference for
what leaving it would buy).
Only correct for one-request-per-read clients (wrk, bench/_load.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mbworker.runtimes.deno.runtime import _default_deno_bin  # noqa: E402

CANNED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
HELLO = 'Deno.serve(() => new Response("hello", { headers: { "content-type": "text/plain" } }));\n'
_PREFIX = struct.Struct(">II")


class Child:
    """The Deno child's channel and the requests waiting on it (request id → Event, set when its head frame
    arrives)."""

    def __init__(self, channel: trio.SocketStream, *, lean: bool, reader_answers: bool = False) -> None:
        self.lean = lean or reader_answers
        self.reader_answers = reader_answers
        self.answer_to: dict[int, int] = {}  # --reader-answers: request id → the client socket's fd
        self.queued = bytearray()
        self.parked: dict[int, trio.lowlevel.Task] = {}
        self.channel = channel
        self.waiting: dict[int, trio.Event] = {}
        self.next_id = 1
        self.ready = trio.Event()
        self.lock = trio.Lock()

    async def forward(self) -> None:
        rid = self.next_id
        self.next_id += 1
        j = f'{{"t":"q","i":{rid},"m":"GET","u":"http://localhost/hello","h":[],"e":1}}'.encode()
        if self.lean:
            self.queued += _PREFIX.pack(len(j), 0) + j
            self.parked[rid] = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            return
        done = self.waiting[rid] = trio.Event()
        async with self.lock:  # frames stay whole on the pipe
            await self.channel.send_all(_PREFIX.pack(len(j), 0) + j)
        await done.wait()

    def forward_answered(self, client_fd: int) -> None:
        """--reader-answers: queue the request; `read_frames` answers the client when the head frame comes."""
        rid = self.next_id
        self.next_id += 1
        j = f'{{"t":"q","i":{rid},"m":"GET","u":"http://localhost/hello","h":[],"e":1}}'.encode()
        self.queued += _PREFIX.pack(len(j), 0) + j
        self.answer_to[rid] = client_fd

    async def read_frames(self) -> None:
        buf = bytearray()
        while True:
            data = await self.channel.receive_some(256 * 1024)
            if not data:
                return
            buf += data
            pos = 0
            while len(buf) - pos >= 8:
                jlen, blen = _PREFIX.unpack_from(buf, pos)
                end = pos + 8 + jlen + blen
                if end > len(buf):
                    break
                head = json.loads(buf[pos + 8 : pos + 8 + jlen])
                pos = end
                if head["t"] == "r":
                    self.ready.set()
                elif head["t"] in ("h", "f"):
                    if self.reader_answers:
                        fd = self.answer_to.pop(head["i"], None)  # None: its client left (wrk stopping)
                        if fd is not None:
                            with contextlib.suppress(OSError):
                                os.write(fd, CANNED)  # ~70 bytes to a socket whose client waits for them
                    elif self.lean:
                        trio.lowlevel.reschedule(self.parked.pop(head["i"]))
                    else:
                        self.waiting.pop(head["i"]).set()
            del buf[:pos]


class _FlushEachPass(trio.abc.Instrument):
    """--lean: writes what tasks queued for the child's channel during one scheduler pass, in one syscall."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.fd = child.channel.socket.fileno()

    def before_io_wait(self, timeout: float) -> None:
        q = self.child.queued
        if q:
            n = os.write(self.fd, q)  # a hello request is ~80 bytes: the socket's ~200 KiB never fills here
            del q[:n]


async def serve_forward_floor(host: str, port: int, lean: bool, reader_answers: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="mbw-forward-floor-") as tmp:
        fn_dir = Path(tmp) / "fn"  # not the channel's parent: the bootstrap revokes read on the channel's path,
        fn_dir.mkdir()  # and Deno revokes a grant of any directory above it along with it
        entry = fn_dir / "index.ts"
        entry.write_text(HELLO)
        path = str(Path(tmp) / "ctl")
        argv = [
            _default_deno_bin(),
            "run",
            "--no-remote",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            "--allow-env",
            f"--allow-read={fn_dir},{path}",
            f"--allow-write={path}",
            f"--allow-net=unix:{path}",
            str(ROOT / "runtimes" / "deno" / "bootstrap.ts"),
            entry.as_uri(),
            "",
            "",
            path,
        ]
        env = {"DENO_DIR": str(Path(tmp) / "deno"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)
        async with trio.open_nursery() as nursery:
            proc = await trio.lowlevel.open_process(argv, env=env, cwd=tmp)
            # Stopped with SIGINT (bench/functions.py's Ready.stop): trio raises KeyboardInterrupt, this kills and
            # reaps Deno, then the temp dir goes. Killed outright, Deno exits on its own (its channel closes) and
            # the temp dir stays behind.
            try:
                with trio.fail_after(30):
                    conn, _ = await listener.accept()
                listener.close()
                child = Child(trio.SocketStream(conn), lean=lean, reader_answers=reader_answers)
                if child.lean:
                    trio.lowlevel.add_instrument(_FlushEachPass(child))
                nursery.start_soon(child.read_frames)
                with trio.fail_after(30):
                    await child.ready.wait()

                async def handle(stream: trio.SocketStream) -> None:
                    try:
                        while True:
                            data = await stream.receive_some(65536)
                            if not data:
                                return
                            if reader_answers:
                                child.forward_answered(stream.socket.fileno())
                                continue
                            await child.forward()
                            await stream.send_all(CANNED)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    finally:  # its fd may be reused by the next connection: no late answer may reach that one
                        fd = stream.socket.fileno()
                        for rid in [r for r, f in child.answer_to.items() if f == fd]:
                            del child.answer_to[rid]

                listeners = await trio.open_tcp_listeners(port, host=host)
                print(f"READY {listeners[0].socket.getsockname()[1]} {proc.pid}", flush=True)
                await trio.serve_listeners(handle, listeners)
            finally:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lean", action="store_true", help="batch channel writes per pass, park tasks directly")
    parser.add_argument("--reader-answers", action="store_true", help="--lean, and the frame reader answers clients")
    args = parser.parse_args()
    try:
        trio.run(serve_forward_floor, args.host, args.port, args.lean, args.reader_answers)
    except* KeyboardInterrupt:  # how bench/functions.py stops it (SIGINT); the cleanups above have run
        pass


if __name__ == "__main__":
    main()
