"""Hostile or broken requests get a clear 4xx with the reason, reach no runtime, and leave no traceback.

One real `mbworker serve` (real Deno) per test; requests go out as raw bytes on a real socket where no client
library would send them.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.daemon.fixtures import write_function
from tests.faults._raw import exchange, gzip_bundle
from tests.runtimes import wasm_modules as wm
from tests.worker_process import RunningWorker

ECHO = """Deno.serve(async (req) => {
  const body = await req.text();
  console.log('echo ran', body.length);
  return Response.json({ headers: Object.fromEntries(req.headers), length: body.length });
});"""


def _port(worker: RunningWorker) -> int:
    return int(worker.public_url.rsplit(":", 1)[1])


def _no_traceback(worker: RunningWorker) -> None:
    assert not [line for line in worker.output if "Traceback" in line], "\n".join(worker.output[-40:])


async def test_request_framing_faults_answer_4xx_before_any_runtime(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(
        write_function(tmp_path, "echo", ECHO, toml="[limits]\nmax_request_bytes = 1000\n"), "--no-verify-jwt"
    )
    port = _port(worker)
    ok = await http.post(f"{worker.public_url}/functions/v1/echo", content=b"x" * 10)
    assert ok.status_code == 200
    assert ok.json()["length"] == 10

    # A chunked body past the function's limit: 413, as a declared length gets (and as Wasm answers).
    over = b"".join(b"200\r\n" + b"y" * 0x200 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    status, _, body = await exchange(
        port,
        b"POST /functions/v1/echo HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n" + over,
    )
    assert (status, json.loads(body)["code"]) == (413, "PAYLOAD_TOO_LARGE"), body

    # Malformed chunked framing (a chunk size that is not hex): 400.
    status, _, body = await exchange(
        port,
        b"POST /functions/v1/echo HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\nnope\r\n0\r\n\r\n",
    )
    assert status == 400, body

    # A Host header that is not a host: 400, and the function never runs.
    for host in (b"a b", b"evil/path", b"x@y", b"[::1", b"host:port:x"):
        status, _, body = await exchange(
            port, b"GET /functions/v1/echo HTTP/1.1\r\nhost: " + host + b"\r\nconnection: close\r\n\r\n"
        )
        assert (status, json.loads(body)["code"]) == (400, "BAD_REQUEST"), (host, body)
    ran = [line for line in worker.output if "echo ran" in line]
    assert len(ran) == 1, ran  # only the first, good request reached the function
    _no_traceback(worker)


async def test_forwarded_headers_from_an_untrusted_peer_are_replaced(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(write_function(tmp_path, "echo", ECHO), "--no-verify-jwt")
    r = await http.get(
        f"{worker.public_url}/functions/v1/echo",
        headers={"x-forwarded-for": "6.6.6.6", "x-forwarded-host": "evil.example", "x-forwarded-proto": "https"},
    )
    seen = r.json()["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == worker.public_url.removeprefix("http://")

    # Underscore spellings reach Deno as the names they are: nothing maps `_` to `-` on the way.
    status, _, body = await exchange(
        _port(worker),
        b"GET /functions/v1/echo HTTP/1.1\r\nhost: localhost\r\nx_forwarded_for: 6.6.6.6\r\n"
        b"x_forwarded_host: evil.example\r\nconnection: close\r\n\r\n",
    )
    seen = json.loads(body)["headers"]
    assert (status, seen["x-forwarded-for"], seen["x-forwarded-host"]) == (200, "127.0.0.1", "localhost"), seen
    assert (seen["x_forwarded_for"], seen["x_forwarded_host"]) == ("6.6.6.6", "evil.example")


async def test_underscore_headers_cannot_spoof_the_client_address_of_a_wasm_function(
    worker: RunningWorker, tmp_path: Path
) -> None:
    fn = tmp_path / "dump"
    fn.mkdir()
    (fn / "function.toml").write_text('runtime = "wasm"\nentrypoint = "dump.wat"\n')
    (fn / "dump.wat").write_text(wm.DUMP)
    await worker.deploy(fn, "--no-verify-jwt")
    status, _, body = await exchange(
        _port(worker),
        b"GET /functions/v1/dump HTTP/1.1\r\nhost: localhost\r\nX_Forwarded_For: 6.6.6.6\r\n"
        b"X_Real_IP: 6.6.6.6\r\nconnection: close\r\n\r\n",
    )
    env = dict(line[4:].split("=", 1) for line in body.decode().splitlines() if line.startswith("env:"))
    assert (status, env["REMOTE_ADDR"], env["HTTP_X_FORWARDED_FOR"]) == (201, "127.0.0.1", "127.0.0.1"), body
    assert "6.6.6.6" not in body.decode()


async def test_admin_and_bundle_faults_are_400_without_traceback(
    worker: RunningWorker, http: httpx.AsyncClient
) -> None:
    admin = {"authorization": f"Bearer {worker.admin_token}"}
    nested = b"[" * 30_000 + b"]" * 30_000  # within the admin API's body limit, past Python's recursion limit
    r = await http.post(f"{worker.admin_url}/admin/v1/functions/echo/rollback", headers=admin, content=nested)
    assert r.status_code == 400, r.text

    manifest = {"slug": "deep", "runtime": "deno", "entrypoint": "index.ts"}
    deep_manifest = json.dumps(manifest).encode()[:-1] + b', "x": ' + nested + b"}"
    long_name = "a" * 300 + ".ts"
    for members in (
        {"mbworker.json": deep_manifest, "index.ts": b"Deno.serve(() => new Response('x'))"},
        {"mbworker.json": json.dumps(manifest).encode(), "index.ts": b"", long_name: b"x"},
    ):
        r = await http.post(
            f"{worker.admin_url}/admin/v1/functions/deep/deploy",
            headers={**admin, "content-type": "application/gzip"},
            content=gzip_bundle(members),
        )
        assert r.status_code == 400, r.text
    _no_traceback(worker)
