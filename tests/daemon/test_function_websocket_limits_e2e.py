"""Function WebSockets and the rest of a process's life, through `mbworker serve`: an open socket is not charged the
CPU of the plain requests around it (it used to be, until the watchdog killed the process under ordinary traffic),
and a close the function asks for goes on the wire as it can (a lone surrogate in the reason became a crash of the
relay and a misleading 1001). Also the upgrade path's plain answer to a client that stops reading."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from websockets.trio.client import connect

from mbworker.lib.http.types import ClientDisconnected
from mbworker.runtimes.api import SocketClosed
from mbworker.worker import function_sockets
from mbworker.worker.function_sockets import StreamResponder
from tests.daemon.fixtures import write_function
from tests.daemon.test_function_websocket_e2e import closed_with, ws_url
from tests.worker_process import RunningWorker

FUNCTION = r"""
Deno.serve((req) => {
  if (new URL(req.url).searchParams.has("burn")) {
    const t = Date.now();
    while (Date.now() - t < 100) {}
    return new Response("burned");
  }
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = (e) => {
    if (e.data === "surrogate") socket.close(4000, "bad \ud800 reason");
    else socket.send("echo " + e.data);
  };
  return response;
});
"""
# one process, a CPU limit the burning requests pass one by one but not all together
TOML = "[limits]\nmax_processes = 1\ncpu_time_ms = 1000\n"


async def test_an_open_socket_is_not_charged_the_cpu_of_the_requests_around_it(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(write_function(tmp_path, "sock", FUNCTION, toml=TOML), "--no-verify-jwt")
    async with connect(ws_url(worker, "/functions/v1/sock")) as ws:
        await ws.send("hi")
        with trio.fail_after(20):
            assert await ws.recv() == "echo hi"
        # 20 × 100 ms of CPU on the same process while the socket is open: twice the limit, none of it the socket's
        for _ in range(20):
            r = await http.get(f"{worker.public_url}/functions/v1/sock?burn")
            assert (r.status_code, r.text) == (200, "burned")
        await ws.send("still there")
        with trio.fail_after(20):
            assert await ws.recv() == "echo still there"

        # the function closes with a reason that is not UTF-8: the client gets it as Deno would send it
        await ws.send("surrogate")
        assert await closed_with(ws) == (4000, "bad \ufffd reason")


def test_a_close_from_a_function_is_one_the_wire_can_carry() -> None:
    assert SocketClosed.from_function(4000, "ok") == SocketClosed(4000, "ok")
    assert SocketClosed.from_function(1006, "x") == SocketClosed(1000, "x")  # never on the wire
    assert SocketClosed.from_function(1015, None) == SocketClosed(1000, "")
    assert SocketClosed.from_function("4000", "x").code == 1000
    long = SocketClosed.from_function(1000, "é" * 100)
    assert len(long.reason.encode()) <= 123
    assert long.reason == "é" * 61  # never half a character


async def test_a_plain_answer_to_an_upgrade_gives_up_on_a_client_that_stops_reading(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """The function answered the upgrade with a streaming Response and the client reads nothing: the write gives
    up after the write timeout (the function's slot is held meanwhile), as on any connection."""
    monkeypatch.setattr(function_sockets, "WRITE_TIMEOUT_S", 5.0)
    ours, _client = trio.testing.lockstep_stream_pair()  # nothing is taken unless the other side reads
    responder = StreamResponder(ours)
    with trio.fail_after(60), pytest.raises(ClientDisconnected, match="took nothing for 5 s"):
        await responder.start(200, [(b"content-type", b"text/plain")])
