"""The floor of any trio HTTP server: accept, read, answer every read with a canned response. No parsing.

It is only correct for one-request-per-read clients (wrk, bench/_load.py): a reference, not a server.

    python bench/floor_server.py --port 8080    # prints "READY <port>" once listening
"""

from __future__ import annotations

import argparse

import trio

CANNED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"


async def _handle(stream: trio.SocketStream) -> None:
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(CANNED)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def serve_floor(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(_handle, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(serve_floor, args.host, args.port)


if __name__ == "__main__":
    main()
