"""A small TCP gateway for the local provider: round-robin over the workers, WebSocket-safe (it splices bytes).

Run as `python -m mbworker.provision.local_gateway --listen 127.0.0.1:PORT --backends FILE`. FILE holds one `host:port`
per line; it is re-read when it changes (replaced or rewritten), so scaling the local cluster only rewrites
the file. A backend that refuses the connection is skipped (that is the health check: a drained or stopped
worker stops accepting).

With `--control URL --node-token-file PATH` it pulls its upstreams from the control plane every second, as the
cloud's proxies do: only ready workers, so one being drained leaves before its drain starts. While the control
plane is unreachable or knows no ready worker, the file is what it uses.

`serve_gateway` owns its listeners and every spliced connection; cancelling it closes them all.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import trio

log = logging.getLogger("mbworker.gateway")

CONNECT_TIMEOUT = 2.0
PULL_INTERVAL = 1.0
IDLE_TIMEOUT = 600.0  # per direction; realtime clients heartbeat every 30 s
CHUNK = 65536


@dataclass
class Backends:
    path: Path
    _stamp: tuple[int, int, int] = (-1, -1, -1)
    _addrs: list[tuple[str, int]] = field(default_factory=list)
    _rr: itertools.count[int] = field(default_factory=itertools.count)
    pulled: list[tuple[str, int]] = field(default_factory=list)
    """The control plane's upstreams at the last pull (empty: none known, the file decides)."""

    def current(self) -> list[tuple[str, int]]:
        if self.pulled:
            return self.pulled
        try:
            st = self.path.stat()
        except OSError:
            return self._addrs
        # inode too: writers replace the file atomically, and mtimes can be coarser than two quick writes
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            addrs = []
            for line in self.path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    host, _, port = line.rpartition(":")
                    addrs.append((host, int(port)))
            self._addrs = addrs
        return self._addrs

    def order(self) -> list[tuple[str, int]]:
        """All backends, starting at the next one in round-robin order."""
        addrs = self.current()
        if not addrs:
            return []
        start = next(self._rr) % len(addrs)
        return addrs[start:] + addrs[:start]


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while True:
            with trio.fail_after(IDLE_TIMEOUT):
                data = await src.receive_some(CHUNK)
            if not data:
                await dst.send_eof()
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        await dst.aclose()


async def _handle(client: trio.SocketStream, backends: Backends) -> None:
    async with client:
        for host, port in backends.order():
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    upstream = await trio.open_tcp_stream(host, port)
                except OSError:
                    continue
                break
        else:
            await client.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 55\r\n"
                b"connection: close\r\n\r\n"
                b'{"code":"no_worker","message":"no worker is reachable"}'
            )
            return
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            nursery.start_soon(_pump, upstream, client)


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def pull_upstreams(
    backends: Backends, control_url: str, token: str, name: str = "gateway", interval: float = PULL_INTERVAL
) -> None:
    """Keep `backends.pulled` in step with the control plane's `GET /control/v1/upstreams` until cancelled. A
    failed pull keeps the last list (logged once per outage). Each pull names this proxy: its heartbeat."""
    from mbworker import __version__

    failing = False
    headers = {"authorization": f"Bearer {token}", "x-mbworker-node": name, "x-mbworker-version": __version__}
    async with httpx.AsyncClient(base_url=control_url, headers=headers, timeout=5.0, trust_env=False) as http:
        while True:
            try:
                response = await http.get("/control/v1/upstreams")
                response.raise_for_status()
                backends.pulled = [_address(str(u["address"])) for u in response.json()]
                failing = False
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                if not failing:
                    log.warning("upstreams not pulled from the control plane (keeping the last list): %r", exc)
                failing = True
            await trio.sleep(interval)


async def serve_gateway(
    host: str,
    port: int,
    backends_file: Path,
    *,
    control: tuple[str, str] | None = None,
    name: str = "gateway",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on host:port and splice each connection to a worker; started() with the bound port. With `control`
    (URL, node token) the upstreams come from the control plane."""
    backends = Backends(backends_file)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, backends)

    async with trio.open_nursery() as nursery:
        if control is not None:
            nursery.start_soon(pull_upstreams, backends, *control, name)
        task_status.started(bound)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _main(host: str, port: int, backends: Path, control: tuple[str, str] | None, name: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_gateway, host, port, backends, control=control, name=name))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbworker.provision.local_gateway")
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--backends", required=True, type=Path, help="file with one host:port per line")
    parser.add_argument("--control", help="the control plane's URL: pull the upstreams from it")
    parser.add_argument("--node-token-file", type=Path, help="the control plane's node token (with --control)")
    parser.add_argument("--name", default="gateway", help="this proxy's name in the control plane's node list")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    control = None
    if args.control:
        if args.node_token_file is None:
            parser.error("--control needs --node-token-file")
        control = (args.control, args.node_token_file.read_text().strip())
    trio.run(_main, host, int(port), args.backends, control, args.name)


if __name__ == "__main__":
    main()
